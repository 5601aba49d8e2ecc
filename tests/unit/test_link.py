"""The link core (optimanode/link.py) without a network or a model: bytes in, bytes and events out.

Two ``Link`` objects, a node's and a Gateway's, are wired to each other by hand (``pump``), so
every step of docs/protocol.md's transport is visible as bytes: the HTTP upgrade, frames with and
without masks, fragments, the size limit (1009), pings and their timeout (1011), the closing
handshake. The handshake state machines are driven with the documented test vector, and the
asyncio adapter (``LinkProtocol``) runs over a recording fake transport. The reference values
(frames, fingerprints) are written out as data, never recomputed by a second implementation.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import SEND_EOF, State

from optimanode.link import (
    OPENED,
    GatewayHandshake,
    HandshakeError,
    Link,
    LinkProtocol,
    NodeHandshake,
    close_reason,
    fingerprint_der,
    format_fingerprint,
    parse_fingerprint,
)
from optimanode.protocol import Challenge, ListModels, Welcome, encode_link

KEY = bytes(range(32))
NONCE_N = bytes(range(0x40, 0x60))
NONCE_G = bytes(range(0x80, 0xA0))
URL = "wss://node.example:8022/"


def pump(src: Link, dst: Link) -> list:
    """Deliver what ``src`` wants to send to ``dst``; the messages ``dst`` reports."""
    out = []
    for data in src.data_to_send():
        if data == SEND_EOF:
            dst.receive_eof()
        else:
            out += dst.receive_data(data)
    return out


def opened_pair(**server_kwargs) -> tuple[Link, Link]:
    node, gateway = Link.server(**server_kwargs), Link.client(URL)
    gateway.upgrade()
    assert pump(gateway, node) == [OPENED]
    assert pump(node, gateway) == [OPENED]
    assert node.is_open and gateway.is_open
    return node, gateway


def frame_bytes(opcode: Opcode, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    return Frame(opcode, payload, fin).serialize(mask=mask, extensions=[])


def parse_server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of unmasked frames (what the node writes), by RFC 6455 §5.2 by hand."""
    out, i = [], 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert b0 & 0x80 and not b1 & 0x80  # FIN, no mask
        n, i = b1 & 0x7F, i + 2
        if n == 126:
            (n,), i = struct.unpack("!H", data[i:i + 2]), i + 2
        elif n == 127:
            (n,), i = struct.unpack("!Q", data[i:i + 8]), i + 8
        out.append((b0 & 0x0F, data[i:i + n]))
        i += n
    return out


# -- handshake arithmetic and state --------------------------------------------------------------


def test_fingerprints_are_formatted_and_parsed_as_the_contract_shows():
    # openssl dgst -sha256 of the same bytes: 9b950af0...2662331c
    text = "sha256:9B:95:0A:F0:53:A0:05:2D:34:1F:BF:99:BA:16:DE:AE:4A:F5:7A:43:A4:3A:0C:E9:AC:61:C2:5B:26:62:33:1C"
    assert fingerprint_der(b"not a certificate, only bytes") == text
    digest = bytes.fromhex("9b950af053a0052d341fbf99ba16deae4af57a43a43a0ce9ac61c25b2662331c")
    assert format_fingerprint(digest) == text
    for spelling in (text, text.lower(), text.removeprefix("sha256:"), text.replace(":", "")[6:], f"  {text} "):
        assert parse_fingerprint(spelling) == digest
    for bad in ("sha256:00", "md5:AB", "", "sha256:" + "zz" * 32):
        with pytest.raises(ValueError, match="fingerprint"):
            parse_fingerprint(bad)


def test_the_two_handshake_machines_produce_the_documented_frames():
    node = NodeHandshake("node-1", lambda: [KEY], nonce_n=NONCE_N)
    gateway = GatewayHandshake(KEY, "gw-1", nonce_g=NONCE_G)
    hello = gateway.receive_challenge(node.challenge())
    welcome = node.receive(hello)
    assert gateway.receive_welcome(welcome).node_id == "node-1"
    assert node.hello is not None and node.hello.gateway_id == "gw-1"
    # The MACs inside are the documented test vector (docs/protocol.md, "Handshake").
    assert msgspec.msgpack.decode(hello)["mac_g"].hex() == \
        "42bbd458085c1a7f404161a67a6a823f31e83721d6c36ea35b2640a0d9f9648e"
    assert msgspec.msgpack.decode(welcome)["mac_n"].hex() == \
        "cb9d272362bfadc8fe03d7545c993c299c53c95c75265f6552fbb3afd4a1242d"
    assert len(hello) == 119 and len(welcome) == 106  # the worked example's sizes


@pytest.mark.parametrize(("frame", "code", "reason"), [
    ("a text hello", 4400, "expected a binary frame holding a MessagePack hello"),
    (b"\xc1 not messagepack", 4400, "bad hello: "),
    (msgspec.msgpack.encode({"type": "hello", "gateway_id": "g", "version": 1}), 4400,
     "bad hello: Object missing required field"),
    (encode_link(ListModels(id="early")), 4001, "unauthorized: the first frame must be a hello"),
])
def test_the_node_refuses_a_first_frame_that_is_not_a_hello_with_the_documented_close(frame, code, reason):
    node = NodeHandshake("node-1", lambda: [KEY])
    node.challenge()
    with pytest.raises(HandshakeError) as info:
        node.receive(frame)
    assert info.value.close_code == code and info.value.reason.startswith(reason)
    assert node.hello is None


def test_the_node_refuses_a_wrong_key_and_an_unoffered_version():
    node = NodeHandshake("node-1", lambda: [KEY])
    intruder = GatewayHandshake(b"w" * 32, "intruder")
    with pytest.raises(HandshakeError) as info:
        node.receive(intruder.receive_challenge(node.challenge()))
    assert (info.value.close_code, info.value.reason) == (4001, "unauthorized")
    future = msgspec.msgpack.decode(GatewayHandshake(KEY, "gw").receive_challenge(node.challenge()))
    future["version"] = 99
    with pytest.raises(HandshakeError) as info:
        node.receive(msgspec.msgpack.encode(future))
    assert info.value.close_code == 4003


def test_the_gateway_refuses_a_node_without_the_key_and_a_node_without_its_version():
    gateway = GatewayHandshake(KEY, "gw-1")
    hello = msgspec.msgpack.decode(gateway.receive_challenge(encode_link(
        Challenge(versions=[1], node_id="fake", nonce_n=NONCE_N))))
    reflected = encode_link(Welcome(version=1, node_id="fake", mac_n=hello["mac_g"]))
    with pytest.raises(HandshakeError) as info:
        gateway.receive_welcome(reflected)
    assert info.value.close_code == 4001
    with pytest.raises(HandshakeError) as info:
        GatewayHandshake(KEY, "gw").receive_challenge(encode_link(Challenge(versions=[7], node_id="n",
                                                                            nonce_n=NONCE_N)))
    assert info.value.close_code == 4003
    with pytest.raises(HandshakeError, match="expected a challenge, got Welcome"):
        GatewayHandshake(KEY, "gw").receive_challenge(encode_link(Welcome(version=1, node_id="n", mac_n=bytes(32))))
    with pytest.raises(HandshakeError, match="does not decode"):
        GatewayHandshake(KEY, "gw").receive_challenge(encode_link(ListModels(id="x")))


# -- the link: upgrade, frames, limits -----------------------------------------------------------


def test_the_upgrade_negotiates_no_extension_and_opens_both_ends():
    node, gateway = Link.server(), Link.client(URL)
    gateway.upgrade()
    (request,) = gateway.data_to_send()
    assert request.startswith(b"GET / HTTP/1.1\r\n") and b"\r\nHost: node.example:8022\r\n" in request
    assert b"Sec-WebSocket-Extensions" not in request  # no permessage-deflate offered
    assert node.receive_data(request) == [OPENED]
    (response,) = node.data_to_send()
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Extensions" not in response and b"Server:" not in response
    assert gateway.receive_data(response) == [OPENED]


def test_a_request_that_is_not_an_upgrade_gets_an_http_error_and_the_end_of_the_stream():
    node = Link.server()
    assert node.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == []
    response, eof = node.data_to_send()
    assert response.startswith(b"HTTP/1.1 426 ") and eof == SEND_EOF and not node.opened


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000])
def test_the_node_frames_binary_messages_unmasked_as_rfc_6455_says(n):
    node, gateway = opened_pair()
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert node.send(payload)
    data = b"".join(node.data_to_send())
    assert parse_server_frames(data) == [(0x2, payload)]
    assert data == frame_bytes(Opcode.BINARY, payload, mask=False)
    assert gateway.receive_data(data) == [payload]


def test_frames_sent_together_leave_together_in_order():
    node, gateway = opened_pair()
    for i in range(4):
        assert node.send(b"chunk %d" % i)
    data = node.data_to_send()
    assert len(data) == 4  # one entry per frame; the adapter writes them joined, once
    assert [p for _, p in parse_server_frames(b"".join(data))] == [b"chunk %d" % i for i in range(4)]
    assert gateway.receive_data(b"".join(data)) == [b"chunk %d" % i for i in range(4)]


def test_websockets_own_frames_follow_the_nodes_and_a_close_is_always_last():
    node, gateway = opened_pair()
    node.send(b"one")
    node.receive_data(frame_bytes(Opcode.PING, b"p"))  # websockets queues the pong
    node.send(b"two")
    node.close(1001, "node shutting down")
    assert not node.send(b"three")
    frames = parse_server_frames(b"".join(node.data_to_send()))
    assert frames[:2] == [(0x2, b"one"), (0x2, b"two")] and frames[2] == (0xA, b"p")
    assert frames[3][0] == 0x8 and len(frames) == 4
    assert node.data_to_send() == []


def test_the_gateway_masks_and_the_node_unmasks():
    node, gateway = opened_pair()
    assert gateway.send(b"hello, node")
    (data,) = gateway.data_to_send()
    assert data[1] & 0x80  # masked, as a client must
    assert node.receive_data(data) == [b"hello, node"]


def test_fragments_are_reassembled_and_text_is_reported_as_text():
    node, _ = opened_pair()
    parts = frame_bytes(Opcode.BINARY, b"ab", fin=False) + frame_bytes(Opcode.CONT, b"cd", fin=False)
    assert node.receive_data(parts) == []
    assert node.receive_data(frame_bytes(Opcode.CONT, b"ef")) == [b"abcdef"]
    assert node.receive_data(frame_bytes(Opcode.TEXT, "héllo".encode())) == ["héllo"]
    assert node.receive_data(frame_bytes(Opcode.TEXT, b"a", fin=False) + frame_bytes(Opcode.CONT, b"b")) == ["ab"]


def test_a_message_over_the_limit_closes_with_1009():
    node, gateway = opened_pair(max_frame_bytes=1000)
    assert node.receive_data(frame_bytes(Opcode.BINARY, b"x" * 1000)) == [b"x" * 1000]
    assert node.receive_data(frame_bytes(Opcode.BINARY, b"x" * 1001)) == []
    close, eof = node.data_to_send()
    assert parse_server_frames(close)[0][0] == 0x8 and struct.unpack("!H", close[2:4])[0] == 1009
    assert eof == SEND_EOF
    # Fragments count together.
    node, _ = opened_pair(max_frame_bytes=1000)
    node.receive_data(frame_bytes(Opcode.BINARY, b"x" * 600, fin=False) + frame_bytes(Opcode.CONT, b"x" * 600))
    assert struct.unpack("!H", node.data_to_send()[0][2:4])[0] == 1009


def test_the_closing_handshake_and_close_info():
    node, gateway = opened_pair()
    node.close(4009, "send buffer overflow: the gateway does not read its frames")
    assert not node.send(b"too late")  # nothing is framed once the close is sent
    assert pump(node, gateway) == []
    assert gateway.close_info() == (4009, "send buffer overflow: the gateway does not read its frames")
    echo, eof = gateway.data_to_send(), node.data_to_send()
    assert eof == [] and len(echo) == 1  # the Gateway echoes; it waits for the node to end TCP
    assert node.receive_data(echo[0]) == []
    assert node.data_to_send() == [SEND_EOF]  # the node ends the stream
    assert node.close_info() == (4009, "send buffer overflow: the gateway does not read its frames")
    node.receive_eof()
    assert node.state is State.CLOSED
    gateway.receive_eof()
    assert gateway.state is State.CLOSED and gateway.close_info()[0] == 4009
    # A stream that just ends reads as 1006; one still up as None.
    a, b = opened_pair()
    assert a.close_info() == (None, "")
    a.receive_eof()
    assert a.close_info() == (1006, "")


def test_a_close_reason_is_cut_to_123_bytes_of_utf8():
    assert close_reason("x" * 200) == "x" * 123
    assert len(close_reason("é" * 100).encode()) <= 123
    assert close_reason("short") == "short"


def test_pings_are_answered_by_the_link():
    node, gateway = opened_pair()
    assert node.receive_data(frame_bytes(Opcode.PING, b"1234")) == []
    assert parse_server_frames(node.data_to_send()[0]) == [(0xA, b"1234")]


def test_keepalive_pings_on_schedule_and_fails_the_link_when_the_pong_is_late():
    node, gateway = opened_pair(ping_interval_s=20.0, ping_timeout_s=20.0)
    assert node.keepalive(100.0) == 120.0 and node.data_to_send() == []
    assert node.keepalive(110.0) == 120.0
    assert node.keepalive(120.0) == 140.0  # a ping went out; its pong is due by 140
    ((opcode, data),) = parse_server_frames(node.data_to_send()[0])
    assert opcode == 0x9 and len(data) == 4
    gateway.receive_data(frame_bytes(Opcode.PING, data, mask=False))
    node.receive_data(gateway.data_to_send()[0])  # the Gateway's pong
    assert node.keepalive(125.0) == 140.0  # answered: the next ping 20 s after the last one
    assert node.keepalive(140.0) == 160.0
    node.data_to_send()
    assert node.keepalive(159.0) == 160.0
    assert node.keepalive(160.0) is None  # no pong within 20 s: failed with 1011
    close, eof = node.data_to_send()
    assert struct.unpack("!H", close[2:4])[0] == 1011 and eof == SEND_EOF
    # Keepalive off: nothing, ever.
    quiet, _ = opened_pair(ping_interval_s=None)
    assert quiet.keepalive(0.0) is None and quiet.data_to_send() == []


def test_the_send_buffer_policy_drops_metrics_at_half_and_overflows_at_the_bound():
    node, _ = opened_pair(send_buffer_bytes=4 << 20)
    assert not node.should_drop((2 << 20) - 1) and node.should_drop(2 << 20)
    assert not node.overflowed((4 << 20) - 1) and node.overflowed(4 << 20)
    gateway = Link.client(URL)  # no bound on the Gateway's end
    assert not gateway.should_drop(1 << 40) and not gateway.overflowed(1 << 40)


# -- the asyncio adapter over a fake transport ---------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, can_eof: bool = False) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = self.eof = False
        self.can_eof = can_eof

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return self.can_eof

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0


async def adapter_pair(**server_kwargs) -> tuple[LinkProtocol, FakeTransport, Link]:
    proto = LinkProtocol(Link.server(**server_kwargs))
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.attach(transport)
    gateway = Link.client(URL)
    gateway.upgrade()
    got: list = []
    proto.on_message = got.append
    proto.data_received(gateway.data_to_send()[0])
    gateway.receive_data(transport.writes.pop())
    return proto, transport, gateway


async def test_the_adapter_writes_what_was_framed_with_one_write_per_flush():
    proto, transport, gateway = await adapter_pair(ping_interval_s=None)
    for i in range(4):
        proto.link.send(b"token %d" % i)
    assert transport.writes == []
    proto.flush()
    assert len(transport.writes) == 1
    assert gateway.receive_data(transport.writes[0]) == [b"token %d" % i for i in range(4)]


async def test_the_adapter_hands_messages_from_the_read_callback_and_answers_pings():
    proto, transport, gateway = await adapter_pair(ping_interval_s=None)
    got: list = []
    texts: list = []
    proto.on_message, proto.on_text = got.append, texts.append
    gateway.send(b"one")
    gateway.send(b"two")
    gateway.protocol.send_ping(b"p")
    gateway.protocol.send_text(b"words")
    proto.data_received(b"".join(gateway.data_to_send()))
    assert got == [b"one", b"two"] and texts == ["words"]
    assert [op for op, _ in parse_server_frames(transport.writes[-1])] == [0xA]


async def test_a_close_the_peer_does_not_finish_is_cut_after_the_timeout():
    proto, transport, _ = await adapter_pair(ping_interval_s=None)
    proto.close(4009, "send buffer overflow", timeout=0.05)
    assert struct.unpack("!H", transport.writes[-1][2:4])[0] == 4009
    assert not transport.aborted
    await asyncio.sleep(0.2)
    assert transport.aborted


async def test_the_end_of_the_stream_half_closes_tcp_or_closes_tls():
    for can_eof in (True, False):
        proto = LinkProtocol(Link.server())
        transport = FakeTransport(can_eof=can_eof)
        proto.connection_made(transport)
        proto.attach(transport)
        proto.data_received(b"not http at all\r\n\r\n")
        assert (transport.eof, transport.closed) == ((True, False) if can_eof else (False, True))


async def test_connection_lost_ends_the_link_and_wakes_waiters():
    proto, transport, _ = await adapter_pair(ping_interval_s=None)
    ended: list = []
    proto.on_closed = ended.append  # type: ignore[method-assign]
    proto.connection_lost(None)
    assert proto.closed.done() and ended == [None]
    assert proto.link.state is State.CLOSED and proto.link.close_info() == (1006, "")
    assert not proto.send(b"nowhere")
