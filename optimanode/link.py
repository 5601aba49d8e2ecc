"""The Gateway link's core, one for both ends: the node's sessions (``gateway/``) and ``NodeClient``.

docs/protocol.md is the contract; this module is the one implementation of its mechanics that both
ends drive, the way ``websockets`` itself is built (a Sans-I/O protocol, one asyncio adapter per
side). It imports only ``optimanode.protocol`` and ``optimanode.errors`` of this package, and
``websockets``' *public* Sans-I/O API (``ServerProtocol``/``ClientProtocol``, ``receive_data``,
``events_received``, ``send_binary``, ``data_to_send``); nothing subclasses websockets.

How it works, in four parts:

1. **Handshake arithmetic** (pure functions): the two MAC labels, the length-prefixed transcript
   ``T``, ``mac`` = HMAC-SHA256(key, label || T), and the certificate fingerprint's text form
   (``sha256:AB:CD:...``, SHA-256 of the DER bytes). This is the only copy: gateway/handshake.py,
   gateway/tls.py and client.py import it. Its independent reference is data: the test vector of
   docs/protocol.md, written out as hex in tests/unit/test_handshake.py.
2. **Handshake state** (Sans-I/O): ``NodeHandshake`` (Challenge out; one frame in; the Welcome, or
   ``HandshakeError`` carrying the close code the contract names) and ``GatewayHandshake``
   (Challenge in, Hello out; Welcome in, checked in constant time). They take and return frame
   payloads; they never see a socket or a clock.
3. **``Link``** (Sans-I/O): one WebSocket connection over a websockets ``ServerProtocol`` (node) or
   ``ClientProtocol`` (Gateway), no extension (so no compression), the incoming size limit
   (``max_size``: 1 MiB on the node, a bigger message fails the link with 1009). Bytes in
   (``receive_data``) give *messages* out: the ``OPENED`` marker once the HTTP upgrade is done
   (the node's side answers the upgrade request itself), then each complete binary message as
   ``bytes`` (fragments reassembled) and each text message as ``str``; pings are answered by
   websockets, close frames echoed. ``send`` frames one binary message and ``data_to_send`` returns
   everything framed since the last call, so a caller can frame several and write them as one. The
   Gateway's frames are websockets' (``send_binary``: masked). The node's are the core's own codec:
   an unmasked binary frame is a 2-byte header from a table (4 or 10 bytes past 125) before the
   payload, appended to ``framed``; websockets' per-frame ``Frame`` object and ``serialize`` cost
   about 1.5 µs a token more, which measured as 5 % more node CPU per token at 4 streams.
   tests/unit/test_link.py checks these bytes against websockets' ``Frame.serialize``, and websockets
   still parses, answers control frames, closes and keeps the state; its queued frames follow the
   node's in ``data_to_send`` (a close is only queued once ``send`` refuses, so it stays last).
   Keepalive is a function of time given by the caller (``keepalive(now)``: a ping when one is due,
   a failed link (1011) when its pong is late, and when to call again). Flow control is the
   policy of the contract's send buffer, given the bytes the transport has not taken yet: metrics
   are dropped once half of it is used (``should_drop``), past the whole the peer is too slow
   (``overflowed``: the node closes with 4009).
4. **``LinkProtocol``**: the asyncio adapter both ends subclass (the node's in gateway/server.py,
   the Gateway's in client.py): an ``asyncio.Protocol`` that feeds what the transport reads to its
   ``Link`` and hands the messages on from the read callback itself (no task wakes per frame), and
   writes what the ``Link`` framed with one ``transport.write`` per ``flush``. The end of the
   stream the protocol asks for (``SEND_EOF``) half-closes TCP, or closes a TLS transport (which
   cannot half-close). Once a close is under way (``close_expected``) the transport is cut after
   ``close_timeout_s`` if the peer does not finish it: a peer that reads nothing never takes the
   close frame either. ``pause_writing``/``resume_writing`` back ``drain``, for senders that may wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.typing import LoggerLike
from websockets.uri import parse_uri

from optimanode.errors import OptimaNodeError
from optimanode.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_UNAUTHORIZED,
    CLOSE_VERSION_UNSUPPORTED,
    MAC_BYTES,
    NONCE_BYTES,
    PROTOCOL_MINOR,
    PROTOCOL_VERSIONS,
    Challenge,
    Hello,
    Welcome,
    decode_from_gateway,
    decode_from_node,
    encode_link,
)

# -- 1. handshake arithmetic -----------------------------------------------------------------

LABEL_GATEWAY = b"optimanode/v1 gateway"
LABEL_NODE = b"optimanode/v1 node"


def transcript(nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str, version: int) -> bytes:
    """``T``: nonce_n, nonce_g, gateway_id, node_id, version, each a 4-byte big-endian length + bytes."""
    parts = (nonce_n, nonce_g, gateway_id.encode(), node_id.encode(), version.to_bytes(4, "big"))
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def mac(key: bytes, label: bytes, nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str,
        version: int) -> bytes:
    """HMAC-SHA256(key, label || T) (docs/protocol.md, "Handshake")."""
    return hmac.new(key, label + transcript(nonce_n, nonce_g, gateway_id, node_id, version), hashlib.sha256).digest()


def gateway_mac(key: bytes, nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str, version: int) -> bytes:
    return mac(key, LABEL_GATEWAY, nonce_n, nonce_g, gateway_id, node_id, version)


def node_mac(key: bytes, nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str, version: int) -> bytes:
    return mac(key, LABEL_NODE, nonce_n, nonce_g, gateway_id, node_id, version)


def format_fingerprint(digest: bytes) -> str:
    """``sha256:AB:CD:...``: upper-case hex pairs joined by colons, as ``openssl x509 -fingerprint``."""
    h = digest.hex().upper()
    return "sha256:" + ":".join(h[i:i + 2] for i in range(0, len(h), 2))


def fingerprint_der(der: bytes) -> str:
    """The pinned form of a certificate given as DER bytes."""
    return format_fingerprint(hashlib.sha256(der).digest())


def parse_fingerprint(fingerprint: str) -> bytes:
    """The 32 digest bytes from ``sha256:AB:CD:...`` (colons, case and the prefix are optional)."""
    text = fingerprint.strip()
    if text.lower().startswith("sha256:"):
        text = text[7:]
    text = text.replace(":", "").replace(" ", "")
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"not a SHA-256 certificate fingerprint: {fingerprint!r} (expected sha256:AB:CD:... "
                         "as `optimanode fingerprint` prints it)")
    return digest


# -- 2. handshake state ----------------------------------------------------------------------


class HandshakeError(OptimaNodeError):
    """The handshake failed; ``close_code`` is the WebSocket close code to close with."""

    def __init__(self, close_code: int, reason: str) -> None:
        self.close_code, self.reason = close_code, reason
        super().__init__(f"{close_code}: {reason}")


def new_challenge(node_id: str, versions: Sequence[int] = PROTOCOL_VERSIONS, *,
                  nonce_n: bytes | None = None) -> Challenge:
    """The node's first frame; ``nonce_n`` is only given by tests (fresh random bytes otherwise)."""
    return Challenge(versions=list(versions), node_id=node_id, nonce_n=nonce_n or secrets.token_bytes(NONCE_BYTES))


def choose_version(offered: Iterable[int], supported: Iterable[int] = PROTOCOL_VERSIONS) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(supported)
    return max(common) if common else None


def make_hello(key: bytes, challenge: Challenge, gateway_id: str, *, version: int | None = None,
               nonce_g: bytes | None = None) -> Hello:
    """The Gateway's answer to a Challenge; HandshakeError (4003) when no version is common."""
    if version is None:
        version = choose_version(challenge.versions)
        if version is None:
            raise HandshakeError(CLOSE_VERSION_UNSUPPORTED, f"no common protocol version: the node speaks "
                                 f"{challenge.versions}, this Gateway {list(PROTOCOL_VERSIONS)}")
    nonce_g = nonce_g or secrets.token_bytes(NONCE_BYTES)
    return Hello(version=version, gateway_id=gateway_id, nonce_g=nonce_g,
                 mac_g=gateway_mac(key, challenge.nonce_n, nonce_g, gateway_id, challenge.node_id, version))


def check_hello(keys: Sequence[bytes], challenge: Challenge, hello: Hello, *, max_frame_bytes: int = 1 << 20) -> Welcome:
    """The node's check of a Hello against every accepted key; the Welcome, or HandshakeError."""
    if hello.version not in challenge.versions:
        raise HandshakeError(CLOSE_VERSION_UNSUPPORTED,
                             f"protocol version {hello.version} is not one of {challenge.versions}")
    if len(hello.mac_g) != MAC_BYTES or len(hello.nonce_g) != NONCE_BYTES:
        raise HandshakeError(CLOSE_UNAUTHORIZED, "unauthorized")
    matched: bytes | None = None
    # Every key is compared (no early exit), so the time taken does not say which key matched.
    for key in keys:
        want = gateway_mac(key, challenge.nonce_n, hello.nonce_g, hello.gateway_id, challenge.node_id, hello.version)
        if hmac.compare_digest(want, hello.mac_g) and matched is None:
            matched = key
    if matched is None:
        # Deliberately says nothing about why: the same answer for a wrong key and a tampered field.
        raise HandshakeError(CLOSE_UNAUTHORIZED, "unauthorized")
    return Welcome(version=hello.version, node_id=challenge.node_id, max_frame_bytes=max_frame_bytes,
                   minor=PROTOCOL_MINOR if hello.version == PROTOCOL_VERSIONS[-1] else 0,
                   mac_n=node_mac(matched, challenge.nonce_n, hello.nonce_g, hello.gateway_id, challenge.node_id,
                                  hello.version))


def check_welcome(key: bytes, challenge: Challenge, hello: Hello, welcome: Welcome) -> None:
    """The Gateway's check that the node holds the key; HandshakeError (4001) if it does not."""
    want = node_mac(key, challenge.nonce_n, hello.nonce_g, hello.gateway_id, challenge.node_id, hello.version)
    if (welcome.version != hello.version or welcome.node_id != challenge.node_id
            or not hmac.compare_digest(want, welcome.mac_n)):
        raise HandshakeError(CLOSE_UNAUTHORIZED, "the node did not prove it holds the access key")


class NodeHandshake:
    """The node's side: ``challenge`` (the payload to send first), then ``receive`` the first frame.

    ``receive`` returns the Welcome's payload and sets ``hello``, or raises ``HandshakeError`` with
    the close code of docs/protocol.md: text → 4400, not a decodable message → 4400 ("bad hello:
    ..."), a message other than Hello → 4001, a version not offered → 4003, a MAC no key makes →
    4001. ``keys`` is asked once per Hello (a ``KeyRing`` re-reads rotated files); what it raises
    (an unusable key file) goes to the caller.
    """

    def __init__(self, node_id: str, keys: Callable[[], Sequence[bytes]], *, max_frame_bytes: int = 1 << 20,
                 versions: Sequence[int] = PROTOCOL_VERSIONS, nonce_n: bytes | None = None) -> None:
        self.keys, self.max_frame_bytes = keys, max_frame_bytes
        self.challenge_msg = new_challenge(node_id, versions, nonce_n=nonce_n)
        self.hello: Hello | None = None

    def challenge(self) -> bytes:
        return encode_link(self.challenge_msg)

    def receive(self, data: bytes | str) -> bytes:
        if isinstance(data, str):
            raise HandshakeError(CLOSE_BAD_FRAME, "expected a binary frame holding a MessagePack hello")
        try:
            msg = decode_from_gateway(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise HandshakeError(CLOSE_BAD_FRAME, f"bad hello: {exc}") from None
        if not isinstance(msg, Hello):
            raise HandshakeError(CLOSE_UNAUTHORIZED, "unauthorized: the first frame must be a hello")
        welcome = check_hello(self.keys(), self.challenge_msg, msg, max_frame_bytes=self.max_frame_bytes)
        self.hello = msg
        return encode_link(welcome)


class GatewayHandshake:
    """The Gateway's side: ``receive_challenge`` → the Hello's payload; ``receive_welcome`` → the checked Welcome.

    Each raises ``HandshakeError`` whose ``close_code`` is what the Gateway closes with: 4003 when no
    version is common, 4001 when the node does not prove the key (a wrong MAC, version or node id),
    1000 for a frame that is not the expected message.
    """

    def __init__(self, key: bytes, gateway_id: str, *, nonce_g: bytes | None = None) -> None:
        self.key, self.gateway_id, self.nonce_g = key, gateway_id, nonce_g
        self.challenge: Challenge | None = None
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None

    @staticmethod
    def _decode(data: bytes | str, what: str) -> Any:
        if isinstance(data, str):
            raise HandshakeError(1000, f"expected a binary {what} frame, got text")
        try:
            return decode_from_node(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise HandshakeError(1000, f"the node's {what} does not decode: {exc}") from None

    def receive_challenge(self, data: bytes | str) -> bytes:
        challenge = self._decode(data, "challenge")
        if not isinstance(challenge, Challenge):
            raise HandshakeError(1000, f"expected a challenge, got {type(challenge).__name__}")
        self.challenge = challenge
        self.hello = make_hello(self.key, challenge, self.gateway_id, nonce_g=self.nonce_g)
        return encode_link(self.hello)

    def receive_welcome(self, data: bytes | str) -> Welcome:
        assert self.challenge is not None and self.hello is not None, "receive_challenge first"
        welcome = self._decode(data, "welcome")
        if not isinstance(welcome, Welcome):
            raise HandshakeError(1000, f"expected a welcome, got {type(welcome).__name__}")
        check_welcome(self.key, self.challenge, self.hello, welcome)
        self.welcome = welcome
        return welcome


# -- 3. the link: frames, limits, keepalive, flow control ------------------------------------

MAX_FRAME_BYTES = 1 << 20  # what the node accepts (Welcome.max_frame_bytes); more: close 1009
# Node → Gateway frames can be large (a model list, 1000 journal events); the node's own limit on
# what it receives is smaller.
MAX_GATEWAY_INCOMING = 16 << 20
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
SEND_BUFFER_BYTES = 4 << 20  # the node's, per connection: bytes its socket has not taken yet
CLOSE_KEEPALIVE_TIMEOUT = 1011


class Opened:
    """The marker ``Link.receive_data`` reports once the HTTP upgrade is done."""

    def __repr__(self) -> str:
        return "OPENED"


OPENED = Opened()
# A binary message is bytes-like: ``bytes`` on the node's end, a ``bytearray`` on the Gateway's
# (websockets hands unmasked payloads over uncopied); msgspec decodes either.
Message = bytes | bytearray | str | Opened

_BINARY, _TEXT, _CONT, _PONG = Opcode.BINARY, Opcode.TEXT, Opcode.CONT, Opcode.PONG
_OPEN = State.OPEN


_HEADERS = [bytes((0x82, n)) for n in range(126)]


def binary_frame_header(n: int) -> bytes:
    """RFC 6455 §5.2 header of an unfragmented, unmasked binary frame of ``n`` payload bytes (no
    extension is negotiated, so RSV bits are 0). tests/unit/test_link.py checks it byte for byte
    against websockets' own ``Frame.serialize``."""
    if n < 126:
        return _HEADERS[n]
    if n < 1 << 16:
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


def close_reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455 §5.5)."""
    data = text.encode()
    return data[:123].decode(errors="ignore") if len(data) > 123 else text


class Link:
    """One end of a Gateway link without I/O: ``Link.server(...)`` or ``Link.client(url, ...)``.

    Bytes in: ``receive_data`` → messages (``OPENED``, ``bytes``, ``str``), ``receive_eof``.
    Bytes out: ``data_to_send`` after anything (a list; ``SEND_EOF`` asks for the end of the stream).
    ``protocol`` is the websockets Sans-I/O object underneath (its ``state``, ``close_rcvd``...).
    """

    def __init__(self, protocol: Protocol, *, ping_interval_s: float | None = PING_INTERVAL_S,
                 ping_timeout_s: float | None = PING_TIMEOUT_S, send_buffer_bytes: int | None = None) -> None:
        self.protocol = protocol
        self.ping_interval_s, self.ping_timeout_s = ping_interval_s, ping_timeout_s
        self.send_buffer_bytes = send_buffer_bytes
        self.opened = False
        # The node frames its own data messages (see ``send``); the Gateway's are masked by websockets.
        self._own_frames = protocol.side is Side.SERVER
        self.framed: list[bytes] = []  # what ``send`` framed, not yet taken by ``data_to_send``
        self._parts: list[bytes] | None = None  # a fragmented message being reassembled
        self._parts_text = False
        self._ping: bytes | None = None
        self._ping_at = 0.0
        self._next_ping: float | None = None

    @classmethod
    def server(cls, *, max_frame_bytes: int = MAX_FRAME_BYTES, logger: LoggerLike | None = None,
               **kwargs: Any) -> Link:
        """The node's end: answers the HTTP upgrade, no extension, messages up to ``max_frame_bytes``."""
        return cls(ServerProtocol(extensions=None, subprotocols=None, max_size=max_frame_bytes, logger=logger),
                   **kwargs)

    @classmethod
    def client(cls, url: str, *, max_size: int | None = MAX_GATEWAY_INCOMING, logger: logging.Logger | None = None,
               **kwargs: Any) -> Link:
        """The Gateway's end for ``ws[s]://host:port/``; ``upgrade`` queues the HTTP request."""
        return cls(ClientProtocol(parse_uri(url), extensions=None, subprotocols=None, max_size=max_size,
                                  logger=logger), **kwargs)

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.protocol.state

    @property
    def is_open(self) -> bool:
        return self.protocol.state is _OPEN

    def close_info(self) -> tuple[int | None, str]:
        """(code, reason) of the close frame received; (1006, "") if the stream ended without one;
        (None, "") while the link is still up."""
        p = self.protocol
        if p.close_rcvd is not None:
            return p.close_rcvd.code, p.close_rcvd.reason
        return (1006, "") if p.state is State.CLOSED else (None, "")

    @property
    def handshake_exc(self) -> Exception | None:
        """Why the HTTP upgrade failed, when it did."""
        return self.protocol.handshake_exc

    # -- bytes in --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Message]:
        p = self.protocol
        p.receive_data(data)
        events = p.events_received()
        if not events:
            return []
        out: list[Message] = []
        for ev in events:
            if type(ev) is Frame:
                op = ev.opcode
                if op is _BINARY and ev.fin and self._parts is None:
                    out.append(ev.data)  # the common case: one frame, one message
                elif op is _BINARY or op is _TEXT or op is _CONT:
                    self._assemble(ev, out)
                elif op is _PONG:
                    self._pong(ev.data)
                # PING: websockets queued the pong; CLOSE: websockets echoed it and ends the stream.
            elif isinstance(ev, Request):
                response = p.accept(ev)  # type: ignore[attr-defined]
                p.send_response(response)  # type: ignore[attr-defined]
                if response.status_code == 101:
                    self.opened = True
                    out.append(OPENED)
            elif isinstance(ev, Response):
                # (The state may be CLOSING already: a close frame can come in the same read.)
                if p.handshake_exc is None:
                    self.opened = True
                    out.append(OPENED)
        return out

    def receive_eof(self) -> None:
        self.protocol.receive_eof()  # idempotent

    def _assemble(self, frame: Frame, out: list[Message]) -> None:
        if frame.opcode is not _CONT:
            self._parts, self._parts_text = [bytes(frame.data)], frame.opcode is _TEXT
        elif self._parts is not None:  # (websockets refuses a continuation with nothing to continue)
            self._parts.append(frame.data)
        if frame.fin and self._parts is not None:
            data, self._parts = b"".join(self._parts), None
            out.append(data.decode(errors="replace") if self._parts_text else data)

    # -- bytes out -------------------------------------------------------------------------

    def upgrade(self) -> None:
        """The Gateway's end: queue the HTTP upgrade request (after the certificate is pinned)."""
        p = self.protocol
        p.send_request(p.connect())  # type: ignore[attr-defined]

    def send(self, payload: bytes) -> bool:
        """Frame one binary message; False (nothing framed) when the link is not open."""
        p = self.protocol
        if p.state is not _OPEN:
            return False
        if self._own_frames:
            # The node's data frames (the token path): a header from the table, no Frame object.
            # (Never an empty item: b"" is SEND_EOF in what data_to_send returns.)
            n = len(payload)
            if n < 126:
                self.framed.append(_HEADERS[n] + payload)
            else:
                self.framed += (binary_frame_header(n), payload)
        else:
            p.send_binary(payload)  # the Gateway's: masked, by websockets
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (once; later calls and a link not open do nothing)."""
        if self.protocol.state is _OPEN:
            self.protocol.send_close(code, close_reason(reason))

    def fail(self, code: int, reason: str = "") -> None:
        """Close at once, without waiting for the peer's close frame."""
        self.protocol.fail(code, close_reason(reason))

    def data_to_send(self) -> list[bytes]:
        """What to write, in order: the frames ``send`` made, then what websockets queued (pongs, a
        close frame, ``SEND_EOF``). A close is only queued once the link left OPEN, after which
        ``send`` frames nothing, so it is always last; a pong may pass data frames, as RFC 6455
        lets control frames do."""
        out = self.framed
        if not out:
            return self.protocol.data_to_send()
        self.framed = []
        out += self.protocol.data_to_send()
        return out

    def close_expected(self) -> bool:
        return self.protocol.close_expected()

    # -- keepalive -------------------------------------------------------------------------

    def keepalive(self, now: float) -> float | None:
        """Ping when due; fail the link (1011) when a pong is late. When to call next, or None."""
        interval = self.ping_interval_s
        if interval is None or self.protocol.state is not _OPEN:
            return None
        if self._ping is not None:
            timeout = self.ping_timeout_s
            if timeout is not None and now >= self._ping_at + timeout:
                self.fail(CLOSE_KEEPALIVE_TIMEOUT, "keepalive ping timeout")
                return None
            return self._ping_at + timeout if timeout is not None else self._ping_at + interval
        if self._next_ping is None:
            self._next_ping = now + interval
        if now < self._next_ping:
            return self._next_ping
        self._ping, self._ping_at = secrets.token_bytes(4), now
        self.protocol.send_ping(self._ping)
        if self.ping_timeout_s is None:  # nothing to wait for: the next ping is the next deadline
            self._ping, self._next_ping = None, now + interval
            return self._next_ping
        return now + self.ping_timeout_s

    def _pong(self, data: bytes) -> None:
        if self._ping is not None and data == self._ping:
            self._ping = None
            assert self.ping_interval_s is not None
            self._next_ping = self._ping_at + self.ping_interval_s

    # -- flow control (the node's send buffer, docs/protocol.md "Limits") ------------------

    def should_drop(self, buffered: int) -> bool:
        """A droppable frame (a metrics snapshot) is dropped once the buffer is half full."""
        limit = self.send_buffer_bytes
        return limit is not None and buffered * 2 >= limit

    def overflowed(self, buffered: int) -> bool:
        """The peer does not read: the buffer passed its bound (the node closes with 4009)."""
        limit = self.send_buffer_bytes
        return limit is not None and buffered >= limit


# -- 4. the asyncio adapter ------------------------------------------------------------------

_log = logging.getLogger(__name__)


def _ignore(data: Any) -> None:
    return None


class LinkProtocol(asyncio.Protocol):
    """An asyncio Protocol around a ``Link``; each end subclasses it (see the module docstring).

    A subclass sets ``transport`` (``attach``) once the bytes it gets are WebSocket bytes (after the
    node's own TLS upgrade; at once on the Gateway's end) and overrides ``on_open`` and
    ``on_closed``; ``on_message`` and ``on_text`` are attributes, so a session can take the messages
    over after the handshake without a layer in between.
    """

    close_timeout_s = 5.0

    def __init__(self, link: Link) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.on_message: Callable[[bytes | bytearray], None] = _ignore
        self.on_text: Callable[[str], None] = _ignore
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._eof_written = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- for subclasses --------------------------------------------------------------------

    def on_open(self) -> None:
        """The HTTP upgrade is done: the WebSocket is open."""

    def on_closed(self, exc: Exception | None) -> None:
        """The connection is gone (``link.close_info()`` says how)."""

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    # -- asyncio callbacks -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        messages = self.link.receive_data(data)
        self.flush()  # pongs, an echoed close, the upgrade response
        if self.link.protocol.state is not _OPEN:
            self._arm_close_timer()
        for m in messages:
            cls = m.__class__
            if cls is str:
                self.on_text(m)  # type: ignore[arg-type]
            elif cls is Opened:
                self._opened()
            else:
                self.on_message(m)  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        self.link.receive_eof()
        self.flush()
        self._arm_close_timer()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.receive_eof()
        for timer in (self._keepalive_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._keepalive_timer = self._close_timer = None
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_closed(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)

    # -- writing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the Link has framed since the last flush: one ``transport.write``."""
        data = self.link.data_to_send()
        if data:
            self.write(data)

    def write(self, data: list[bytes]) -> None:
        """Write ``data`` (what ``Link.data_to_send`` returned) with one ``transport.write``."""
        transport = self.transport
        if transport is None or self._eof_written or transport.is_closing():
            return
        if SEND_EOF in data:
            self._write_with_eof(transport, data)
        else:
            transport.write(data[0] if len(data) == 1 else b"".join(data))

    def _arm_close_timer(self) -> None:
        """Once a close is under way, the transport is cut ``close_timeout_s`` later at the latest.
        (Called where a close can begin: bytes in, the end of the stream, ``close``, keepalive.)"""
        if self._close_timer is None and self.link.close_expected():
            self._close_timer = self.loop.call_later(self.close_timeout_s, self.abort)

    def _write_with_eof(self, transport: asyncio.Transport, data: list[bytes]) -> None:
        i = data.index(SEND_EOF)
        if i:
            transport.write(b"".join(data[:i]))
        self._eof_written = True  # (websockets writes nothing after it; nor does this)
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except Exception:  # noqa: BLE001 - the peer is gone already; connection_lost follows
                transport.abort()
        else:
            transport.close()  # TLS: no half-close; close after what is buffered is written

    def send(self, payload: bytes) -> bool:
        """Frame and write one binary message now; False when the link is not open."""
        if not self.link.send(payload):
            return False
        self.flush()
        return True

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        if self._paused and not self.closed.done():
            w = self.loop.create_future()
            self._drain_waiters.append(w)
            try:
                await w
            finally:
                self._drain_waiters.remove(w)

    def close(self, code: int = 1000, reason: str = "", *, timeout: float | None = None) -> None:
        """Start the closing handshake; the transport is cut after ``timeout`` (``close_timeout_s``)."""
        if self.transport is None or self.link.state is State.CONNECTING:
            self.abort()  # no WebSocket yet: nothing to close but the connection
            return
        if timeout is not None and self._close_timer is None:
            self._close_timer = self.loop.call_later(timeout, self.abort)
        self.link.close(code, reason)
        self.flush()
        self._arm_close_timer()

    def abort(self) -> None:
        """Cut the connection now (no close frame)."""
        transport = self.transport
        if transport is not None:
            transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    # -- keepalive -------------------------------------------------------------------------

    def _opened(self) -> None:
        self._keepalive()
        self.on_open()

    def _keepalive(self) -> None:
        self._keepalive_timer = None
        at = self.link.keepalive(self.loop.time())
        self.flush()
        if at is None:
            self._arm_close_timer()  # (a late pong failed the link)
        if at is not None and not self.closed.done():
            self._keepalive_timer = self.loop.call_at(at, self._keepalive)
