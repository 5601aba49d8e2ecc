"""Fault injection at the process and disk level: a killed node, a full disk, a corrupt journal, a flood.

The node is killed, its disk fills, its journal is corrupt, a Gateway floods it. Each test states
what an operator relies on in that case (docs/reliability.md describes them, with the figures
these tests print under ``-s``).

Quick cases run by default; the long ones are marked ``slow`` (``tools/run-tests -m slow``). The
tmpfs cases need root to mount: skipped for other users, a failure as root (CI) when the mount is
refused. Everything talks over loopback (127.0.0.1, and 127.0.0.2 for the wrong-key peer).
There are no timed assertions here beyond generous bounds that say "it did not hang"; the one
margin asserted (a Gateway's throughput and longest wait for a token beside a flooding one) is a
functional guard, not a benchmark: the measured figures are in docs/reliability.md.

Run as a script, this module is the flooding Gateway: ``python tests/system/test_reliability.py flood
URL KEYHEX`` sends garbage and wrong-key handshakes until its stdin closes, then prints its counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from optimanode.client import ConnectionLost, NodeClient, RemoteError  # noqa: E402
from optimanode.config import load_settings  # noqa: E402
from optimanode.errors import JournalError, ModelNotRunning  # noqa: E402
from optimanode.gateway import keys, tls  # noqa: E402
from optimanode.node import Node  # noqa: E402
from optimanode.protocol import (  # noqa: E402
    CompletionRequest,
    Done,
    InferDone,
    ModelSettings,
    NodeStopped,
    SamplingParams,
    TokenChunk,
)

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


# -- a node in its own process, and a Gateway connection to it ----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """``python -m optimanode run`` on a models and state directory, with only the settings given."""

    def __init__(self, models: Path, state: Path, log: Path, *, enable_new: bool = False, **sets: Any) -> None:
        self.models, self.state, self.log = models, state, log
        self.port = free_port()
        base = {"listen.host": "127.0.0.1", "model_defaults.n_ctx": 512, "scan.hash_models": "false",
                "scan.interval_s": 3600, "restart.backoff_base_s": 0.2, "restart.backoff_cap_s": 1.0,
                "restart.heartbeat_interval_s": 0.5}
        base.update(sets)
        self.cmd = [sys.executable, "-m", "optimanode", "run", "--config", os.devnull, "--models-dir", str(models),
                    "--state-dir", str(state), "--port", str(self.port)]
        if enable_new:
            self.cmd.append("--enable-new")
        for k, v in base.items():
            self.cmd += ["--set", f"{k}={v}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTIMANODE_")}
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"))

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def credentials(self) -> tuple[bytes, str]:
        return keys.read_key(self.state / "access.key"), tls.fingerprint_file(self.state / "tls" / "cert.pem")

    async def connect(self, gateway_id: str = "test", timeout: float = 60.0) -> NodeClient:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the node exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                key, fp = self.credentials()
                return await NodeClient.connect(self.url, key, fingerprint=fp, gateway_id=gateway_id, open_timeout=10)
            except Exception:  # noqa: BLE001 - not up yet (no key file, no listener): try again
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


async def wait_state(client: NodeClient, eid: str, states: set[str], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        st = await client.status(eid)
        if st.state in states:
            return st
        assert time.monotonic() < deadline, f"{eid} is {st.state} ({st.reason}), not {states}"
        await asyncio.sleep(0.05)


async def by_name(client: NodeClient) -> dict[str, str]:
    return {Path(m.info.path).name: m.id for m in await client.models()}


async def stream_tok_s(client: NodeClient, eid: str, prompts: list[str], max_tokens: int) -> tuple[float, float]:
    """Completion tokens per second over these requests, one after another, and the longest wait
    for a chunk (from the request, then from the chunk before): what a stalled event loop shows."""
    tokens, t, gap = 0, time.perf_counter(), 0.0
    for prompt in prompts:
        last = time.perf_counter()
        async for msg in client.infer(eid, CompletionRequest(prompt=prompt, params=SamplingParams(
                temperature=0.0, max_tokens=max_tokens))):
            now = time.perf_counter()
            if isinstance(msg, TokenChunk):
                gap = max(gap, now - last)
                last = now
            if isinstance(msg, InferDone):
                tokens += msg.usage.completion_tokens
    return tokens / (time.perf_counter() - t), gap


@pytest.fixture
def two_models(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (d / name).symlink_to(smollm2_path)
    return d


@contextlib.contextmanager
def running(*nodes: NodeProcess):
    try:
        yield
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait(10)


# -- kill -9 the node under load ---------------------------------------------------------------


async def test_a_node_killed_under_load_comes_back_with_every_acknowledged_change(tmp_path, two_models):
    """SIGKILL while a Gateway streams and changes settings: the journal opens, holds every change
    the node acknowledged, and the enabled model is running again."""
    state = tmp_path / "state"
    first = NodeProcess(two_models, state, tmp_path / "node.log")
    with running(first):
        c = await first.connect()
        ids = await by_name(c)
        a, b = ids["a.gguf"], ids["b.gguf"]
        await c.enable(a)
        await wait_state(c, a, {"running"})
        worker = psutil.Process((await c.status(a)).pid)

        got_token = asyncio.Event()

        async def stream() -> str:
            try:
                async for msg in c.infer(a, CompletionRequest(prompt="1, 2, 3,", params=SamplingParams(
                        temperature=0, max_tokens=2000))):
                    if isinstance(msg, TokenChunk):
                        got_token.set()
                return "completed"
            except ConnectionLost:
                return "connection lost"

        acked: list[int] = []
        sent: list[int] = []

        async def configure_loop() -> None:
            with contextlib.suppress(ConnectionLost):
                for i in range(10_000):
                    sent.append(256 + i)
                    await c.configure(b, ModelSettings(n_ctx=256 + i, n_threads=1))
                    acked.append(256 + i)

        streaming = asyncio.ensure_future(stream())
        changing = asyncio.ensure_future(configure_loop())
        async with asyncio.timeout(60):
            await got_token.wait()
            while len(acked) < 20:
                await asyncio.sleep(0.005)
        first.kill9()  # mid-flight: a configure is (almost always) waiting for its answer
        async with asyncio.timeout(30):
            assert await streaming == "connection lost"
            await changing
        try:
            worker.wait(10)  # the worker dies with its node: nothing holds the model's memory
        except psutil.TimeoutExpired:
            worker.kill()
            raise AssertionError(f"worker {worker.pid} outlived its node by 10 s") from None
        await c.close()
    assert acked, "no change was acknowledged before the kill"

    t0 = time.perf_counter()
    second = NodeProcess(two_models, state, tmp_path / "node.log")
    with running(second):
        c = await second.connect()
        t_listen = time.perf_counter() - t0
        st_a = await wait_state(c, a, {"running"})
        print(f"node restart after kill -9: {len(acked)} acknowledged configure calls, "
              f"listening after {t_listen:.2f} s, model running after {time.perf_counter() - t0:.2f} s")
        assert st_a.enabled and st_a.pid != worker.pid
        st_b = await c.status(b)
        # The last change acknowledged is in force, or the one in flight if its commit beat the kill.
        assert acked[-1] <= st_b.settings.n_ctx <= sent[-1] and st_b.settings.n_threads == 1
        assert not st_b.enabled and st_b.state == "discovered"
        journaled = {e.data["settings"]["n_ctx"] for e in await c.events(b, limit=1000) if e.type == "desired"}
        assert set(acked) <= journaled, sorted(set(acked) - journaled)
        trail = [e.data["trigger"] for e in await c.events(a, limit=1000) if e.type == "transition"]
        assert trail == ["enable", "start", "ready", "recover", "start", "ready"], trail
        async for msg in c.infer(a, CompletionRequest(prompt="Hello", params=GREEDY)):
            last = msg
        assert isinstance(last, InferDone) and last.usage.completion_tokens > 0
        await c.close()
        assert second.stop() == 0, second.tail()


# -- a full disk under the journal -------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m"):
    """A real tmpfs of ``size`` mounted at ``path``, unmounted afterwards.

    Mounting needs root: a non-root run skips the case (saying so); as root (CI) a refused mount
    is a failure, so the case cannot quietly stop running there.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the page_cap case covers SQLITE_FULL without it")
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"running as root, but mount -t tmpfs failed: {out.stderr.strip()}"
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(path: Path) -> Path:
    """Write a file until the file system says it is full (ENOSPC)."""
    filler = path / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    return filler


async def top_off(node: Node) -> int:
    """Append small events until one fails: whatever SQLite had already allocated is now used too.

    (A commit that fits in pages SQLite already has, such as WAL space reused after a checkpoint,
    still succeeds on a full disk; the first one that needs a new page fails.)
    """
    assert node.journal is not None
    for i in range(20_000):
        try:
            await node.journal.append("node", NodeStopped(reason=""))
        except JournalError:
            return i
    raise AssertionError("the journal never filled up")


@pytest.mark.parametrize("disk", ["tmpfs", "page_cap"])
async def test_a_full_disk_refuses_desired_changes_and_the_running_model_keeps_serving(tmp_path, smollm2_path, disk):
    """A real full file system (an 8 MiB tmpfs; needs root) and SQLite's own page cap: a desired change
    whose append fails is refused with JournalError and not applied; the running model keeps serving;
    with space again it goes through, and the journal holds exactly the changes acknowledged."""
    from optimanode.gateway.server import GatewayServer

    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").symlink_to(smollm2_path)
    (models / "b.gguf").symlink_to(smollm2_path)
    state = tmp_path / "state"
    with small_disk(state) if disk == "tmpfs" else contextlib.nullcontext(False) as mounted:
        settings = load_settings(environ={}, overrides={
            "models_dir": str(models), "state_dir": str(state), "model_defaults.n_ctx": "512",
            "scan.hash_models": "false", "scan.interval_s": "3600", "listen.host": "127.0.0.1"})
        async with Node(settings) as node:
            ids = {Path(ex.info.path).name: eid for eid, ex in node.executors.items()}
            a, b = ids["a.gguf"], ids["b.gguf"]
            await node.enable(a)
            await node.wait_for_state(a, {"running"}, timeout=60)
            server = GatewayServer(node, settings, lambda: None, "full-disk-node", host="127.0.0.1", port=0)  # type: ignore[arg-type]
            await server.start()  # its key and certificate are written before the disk fills
            try:
                key = keys.read_key(settings.key_path)
                c = await NodeClient.connect(f"wss://127.0.0.1:{server.port}", key, fingerprint=server.fingerprint)
                if mounted:
                    filler = fill(state)
                else:
                    # SQLite's own cap on the file's pages stands in for the disk (the same SQLITE_FULL).
                    # (The journal's connection is private; a test may reach into it, the node never does.)
                    db = node.journal._db  # type: ignore[union-attr]
                    (pages,) = await (await db.execute("PRAGMA page_count")).fetchone()  # type: ignore[misc]
                    await db.execute(f"PRAGMA max_page_count = {pages}")
                t_top = time.perf_counter()
                topped = await top_off(node)
                print(f"top-off: {topped} appends in {time.perf_counter() - t_top:.2f} s (mounted={mounted})")

                # The desired change is not acknowledged: the call fails, and nothing changed.
                with pytest.raises(JournalError, match="disk is full") as info:
                    await node.enable(b)
                assert "journal append failed" in str(info.value)
                assert not node.status(b).enabled
                with pytest.raises(JournalError):
                    await node.configure(a, ModelSettings(n_ctx=256))
                assert node.status(a).settings.n_ctx is None
                # Over the Gateway link the same refusal arrives as an error naming the cause.
                with pytest.raises(RemoteError, match="disk is full") as remote:
                    await c.enable(b)
                assert remote.value.code == "internal", remote.value
                # The running model keeps serving (its request events cannot be journaled; that is logged).
                for _ in range(2):
                    async for msg in node.infer(a, CompletionRequest(prompt="The capital of France is", params=GREEDY)):
                        last = msg
                    assert isinstance(last, Done) and last.usage.completion_tokens > 0
                async for msg in c.infer(a, CompletionRequest(prompt="Hello", params=GREEDY)):
                    last = msg
                assert isinstance(last, InferDone)
                assert node.status(a).state == "running"

                # The worker dies while the disk is full: its crash cannot be journaled. Requests are
                # refused at once, saying why (no hang, no "running" model that never answers) ...
                pid = node.status(a).pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                async with asyncio.timeout(15):
                    while node.status(a).pid is not None:
                        await asyncio.sleep(0.02)
                with pytest.raises(ModelNotRunning, match="could not be journaled yet: .*disk is full"):
                    async for _ in node.infer(a, CompletionRequest(prompt="Hello", params=GREEDY)):
                        pass

                # Space again: the same change goes through, with no restart of the node, and the
                # crash is journaled and the model restarted.
                if mounted:
                    filler.unlink()
                else:
                    await db.execute("PRAGMA max_page_count = 1073741823")
                st = await c.enable(b)
                assert st.enabled
                t_space = time.perf_counter()
                async with asyncio.timeout(90):
                    while (st_a := node.status(a)).state != "running" or st_a.pid is None:
                        await asyncio.sleep(0.05)
                print(f"full disk ({disk}): model running again {time.perf_counter() - t_space:.2f} s after space "
                      "came back")
                assert st_a.pid != pid and st_a.restarts == 1 and st_a.recent_crashes == 1
                async for msg in c.infer(a, CompletionRequest(prompt="Hello", params=GREEDY)):
                    last = msg
                assert isinstance(last, InferDone) and last.usage.completion_tokens > 0
                await c.close()
            finally:
                await server.stop()
        # Every change the node acknowledged is on disk; the refused ones are not.
        db2 = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True)
        desired = [(s, json.loads(d)) for s, d in db2.execute(
            "SELECT stream, data FROM events WHERE type = 'desired' ORDER BY seq")]
        db2.close()
        assert [(s, d["enabled"]) for s, d in desired] == [(a, True), (b, True)], desired
        assert all("n_ctx" not in d.get("settings", {}) for _, d in desired)
        trail = [json.loads(d)["trigger"] for (d,) in db2_rows(state, a)]
        assert trail[:5] == ["enable", "start", "ready", "crash", "restart"], trail  # the crash once, late


async def test_a_node_stopped_while_its_journal_is_full_still_stops_its_workers(tmp_path, smollm2_path):
    """The stop of each worker cannot be journaled, and the workers are stopped all the same."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").symlink_to(smollm2_path)
    settings = load_settings(environ={}, overrides={
        "models_dir": str(models), "state_dir": str(tmp_path / "state"), "model_defaults.n_ctx": "512",
        "scan.hash_models": "false", "scan.interval_s": "3600"})
    node = Node(settings)
    await node.start()
    try:
        (a,) = node.executors
        await node.enable(a)
        await node.wait_for_state(a, {"running"}, timeout=60)
        worker = psutil.Process(node.status(a).pid)
        db = node.journal._db  # type: ignore[union-attr]
        (pages,) = await (await db.execute("PRAGMA page_count")).fetchone()  # type: ignore[misc]
        await db.execute(f"PRAGMA max_page_count = {pages}")
        await top_off(node)
    finally:
        async with asyncio.timeout(60):
            await node.stop()
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, worker


def db2_rows(state: Path, stream: str) -> list[tuple[str]]:
    db = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT data FROM events WHERE stream = ? AND type = 'transition' ORDER BY seq",
                          (stream,)).fetchall()
    finally:
        db.close()


# -- a corrupt journal -------------------------------------------------------------------------


def run_node_once(tmp_path: Path, state: Path, port: int | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "models").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTIMANODE_")}
    return subprocess.run([sys.executable, "-m", "optimanode", "run", "--config", os.devnull, "--models-dir",
                           str(tmp_path / "models"), "--state-dir", str(state), "--port", str(port or free_port()),
                           "--set", "listen.host=127.0.0.1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def refused_start(tmp_path: Path, state: Path) -> str:
    """Run the node on ``state``; it must exit with code 3 (not hang, not start); its last stderr line."""
    try:
        out = run_node_once(tmp_path, state)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the node neither exited nor failed within 60 s:\n{exc.stderr}") from None
    assert out.returncode == 3, out.stderr
    return out.stderr.strip().splitlines()[-1]


def test_a_path_the_node_cannot_use_at_start_is_one_line_and_exit_code_3(tmp_path):
    """An OSError at start (here a models_dir under a regular file; under systemd a key file the
    node may not create in a read-only /etc, a node.lock another user owns) was a traceback and
    exit 1: now one line naming the path, exit 3."""
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTIMANODE_")}
    out = subprocess.run([sys.executable, "-m", "optimanode", "run", "--config", os.devnull, "--models-dir",
                          str(tmp_path / "a-file" / "models"), "--state-dir", str(tmp_path / "state"),
                          "--port", str(free_port()), "--set", "listen.host=127.0.0.1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"optimanode: cannot start: {tmp_path / 'a-file' / 'models'}: Not a directory", last


def test_a_port_in_use_stops_the_node_with_one_line_and_exit_code_3(tmp_path):
    """Another program holds the Gateway port: one line naming the setting and the address, exit 3
    (not a traceback and exit 1), and the journal the node had opened is left consistent."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    state = tmp_path / "state"
    try:
        out = run_node_once(tmp_path, state, port)
    finally:
        holder.close()
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"optimanode: listen.host/listen.port: 127.0.0.1:{port}: expected an address"), last
    assert "in use" in last, last
    # The node had opened its journal before the listener failed; it was closed cleanly.
    import sqlite3

    db = sqlite3.connect(state / "journal.sqlite3")
    assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM events WHERE type = 'node_started'").fetchone()[0] == 1


def test_a_journal_that_is_not_a_database_stops_the_node_with_exit_code_3(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    journal = state / "journal.sqlite3"
    garbage = os.urandom(64 << 10)
    journal.write_bytes(garbage)
    last = refused_start(tmp_path, state)
    assert last == f"optimanode: journal open of {journal} failed: DatabaseError: file is not a database", last
    assert journal.read_bytes() == garbage  # the evidence is left as it was


def test_a_journal_with_a_damaged_page_stops_the_node_with_exit_code_3(tmp_path):
    state = tmp_path / "state"
    journal = state / "journal.sqlite3"

    async def build() -> None:
        from optimanode.journal import Journal

        j = await Journal.open(journal)
        await j.append_many([("node", NodeStopped(reason="x" * 200)) for _ in range(500)])
        await j.close()  # the WAL is checkpointed into the file

    asyncio.run(build())
    data = bytearray(journal.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    assert len(data) >= 6 * page
    # Page 5 is the root of the events_ts index (migrations/0001: schema_migrations, events and its
    # UNIQUE index, then events_ts): a b-tree page quick_check walks, scrambled.
    data[4 * page:5 * page] = os.urandom(page)
    journal.write_bytes(bytes(data))
    last = refused_start(tmp_path, state)
    assert last.startswith(f"optimanode: journal {journal}") or last.startswith(
        f"optimanode: journal open of {journal} failed"), last
    assert "corrupt" in last or "malformed" in last, last
    assert journal.read_bytes() == bytes(data)


def test_an_event_row_that_does_not_decode_stops_the_node_with_exit_code_3(tmp_path):
    """Damage SQLite's own checks cannot see (a cell's bytes changed inside a sound page, a hand
    edit) fails replay with a line naming the file and the event, not a traceback or a hang."""
    state = tmp_path / "state"
    journal = state / "journal.sqlite3"

    async def build() -> None:
        from optimanode.journal import Journal
        from optimanode.protocol import DesiredChanged, ModelInfo, Registered

        j = await Journal.open(journal)
        info = ModelInfo(path=str(tmp_path / "models" / "a.gguf"), files=[], size_bytes=1, mtime_ns=1)
        await j.append_many([("a-0000", Registered(info=info)), ("a-0000", DesiredChanged(enabled=True))])
        await j.close()

    asyncio.run(build())
    db = sqlite3.connect(journal)
    (seq,) = db.execute("SELECT seq FROM events WHERE type = 'desired'").fetchone()
    db.execute("UPDATE events SET data = '{\"type\":\"desired\",\"enab' WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    before = journal.read_bytes()
    last = refused_start(tmp_path, state)
    assert last == (f"optimanode: journal {journal} is corrupt: event seq {seq} cannot be read (DecodeError: "
                    "Input data was truncated); it was written by a newer node or damaged"), last
    assert journal.read_bytes() == before


def test_a_node_first_started_on_a_full_disk_exits_with_code_3_saying_so(tmp_path):
    """An empty state directory on a full disk: the node id cannot be written; one line, exit 3."""
    state = tmp_path / "state"
    with small_disk(state, "1m"):
        fill(state)
        last = refused_start(tmp_path, state)
        assert last == (f"optimanode: cannot write the node id to {state / 'node_id'}: "
                        "[Errno 28] No space left on device"), last
        assert not (state / "node_id").exists()  # no empty id left for the next start to adopt


async def test_a_node_restarted_on_a_full_disk_exits_with_code_3_saying_so(tmp_path):
    """A restart on a full state disk (the journal cannot make its WAL) is refused with a line that
    names the journal and the free space, not a bare "disk I/O error"."""
    state = tmp_path / "state"
    (tmp_path / "models").mkdir()
    with small_disk(state, "4m"):
        first = NodeProcess(tmp_path / "models", state, tmp_path / "node.log")
        with running(first):
            await (await first.connect()).close()  # node id, key, certificate and journal written
            assert first.stop() == 0, first.tail()  # a clean stop: the WAL and its index are gone
        before = (state / "journal.sqlite3").read_bytes()
        fill(state)
        last = refused_start(tmp_path, state)
        assert last.startswith(f"optimanode: journal open of {state / 'journal.sqlite3'} failed: "), last
        assert last.endswith("(the file system holding it has 0 bytes free)"), last
        assert (state / "journal.sqlite3").read_bytes() == before


# -- a Gateway flooding garbage and wrong-key handshakes ---------------------------------------


async def flood(url: str, key: bytes, stop: asyncio.Event) -> dict[str, int]:
    """Garbage frames on an authenticated session, and wrong-key handshakes, each as fast as answered."""
    import msgspec
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    from optimanode.client import LABEL_GATEWAY, LABEL_NODE, mac
    from optimanode.protocol import (
        Challenge,
        Error,
        Hello,
        Welcome,
        decode_from_node,
        encode_link,
    )

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    counts = {"garbage_frames": 0, "bad_request_answers": 0, "bad_handshakes": 0, "welcomed_with_wrong_key": 0}

    async def handshake(ws: Any, k: bytes, gid: str) -> Any:
        ch = decode_from_node(await ws.recv())
        assert isinstance(ch, Challenge)
        ng = os.urandom(32)
        await ws.send(encode_link(Hello(version=1, gateway_id=gid, nonce_g=ng,
                                        mac_g=mac(k, LABEL_GATEWAY, ch.nonce_n, ng, gid, ch.node_id, 1))))
        return ch, ng, decode_from_node(await ws.recv())

    ws = await connect(url, ssl=ctx, compression=None, proxy=None, open_timeout=10)
    ch, ng, welcome = await handshake(ws, key, "flooder")
    assert isinstance(welcome, Welcome) and welcome.mac_n == mac(key, LABEL_NODE, ch.nonce_n, ng, "flooder",
                                                                  ch.node_id, 1)

    async def garbage() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            await ws.send(os.urandom(64) if i % 2 else msgspec.msgpack.encode({"type": "infer", "id": f"x{i}"}))
            answer = decode_from_node(await asyncio.wait_for(ws.recv(), 30))
            counts["garbage_frames"] += 1
            counts["bad_request_answers"] += isinstance(answer, Error) and answer.code == "bad_request"

    async def wrong_key() -> None:
        wrong = os.urandom(32)
        while not stop.is_set():
            try:
                # From another loopback address: the lockout it earns does not shut out the garbage session.
                async with connect(url, ssl=ctx, compression=None, proxy=None, open_timeout=10,
                                   local_addr=("127.0.0.2", 0)) as c:
                    _, _, answer = await handshake(c, wrong, "intruder")
                    counts["welcomed_with_wrong_key"] += isinstance(answer, Welcome)
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError, AssertionError):
                pass
            counts["bad_handshakes"] += 1

    try:
        await asyncio.gather(garbage(), wrong_key())
    finally:
        with contextlib.suppress(Exception):
            await ws.close()
    return counts


def flood_main(url: str, keyhex: str) -> None:
    import threading

    # At the lowest priority: a flooding Gateway would run on a machine of its own, so its own CPU
    # must not be what slows the node's worker down here; the node's work answering it still counts.
    os.nice(19)

    async def go() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_eof() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=on_eof, daemon=True).start()
        return await flood(url, bytes.fromhex(keyhex), stop)

    print(json.dumps(asyncio.run(go())), flush=True)


@contextlib.asynccontextmanager
async def flooding(url: str, key: bytes) -> AsyncIterator[dict[str, int]]:
    """The flooder in a process of its own (a Gateway on another machine would not share our CPU budget either)."""
    counts: dict[str, int] = {}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "flood", url, key.hex(), cwd=REPO, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(1.0)  # under way
        yield counts
    finally:
        try:
            out, err = await asyncio.wait_for(proc.communicate(b""), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("the flooder did not stop within 60 s of its stdin closing") from None
    # The flooder must have run to the end: a node that closed its session would end it early.
    assert proc.returncode == 0 and out, f"the flooder failed ({proc.returncode}):\n{err.decode()[-2000:]}"
    counts.update(json.loads(out))


async def test_a_flooding_gateway_does_not_starve_a_good_one(tmp_path, smollm2_path):
    """Functional guard, not a benchmark. The stated margin: beside the flood the good Gateway keeps
    at least half its throughput alone (measured in the same test, round by round) and never waits
    more than 1 s for a token, the first included (alone: tens of ms), in at least one of two to five rounds.
    Throughput alone would miss a stalled event loop (tokens queue up in the pipe and arrive in a
    burst), hence the gap. docs/reliability.md has the measured figures."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").symlink_to(smollm2_path)
    # One decode thread, so the flood and the node have the other core, as they would have on any
    # machine with a core to spare.
    node = NodeProcess(models, tmp_path / "state", tmp_path / "node.log", enable_new=True,
                       **{"model_defaults.n_threads": 1})
    with running(node):
        good = await node.connect("good")
        (eid,) = (await by_name(good)).values()
        await wait_state(good, eid, {"running"})
        await stream_tok_s(good, eid, ["0. Hello"], 8)  # warm-up
        key, _ = node.credentials()
        rounds: list[tuple[float, float]] = []
        floods: list[dict[str, int]] = []

        def kept_up(ratio: float, gap: float) -> bool:
            return ratio >= 0.5 and gap < 1.0

        # Rounds of alone-then-flooded until one shows the good Gateway kept up: starvation fails
        # every round, while a neighbour's load on a shared machine only spoils some.
        for r in range(5):
            if len(rounds) >= 2 and any(kept_up(*x) for x in rounds):
                break
            alone, gap_alone = await stream_tok_s(
                good, eid, [f"{r}1. The history of Rome", f"{r}2. A recipe for bread:"], 48)
            async with flooding(node.url, key) as counts:
                flooded, gap = await stream_tok_s(good, eid, [f"{r}3. The history of Rome", f"{r}4. A recipe:"], 48)
            rounds.append((flooded / alone, gap))
            floods.append(counts)
            print(f"round {r}: good Gateway alone {alone:.1f} tok/s (longest gap {gap_alone * 1000:.0f} ms), beside "
                  f"the flood {flooded:.1f} tok/s (longest gap {gap * 1000:.0f} ms), ratio {flooded / alone:.2f}; "
                  f"flood: {counts}")
        assert any(kept_up(*x) for x in rounds), rounds
        for counts in floods:
            # The flood was real, every garbage frame was answered bad_request, and no wrong key got in.
            assert counts["garbage_frames"] > 20 and counts["bad_handshakes"] > 5, counts
            assert counts["bad_request_answers"] == counts["garbage_frames"], counts
            assert counts["welcomed_with_wrong_key"] == 0, counts
        assert not good.closed
        await good.close()
        assert node.stop() == 0, node.tail()
    log = node.log.read_text()
    # Operators see the wrong-key attempts and from where, and the lockout once per lockout (5
    # failures make one), not once per refused connection: a flood must not fill the log.
    refused = log.count("refused a Gateway from 127.0.0.2: unauthorized")
    locked = log.count("refused a Gateway connection from 127.0.0.2: locked out")
    assert refused >= 5 and 1 <= locked <= refused // 5, (refused, locked)
    print(f"node log: {refused} wrong-key refusals and {locked} lockout lines for "
          f"{sum(f['bad_handshakes'] for f in floods)} wrong-key attempts")


# -- long cases --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_kill_9_of_the_worker_under_8_streams_through_the_gateway(tmp_path, smollm2_path):
    """The worker (parallel 8) dies under 8 streams over the link: every stream ends with
    worker_crashed or a normal end, none hangs, and the model serves again."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").symlink_to(smollm2_path)
    node = NodeProcess(models, tmp_path / "state", tmp_path / "node.log", enable_new=True,
                       **{"model_defaults.parallel": 8, "model_defaults.n_ctx": 4096})
    with running(node):
        c = await node.connect()
        (eid,) = (await by_name(c)).values()
        st = await wait_state(c, eid, {"running"})
        started = asyncio.Event()

        async def one(i: int) -> str:
            try:
                async for msg in c.infer(eid, CompletionRequest(prompt=f"{i}. counting: 1, 2,", params=SamplingParams(
                        temperature=0, max_tokens=300))):
                    if isinstance(msg, TokenChunk):
                        started.set()
                return "done"
            except RemoteError as exc:
                return exc.code

        tasks = [asyncio.ensure_future(one(i)) for i in range(8)]
        async with asyncio.timeout(120):
            await started.wait()
        t_kill = time.perf_counter()
        os.kill(st.pid, signal.SIGKILL)
        async with asyncio.timeout(15):
            outcomes = await asyncio.gather(*tasks)
        t_told = time.perf_counter() - t_kill
        assert set(outcomes) <= {"done", "worker_crashed"} and "worker_crashed" in outcomes, outcomes
        # The requests hear of the crash first; the crash is journaled right after. Then the restart.
        async with asyncio.timeout(90):
            while (st2 := await c.status(eid)).state != "running" or st2.pid == st.pid:
                await asyncio.sleep(0.05)
        print(f"worker kill -9 under 8 streams: outcomes {sorted(outcomes)}; all 8 ended {t_told:.3f} s after "
              f"the signal; running again after {time.perf_counter() - t_kill:.2f} s")
        assert st2.restarts == 1 and st2.recent_crashes == 1
        async for msg in c.infer(eid, CompletionRequest(prompt="Again", params=GREEDY)):
            last = msg
        assert isinstance(last, InferDone) and last.usage.completion_tokens == 8
        await c.close()
        assert node.stop() == 0, node.tail()


@pytest.mark.slow
async def test_repeated_node_kills_leave_a_journal_whose_replay_matches_its_projection(tmp_path, two_models):
    """Three SIGKILLs at random points under enable/disable churn and a stream: each time the journal
    passes SQLite's integrity check and replaying the events gives exactly the stored projection."""
    import random

    from optimanode.journal import Journal

    state = tmp_path / "state"
    rng = random.Random(7)
    for life in range(3):
        node = NodeProcess(two_models, state, tmp_path / "node.log")
        with running(node):
            c = await node.connect()
            ids = await by_name(c)
            a, b = ids["a.gguf"], ids["b.gguf"]
            await c.enable(a)
            await wait_state(c, a, {"running"})

            async def churn(c: NodeClient = c, b: str = b) -> None:
                with contextlib.suppress(ConnectionLost, RemoteError):
                    while True:
                        await c.enable(b)
                        await asyncio.sleep(rng.random() * 0.3)
                        await c.disable(b)

            async def stream(c: NodeClient = c, a: str = a, life: int = life) -> None:
                with contextlib.suppress(ConnectionLost, RemoteError):
                    async for _ in c.infer(a, CompletionRequest(prompt=f"{life}. 1, 2,", params=SamplingParams(
                            temperature=0, max_tokens=1000))):
                        pass

            jobs = [asyncio.ensure_future(churn()), asyncio.ensure_future(stream())]
            await asyncio.sleep(1.0 + rng.random() * 3)
            node.kill9()
            async with asyncio.timeout(30):
                await asyncio.gather(*jobs)
            await c.close()
        db = sqlite3.connect(state / "journal.sqlite3")
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        db.close()
        j = await Journal.open(state / "journal.sqlite3")
        try:
            assert await j.replay() == j.views()
        finally:
            await j.close()
    last = NodeProcess(two_models, state, tmp_path / "node.log")
    with running(last):
        c = await last.connect()
        assert (await wait_state(c, a, {"running"})).enabled
        await c.close()
        assert last.stop() == 0, last.tail()


if __name__ == "__main__":
    if sys.argv[1:2] != ["flood"] or len(sys.argv) != 4:
        sys.exit("usage: python tests/system/test_reliability.py flood URL KEYHEX   (floods until stdin closes)")
    flood_main(sys.argv[2], sys.argv[3])
