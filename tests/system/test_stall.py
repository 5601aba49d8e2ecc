"""A stuck decode is caught and a request's wall time is bounded: the stall watch and deadlines, with real workers.

A decode wedged inside llama.cpp (a GPU call that never returns, a spinning kernel) cannot be had
on demand, so a fault injection stands in for it: ``OPTIMANODE_TEST_FAULT=decode-hang:FILE`` makes
the first worker started while FILE exists block its decode thread for good after N serving steps
(N read from the file), right after its black box recorded the step as "in llama_decode". Its
reader thread goes on answering heartbeats, as it does while llama.cpp is wedged. Everything else
is real: SmolLM2, worker processes, SIGKILL, the journal.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from optimanode import protocol as p
from optimanode.errors import DeadlineExceeded, RequestError, WorkerCrashed
from optimanode.executors.supervisor import ExitInfo, WorkerProcess
from optimanode.node import Node
from optimanode.protocol import Chunk, CompletionRequest, Done, ModelSettings, SamplingParams
from system.test_node import make_settings, models  # noqa: F401  (models: the fixture)

pytestmark = pytest.mark.timeout(300)

# A prompt SmolLM2 continues for hundreds of tokens (it counts on), so no stream ends by itself
# before the fault or the deadline.
COUNTING = "1, 2, 3, 4, 5,"
# The tests' stall timeout: short, but far above a real step here even on a machine loaded several
# times over (a step that did take this long would be a stall by definition, and fail the test).
STALL_S = 5.0


def _settings(tmp_path: Path, **overrides: str) -> Any:
    # test_node's settings, with heartbeats 4 times a second so progress is seen soon after a stall.
    return make_settings(tmp_path, **{"restart.heartbeat_interval_s": "0.25", **overrides})


def _hang_after(tmp_path: Path, monkeypatch: Any, steps: int) -> Path:
    flag = tmp_path / "hang-once"
    flag.write_text(str(steps))
    monkeypatch.setenv("OPTIMANODE_TEST_FAULT", f"decode-hang:{flag}")
    return flag


# When each stream sent its request, got its last chunk and ended (time.monotonic), for the
# figures printed with -s (docs/reliability.md); nothing is asserted on them.
_times: dict[str, tuple[float, float, float]] = {}


async def _stream(node: Node, eid: str, rid: str, params: SamplingParams) -> tuple[int, Done | RequestError]:
    """(chunks received, how the stream ended: its Done or its error)."""
    chunks = 0
    sent = last = time.monotonic()
    try:
        async for msg in node.infer(eid, CompletionRequest(prompt=COUNTING, params=params), request_id=rid):
            if isinstance(msg, Chunk):
                chunks += 1
                last = time.monotonic()
            else:
                _times[rid] = (sent, last, time.monotonic())
                return chunks, msg
    except RequestError as exc:
        _times[rid] = (sent, last, time.monotonic())
        return chunks, exc
    raise AssertionError("a stream ended without a Done or an error")


async def _crash_event(node: Node, eid: str) -> p.Transition:
    for _ in range(600):  # bounded: 60 s
        for e in await node.events(eid, limit=100):
            if e.type == "transition" and e.body.trigger == "crash":
                return e.body
        await asyncio.sleep(0.1)
    raise AssertionError("no crash journaled")


async def _started(node: Node) -> str:
    (eid,) = node.executors
    await node.enable(eid, by="test")
    assert await node.wait_for_state(eid, {"running", "failed"}, timeout=120) == "running"
    return eid


# ---------------------------------------------------------------------------------------------
# The stall watch


async def test_a_blocked_decode_thread_shows_in_the_heartbeat_and_the_worker_is_killed_as_stalled(
        smollm2_path: Path, tmp_path: Path, monkeypatch: Any) -> None:
    flag = _hang_after(tmp_path, monkeypatch, 4)
    exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()

    async def on_exit(_: WorkerProcess, info: ExitInfo) -> None:
        exited.set_result(info)

    worker = await WorkerProcess.spawn("m", p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=2),
                                       on_exit, heartbeat_interval_s=0.25, stall_timeout_s=STALL_S)
    reports: list[p.Pong] = []

    async def watch() -> None:
        while True:
            if worker.progress is not None and (not reports or reports[-1] is not worker.progress):
                reports.append(worker.progress)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(120):
            await worker.ready
        assert not flag.exists()  # this worker took the fault
        chunks = 0
        with pytest.raises(WorkerCrashed) as crashed:
            async with asyncio.timeout(60):
                async for msg in worker.generate("req-1", CompletionRequest(
                        prompt=COUNTING, params=SamplingParams(temperature=0.0, max_tokens=400))):
                    chunks += 1
        async with asyncio.timeout(30):
            info = await exited
    finally:
        watcher.cancel()
        if worker.proc.returncode is None:
            worker.proc.kill()
            await worker.proc.wait()
    # Four steps served (the prompt, then generation), then nothing: the stream had its tokens.
    assert chunks >= 1
    # The reader thread answered throughout: the heartbeats said "1 pending, no step for a while".
    stuck = [r for r in reports if r.pending == 1 and r.steps == 4 and r.since_step_s > 1.0]
    assert stuck, reports
    assert crashed.value.code == "worker_crashed" and crashed.value.details["cause"] == "stalled"
    assert crashed.value.message.startswith("stalled: no decode step for ")
    # Killed by the stall watch, not by the heartbeat timeout, and the crash names the step.
    assert info.stalled and info.signal == signal.SIGKILL and info.was_ready
    assert (info.phase, info.in_decode, info.batch_tokens, info.requests) == ("generation", True, 1, ("req-1",))
    assert info.describe().startswith("stalled: no decode step for ")
    assert "in llama_decode during generation of a 1-token batch (request req-1)" in info.describe()
    assert any("the decode thread blocks at step 5" in line for line in info.stderr_tail), info.stderr_tail


async def test_a_stalled_model_ends_its_streams_crashes_as_stalled_and_serves_again(
        tmp_path: Path, models: Path, monkeypatch: Any) -> None:
    # Request b's prompt is evaluated in step 2 (one prompt per step on the CPU), or a few steps
    # later if it arrives late: by step 10 both stream.
    _hang_after(tmp_path, monkeypatch, 10)
    settings = _settings(tmp_path, **{"model_defaults.parallel": "2", "model_defaults.stall_timeout_s": str(STALL_S)})
    async with Node(settings) as node:
        eid = await _started(node)
        first_pid = node.status(eid).pid
        params = SamplingParams(temperature=0.0, max_tokens=400)
        async with asyncio.timeout(90):
            ends = await asyncio.gather(_stream(node, eid, "a", params), _stream(node, eid, "b", params))
        for chunks, end in ends:
            # Each stream had tokens, then one clear terminal error, naming the stall.
            assert chunks >= 1
            assert isinstance(end, WorkerCrashed) and end.details["cause"] == "stalled", end
            assert end.message.startswith("stalled: no decode step for ")
        # The streams ended as the kill was sent; the crash is journaled once the process is reaped.
        crash = await _crash_event(node, eid)
        assert await node.wait_for_state(eid, {"running", "failed"}, timeout=120) == "running"
        back = time.monotonic()
        last_chunk, ended = max(_times[r][1] for r in "ab"), max(_times[r][2] for r in "ab")
        print(f"\n[figures] stall_timeout_s {STALL_S:g}, heartbeat 0.25 s: last chunk -> streams ended "
              f"{ended - last_chunk:.2f} s; streams ended -> running again {back - ended:.2f} s")
        status = node.status(eid)
        assert status.restarts == 1 and status.pid != first_pid
        assert crash.reason.startswith("stalled: no decode step for ") and "no heartbeat" not in crash.reason
        assert f"(stall_timeout_s {STALL_S:g}; 10 steps before)" in crash.reason
        assert crash.signal == signal.SIGKILL and crash.phase == "generation"
        assert set(crash.requests) == {"a", "b"} and (crash.batch_tokens, crash.batch_seqs) == (2, 2)
        assert "in llama_decode during generation of a 2-token batch of 2 sequences" in crash.reason
        # The replacement (no fault: the first worker took it) serves.
        chunks, end = await _stream(node, eid, "c", SamplingParams(temperature=0.0, max_tokens=8))
        assert isinstance(end, Done) and end.finish_reason == "length" and chunks >= 1


# ---------------------------------------------------------------------------------------------
# Deadlines


async def _journaled_outcome(node: Node, eid: str, rid: str) -> str:
    for _ in range(100):  # the request's end is journaled in the background
        for e in await node.events(eid, limit=1000):
            if e.type == "request_finished" and e.body.request_id == rid:
                return e.body.outcome
        await asyncio.sleep(0.05)
    raise AssertionError(f"no request_finished for {rid}")


async def test_a_request_deadline_ends_a_long_generation_and_one_waiting_in_the_queue(
        tmp_path: Path, models: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPTIMANODE_TEST_FAULT", raising=False)
    async with Node(_settings(tmp_path, **{"model_defaults.n_ctx": "2048"})) as node:
        eid = await _started(node)
        pid = node.status(eid).pid
        # Running: 2000 tokens asked for (tens of seconds here), 2 s allowed (time for the first
        # tokens even on a loaded machine).
        chunks, end = await _stream(node, eid, "long", SamplingParams(temperature=0.0, max_tokens=2000,
                                                                      deadline_s=2.0))
        assert isinstance(end, DeadlineExceeded), end
        # deadline_ms: it ended while streaming (in the queue it would name the queue instead).
        assert end.code == "deadline_exceeded" and end.details["deadline_ms"] == 2000 and chunks >= 1
        sent, _, ended = _times["long"]
        print(f"\n[figures] deadline 2 s while streaming: ended {ended - sent:.3f} s after it was sent, "
              f"{chunks} chunks")
        assert await _journaled_outcome(node, eid, "long") == "deadline_exceeded"

        # Queued: the only slot is busy with a request without a deadline.
        busy = asyncio.create_task(_stream(node, eid, "busy", SamplingParams(temperature=0.0, max_tokens=2000)))
        while node.status(eid).in_flight == 0:
            await asyncio.sleep(0.02)
        queued_chunks, queued = await _stream(node, eid, "queued", SamplingParams(max_tokens=8, deadline_s=0.3))
        assert isinstance(queued, DeadlineExceeded) and queued_chunks == 0
        assert "while it waited" in queued.message
        sent, _, ended = _times["queued"]
        print(f"[figures] deadline 0.3 s in the queue: ended {ended - sent:.3f} s after it was sent")
        assert not busy.done()  # the running request goes on, untouched
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy
        # The worker is the same one and serves the next request.
        chunks, end = await _stream(node, eid, "after", SamplingParams(temperature=0.0, max_tokens=8))
        assert isinstance(end, Done) and node.status(eid).pid == pid


async def test_a_models_deadline_caps_every_request_and_changing_it_restarts_nothing(
        tmp_path: Path, models: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPTIMANODE_TEST_FAULT", raising=False)
    async with Node(_settings(tmp_path, **{"model_defaults.n_ctx": "2048"})) as node:
        eid = await _started(node)
        pid = node.status(eid).pid
        # (configure wakes the reconcile loop at once: a worker this made stale would be replaced.)
        await node.configure(eid, ModelSettings(deadline_s=0.5, stall_timeout_s=30.0), by="test")
        for rid, own in (("none", None), ("longer", 100.0)):
            _, end = await _stream(node, eid, rid, SamplingParams(temperature=0.0, max_tokens=2000, deadline_s=own))
            # No deadline of its own, or a longer one: the model's 0.5 s applies.
            assert isinstance(end, DeadlineExceeded) and end.details["deadline_ms"] == 500, end
        await node.configure(eid, ModelSettings(), by="test")
        _, end = await _stream(node, eid, "free", SamplingParams(temperature=0.0, max_tokens=8))
        assert isinstance(end, Done)
        assert node.status(eid).pid == pid and node.status(eid).restarts == 0  # one worker throughout


async def test_a_deadline_ends_a_stream_on_time_even_while_its_decode_is_stuck(
        tmp_path: Path, models: Path, monkeypatch: Any) -> None:
    _hang_after(tmp_path, monkeypatch, 3)
    # A stall timeout far off: only the deadline can end this stream.
    async with Node(_settings(tmp_path, **{"model_defaults.stall_timeout_s": "600"})) as node:
        eid = await _started(node)
        # (3 s: the three steps before the hang have time to stream, however loaded the machine.)
        chunks, end = await _stream(node, eid, "stuck", SamplingParams(temperature=0.0, max_tokens=400,
                                                                       deadline_s=3.0))
        assert isinstance(end, DeadlineExceeded), end
        assert end.details["deadline_ms"] == 3000 and chunks >= 1
        assert node.status(eid).state == "running"  # the stall watch has not acted (yet)
