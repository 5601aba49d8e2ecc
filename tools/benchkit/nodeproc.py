"""A real node in a subprocess of its own, reached as a Gateway reaches it (compare, lifecycle, soak).

How it works: ``NodeProc`` runs ``python -m optimanode run`` with ``--config /dev/null``, no
``OPTIMANODE_*`` variables and only the ``--set`` settings it is given, on a fresh (or given) state
directory whose models directory holds symlinks to the GGUF files. ``connect`` polls until the
node's access key and TLS certificate exist and a ``NodeClient`` handshake succeeds (TLS WebSocket,
pinned fingerprint); ``start`` then waits for the first model to be ``running``. ``stream`` times
one request chunk by chunk into a ``Stream``; ``close`` sends SIGTERM and waits (SIGKILL after
60 s). The node's stderr goes to ``TAG.log`` in the work directory (``tail`` shows its end). With
``root`` the node (and, through the inherited ``PYTHONPATH``, its workers) runs from another checkout
of this repository, e.g. an older commit, so ``compare --baseline-tree`` measures both in one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import ROOT, Stream, die_with_parent, free_port


class NodeProc:
    """A real node subprocess on a fresh (or given) state directory, and one Gateway connection to it."""

    name = "node"

    def __init__(self, model: str | Sequence[str], work: Path, *, sets: dict[str, Any], enable_new: bool = True,
                 state: Path | None = None, tag: str = "node", root: Path | None = None,
                 step_log: bool = False) -> None:
        self.work = work
        self.models = work / f"models-{tag}"
        self.models.mkdir(parents=True, exist_ok=True)
        for m in [model] if isinstance(model, str) else model:
            link = self.models / Path(m).name
            if not link.exists():
                link.symlink_to(m)
        self.state = state or work / f"state-{tag}"
        self.port = free_port()
        self.log_path = work / f"{tag}.log"
        # --config /dev/null and no OPTIMANODE_* variables: only the settings given here apply.
        cmd = [sys.executable, "-m", "optimanode", "run", "--config", os.devnull, "--models-dir", str(self.models),
               "--state-dir", str(self.state), "--port", str(self.port)]
        if enable_new:
            cmd.append("--enable-new")
        for k, v in {"listen.host": "127.0.0.1", **sets}.items():
            cmd += ["--set", f"{k}={v}"]
        self.cmd = cmd
        self.started_wall = time.time()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("OPTIMANODE_")}
        # ``step_log``: its workers log every decode step under this prefix (benchkit/steps.py).
        self.step_log = work / f"steps-{tag}" if step_log else None
        if self.step_log is not None:
            child_env["OPTIMANODE_WORKER_STEP_LOG"] = str(self.step_log)
        if root is not None:  # import optimanode from that checkout, not from this venv's editable install
            child_env["PYTHONPATH"] = str(root)
        self.proc = subprocess.Popen(cmd, cwd=root or ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=self.log_path.open("wb"),
                                     preexec_fn=die_with_parent)
        self.pid = self.proc.pid
        self.client: Any = None
        self.eid = ""

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def credentials(self) -> tuple[bytes, str]:
        from optimanode.gateway import keys, tls

        return keys.read_key(self.state / "access.key"), tls.fingerprint_file(self.state / "tls" / "cert.pem")

    async def connect(self, timeout: float = 120.0, gateway_id: str = "bench") -> Any:
        from optimanode.client import ConnectionFailed, NodeClient
        from optimanode.errors import OptimaNodeError

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                key, fp = self.credentials()
                self.client = await NodeClient.connect(self.url, key, fingerprint=fp, gateway_id=gateway_id,
                                                       open_timeout=10, call_timeout=60)
                self.connected_wall = time.time()
                return self.client
            except (OSError, ValueError, ConnectionFailed, OptimaNodeError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not connect to the node within {timeout} s:\n{self.tail()}") from None
                await asyncio.sleep(0.1)

    async def wait_state(self, eid: str, states: set[str], timeout: float = 300.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.client.status(eid)
            if st.state in states:
                return st
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {eid} is {st.state} ({st.reason}), not {states}, after {timeout} s")
            await asyncio.sleep(0.05)

    async def start(self, timeout: float = 300.0) -> NodeProc:
        """Connect and wait for the (only or first) model to run."""
        await self.connect()
        deadline = time.monotonic() + timeout
        while not self.eid:
            models = await self.client.models()
            if models:
                self.eid = sorted(models, key=lambda m: m.info.path)[0].id
            elif time.monotonic() > deadline:
                raise RuntimeError("the node registered no model")
            else:
                await asyncio.sleep(0.1)
        await self.wait_state(self.eid, {"running"}, timeout)
        return self

    async def worker_pid(self) -> int | None:
        return (await self.client.status(self.eid)).pid

    async def stream(self, prompt: str, max_tokens: int) -> Stream:
        from optimanode.protocol import CompletionRequest, InferDone, SamplingParams, TokenChunk

        req = CompletionRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
        stamps: list[float] = []
        done = None
        sent = time.perf_counter()
        async for msg in self.client.infer(self.eid, req):
            if isinstance(msg, TokenChunk):
                stamps.append(time.perf_counter())
            elif isinstance(msg, InferDone):
                done = msg
        assert done is not None
        return Stream(sent=sent, stamps=stamps, tokens=done.usage.completion_tokens, worker_ttft=done.timings.ttft_s)

    async def run(self, prompts: list[str], max_tokens: int, sequential: bool = False) -> list[Stream]:
        if sequential:
            return [await self.stream(p, max_tokens) for p in prompts]
        return list(await asyncio.gather(*(self.stream(p, max_tokens) for p in prompts)))

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def close(self) -> int | None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
