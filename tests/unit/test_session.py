"""The node's Gateway session (gateway/session.py) on the link core, no socket: refusals, control, metrics, flow.

The session runs on a real ``Node`` (a real journal, a models directory holding one tiny written
model that is never enabled, so no worker starts) and is reached through a Gateway-side link end
(``optimanode.link``) wired to the node's by ``tests/unit/linkpair.py``. Inference itself, which
needs a running model, is tested in tests/system/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

import gguf_files
from optimanode.config import load_settings
from optimanode.gateway.session import Session, error_frame
from optimanode.errors import ContextOverflow, RequestError
from optimanode.link import Link, LinkProtocol
from optimanode.metrics import Sampler
from optimanode.node import Node
from optimanode.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_SLOW,
    Ack,
    CancelInfer,
    CompletionRequest,
    Configure,
    DesiredChanged,
    Error,
    Events,
    GetModel,
    Hello,
    Infer,
    ListModels,
    Metrics,
    Models,
    ModelSettings,
    ModelStatus,
    ReadEvents,
    Subscribe,
    Unsubscribe,
    decode_from_node,
    encode_link,
)
from optimanode.testing import FakeNvml
from unit.linkpair import MemoryTransport, open_pair, server_end

pytestmark = pytest.mark.timeout(60)


@dataclass
class Env:
    node: Node
    session: Session
    gateway: LinkProtocol
    inbox: asyncio.Queue
    to_gateway: MemoryTransport  # what the node writes
    eid: str

    def send(self, msg) -> None:
        assert self.gateway.send(encode_link(msg))

    def send_raw(self, data: bytes) -> None:
        assert self.gateway.send(data)

    def send_text(self, text: str) -> None:
        self.gateway.link.protocol.send_text(text.encode())
        self.gateway.flush()

    async def recv(self, timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            data = await self.inbox.get()
        return decode_from_node(data)

    async def call(self, msg):
        self.send(msg)
        return await self.recv()


def settings_for(root: Path):
    return load_settings(environ={}, overrides={
        "models_dir": str(root / "models"), "state_dir": str(root / "state"), "scan.hash_models": "false",
        "scan.interval_s": "3600"})


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    models = tmp_path / "models"
    models.mkdir()
    path = gguf_files.write_model(models / "tiny.gguf")
    old = time.time() - 3600
    os.utime(path, (old, old))  # settled: registered at the first scan
    async with Node(settings_for(tmp_path)) as node:
        (eid,) = node.executors
        node_end = server_end()
        gateway = LinkProtocol(Link.client("ws://node.test/", ping_interval_s=None, ping_timeout_s=None))
        inbox: asyncio.Queue = asyncio.Queue()
        gateway.on_message = gateway.on_text = inbox.put_nowait
        to_gateway, _ = await open_pair(node_end, gateway)
        sampler = Sampler(node.list, node_id="unit", nvml=FakeNvml())
        session = Session(conn=node_end, node=node, gateway_id="gw", sample=sampler.sample)
        node_end.on_message = node_end.on_text = session.on_frame
        run = asyncio.create_task(session.run())
        try:
            yield Env(node, session, gateway, inbox, to_gateway, eid)
        finally:
            to_gateway.release()
            node_end.close(1000, "test over", timeout=2)
            async with asyncio.timeout(10):
                await run


# -- control ------------------------------------------------------------------------------------


async def test_list_and_get_model_answer_with_the_nodes_own_status(env: Env) -> None:
    models = await env.call(ListModels(id="c1"))
    assert isinstance(models, Models) and models.id == "c1"
    assert [(m.id, m.state, m.enabled) for m in models.models] == [(env.eid, "discovered", False)]
    assert models.models == env.node.list()
    status = await env.call(GetModel(id="c2", model=env.eid))
    assert status == ModelStatus(id="c2", status=env.node.status(env.eid))


async def test_a_reply_the_link_cannot_carry_gets_an_error_and_the_next_call_is_answered(env: Env, monkeypatch) -> None:
    """A model header may declare integers past 64 bits; the control loop once died encoding one,
    and the session's later control calls went unanswered."""
    real = env.node.list
    monkeypatch.setattr(env.node, "list", lambda: [msgspec.structs.replace(
        st, info=msgspec.structs.replace(st.info, parameter_count=2**64)) for st in real()])
    err = await env.call(ListModels(id="c1"))
    assert isinstance(err, Error) and (err.id, err.code) == ("c1", "internal")
    assert err.message.startswith("the reply could not be encoded: OverflowError")
    status = await env.call(GetModel(id="c2", model=env.eid))
    assert status == ModelStatus(id="c2", status=env.node.status(env.eid))


async def test_a_control_call_on_an_unknown_model_gets_its_error_with_the_calls_id(env: Env) -> None:
    err = await env.call(GetModel(id="c3", model="nope"))
    assert isinstance(err, Error) and (err.id, err.code) == ("c3", "unknown_model")
    assert "nope" in err.message


async def test_configure_is_journaled_before_the_reply_names_the_gateway(env: Env) -> None:
    reply = await env.call(Configure(id="c4", model=env.eid, settings=ModelSettings(n_ctx=1024, parallel=2)))
    assert isinstance(reply, ModelStatus) and reply.status.settings == ModelSettings(n_ctx=1024, parallel=2)
    events = await env.node.journal.read(stream=env.eid)
    desired = [e.body for e in events if isinstance(e.body, DesiredChanged)]
    assert desired[-1] == DesiredChanged(enabled=False, settings=ModelSettings(n_ctx=1024, parallel=2), by="gateway:gw")
    # ReadEvents returns the same journal, as plain maps.
    record = (await env.call(ReadEvents(id="c5", model=env.eid, limit=1)))
    assert isinstance(record, Events) and record.events[-1].type == "desired"
    assert record.events[-1].data["by"] == "gateway:gw" and record.events[-1].data["settings"]["n_ctx"] == 1024


async def test_a_configure_with_a_key_that_is_not_a_setting_is_refused_and_changes_nothing(env: Env) -> None:
    raw = msgspec.msgpack.encode({"type": "configure", "id": "c6", "model": env.eid, "settings": {"n_cxt": 1024}})
    env.send_raw(raw)
    err = await env.recv()
    assert isinstance(err, Error) and (err.id, err.code) == ("c6", "bad_request")
    assert err.details["field"] == "settings.n_cxt"
    assert "n_ctx" in err.message  # the known keys are listed
    assert env.node.status(env.eid).settings == ModelSettings()


async def test_control_calls_are_answered_in_the_order_they_came(env: Env) -> None:
    for i in range(5):
        env.send(GetModel(id=f"g{i}", model=env.eid if i % 2 else "nope"))
    assert [(await env.recv()).id for _ in range(5)] == [f"g{i}" for i in range(5)]


# -- frames that are not part of the protocol ---------------------------------------------------------


async def test_a_text_frame_gets_bad_request_and_the_session_goes_on(env: Env) -> None:
    env.send_text('{"type": "list_models", "id": "t"}')
    err = await env.recv()
    assert isinstance(err, Error) and (err.id, err.code, err.details) == ("", "bad_request", {"field": "frame"})
    assert "binary" in err.message
    assert isinstance(await env.call(ListModels(id="after")), Models)


@pytest.mark.parametrize("data", [b"\xc1", b"not messagepack at all", b"\x92\x01\x02"])
async def test_bytes_that_do_not_decode_get_bad_request_for_the_frame(env: Env, data: bytes) -> None:
    env.send_raw(data)
    err = await env.recv()
    assert isinstance(err, Error) and (err.id, err.code, err.details["field"]) == ("", "bad_request", "frame")
    assert isinstance(await env.call(ListModels(id="after")), Models)


async def test_an_unknown_type_is_refused_with_the_frames_own_id(env: Env) -> None:
    env.send_raw(msgspec.msgpack.encode({"type": "teleport", "id": "x1"}))
    err = await env.recv()
    assert isinstance(err, Error) and (err.id, err.code) == ("x1", "bad_request")
    assert err.details["field"] == "type"


async def test_a_field_out_of_range_is_named_by_its_dotted_path_and_the_request_id_kept(env: Env) -> None:
    env.send_raw(msgspec.msgpack.encode({"type": "infer", "id": "r1", "model": env.eid,
                                         "request": {"type": "completion", "prompt": "x",
                                                     "params": {"max_tokens": 0}}}))
    err = await env.recv()
    assert isinstance(err, Error) and (err.id, err.code) == ("r1", "bad_request")
    assert err.details["field"] == "request.params.max_tokens" and "1..1000000" in err.message


async def test_an_id_too_long_to_be_an_id_is_not_echoed(env: Env) -> None:
    env.send_raw(msgspec.msgpack.encode({"type": "list_models", "id": "x" * 129}))
    err = await env.recv()
    assert isinstance(err, Error) and err.id == "" and err.details["field"] == "id"


async def test_a_second_hello_is_refused(env: Env) -> None:
    err = await env.call(Hello(version=1, gateway_id="gw", nonce_g=bytes(32), mac_g=bytes(32)))
    assert isinstance(err, Error) and err.code == "bad_request" and err.message == "already authenticated"


# -- inference refusals (no model runs here) ------------------------------------------------------


async def test_an_infer_for_a_model_that_is_not_running_or_unknown_ends_with_one_error(env: Env) -> None:
    request = CompletionRequest(prompt="The capital of France is")
    not_running = await env.call(Infer(id="r1", model=env.eid, request=request))
    assert isinstance(not_running, Error) and (not_running.id, not_running.code) == ("r1", "model_not_running")
    unknown = await env.call(Infer(id="r1", model="nope", request=request))  # the id is free again
    assert isinstance(unknown, Error) and (unknown.id, unknown.code) == ("r1", "unknown_model")
    assert env.session._requests == {}


async def test_an_infer_and_its_cancel_in_one_read_end_with_cancelled_and_free_the_id(env: Env) -> None:
    """Both frames handled before the Infer's task first runs (a caller cancelled right after its
    send): the task is cancelled before its body starts, which once meant no terminal frame and
    an id taken for the rest of the session."""
    request = CompletionRequest(prompt="The capital of France is")
    env.send(Infer(id="r1", model=env.eid, request=request))
    env.send(CancelInfer(id="r1"))
    reply = await env.recv()
    assert isinstance(reply, Error) and (reply.id, reply.code) == ("r1", "cancelled")
    again = await env.call(Infer(id="r1", model=env.eid, request=request))  # the id is free again
    assert isinstance(again, Error) and (again.id, again.code) == ("r1", "model_not_running")
    assert env.session._requests == {}


async def test_a_cancel_for_an_unknown_request_gets_no_frame(env: Env) -> None:
    env.send(CancelInfer(id="never-sent"))
    reply = await env.call(ListModels(id="c"))
    assert isinstance(reply, Models) and reply.id == "c"  # the next frame answers the next call


# -- metrics ----------------------------------------------------------------------------------------


async def test_subscribe_acks_then_sends_metrics_at_once_and_unsubscribe_stops_them(env: Env) -> None:
    assert await env.call(Subscribe(id="m1", interval_s=0.25)) == Ack(id="m1")
    first = await env.recv()
    assert isinstance(first, Metrics) and first.id == "m1" and first.report.node_id == "unit"
    assert [e.id for e in first.report.executors] == [env.eid]
    second = await env.recv()
    assert isinstance(second, Metrics) and second.report.ts >= first.report.ts
    env.send(Unsubscribe(id="u1"))
    while isinstance(msg := await env.recv(), Metrics):
        pass  # one may have been on its way
    assert msg == Ack(id="u1")
    with pytest.raises(TimeoutError):
        await env.recv(timeout=0.8)  # three intervals: nothing more


async def test_a_new_subscription_replaces_the_old_one(env: Env) -> None:
    assert await env.call(Subscribe(id="a", interval_s=0.25)) == Ack(id="a")
    env.send(Subscribe(id="b", interval_s=0.25))
    ids = [(await env.recv()).id for _ in range(6)]
    after_b = ids[ids.index("b") + 1:]
    assert after_b and set(after_b) == {"b"}, ids


# -- flow control ----------------------------------------------------------------------------------


async def test_metrics_are_dropped_while_the_gateway_is_behind_and_the_session_stays_open(env: Env) -> None:
    assert await env.call(Subscribe(id="m", interval_s=0.25)) == Ack(id="m")
    size = len(env.to_gateway.written[-1])  # one Metrics frame, as the node wrote it
    env.session._link.send_buffer_bytes = 3 * size  # drop past 1.5 frames waiting, close past 3
    env.to_gateway.hold()
    async with asyncio.timeout(10):
        while env.session.metrics_dropped < 2:
            await asyncio.sleep(0.05)
    assert env.to_gateway.get_write_buffer_size() <= 3 * size and not env.session.closing
    env.to_gateway.release()
    assert isinstance(await env.call(ListModels(id="still-here")), (Models, Metrics))


async def test_a_gateway_that_does_not_read_is_closed_with_4009(env: Env) -> None:
    one = len(encode_link(Models(id="c0", models=env.node.list())))
    env.session._link.send_buffer_bytes = 4 * one
    env.to_gateway.hold()
    for i in range(10):
        env.send(ListModels(id=f"c{i}"))
    async with asyncio.timeout(10):
        while not env.session.closing:
            await asyncio.sleep(0.01)
    env.to_gateway.release()
    async with asyncio.timeout(10):
        await env.gateway.wait_closed()
    assert env.gateway.link.close_info() == (CLOSE_TOO_SLOW, "send buffer overflow: the gateway does not read its "
                                                            "frames")
    got = []
    while not env.inbox.empty():
        got.append(decode_from_node(env.inbox.get_nowait()).id)
    assert 0 < len(got) < 10 and got == [f"c{i}" for i in range(len(got))]  # what overflowed never left


async def test_shutdown_closes_with_going_away(env: Env) -> None:
    await env.session.shutdown(timeout=2)
    async with asyncio.timeout(10):
        await env.gateway.wait_closed()
    assert env.gateway.link.close_info() == (CLOSE_GOING_AWAY, "node shutting down")


# -- the error frame ------------------------------------------------------------------------------------


def test_error_frames_keep_strings_and_ints_make_bools_ints_and_drop_nones() -> None:
    exc = RequestError("no", code="bad_request", field="x", count=3, ok=True, gone=None, where=Path("/m"))
    assert error_frame("r", exc) == Error(id="r", code="bad_request", message="no",
                                          details={"field": "x", "count": 3, "ok": 1, "where": "/m"})
    assert error_frame("r", ContextOverflow("too long")).code == "context_overflow"
