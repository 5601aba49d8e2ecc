"""The prompt cache through a real node: settings reach the worker, counters come back on the heartbeat."""

from __future__ import annotations

import asyncio
import time

import psutil

from system.test_node import GREEDY, collect, make_settings, models, only_id  # noqa: F401 (fixture)

from optimanode import protocol as p
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


async def test_the_nodes_ram_floor_reaches_the_worker_which_empties_its_cache_and_keeps_it_empty(smollm2_path):
    """A real worker process: the floor rides on each heartbeat and on ``nudge``; the counters
    come back on the next Pong."""
    from optimanode.executors.supervisor import WorkerProcess

    floor = [0]

    async def on_exit(*_) -> None:
        pass

    worker = await WorkerProcess.spawn(
        "m", p.WorkerSettings(model_path=str(smollm2_path), n_ctx=1024, n_threads=2, prompt_cache_mib=16),
        on_exit, heartbeat_interval_s=0.25, keep_free_bytes=lambda: floor[0])

    async def run(prompt: str) -> None:
        async for _ in worker.generate(f"r{time.monotonic_ns()}", CompletionRequest(prompt=prompt, params=GREEDY)):
            pass

    async def report(ok) -> p.PromptCacheReport:
        async with asyncio.timeout(10):
            while True:
                cache = worker.progress.prompt_cache if worker.progress is not None else None
                if cache is not None and ok(cache):
                    return cache
                await asyncio.sleep(0.05)

    try:
        async with asyncio.timeout(120):
            await worker.ready
        await run(PROMPT)
        await run("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,")  # saves the first
        held = await report(lambda c: c.entries == 1)
        assert held.bytes > 0 and held.pressure_evictions == 0
        # A floor the machine cannot meet with the cache in it (as while a large model loads).
        floor[0] = psutil.virtual_memory().available + held.bytes + (1 << 30)
        worker.nudge()
        cache = await report(lambda c: c.entries == 0)
        assert cache.bytes == 0 and cache.pressure_evictions == 1 and cache.evictions == 0
        await run(PROMPT)  # would save the counting prompt's cells: refused under the floor
        cache = await report(lambda c: c.pressure_evictions == 2)
        assert cache.entries == 0 and cache.saves == held.saves
        floor[0] = 0  # lifted: the worker reads frames in order, so it has the new floor before the request
        worker.nudge()
        await run("Once upon a time, in a small village by the sea, there lived an old fisherman who")
        cache = await report(lambda c: c.saves == held.saves + 1)
        assert cache.entries == 1 and cache.pressure_evictions == 2
    finally:
        if worker.proc.returncode is None:
            worker.proc.kill()
            await worker.proc.wait()


async def test_the_runtimes_floor_is_the_reserve_and_admission_counts_what_the_cache_holds(tmp_path, models):
    async with Node(make_settings(tmp_path, memory_reserve_mb="300",
                                  **{"model_defaults.prompt_cache_mib": "16"})) as node:
        eid = only_id(node)
        runtime = node._p.runtime
        assert runtime.keep_free_bytes() == 300 << 20
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        assert runtime.keep_free_bytes() == 300 << 20  # nothing loading: the reserve alone
        ex = runtime.executors[eid]
        assert runtime.fact(ex).cache_bytes == 0
        await collect(node.infer(eid, CompletionRequest(prompt=PROMPT, params=GREEDY)))
        await collect(node.infer(eid, CompletionRequest(prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, "
                                                               "15, 16, 17, 18, 19, 20,", params=GREEDY)))
        deadline = time.monotonic() + 10
        while (cache := node.status(eid).prompt_cache) is None or cache.entries < 1:  # the next heartbeat
            assert time.monotonic() < deadline, cache
            await asyncio.sleep(0.1)
        # What the worker's cache holds is room for admission: it gives it back on request.
        assert 0 < runtime.fact(ex).cache_bytes <= 16 << 20


async def test_a_model_starting_sends_the_other_workers_the_new_floor_at_once(tmp_path, smollm2_path):
    models_dir = tmp_path / "two"
    models_dir.mkdir()
    for name in ("a", "b"):
        (models_dir / f"{name}.gguf").symlink_to(smollm2_path)
    async with Node(make_settings(tmp_path, models_dir=str(models_dir), memory_reserve_mb="300")) as node:
        runtime = node._p.runtime
        a, b = sorted(node.executors)
        await node.enable(a)
        await node.wait_for_state(a, {"running"}, timeout=60)
        worker_a = runtime.executors[a].worker
        floors: list[int] = []
        sent = worker_a.nudge
        worker_a.nudge = lambda: (floors.append(runtime.keep_free_bytes()), sent())  # type: ignore[method-assign]
        await node.enable(b)
        await node.wait_for_state(b, {"running"}, timeout=60)
        # Once, as b's worker was spawned: the reserve and b's estimate, which it has yet to allocate.
        est = runtime.executors[b].estimate
        assert est is not None and floors == [(300 << 20) + est.ram_bytes]
