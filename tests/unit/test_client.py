"""The Gateway-side client (optimanode/client.py) against a scripted node end of the real link core, without a socket.

The test plays the node: it reads what ``NodeClient`` sends (decoded as the node decodes it) and
answers with frames of its choosing, so routing by id, streams, errors, cancellation, a dropped
connection and ``NodePool``'s choice are checked frame by frame. ``tests/unit/linkpair.py`` wires
the two ends; the real handshake and TLS are tested in tests/system/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import pytest

from optimanode.client import (
    ClientError,
    ConnectionLost,
    NodeClient,
    NodePool,
    NoNodeAvailable,
    RemoteError,
    _GatewayConnection,
)
from optimanode.link import Link, LinkProtocol
from optimanode.protocol import (
    CLOSE_BAD_FRAME,
    Ack,
    CancelInfer,
    CompletionRequest,
    CpuReport,
    Error,
    ExecutorMetrics,
    ExecutorStatus,
    GetModel,
    Infer,
    InferDone,
    ListModels,
    MemoryReport,
    Metrics,
    MetricsReport,
    ModelInfo,
    Models,
    ModelStatus,
    Subscribe,
    Timings,
    TokenChunk,
    Unsubscribe,
    Usage,
    decode_from_gateway,
    encode_link,
)
from unit.linkpair import MemoryTransport, open_pair, server_end

pytestmark = pytest.mark.timeout(60)

REQUEST = CompletionRequest(prompt="The capital of France is")
DONE = dict(usage=Usage(prompt_tokens=5, completion_tokens=2), timings=Timings(ttft_s=0.1, tokens_per_s=10.0,
                                                                               total_s=0.2))
STATUS = ExecutorStatus(id="m", state="running", enabled=True,
                        info=ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=1, mtime_ns=0))


@dataclass
class Node:
    """The node's end, scripted by the test."""

    end: LinkProtocol
    inbox: asyncio.Queue
    to_gateway: MemoryTransport

    def send(self, msg) -> None:
        assert self.end.send(encode_link(msg))

    async def recv(self, timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            return decode_from_gateway(await self.inbox.get())


async def connected(name: str = "n") -> tuple[NodeClient, Node]:
    end = server_end()
    inbox: asyncio.Queue = asyncio.Queue()
    end.on_message = end.on_text = inbox.put_nowait
    conn = _GatewayConnection(Link.client("ws://node.test/", ping_interval_s=None, ping_timeout_s=None), None)
    to_gateway, _ = await open_pair(end, conn)
    await asyncio.wait_for(conn.opened, 5)
    client = NodeClient(conn, url="ws://node.test/", node_id=name, gateway_id="gw", version=1,
                        max_frame_bytes=1 << 20, call_timeout=5.0)
    return client, Node(end, inbox, to_gateway)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[NodeClient, Node]]:
    client, node = await connected()
    yield client, node
    node.end.close(1000, "test over", timeout=2)
    async with asyncio.timeout(10):
        await client._conn.wait_closed()


# -- control calls --------------------------------------------------------------------------------


async def test_a_control_call_is_sent_with_a_fresh_id_and_returns_the_answer_with_that_id(pair) -> None:
    client, node = pair
    task = asyncio.create_task(client.models())
    call = await node.recv()
    assert isinstance(call, ListModels) and call.id.startswith("c")
    node.send(Models(id="someone-else", models=[]))  # not for this call: ignored
    node.send(Models(id=call.id, models=[STATUS]))
    assert await asyncio.wait_for(task, 5) == [STATUS]


async def test_an_error_answer_raises_remote_error_with_the_nodes_code_and_details(pair) -> None:
    client, node = pair
    task = asyncio.create_task(client.status("nope"))
    call = await node.recv()
    assert call == GetModel(id=call.id, model="nope")
    node.send(Error(id=call.id, code="unknown_model", message="no model 'nope'", details={"model": "nope"}))
    with pytest.raises(RemoteError) as exc:
        await asyncio.wait_for(task, 5)
    assert (exc.value.code, exc.value.message, exc.value.details) == ("unknown_model", "no model 'nope'",
                                                                       {"model": "nope"})


async def test_an_answer_of_the_wrong_kind_is_a_client_error_not_a_wrong_result(pair) -> None:
    client, node = pair
    task = asyncio.create_task(client.status("m"))
    call = await node.recv()
    node.send(Models(id=call.id, models=[]))
    with pytest.raises(Exception, match="unexpected answer to GetModel: Models"):
        await asyncio.wait_for(task, 5)


async def test_calls_answered_out_of_order_each_get_their_own_answer(pair) -> None:
    client, node = pair
    tasks = [asyncio.create_task(client.status(f"m{i}")) for i in range(3)]
    calls = [await node.recv() for _ in range(3)]
    for call in reversed(calls):
        node.send(ModelStatus(id=call.id, status=msgspec.structs.replace(STATUS, id=call.model)))
    assert [s.id for s in await asyncio.gather(*tasks)] == ["m0", "m1", "m2"]


# What a newer or buggy node may send: an InferDone with a finish reason this client does not know.
UNREADABLE_DONE = dict(type="done", finish_reason="tool_budget", usage={"prompt_tokens": 1, "completion_tokens": 1},
                       timings={"ttft_s": 0.1, "tokens_per_s": 1.0, "total_s": 0.1})


def unreadable(**fields) -> bytes:
    return msgspec.msgpack.encode({**UNREADABLE_DONE, **fields})


async def test_a_frame_the_client_cannot_read_ends_the_call_its_id_names_and_the_session_goes_on(pair) -> None:
    client, node = pair
    got: list = []

    async def run() -> None:
        async for msg in client.infer("m", REQUEST, request_id="r1"):
            got.append(msg)

    task = asyncio.create_task(run())
    await node.recv()
    node.send(TokenChunk(id="r1", text="Paris"))
    assert node.end.send(unreadable(id="r1"))
    # Ends at once (call_timeout plays no part in a stream: without this it waited for ever).
    with pytest.raises(ClientError, match=r"'done' frame for r1 .*cannot read.*tool_budget") as exc:
        await asyncio.wait_for(task, 5)
    assert not isinstance(exc.value, ConnectionLost)
    assert got == [TokenChunk(id="r1", text="Paris")]
    assert await node.recv() == CancelInfer(id="r1")  # in case the node still runs it (it ignores a finished id)
    assert not client.closed
    # The same connection serves the next call.
    second = asyncio.create_task(client.models())
    call = await node.recv()
    node.send(Models(id=call.id, models=[STATUS]))
    assert await asyncio.wait_for(second, 5) == [STATUS]


async def test_an_unreadable_answer_to_a_control_call_or_subscription_ends_it_at_once(pair) -> None:
    client, node = pair
    task = asyncio.create_task(client.models())
    call = await node.recv()
    assert node.end.send(msgspec.msgpack.encode({"type": "models", "id": call.id, "models": "not a list"}))
    with pytest.raises(ClientError, match=f"'models' frame for {call.id} .*cannot read"):
        await asyncio.wait_for(task, 2)  # not the call's own timeout (5 s)
    reports = client.metrics(1.0)
    first = asyncio.create_task(anext(reports))
    sub = await node.recv()
    assert isinstance(sub, Subscribe)
    assert node.end.send(msgspec.msgpack.encode({"type": "metrics", "id": sub.id, "report": 7}))
    with pytest.raises(ClientError, match="'metrics' frame .*cannot read"):
        await asyncio.wait_for(first, 2)
    await reports.aclose()
    assert isinstance(await node.recv(), Unsubscribe) and not client.closed


async def test_an_unreadable_frame_for_no_waiting_call_is_dropped_and_the_session_goes_on(pair) -> None:
    client, node = pair
    assert node.end.send(unreadable(id="long-gone"))
    assert node.end.send(msgspec.msgpack.encode({"type": "from_the_future", "id": "long-gone"}))
    task = asyncio.create_task(client.models())
    call = await node.recv()
    node.send(Models(id=call.id, models=[]))
    assert await asyncio.wait_for(task, 5) == [] and not client.closed


@pytest.mark.parametrize("frame", [
    b"\xc1 not a frame",
    msgspec.msgpack.encode(["not", "a", "map"]),
    unreadable(),
    unreadable(id=""),
    unreadable(id=7),
], ids=["not-msgpack", "not-a-map", "no-id", "empty-id", "int-id"])
async def test_an_unreadable_frame_without_an_id_fails_the_connection_and_ends_every_waiting_call(pair, frame) -> None:
    client, node = pair
    call = asyncio.create_task(client.models())
    stream = asyncio.create_task(anext(client.infer("m", REQUEST)))
    await node.recv()
    await node.recv()
    assert node.end.send(frame)
    for task in (call, stream):
        with pytest.raises(ConnectionLost, match="4400: unreadable frame from the node") as exc:
            await asyncio.wait_for(task, 5)
        assert exc.value.close_code == CLOSE_BAD_FRAME
    assert client.closed
    with pytest.raises(ConnectionLost):
        await client.models()  # and every later one, at once
    async with asyncio.timeout(10):
        await node.end.wait_closed()
    assert node.end.link.close_info()[0] == CLOSE_BAD_FRAME  # the node was told why


async def test_a_request_id_already_waiting_is_refused(pair) -> None:
    client, node = pair
    stream = client.infer("m", REQUEST, request_id="same")
    first = asyncio.create_task(anext(stream))
    await node.recv()
    with pytest.raises(ValueError, match="already in use"):
        await anext(client.infer("m", REQUEST, request_id="same"))
    first.cancel()


# -- inference ---------------------------------------------------------------------------------------


async def test_infer_yields_the_chunks_then_the_done_of_its_own_id(pair) -> None:
    client, node = pair
    got: list = []

    async def run(rid: str) -> None:
        async for msg in client.infer("m", REQUEST, request_id=rid):
            got.append((rid, msg))

    tasks = [asyncio.create_task(run("a")), asyncio.create_task(run("b"))]
    sent = {(await node.recv()).id, (await node.recv()).id}
    assert sent == {"a", "b"}
    node.send(TokenChunk(id="b", text="B1"))
    node.send(TokenChunk(id="a", text="A1"))
    node.send(InferDone(id="a", finish_reason="stop", **DONE))
    node.send(TokenChunk(id="b", text="B2", tokens=2))
    node.send(InferDone(id="b", finish_reason="length", **DONE))
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [m for r, m in got if r == "a"] == [TokenChunk(id="a", text="A1"), InferDone(id="a", finish_reason="stop",
                                                                                        **DONE)]
    assert [type(m).__name__ for r, m in got if r == "b"] == ["TokenChunk", "TokenChunk", "InferDone"]
    with pytest.raises(TimeoutError):
        await node.recv(timeout=0.3)  # finished streams send no CancelInfer


async def test_an_error_ends_the_stream_as_remote_error(pair) -> None:
    client, node = pair

    async def run() -> list:
        return [m async for m in client.infer("m", REQUEST)]

    task = asyncio.create_task(run())
    call = await node.recv()
    assert isinstance(call, Infer) and call.request == REQUEST and call.model == "m"
    node.send(TokenChunk(id=call.id, text="x"))
    node.send(Error(id=call.id, code="worker_crashed", message="worker 7 killed by SIGKILL", details={"signal": 9}))
    with pytest.raises(RemoteError) as exc:
        await asyncio.wait_for(task, 5)
    assert exc.value.code == "worker_crashed" and exc.value.details == {"signal": 9}


async def test_leaving_a_stream_early_sends_cancel_for_it(pair) -> None:
    client, node = pair
    stream = client.infer("m", REQUEST, request_id="r9")
    task = asyncio.create_task(anext(stream))
    await node.recv()
    node.send(TokenChunk(id="r9", text="x"))
    assert await asyncio.wait_for(task, 5) == TokenChunk(id="r9", text="x")
    await stream.aclose()
    assert await node.recv() == CancelInfer(id="r9")


async def test_a_dropped_connection_ends_every_waiting_call_with_connection_lost(pair) -> None:
    client, node = pair
    call = asyncio.create_task(client.models())
    stream = asyncio.create_task(anext(client.infer("m", REQUEST)))
    await node.recv()
    await node.recv()
    node.end.close(1001, "node shutting down")
    for task in (call, stream):
        with pytest.raises(ConnectionLost) as exc:
            await asyncio.wait_for(task, 5)
        assert (exc.value.close_code, exc.value.reason) == (1001, "node shutting down")
    assert client.closed
    with pytest.raises(ConnectionLost):
        await client.models()  # and every later one, at once


# -- metrics ------------------------------------------------------------------------------------------


def report(*executors: ExecutorMetrics, ts: float = 1.0) -> MetricsReport:
    return MetricsReport(ts=ts, cpu=CpuReport(percent=1.0, per_core=[1.0], cores_logical=1, cores_physical=1,
                                              load_1m=0.0, load_5m=0.0, load_15m=0.0),
                         memory=MemoryReport(total_bytes=1, available_bytes=1, used_bytes=0, swap_total_bytes=0,
                                             swap_used_bytes=0),
                         executors=list(executors))


def running(model: str = "m", free: int = 1, queue: int = 0) -> ExecutorMetrics:
    return ExecutorMetrics(id=model, state="running", free_slots=free, queue_depth=queue)


async def test_metrics_frames_keep_latest_metrics_fresh_and_the_iterator_unsubscribes_when_left(pair) -> None:
    client, node = pair
    seen: list[float] = []

    async def watch() -> None:
        async for r in client.metrics(interval=0.5):
            seen.append(r.ts)
            if len(seen) == 2:
                break

    task = asyncio.create_task(watch())
    sub = await node.recv()
    assert isinstance(sub, Subscribe) and sub.interval_s == 0.5
    node.send(Ack(id=sub.id))
    node.send(Metrics(id=sub.id, report=report(ts=1.0)))
    node.send(Metrics(id=sub.id, report=report(ts=2.0)))
    await asyncio.wait_for(task, 5)
    assert seen == [1.0, 2.0] and client.latest_metrics.ts == 2.0 and client.metrics_seq == 2
    assert isinstance(await node.recv(), Unsubscribe)
    assert (await client.wait_metrics(1.0)).ts == 2.0


async def test_waiting_for_metrics_on_a_closed_client_raises_at_once(pair) -> None:
    client, node = pair
    node.end.close(1000, "bye")
    async with asyncio.timeout(5):
        await client._conn.wait_closed()
    with pytest.raises(ConnectionLost) as exc:
        await client.wait_metrics(5.0)
    assert exc.value.close_code == 1000


async def test_a_connection_lost_while_waiting_for_metrics_ends_the_wait(pair) -> None:
    client, node = pair
    waiting = asyncio.create_task(client.wait_metrics(2.0))
    await asyncio.sleep(0.05)
    node.end.close(1000, "bye")
    with pytest.raises(ConnectionLost):
        await waiting


# -- the pool -------------------------------------------------------------------------------------------


async def test_the_pool_ranks_by_free_slots_then_queue_and_skips_nodes_not_running_the_model() -> None:
    pairs = [await connected(f"n{i}") for i in range(4)]
    clients = [c for c, _ in pairs]
    clients[0].latest_metrics = report(running(free=0, queue=3))
    clients[1].latest_metrics = report(running(free=1))
    clients[2].latest_metrics = report(running(model="other", free=8))
    clients[3].latest_metrics = None  # no report yet: last resort
    pool = NodePool(clients)
    assert [c.node_id for c in pool.ranked("m")] == ["n1", "n0", "n3"]
    # Requests sent since the last report count against a node's free slots: n1's one slot is
    # taken by the first, the second waits in n1's empty queue, the third goes to n0 (n1 is over).
    assert [pool.pick("m").node_id for _ in range(3)] == ["n1", "n1", "n0"]
    clients[1].metrics_seq += 1  # a new report from n1: what was sent before it is in it
    assert pool.ranked("m")[0].node_id == "n1"
    with pytest.raises(NoNodeAvailable):
        NodePool(clients[2:3]).pick("m")
    for c, node in pairs:
        node.end.close(1000, "")
    async with asyncio.timeout(10):
        for c in clients:
            await c._conn.wait_closed()
    assert pool.ranked("m") == []  # closed clients are skipped


async def test_the_pool_tries_the_next_node_when_one_refuses_before_the_first_frame() -> None:
    (busy, busy_node), (free, free_node) = await connected("busy"), await connected("free")
    busy.latest_metrics = report(running(free=4))
    free.latest_metrics = report(running(free=1))
    pool = NodePool([busy, free])

    async def run() -> list:
        return [m async for m in pool.infer("m", REQUEST)]

    task = asyncio.create_task(run())
    first = await busy_node.recv()
    busy_node.send(Error(id=first.id, code="overloaded", message="queue full"))
    second = await free_node.recv()
    free_node.send(TokenChunk(id=second.id, text="ok"))
    free_node.send(InferDone(id=second.id, finish_reason="stop", **DONE))
    assert [type(m).__name__ for m in await asyncio.wait_for(task, 5)] == ["TokenChunk", "InferDone"]
    await pool.close()



async def test_the_pool_lets_go_of_a_node_whose_stream_ends_unreadable() -> None:
    client, node = await connected()
    client.latest_metrics = report(running(free=1))
    pool = NodePool([client])

    async def run() -> list:
        return [m async for m in pool.infer("m", REQUEST)]

    task = asyncio.create_task(run())
    call = await node.recv()
    assert pool._pending(client) == 1
    node.send(TokenChunk(id=call.id, text="Paris"))
    assert node.end.send(unreadable(id=call.id))
    with pytest.raises(ClientError, match="cannot read"):
        await asyncio.wait_for(task, 5)
    assert pool._pending(client) == 0  # its slot is free again
    await pool.close()

# -- before connecting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "kw", "message"), [
    ("wss://node:8022", dict(key=bytes(31)), "32 bytes"),
    ("wss://node:8022", dict(), "needs the fingerprint"),
    ("ws://node:8022", dict(), "plaintext"),
    ("http://node:8022", dict(), "not a node URL"),
])
async def test_connect_refuses_bad_arguments_before_touching_the_network(url, kw, message) -> None:
    with pytest.raises(ValueError, match=message):
        await NodeClient.connect(url, kw.pop("key", bytes(32)), **kw)


async def test_a_peer_without_the_pinned_certificate_gets_not_one_byte() -> None:
    conn = _GatewayConnection(Link.client("wss://node.test/"), hashlib.sha256(b"the node's certificate").digest())
    transport = MemoryTransport(asyncio.get_running_loop())
    conn.connection_made(transport)  # no TLS object here: nothing to match the pin
    assert transport.written == [] and transport.is_closing() and conn.seen_pin == b""
    await asyncio.sleep(0.05)  # and nothing on a later loop turn either (the upgrade was never queued)
    assert transport.written == [] and conn.link.state.name == "CONNECTING"
