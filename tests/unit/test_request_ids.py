"""A request id's life on the node without a process: the supervisor's tombstones, the drain's cut.

An id is the worker's until the worker answers it (Done or Failed). A request that ends for its
caller before that (its deadline, a drain's cut, its receiver raising, its caller gone) leaves a
tombstone on its ``WorkerProcess``; a reuse of the id waits behind it, so the worker never refuses
the reuse as "already running" and the new request never sees the old one's frames. The worker
stand-in is the one of tests/unit/test_supervisor.py: frames written to its stdin are decoded
here, frames it "writes" are fed to the ``_FrameReader``. The real race (a loaded SmolLM2 worker)
is in tests/system/test_request_ids.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from optimanode import protocol as p
from optimanode.errors import NodeFault, RequestError, ShuttingDown, WorkerCrashed
from optimanode.executors.supervisor import WorkerProcess, _FrameReader
from optimanode.inference import Inference, _Flight
from optimanode.protocol import CompletionRequest, SamplingParams
from unit.test_supervisor import Proc, worker  # noqa: F401  (the worker stand-in and its fixture)

OLD = CompletionRequest(prompt="Write a long story about a dragon.", params=SamplingParams(max_tokens=300))
NEW = CompletionRequest(prompt="The capital of France is", params=SamplingParams(max_tokens=4))
TIMINGS = p.Timings(ttft_s=0.1, tokens_per_s=10.0, total_s=0.2)


def done(rid: str, finish: str = "length", completion_tokens: int = 2) -> p.Done:
    return p.Done(id=rid, finish_reason=finish, usage=p.Usage(prompt_tokens=5, completion_tokens=completion_tokens),
                  timings=TIMINGS)


def feed(reader: _FrameReader, *msgs: object) -> None:
    reader.data_received(b"".join(p.frame(m) for m in msgs))


async def _until_sent(proc: Proc, n: int) -> None:
    async with asyncio.timeout(5):
        while len(proc.stdin.frames()) < n:
            await asyncio.sleep(0)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _aborted(w: WorkerProcess, reader: _FrameReader, proc: Proc, rid: str = "r") -> None:
    """``rid`` started, streamed a chunk, and was aborted (its deadline): the worker has not answered yet."""
    got: list[p.Chunk] = []
    task = asyncio.create_task(w.complete(rid, OLD, got.append))
    await _until_sent(proc, 1)
    feed(reader, p.Chunk(id=rid, text="Once"))
    w.abort(rid, RequestError("too late", code="deadline_exceeded"))
    with pytest.raises(RequestError) as exc:
        await asyncio.wait_for(task, 5)
    assert exc.value.code == "deadline_exceeded" and [c.text for c in got] == ["Once"]
    assert proc.stdin.frames() == [p.Generate(id=rid, request=OLD), p.Cancel(id=rid)]


async def test_a_reused_id_waits_for_the_workers_answer_to_the_old_request_and_gets_only_its_own_frames(worker):
    w, reader, proc = worker
    await _aborted(w, reader, proc)
    got: list[p.Chunk] = []
    reuse = asyncio.create_task(w.complete("r", NEW, got.append))
    await _settle()
    # The worker still holds "r" (it sees the Cancel at its next step): no Generate goes yet.
    assert not reuse.done() and proc.stdin.frames()[2:] == []
    # The old request's late frames, its Done(cancelled) last: none reaches the new caller.
    feed(reader, p.Chunk(id="r", text=" upon"), done("r", "cancelled", completion_tokens=2))
    await _until_sent(proc, 3)
    assert proc.stdin.frames()[2:] == [p.Generate(id="r", request=NEW)] and got == []
    feed(reader, p.Chunk(id="r", text=" Paris"), done("r", "stop", completion_tokens=1))
    d = await asyncio.wait_for(reuse, 5)
    assert d.finish_reason == "stop" and d.usage.completion_tokens == 1 and [c.text for c in got] == [" Paris"]
    assert w._tombs == {} and w.in_flight == 0 and proc.stdin.frames()[3:] == []  # ended normally: no Cancel


async def test_a_failed_answer_frees_the_id_too_and_an_answered_request_leaves_no_tombstone(worker):
    w, reader, proc = worker
    await _aborted(w, reader, proc)
    feed(reader, p.Failed(id="r", code="internal", message="boom"))  # the old request's answer
    assert w._tombs == {}
    reuse = asyncio.create_task(w.complete("r", NEW, lambda c: None))
    await _until_sent(proc, 3)
    feed(reader, done("r"))
    assert (await asyncio.wait_for(reuse, 5)).finish_reason == "length"
    # The worker's Done came after the abort but before its caller woke: the id is free, no tombstone.
    task = asyncio.create_task(w.complete("s", NEW, lambda c: None))
    await _until_sent(proc, 4)
    w.abort("s", RequestError("too late", code="deadline_exceeded"))
    feed(reader, done("s", "cancelled"))
    with pytest.raises(RequestError):
        await asyncio.wait_for(task, 5)
    assert w._tombs == {}


async def test_a_caller_that_goes_away_leaves_a_tombstone_until_the_worker_answers(worker):
    w, reader, proc = worker
    stream = w.generate("r", OLD)
    first = asyncio.create_task(anext(stream))
    await _until_sent(proc, 1)
    feed(reader, p.Chunk(id="r", text="x"))
    await asyncio.wait_for(first, 5)
    await stream.aclose()
    assert proc.stdin.frames()[-1] == p.Cancel(id="r") and set(w._tombs) == {"r"} and w.in_flight == 0
    feed(reader, done("r", "cancelled"))
    assert w._tombs == {}


async def test_a_request_waiting_behind_a_tombstone_can_be_aborted_or_cancelled(worker):
    w, reader, proc = worker
    await _aborted(w, reader, proc)
    # Aborted while it waits (its own deadline, a drain's cut): it ends at once and is never sent.
    waiting = asyncio.create_task(w.complete("r", NEW, lambda c: None))
    await _settle()
    w.abort("r", RequestError("too late again", code="deadline_exceeded"))
    with pytest.raises(RequestError, match="too late again"):
        await asyncio.wait_for(waiting, 5)
    assert proc.stdin.frames()[2:] == [] and set(w._tombs) == {"r"}
    # Cancelled while it waits (node.cancel, the node's drain): its Generate goes, then its Cancel.
    waiting = asyncio.create_task(w.complete("r", NEW, lambda c: None))
    await _settle()
    w.cancel("r")
    assert proc.stdin.frames()[2:] == []
    feed(reader, done("r", "cancelled"))  # the old request's answer
    await _until_sent(proc, 4)
    assert proc.stdin.frames()[2:] == [p.Generate(id="r", request=NEW), p.Cancel(id="r")]
    feed(reader, done("r", "cancelled", completion_tokens=0))
    assert (await asyncio.wait_for(waiting, 5)).finish_reason == "cancelled"
    assert w._tombs == {}


async def test_a_second_live_request_with_the_id_is_still_refused_while_one_waits(worker):
    w, reader, proc = worker
    await _aborted(w, reader, proc)
    waiting = asyncio.create_task(w.complete("r", NEW, lambda c: None))
    await _settle()
    with pytest.raises(NodeFault, match="already in flight"):
        await w.complete("r", NEW, lambda c: None)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert proc.stdin.frames()[2:] == [] and w.in_flight == 0 and set(w._tombs) == {"r"}


async def test_the_workers_end_releases_its_tombstones_and_their_waiters_fail_as_crashed(worker):
    w, reader, proc = worker
    await _aborted(w, reader, proc)
    waiting = asyncio.create_task(w.complete("r", NEW, lambda c: None))
    await _settle()
    w._fail_streams(WorkerCrashed("worker 4242 killed by SIGKILL"))  # what the exit does
    with pytest.raises(WorkerCrashed):
        await asyncio.wait_for(waiting, 5)
    assert w._tombs == {} and proc.stdin.frames()[2:] == []


# -- the node's drain deadline ---------------------------------------------------------------------


def _inference() -> Inference:
    runtime = SimpleNamespace(settings=SimpleNamespace(drain_deadline_s=30.0))
    return Inference(runtime, background=None)  # type: ignore[arg-type]


def test_a_natural_done_for_a_request_the_drain_cut_is_delivered_as_its_done():
    inference = _inference()
    inference._shut_out.add("r")
    flight = _Flight("r", ex=None, worker=None, traffic=None)  # type: ignore[arg-type]
    # Every token streamed, its Done in the same step as the cut: it finished, as its Done says.
    inference._finished(flight, done("r", "length"))
    assert flight.outcome == "length" and flight.done is not None
    cut = _Flight("r", ex=None, worker=None, traffic=None)  # type: ignore[arg-type]
    with pytest.raises(ShuttingDown, match="drain deadline"):
        inference._finished(cut, done("r", "cancelled"))
    assert cut.done is None
