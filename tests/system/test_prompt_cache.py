"""The prompt cache through a real node: settings reach the worker, counters come back on the heartbeat."""

from __future__ import annotations

import asyncio
import time

from system.test_node import GREEDY, collect, make_settings, models, only_id  # noqa: F401 (fixture)

from optimanode.node import Node
from optimanode.protocol import CompletionRequest

PROMPT = ("Question: Which of these is a fruit: a carrot, an apple or a potato? Think about it and "
          "answer in one word.\nAnswer:")


async def test_cached_tokens_and_the_cache_counters_reach_the_executor_status(tmp_path, models):
    async with Node(make_settings(tmp_path, **{"model_defaults.prompt_cache_mib": "16"})) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        assert node.status(eid).effective.prompt_cache_mib == 16
        req = CompletionRequest(prompt=PROMPT, params=GREEDY)
        _, first = await collect(node.infer(eid, req))
        # Another prompt takes the one slot (the first one's cells go to the host cache), then the
        # first prompt again is restored from it.
        await collect(node.infer(eid, CompletionRequest(prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, "
                                                               "15, 16, 17, 18, 19, 20,", params=GREEDY)))
        _, again = await collect(node.infer(eid, req))
        assert first.usage.cached_tokens == 0
        assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
        deadline = time.monotonic() + 10
        while True:  # the next heartbeat (every 0.5 s here) carries the counters
            cache = node.status(eid).prompt_cache
            if cache is not None and cache.hits >= 1:
                break
            assert time.monotonic() < deadline, cache
            await asyncio.sleep(0.1)
        assert cache.cap_bytes == 16 << 20 and cache.saves >= 1 and cache.entries >= 1
        assert 0 < cache.bytes <= cache.cap_bytes
        assert cache.tokens_served >= again.usage.cached_tokens
