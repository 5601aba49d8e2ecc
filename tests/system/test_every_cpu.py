"""Every CPU serves (issue 11), through processes: a warm-up SIGSEGV reported by the supervisor, safe mode in the node.

The kernel fault this guards against (ggml's AMX kernels on Sapphire Rapids) cannot be had on
every machine, so a fault injection stands in for it: ``OPTIMANODE_TEST_FAULT=warmup-segv`` makes
the worker's warm-up die of a real SIGSEGV unless it runs in safe mode, exactly the shape of that
fault. Everything else is real: the SmolLM2 model, worker processes, signals and the journal.
The warm-up itself, in process, is tested in tests/model/test_every_cpu.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optimanode import protocol as p
from optimanode.executors.supervisor import ExitInfo, WorkerProcess
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, ModelSettings, SamplingParams
from system.test_node import collect, make_settings, models, only_id  # noqa: F401 - models is a fixture

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------
# The worker's black box and faulthandler, through the supervisor


async def _spawn_and_wait(settings: p.WorkerSettings, monkeypatch: Any, fault: str | None,
                          then: Any = None) -> ExitInfo:
    if fault:
        monkeypatch.setenv("OPTIMANODE_TEST_FAULT", fault)
    else:
        monkeypatch.delenv("OPTIMANODE_TEST_FAULT", raising=False)
    exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()

    async def on_exit(_: WorkerProcess, info: ExitInfo) -> None:
        exited.set_result(info)

    worker = await WorkerProcess.spawn("m", settings, on_exit, heartbeat_interval_s=0.5)
    try:
        if then is not None:
            await then(worker)
        async with asyncio.timeout(120):
            return await exited
    finally:
        if worker.proc.returncode is None:
            worker.proc.kill()
            await worker.proc.wait()


async def test_a_segfault_in_the_warm_up_is_reported_with_its_phase_batch_and_stack(smollm2_path: Path,
                                                                                    monkeypatch: Any) -> None:
    info = await _spawn_and_wait(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_batch=128,
                                                  n_threads=2), monkeypatch, "warmup-segv")
    assert info.signal == signal.SIGSEGV and info.fatal_signal and not info.was_ready
    assert (info.phase, info.in_decode, info.batch_tokens) == ("warm-up", True, 128)
    assert "killed by SIGSEGV in llama_decode during warm-up of a 128-token batch" in info.describe()
    tail = "\n".join(info.stderr_tail)
    assert "Fatal Python error: Segmentation fault" in tail  # faulthandler
    assert "_warm_up" in tail  # the Python stack names where it died


async def test_safe_mode_is_not_hit_by_a_fault_that_spares_it(smollm2_path: Path, monkeypatch: Any) -> None:
    async def ask_and_stop(worker: WorkerProcess) -> None:
        ready = await worker.ready
        assert ready.safe_mode and ready.warmup_batch == 128
        await worker.stop(5.0)

    info = await _spawn_and_wait(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_batch=128,
                                                  n_threads=2, safe_mode=True), monkeypatch, "warmup-segv",
                                 then=ask_and_stop)
    assert info.exit_code == 0 and info.was_ready


async def test_a_crash_while_generating_names_the_request_in_the_step(smollm2_path: Path, monkeypatch: Any) -> None:
    async def crash_mid_stream(worker: WorkerProcess) -> None:
        await worker.ready
        request = CompletionRequest(prompt="Count from one to one hundred:",
                                    params=SamplingParams(temperature=0.0, max_tokens=400))
        stream = aiter(worker.generate("req-42", request))
        # The first chunk comes from the step that evaluated the prompt; the second from a
        # generation step: from then on every step the worker starts is one of generation.
        for _ in range(2):
            assert isinstance(await anext(stream), p.Chunk)
        os.kill(worker.pid, signal.SIGSEGV)  # what a kernel fault delivers
        with pytest.raises(Exception):
            async for _ in stream:
                pass

    info = await _spawn_and_wait(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=2),
                                 monkeypatch, None, then=crash_mid_stream)
    assert info.signal == signal.SIGSEGV and info.was_ready
    assert info.phase == "generation" and info.requests == ("req-42",) and info.batch_tokens == 1
    assert "during generation of a 1-token batch (request req-42)" in info.describe()


# ---------------------------------------------------------------------------------------------
# The node: safe mode within one restart, journaled and shown; failed with a reason when it does not help


def _inspect(tmp_path: Path, *args: str) -> str:
    return subprocess.run([sys.executable, str(REPO / "tools" / "inspect-journal"), "--state-dir",
                           str(tmp_path / "state"), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


async def test_a_segfault_in_the_warm_up_gives_running_in_safe_mode_within_one_restart(tmp_path: Path, models: Path,
                                                                                      monkeypatch: Any) -> None:
    monkeypatch.setenv("OPTIMANODE_TEST_FAULT", "warmup-segv")
    settings = make_settings(tmp_path, **{"model_defaults.n_batch": "64"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid, by="test")
        assert await node.wait_for_state(eid, {"running", "failed"}, timeout=120) == "running"
        status = node.status(eid)
        assert status.safe_mode and status.effective is not None and status.effective.safe_mode
        assert status.restarts == 1 and status.recent_crashes == 0  # a diagnosis, not a crash loop
        assert "SIGSEGV in llama_decode during warm-up of a 64-token batch" in status.safe_mode_reason
        text, done = await collect(node.infer(eid, CompletionRequest(prompt="The capital of France is",
                                                                     params=GREEDY)))
        assert done.usage.completion_tokens > 0 and text
        events = [e for e in await node.events(eid, limit=100) if e.type == "transition"]
        crash = next(e.body for e in events if e.body.trigger == "crash")
        assert crash.signal == signal.SIGSEGV and crash.safe_mode is True and crash.restart_in_s == 0.0
        assert (crash.phase, crash.batch_tokens) == ("warm-up", 64)
        assert any("Fatal Python error" in line for line in crash.stderr_tail)
        ready = [e.body for e in events if e.body.trigger == "ready"]
        assert ready[-1].safe_mode is True and "in safe mode" in ready[-1].reason
    crashes = _inspect(tmp_path, "crashes")
    assert "doing: warm-up, 64-token batch" in crashes and "SAFE MODE turned on" in crashes
    assert "SAFE MODE" in _inspect(tmp_path, "state")
    timeline = json.loads(_inspect(tmp_path, "--json", "timeline"))
    assert any(e["data"].get("safe_mode") is True for e in timeline["events"] if e["type"] == "transition")

    # A node restart keeps it: the next worker starts in safe mode straight away, no new crash.
    async with Node(settings) as node:
        eid = only_id(node)
        assert await node.wait_for_state(eid, {"running", "failed"}, timeout=120) == "running"
        assert node.status(eid).safe_mode and node.status(eid).restarts == 0


async def test_safe_mode_off_makes_the_same_fault_an_ordinary_crash(tmp_path: Path, models: Path,
                                                                    monkeypatch: Any) -> None:
    monkeypatch.setenv("OPTIMANODE_TEST_FAULT", "warmup-segv")
    async with Node(make_settings(tmp_path, **{"model_defaults.n_batch": "32", "restart.crash_budget": "2",
                                               "model_defaults.safe_mode": "off"})) as node:
        eid = only_id(node)
        await node.enable(eid, by="test")
        assert await node.wait_for_state(eid, {"failed"}, timeout=120) == "failed"
        assert not node.status(eid).safe_mode
        crashes = [e.body for e in await node.events(eid, limit=100)
                   if e.type == "transition" and e.body.trigger == "crash"]
        assert len(crashes) == 2 and all(c.safe_mode is None for c in crashes)
        assert "2 crashes within" in node.status(eid).reason


@pytest.mark.parametrize(("fault", "why"), [
    ("warmup-segv-always", "died of SIGSEGV while loading even in safe mode"),
    ("warmup-sigill-always", "this llama.cpp build uses instructions this CPU lacks: rebuild on this machine"),
])
async def test_a_safe_mode_worker_that_dies_too_ends_failed_with_a_reason_to_act_on(tmp_path: Path, models: Path,
                                                                                   monkeypatch: Any, fault: str,
                                                                                   why: str) -> None:
    monkeypatch.setenv("OPTIMANODE_TEST_FAULT", fault)
    async with Node(make_settings(tmp_path, **{"model_defaults.n_batch": "32"})) as node:
        eid = only_id(node)
        await node.enable(eid, by="test")
        assert await node.wait_for_state(eid, {"failed", "running"}, timeout=120) == "failed"
        status = node.status(eid)
        assert why in status.reason and status.restarts == 1
        triggers = [e.body.trigger for e in await node.events(eid, limit=100) if e.type == "transition"]
        assert triggers[-4:] == ["crash", "restart", "crash", "give_up"], triggers


async def test_safe_mode_can_be_forced_on_over_the_api_and_checked(tmp_path: Path, models: Path,
                                                                   monkeypatch: Any) -> None:
    monkeypatch.delenv("OPTIMANODE_TEST_FAULT", raising=False)
    async with Node(make_settings(tmp_path, **{"model_defaults.n_batch": "32"})) as node:
        eid = only_id(node)
        await node.enable(eid, by="test")
        assert await node.wait_for_state(eid, {"running"}, timeout=120) == "running"
        assert not node.status(eid).safe_mode
        first_pid = node.status(eid).pid
        await node.configure(eid, ModelSettings(safe_mode="on"), by="test")
        # The worker is replaced by a safe-mode one.
        for _ in range(600):
            s = node.status(eid)
            if s.state == "running" and s.pid not in (None, first_pid):
                break
            await asyncio.sleep(0.1)
        s = node.status(eid)
        assert s.state == "running" and s.safe_mode and s.safe_mode_reason == "safe_mode = on"
        with pytest.raises(Exception, match="safe_mode: expected one of auto, on, off"):
            await node.configure(eid, ModelSettings(safe_mode="maybe"), by="test")


# ---------------------------------------------------------------------------------------------
# On a CPU with AMX: the default build really serves (skipped elsewhere, saying why)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif("amx_tile" not in _cpu_flags(),
                    reason="this CPU has no AMX (amx_tile not in /proc/cpuinfo): the AMX kernel fault cannot happen here")
async def test_on_an_amx_cpu_the_quickstart_model_answers_a_30_token_prompt(tmp_path: Path, models: Path,
                                                                           monkeypatch: Any) -> None:
    monkeypatch.delenv("OPTIMANODE_TEST_FAULT", raising=False)
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid, by="test")
        assert await node.wait_for_state(eid, {"running", "failed"}, timeout=120) == "running"
        prompt = "Write one sentence about the sea. " * 4  # about 30 tokens
        text, done = await collect(node.infer(eid, CompletionRequest(prompt=prompt, params=GREEDY)))
        assert done.usage.prompt_tokens >= 30 and done.usage.completion_tokens > 0
        assert not node.status(eid).safe_mode  # the build itself is right, not rescued by safe mode
