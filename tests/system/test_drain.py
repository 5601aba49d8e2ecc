"""Operator changes that drop nothing: a worker replaced or disabled drains, SIGTERM refuses the queue at once, SIGHUP replaces models one at a time.

Real parts: the SmolLM2 model in real worker processes, the real journal, real signals delivered
to this process (the service runs in the test's loop, as in test_service.py). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

from optimanode import client_cli
from optimanode.client import NodeClient, RemoteError
from optimanode.errors import Cancelled, ModelNotRunning, ShuttingDown
from optimanode.gateway import keys
from optimanode.gateway.server import GatewayServer
from optimanode.journal import Journal
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, ModelSettings, SamplingParams, TokenChunk
from system.test_gateway import NODE_ID, fake_sampler
from system.test_gateway import collect as gateway_collect
from system.test_node import collect, make_settings, only_id
import gguf_files
from system.test_service import NotifySocket, notifier_for, serving

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def models(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    return d


@pytest.fixture
def notify():
    ns = NotifySocket()
    yield ns
    ns.close()


def counting(n: int) -> CompletionRequest:
    """A prompt the model continues for all of ``n`` tokens (greedy), so a stream's length is known."""
    return CompletionRequest(prompt="1, 2, 3,", params=SamplingParams(temperature=0, max_tokens=n))


async def running(node: Node, eid: str) -> int:
    await node.wait_for_state(eid, {"running"}, timeout=120)
    return node.status(eid).pid


async def left_running(node: Node, eid: str) -> None:
    """Until the reconciler has acted on a change (the model is no longer ``running``); bounded."""
    async with asyncio.timeout(30):
        while node.status(eid).state == "running":
            await asyncio.sleep(0.01)


async def timed(coro) -> tuple[object, float]:
    """The coroutine's result (or the error it raised) and the monotonic time it ended."""
    try:
        result: object = await coro
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = exc
    return result, time.monotonic()


async def journaled(tmp_path: Path, eid: str) -> list:
    """The model's events, read once the node has stopped (request ends are journaled in the background)."""
    journal = await Journal.open(tmp_path / "state" / "journal.sqlite3")
    try:
        return await journal.read(stream=eid)
    finally:
        await journal.close()


def bodies(events, type_: str) -> list:
    return [e.body for e in events if e.type == type_]


async def test_a_configure_during_four_streams_lets_all_four_finish_and_the_next_request_runs_on_the_new_worker(
        tmp_path, models):
    settings = make_settings(tmp_path, **{"model_defaults.parallel": "4"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        old_pid = await running(node, eid)
        streams = [node.infer(eid, counting(64), request_id=f"s{i}") for i in range(4)]
        for s in streams:
            await anext(s)  # each is on the old worker, decoding
        rest = [asyncio.ensure_future(timed(collect(s))) for s in streams]
        configured_at = time.monotonic()
        await node.configure(eid, ModelSettings(n_ctx=384), by="test")
        await left_running(node, eid)
        # Sent while the old worker drains: it waits for the new worker instead of being refused.
        nxt = asyncio.ensure_future(timed(collect(node.infer(eid, counting(8), request_id="next"))))
        async with asyncio.timeout(180):
            timed_results = await asyncio.gather(*rest)
            (_, next_done), next_at = await nxt
        results = [r for r, _ in timed_results]
        print(f"\nconfigure during 4 streams: the 4 ended {max(t for _, t in timed_results) - configured_at:.2f} s "
              f"after the configure, the next request {next_at - configured_at:.2f} s after it (on the new worker)")
        for _, done in results:
            assert done.finish_reason == "length" and done.usage.completion_tokens == 64
        assert next_done.finish_reason == "length" and next_done.usage.completion_tokens == 8
        st = node.status(eid)
        assert st.state == "running" and st.pid != old_pid and st.effective.n_ctx == 384
    events = await journaled(tmp_path, eid)
    (started,) = bodies(events, "drain_started")
    (ended,) = bodies(events, "drain_ended")
    assert (started.pid, started.running, started.replacing) == (old_pid, 4, True)
    assert (ended.pid, ended.finished, ended.cut) == (old_pid, 4, 0)
    print(f"drain: {ended.duration_s:.2f} s, {ended.finished} finished, {ended.cut} cut")
    outcomes = {b.request_id: b.outcome for b in bodies(events, "request_finished")}
    assert outcomes == {"s0": "length", "s1": "length", "s2": "length", "s3": "length", "next": "length"}
    # The next request started only after the new worker was ready: it ran there.
    (drained,) = [e.seq for e in events if e.type == "drain_ended"]
    (new_ready,) = [e.seq for e in events if e.type == "transition" and e.body.trigger == "ready"
                    and e.body.pid == st.pid]
    (next_started,) = [e.seq for e in events if e.type == "request_started" and e.body.request_id == "next"]
    assert drained < new_ready < next_started


async def test_a_model_file_replaced_on_disk_drains_its_worker_and_the_stream_finishes(tmp_path, models, smollm2_path):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        old_pid = await running(node, eid)
        stream = node.infer(eid, counting(128), request_id="during-replace")
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        # Same name, new file (a real copy, as an operator's `cp new.gguf` then `mv` makes it).
        link = models / "smollm2.gguf"
        link.unlink()
        gguf_files.copy(smollm2_path, link)
        old = time.time() - 60
        os.utime(link, (old, old))  # settled: not a file still being copied
        await node.rescan()
        async with asyncio.timeout(120):
            _, done = await rest
        assert done.finish_reason == "length" and done.usage.completion_tokens == 128
        assert await running(node, eid) != old_pid
    events = await journaled(tmp_path, eid)
    (started,) = bodies(events, "drain_started")
    (ended,) = bodies(events, "drain_ended")
    assert (started.running, started.replacing, ended.finished, ended.cut) == (1, True, 1, 0)


async def test_a_stream_past_drain_timeout_is_cut_with_its_own_reason_and_the_model_comes_back(tmp_path, models):
    settings = make_settings(tmp_path, **{"drain_timeout_s": "0.5"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        old_pid = await running(node, eid)
        stream = node.infer(eid, counting(400), request_id="long")
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        await node.configure(eid, ModelSettings(n_ctx=384))
        with pytest.raises(Cancelled) as info:
            async with asyncio.timeout(60):
                await rest
        # Not the Gateway's own cancel (that is a Done with finish_reason "cancelled"): an error
        # whose details say the node cut it, and why.
        assert info.value.code == "cancelled"
        assert info.value.details == {"reason": "drain_timeout", "executor": eid}
        assert "drain_timeout_s" in info.value.message
        new_pid = await running(node, eid)
        assert new_pid != old_pid
    events = await journaled(tmp_path, eid)
    (ended,) = bodies(events, "drain_ended")
    assert (ended.finished, ended.cut, ended.cut_requests) == (0, 1, ["long"])
    assert [b.outcome for b in bodies(events, "request_finished")] == ["cancelled"]


async def test_disable_lets_the_running_stream_finish_and_refuses_the_queued_one_at_once(tmp_path, models):
    settings = make_settings(tmp_path, **{"model_defaults.parallel": "1"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        pid = await running(node, eid)
        stream = node.infer(eid, counting(120), request_id="running")
        await anext(stream)
        first = asyncio.ensure_future(timed(collect(stream)))
        queued = asyncio.ensure_future(timed(collect(node.infer(eid, counting(4), request_id="queued"))))
        async with asyncio.timeout(10):
            while node.status(eid).queue_depth < 1:
                await asyncio.sleep(0.01)
        await node.disable(eid, by="test")
        async with asyncio.timeout(120):
            (refused, refused_at), ((_, done), done_at) = await asyncio.gather(queued, first)
        # No worker will come for the queued request: told at once, not after the running one.
        assert isinstance(refused, ModelNotRunning) and refused.details["state"] == "stopping"
        assert refused_at < done_at
        assert done.finish_reason == "length" and done.usage.completion_tokens == 120
        await node.wait_for_state(eid, {"discovered"}, timeout=30)
        with pytest.raises(ModelNotRunning):
            await anext(node.infer(eid, counting(2)))
    events = await journaled(tmp_path, eid)
    (started,) = bodies(events, "drain_started")
    (ended,) = bodies(events, "drain_ended")
    assert (started.pid, started.running, started.queued, started.refused, started.replacing) == (pid, 1, 0, 1, False)
    assert (ended.finished, ended.cut) == (1, 0)


async def test_disable_now_cuts_the_running_stream_at_once_with_reason_disabled(tmp_path, models):
    # A drain_timeout_s no test waits out: only `now` can end this stream early.
    settings = make_settings(tmp_path, **{"drain_timeout_s": "600"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        await running(node, eid)
        stream = node.infer(eid, counting(400), request_id="long")
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        await node.disable(eid, by="test", now=True)
        with pytest.raises(Cancelled) as info:
            async with asyncio.timeout(60):
                await rest
        assert info.value.details == {"reason": "disabled", "executor": eid}
        await node.wait_for_state(eid, {"discovered"}, timeout=30)
    events = await journaled(tmp_path, eid)
    (started,) = bodies(events, "drain_started")
    (ended,) = bodies(events, "drain_ended")
    assert started.timeout_s == 0.0 and (ended.finished, ended.cut, ended.cut_requests) == (0, 1, ["long"])


async def test_disable_now_during_a_drain_cuts_it_short(tmp_path, models):
    settings = make_settings(tmp_path, **{"drain_timeout_s": "600"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        await running(node, eid)
        stream = node.infer(eid, counting(400), request_id="long")
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        await node.disable(eid, by="test")
        await left_running(node, eid)
        assert not rest.done()  # draining: it may run for up to 600 s
        await node.disable(eid, by="test", now=True)
        with pytest.raises(Cancelled) as info:
            async with asyncio.timeout(60):
                await rest
        assert info.value.details["reason"] == "disabled"
        await node.wait_for_state(eid, {"discovered"}, timeout=30)
    (ended,) = bodies(await journaled(tmp_path, eid), "drain_ended")
    assert (ended.finished, ended.cut) == (0, 1)


async def test_sigterm_refuses_queued_requests_at_once_while_the_running_one_finishes(tmp_path, models, notify):
    settings = make_settings(tmp_path, **{"scan.enable_new": "true", "drain_deadline_s": "150",
                                          "model_defaults.parallel": "1"})
    async with serving(settings, notifier_for(notify)) as (service, task):
        node = service.node
        eid = only_id(node)
        await running(node, eid)
        stream = node.infer(eid, counting(120), request_id="running")
        await anext(stream)
        first = asyncio.ensure_future(timed(collect(stream)))
        queued = [asyncio.ensure_future(timed(collect(node.infer(eid, counting(4), request_id=f"q{i}"))))
                  for i in range(3)]
        async with asyncio.timeout(10):
            while node.status(eid).queue_depth < 3:
                await asyncio.sleep(0.01)
        signalled_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(180):
            refusals = await asyncio.gather(*queued)
            (_, done), done_at = await first
            assert await task == 0
    print(f"\nSIGTERM: 3 queued requests refused {max(at for _, at in refusals) - signalled_at:.3f} s after it, "
          f"the running one finished {done_at - signalled_at:.2f} s after it")
    # Each queued request was refused before the running one ended (a Gateway can move it now).
    for exc, at in refusals:
        assert isinstance(exc, ShuttingDown) and "still queued" in exc.message
        assert at < done_at
    assert done.finish_reason == "length" and done.usage.completion_tokens == 120


async def test_sighup_with_new_model_defaults_replaces_the_models_one_at_a_time(tmp_path, smollm2_path, notify):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        (models / f"{name}.gguf").symlink_to(smollm2_path)
    settings = make_settings(tmp_path, **{"scan.enable_new": "true"})
    reloaded = msgspec.structs.replace(settings, model_defaults=msgspec.structs.replace(settings.model_defaults,
                                                                                       n_ctx=384))
    async with serving(settings, notifier_for(notify), load_settings=lambda: reloaded) as (service, task):
        node = service.node
        eids = sorted(node.executors)
        old = {eid: await running(node, eid) for eid in eids}
        mark = (await node.events(limit=1))[-1].seq
        hup_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(240):
            # A new worker each (the effective settings read 384 as soon as the reload is in, while
            # the second model's old worker still runs: waiting on them alone raced under load).
            while not all(node.status(e).state == "running" and node.status(e).pid not in (None, old[e])
                          and node.status(e).effective.n_ctx == 384 for e in eids):
                await asyncio.sleep(0.1)
        print(f"\nSIGHUP: both models replaced, one after the other, in {time.monotonic() - hup_at:.2f} s")
        assert all(node.status(e).pid != old[e] for e in eids)
        events = await node.events(limit=1000)
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await task == 0
    # One at a time: the second model's worker was stopped only after the first one's new worker was ready.
    trail = [(e.stream, e.body.trigger) for e in events
             if e.seq > mark and e.type == "transition" and e.body.trigger in ("stop", "ready")]
    first, second = trail[0][0], trail[2][0]
    assert trail == [(first, "stop"), (first, "ready"), (second, "stop"), (second, "ready")], trail
    assert {first, second} == set(eids)
    assert len([e for e in events if e.seq > mark and e.type == "drain_ended"]) == 2


async def test_over_the_gateway_link_a_cut_stream_ends_with_error_cancelled_naming_its_reason(tmp_path, models):
    """The terminal frames a Gateway sees (docs/protocol.md, "How a stream ends")."""
    settings = make_settings(tmp_path, **{"drain_timeout_s": "0.5"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        await running(node, eid)
        server = GatewayServer(node, settings, fake_sampler(node, NODE_ID), NODE_ID, host="127.0.0.1", port=0)
        await server.start()
        try:
            c = await NodeClient.connect(f"wss://127.0.0.1:{server.port}", keys.read_key(settings.key_path),
                                         fingerprint=server.fingerprint, gateway_id="gw-drain", open_timeout=10)
            try:
                for change, reason in (("configure", "drain_timeout"), ("disable_now", "disabled")):
                    stream = c.infer(eid, counting(400), request_id=change)
                    assert isinstance(await anext(stream), TokenChunk)
                    rest = asyncio.ensure_future(gateway_collect(stream))
                    if change == "configure":
                        await c.configure(eid, ModelSettings(n_ctx=384))
                    else:  # through the command line, as an operator would
                        argv = ["--url", f"wss://127.0.0.1:{server.port}", "--key-file", str(settings.key_path),
                                "--fingerprint", server.fingerprint, "disable", eid, "--now"]
                        assert await asyncio.to_thread(client_cli.main, argv) == 0
                    with pytest.raises(RemoteError) as info:
                        await rest
                    assert info.value.code == "cancelled"
                    assert info.value.details == {"reason": reason, "executor": eid}
                    await node.wait_for_state(eid, {"running" if change == "configure" else "discovered"}, 120)
            finally:
                await c.close()
        finally:
            await server.stop()
