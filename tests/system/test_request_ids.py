"""Request ids over a request's whole life, with the real SmolLM2 worker.

docs/protocol.md: "an id may be reused once its request has ended".
A request that ends on the node before its worker let go of its id (its deadline, a drain's cut)
leaves the id to the worker until the worker's own answer (the supervisor's tombstone): a reuse at
once waits for that answer instead of being refused, and gets only its own frames. Two in-process
requests with one id are refused at the check, queued or not. A consumer that stops at the Done
leaves the outcome the Done says. (tests/unit/test_request_ids.py: the same without a process.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from optimanode.errors import BadRequest, DeadlineExceeded
from optimanode.node import Node
from optimanode.protocol import Chunk, CompletionRequest, Done, SamplingParams

from system.test_node import make_settings, models, only_id  # noqa: F401 - models is a fixture

pytestmark = pytest.mark.timeout(240)

SHORT = CompletionRequest(prompt="The capital of France is", params=SamplingParams(temperature=0.0, max_tokens=8))


def long(max_tokens: int = 300, deadline_s: float | None = None) -> CompletionRequest:
    return CompletionRequest(prompt="Write a long story about a dragon who lived in a cave by the sea.",
                             params=SamplingParams(temperature=0.0, max_tokens=max_tokens, deadline_s=deadline_s))


async def finished(node: Node, eid: str, rid: str, n: int = 1) -> list[str]:
    """The outcomes of ``rid``'s first ``n`` journaled ends (journaled in the background: waited for)."""
    deadline = time.monotonic() + 15
    while True:
        outcomes = [e.body.outcome for e in await node.events(eid, limit=500)
                    if e.type == "request_finished" and e.body.request_id == rid]
        if len(outcomes) >= n or time.monotonic() > deadline:
            return outcomes
        await asyncio.sleep(0.05)


async def test_an_id_reused_at_once_after_its_deadline_passed_runs_with_only_its_own_frames(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        ref: list[Chunk] = []
        ref_done = await node.infer_to(eid, SHORT, ref.append, request_id="reference")
        for _ in range(2):
            with pytest.raises(DeadlineExceeded):
                await node.infer_to(eid, long(deadline_s=0.3), lambda c: None, request_id="r1")
            # At once: the worker still holds "r1" until it sees the Cancel at its next step.
            got: list[Chunk] = []
            done = await node.infer_to(eid, SHORT, got.append, request_id="r1")
            assert done.id == "r1" and done.finish_reason == ref_done.finish_reason
            assert "".join(c.text for c in got) == "".join(c.text for c in ref)
            assert (done.usage.prompt_tokens, done.usage.completion_tokens) == \
                (ref_done.usage.prompt_tokens, ref_done.usage.completion_tokens)
            assert done.usage.completion_tokens == sum(c.tokens for c in got)
        # The iterator's path too.
        with pytest.raises(DeadlineExceeded):
            await node.infer_to(eid, long(deadline_s=0.3), lambda c: None, request_id="r2")
        msgs = [m async for m in node.infer(eid, SHORT, request_id="r2")]
        assert isinstance(msgs[-1], Done) and msgs[-1].usage.prompt_tokens == ref_done.usage.prompt_tokens
        assert "".join(m.text for m in msgs[:-1]) == "".join(c.text for c in ref)
        assert await finished(node, eid, "r1", 4) == ["deadline_exceeded", ref_done.finish_reason] * 2
        assert node.busy() == 0


async def test_a_second_queued_request_with_the_same_id_is_refused_and_the_first_stays_cancellable(tmp_path, models):
    async with Node(make_settings(tmp_path, **{"model_defaults.parallel": "2"})) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        # Both slots taken: what comes next queues.
        running = [asyncio.create_task(node.infer_to(eid, long(), lambda c: None, request_id=f"busy{i}"))
                   for i in range(2)]
        async with asyncio.timeout(30):
            while node.status(eid).in_flight < 2:
                await asyncio.sleep(0.01)
        first = asyncio.create_task(node.infer_to(eid, long(), lambda c: None, request_id="x"))
        await asyncio.sleep(0.05)
        assert node.status(eid).queue_depth == 1
        with pytest.raises(BadRequest, match="already in flight"):
            async with asyncio.timeout(5):  # refused at once, not queued behind the first
                await node.infer_to(eid, SHORT, lambda c: None, request_id="x")
        assert node.status(eid).queue_depth == 1 and not first.done()
        for rid in ("busy0", "busy1"):
            assert node.cancel(rid)
        for t in running:
            assert (await asyncio.wait_for(t, 30)).finish_reason == "cancelled"
        # The first got a slot and is running: cancelling it by its id reaches it.
        async with asyncio.timeout(30):
            while not node.cancel("x"):
                await asyncio.sleep(0.01)
        done = await asyncio.wait_for(first, 30)
        assert done.finish_reason == "cancelled" and done.usage.completion_tokens < 300
        assert await finished(node, eid, "x") == ["cancelled"]
        assert node.busy() == 0


async def test_a_consumer_that_stops_at_the_done_leaves_the_outcome_the_done_says(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        done = None
        async with contextlib.aclosing(node.infer(eid, SHORT, request_id="c1")) as stream:
            async for msg in stream:
                if isinstance(msg, Done):
                    done = msg
                    break  # the stream is closed here, before the generator ran past its Done
        assert done is not None and done.finish_reason in {"stop", "length"}
        assert await finished(node, eid, "c1") == [done.finish_reason]
        stats = {s.labels["outcome"]: s.value for m in node._p.inference.stats.requests.collect()
                 for s in m.samples if s.name.endswith("_total")}
        assert stats == {done.finish_reason: 1.0}
