"""The wire and journal codecs (optimanode/protocol.py): every message round-trips; schema breaks are refused."""

from __future__ import annotations

import msgspec
import pytest

from optimanode import protocol as p
from optimanode.errors import BY_CODE
from optimanode.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    SamplingParams,
    decode_event,
    decode_from_gateway,
    decode_from_node,
    decode_from_worker,
    decode_to_worker,
    encode_event,
    encode_link,
)

N32 = bytes(range(32))
STATUS = p.ExecutorStatus(id="m-1", state="running", enabled=True,
                          info=p.ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=10, mtime_ns=1))
USAGE = p.Usage(prompt_tokens=5, completion_tokens=2)
TIMINGS = p.Timings(ttft_s=0.25, tokens_per_s=20.0, total_s=0.3)
CHAT = ChatRequest(messages=[ChatMessage(role="user", content="hi ✓")], params=SamplingParams(stop=["\n"], seed=7))

FROM_GATEWAY = [
    p.Hello(version=1, gateway_id="gw", nonce_g=N32, mac_g=N32),
    p.Infer(id="r1", model="m-1", request=CompletionRequest(prompt="The capital of France is")),
    p.Infer(id="r2", model="m-1", request=CHAT),
    p.CancelInfer(id="r1"),
    p.ListModels(id="c1"),
    p.GetModel(id="c2", model="m-1"),
    p.Enable(id="c3", model="m-1"),
    p.Disable(id="c4", model="m-1", now=True),
    p.Configure(id="c5", model="m-1", settings=p.ModelSettings(n_ctx=1024, parallel=2)),
    p.Rescan(id="c6"),
    p.ReadEvents(id="c7", model="m-1", limit=5),
    p.Subscribe(id="s1", interval_s=0.5),
    p.Unsubscribe(id="s1"),
]

FROM_NODE = [
    p.Challenge(versions=[1], node_id="n", nonce_n=N32),
    p.Welcome(version=1, node_id="n", mac_n=N32),
    p.TokenChunk(id="r1", text=" Paris", tokens=2),
    p.InferDone(id="r1", finish_reason="length", usage=USAGE, timings=TIMINGS),
    p.Error(id="r1", code="unknown_model", message="no such model", details={"model": "x", "n": 3}),
    p.Models(id="c1", models=[STATUS]),
    p.ModelStatus(id="c2", status=STATUS),
    p.Events(id="c7", events=[p.EventRecord(seq=1, ts=1.5, stream="m-1", version=1, type="registered",
                                            data={"path": "/m/a.gguf"})]),
    p.Ack(id="s1"),
]


@pytest.mark.parametrize("msg", FROM_GATEWAY, ids=lambda m: type(m).__name__)
def test_every_gateway_message_round_trips(msg) -> None:
    assert decode_from_gateway(encode_link(msg)) == msg


@pytest.mark.parametrize("msg", FROM_NODE, ids=lambda m: type(m).__name__)
def test_every_node_message_round_trips(msg) -> None:
    assert decode_from_node(encode_link(msg)) == msg


def test_the_type_tag_is_on_the_wire_and_requests_are_told_apart_by_it() -> None:
    raw = msgspec.msgpack.decode(encode_link(FROM_GATEWAY[2]))
    assert raw["type"] == "infer" and raw["request"]["type"] == "chat"
    assert raw["request"]["messages"] == [{"role": "user", "content": "hi ✓"}]
    assert isinstance(decode_from_gateway(encode_link(FROM_GATEWAY[1])).request, CompletionRequest)


def test_a_message_of_the_other_direction_is_refused_naming_the_tag() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'chunk'"):
        decode_from_gateway(encode_link(p.TokenChunk(id="r1", text="x")))
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'infer'"):
        decode_from_node(encode_link(FROM_GATEWAY[1]))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", msgspec.msgpack.encode({"type": "list_models"})[:-2]])
def test_bytes_that_are_not_one_messagepack_value_are_a_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_from_gateway(data)


def test_a_string_that_is_not_utf8_is_a_decode_error_not_a_unicode_error() -> None:
    data = msgspec.msgpack.encode({"type": "list_models", "id": "x"}).replace(b"\xa1x", b"\xa1\xff")
    with pytest.raises(msgspec.DecodeError) as info:
        decode_from_gateway(data)
    assert not isinstance(info.value, UnicodeDecodeError)


def _refused(raw: dict) -> str:
    with pytest.raises(msgspec.ValidationError) as info:
        decode_from_gateway(msgspec.msgpack.encode(raw))
    return str(info.value)


def _infer(**params) -> dict:
    return {"type": "infer", "id": "r", "model": "m",
            "request": {"type": "completion", "prompt": "x", "params": params}}


@pytest.mark.parametrize(("params", "where"), [
    ({"max_tokens": 0}, "$.request.params.max_tokens"),
    ({"max_tokens": 1_000_001}, "$.request.params.max_tokens"),
    ({"temperature": -0.1}, "$.request.params.temperature"),
    ({"top_p": 0}, "$.request.params.top_p"),
    ({"min_p": 1.5}, "$.request.params.min_p"),
    ({"repeat_penalty": 0}, "$.request.params.repeat_penalty"),
    ({"stop": [""]}, "$.request.params.stop[0]"),
    ({"stop": ["s"] * 17}, "$.request.params.stop"),
    ({"max_tokens": 1.5}, "$.request.params.max_tokens"),
    ({"max_tokens": "8"}, "$.request.params.max_tokens"),
])
def test_sampling_params_out_of_range_or_of_the_wrong_type_are_refused_where_they_are(params, where) -> None:
    assert f"at `{where}`" in _refused(_infer(**params))


def test_an_int_is_accepted_for_a_float_field() -> None:
    msg = decode_from_gateway(msgspec.msgpack.encode(_infer(temperature=1, top_p=1)))
    assert msg.request.params.temperature == 1.0 and isinstance(msg.request.params.temperature, float)


def test_unknown_sampling_params_are_refused_but_unknown_model_settings_are_kept_for_old_journals() -> None:
    assert "Object contains unknown field `temprature`" in _refused(_infer(temprature=0.5))
    # ModelSettings is journaled: a key a newer node wrote must not stop this one replaying.
    s = msgspec.msgpack.decode(msgspec.msgpack.encode({"n_ctx": 512, "from_the_future": 1}), type=p.ModelSettings)
    assert s == p.ModelSettings(n_ctx=512)


@pytest.mark.parametrize(("raw", "where"), [
    ({"type": "list_models", "id": ""}, "$.id"),
    ({"type": "list_models", "id": "x" * 129}, "$.id"),
    ({"type": "list_models"}, "missing required field `id`"),
    ({"type": "get_model", "id": "c", "model": ""}, "$.model"),
    ({"type": "subscribe", "id": "s", "interval_s": 0.1}, "$.interval_s"),
    ({"type": "read_events", "id": "e", "limit": 1001}, "$.limit"),
    ({"type": "hello", "version": 1, "gateway_id": "g", "nonce_g": b"short", "mac_g": N32}, "$.nonce_g"),
    ({"type": "teleport", "id": "x"}, "Invalid value 'teleport'"),
    ({"id": "x"}, "missing required field `type`"),
])
def test_link_frames_that_break_the_schema_are_refused(raw, where) -> None:
    assert where in _refused(raw)


def test_the_longest_ids_are_accepted() -> None:
    msg = decode_from_gateway(msgspec.msgpack.encode({"type": "get_model", "id": "i" * 128, "model": "m" * 256}))
    assert (len(msg.id), len(msg.model)) == (128, 256)


def test_error_frames_carry_only_known_codes_and_each_code_has_its_exception_class() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'oops'"):
        decode_from_node(msgspec.msgpack.encode({"type": "error", "id": "r", "code": "oops"}))
    assert set(BY_CODE) == p.ERROR_CODES
    assert all(cls.code == code for code, cls in BY_CODE.items())


def test_model_settings_omit_what_is_not_set() -> None:
    assert msgspec.msgpack.decode(encode_link(p.Configure(id="c", model="m", settings=p.ModelSettings())))[
        "settings"] == {}


# -- worker pipe ------------------------------------------------------------------------------

TO_WORKER = [
    p.WorkerSettings(model_path="/m/a.gguf", n_ctx=512, parallel=2, safe_mode=True),
    p.Generate(id="r", request=CHAT),
    p.Cancel(id="r"),
    p.Ping(seq=3),
    p.Shutdown(),
]
FROM_WORKER = [
    p.Ready(pid=42, n_ctx=512, load_s=0.5, warmup_batch=128, safe_mode=True),
    p.Pong(seq=3, steps=10, pending=1, since_step_s=0.25),
    p.Chunk(id="r", text="é", tokens=2),
    p.Done(id="r", finish_reason="cancelled", usage=USAGE, timings=TIMINGS),
    p.Failed(id="r", code="context_overflow", message="prompt of 600 tokens > n_ctx 512"),
]


@pytest.mark.parametrize("msg", TO_WORKER + FROM_WORKER, ids=lambda m: type(m).__name__)
def test_worker_frames_are_length_prefixed_and_round_trip(msg) -> None:
    data = p.frame(msg)
    (n,) = p.FRAME_HEADER.unpack(data[:4])
    assert n == len(data) - 4
    decode = decode_to_worker if msg in TO_WORKER else decode_from_worker
    assert decode(data[4:]) == msg


def test_a_worker_message_on_the_wrong_side_of_the_pipe_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_to_worker(p.frame(p.Ready(pid=1, n_ctx=1, load_s=0.0))[4:])
    with pytest.raises(msgspec.ValidationError):
        decode_from_worker(p.frame(p.Ping(seq=1))[4:])


# -- journal events ---------------------------------------------------------------------------

EVENTS = [
    p.Registered(info=STATUS.info),
    p.Transition(trigger="crash", src="running", dst="crashed", reason="killed by SIGKILL", stderr_tail=["x"]),
    p.DesiredChanged(enabled=True, settings=p.ModelSettings(parallel=2), by="gateway:gw"),
    p.Hashed(sha256="ab" * 32, size_bytes=10, mtime_ns=1),
    p.RequestStarted(request_id="r", kind="chat", by="gw"),
    p.RequestFinished(request_id="r", outcome="stop", prompt_tokens=3, completion_tokens=4),
    p.NodeStarted(pid=1, version="0"),
    p.NodeStopped(reason="signal"),
]


@pytest.mark.parametrize("body", EVENTS, ids=lambda b: type(b).__name__)
def test_journal_events_are_json_with_their_tag_and_round_trip(body) -> None:
    data = encode_event(body)
    assert msgspec.json.decode(data)["type"] == type(body).__struct_config__.tag
    assert decode_event(data) == body
    assert decode_event(data.decode()) == body


def test_an_event_of_an_unknown_type_does_not_decode() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"type": "teleported", "to": "mars"}')
