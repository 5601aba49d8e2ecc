"""Fault injection at the node: whatever breaks, every request ends (completion or a clear error) and the model returns."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from optimanode.errors import RequestError
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, Done, SamplingParams
from system.test_node import collect, make_settings, models, only_id  # noqa: F401 - models is a fixture

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("streams", [4])
async def test_kill_9_under_concurrent_streams_ends_every_request_and_the_model_returns(tmp_path, models, streams):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        params = SamplingParams(temperature=0, max_tokens=200)

        async def one(i: int) -> str:
            try:
                _, done = await collect(node.infer(eid, CompletionRequest(prompt=f"List {i}:", params=params)))
                assert isinstance(done, Done)
                return "done"
            except RequestError as exc:
                return exc.code

        tasks = [asyncio.ensure_future(one(i)) for i in range(streams)]
        async with asyncio.timeout(30):
            while node.status(eid).in_flight == 0:
                await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):  # none hangs
            outcomes = await asyncio.gather(*tasks)
        assert set(outcomes) <= {"done", "worker_crashed"}
        assert "worker_crashed" in outcomes
        await node.wait_for_state(eid, {"crashed", "restarting"}, timeout=10)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        _, done = await collect(node.infer(eid, CompletionRequest(prompt="Again", params=SamplingParams(
            temperature=0, max_tokens=8))))
        assert done.usage.completion_tokens == 8
