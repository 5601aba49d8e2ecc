"""Every request accounted for in the journal: requests cut while still queued by a worker's death get a start and an end, as the ones running do.

Real parts: the SmolLM2 model in a real worker process killed with SIGKILL, the real journal.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from optimanode.errors import WorkerCrashed
from optimanode.journal import Journal
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, SamplingParams
from system.test_node import collect, make_settings, only_id

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def models(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    return d


async def test_requests_cut_while_queued_by_a_worker_kill_are_journaled_like_the_running_one(tmp_path, models):
    settings = make_settings(tmp_path, **{"model_defaults.parallel": "1"})
    request = CompletionRequest(prompt="1, 2, 3,", params=SamplingParams(temperature=0, max_tokens=400))
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=120)
        pid = node.status(eid).pid
        first = node.infer(eid, request, request_id="running")
        await anext(first)
        streams = [asyncio.ensure_future(collect(first))] + [
            asyncio.ensure_future(collect(node.infer(eid, request, request_id=f"queued-{i}"))) for i in range(3)]
        async with asyncio.timeout(10):
            while node.status(eid).queue_depth < 3:
                await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(60):
            results = await asyncio.gather(*streams, return_exceptions=True)
        assert all(isinstance(r, WorkerCrashed) for r in results), results
    journal = await Journal.open(settings.journal_path)
    try:
        started = {e.body.request_id for e in await journal.read(stream=eid, types=["request_started"])}
        finished = {e.body.request_id: e.body.outcome
                    for e in await journal.read(stream=eid, types=["request_finished"])}
    finally:
        await journal.close()
    ids = {"running", "queued-0", "queued-1", "queued-2"}
    assert started == ids
    assert finished == dict.fromkeys(ids, "worker_crashed")
