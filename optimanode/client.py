"""The Gateway side of the Gateway link: connect to nodes, infer, control models, watch metrics.

Written from docs/protocol.md, never importing the node or the server: it imports
``optimanode.protocol``, ``optimanode.errors`` and ``optimanode.link``, the link core the node's
side drives too (the handshake arithmetic, its state, the WebSocket mechanics over websockets'
Sans-I/O protocol), so the two ends cannot drift apart; the independent reference is the
documented test vector and frames, checked as data by tests/unit/test_handshake.py.

How it works:

* ``NodeClient.connect(url, key, fingerprint=...)`` opens a TCP connection with TLS whose context
  verifies nothing itself (``CERT_NONE``, no system CAs, no host name check): the certificate is
  *pinned* instead. ``_GatewayConnection`` (the Gateway's asyncio adapter of ``optimanode.link``)
  checks the SHA-256 of the peer certificate's DER bytes in ``connection_made``, which asyncio
  calls once TLS is up and before anything is written; only when it matches is the HTTP upgrade
  request written. A mismatch aborts the connection with nothing sent and raises
  ``FingerprintMismatch`` with both fingerprints. Then the mutual handshake (``GatewayHandshake``):
  answer the Challenge with a Hello whose MAC proves the key, and check the node's Welcome MAC (a
  node that cannot produce it does not hold the key: ``NodeAuthFailed``). The key never leaves
  this process. TCP, TLS and the upgrade share ``open_timeout``; the handshake gets as long again.
* Every frame is decoded as the connection parses it (from the read callback: no task wakes per
  frame) and routed by ``id`` to the queue of the call waiting for it, so any number of inferences
  and control calls share the connection; the connection's end wakes every waiting call. Every
  Metrics frame also updates ``latest_metrics``, which ``NodePool`` ranks nodes by. A frame that
  does not decode (a newer or buggy node) ends the call its ``id`` names with ``ClientError``; one
  without a usable id fails the connection (close 4400: every waiting call ends).
* ``infer`` is an async iterator of ``TokenChunk`` ... ``InferDone``; an ``Error`` frame raises
  ``RemoteError`` with the node's stable ``code``, ``message`` and ``details``. Leaving the loop
  early (``break``, cancellation) sends ``CancelInfer`` for it.
* ``embed(model, inputs, normalize=True)`` sends one ``EmbedRequest`` (protocol minor 2; an older
  node is refused here, before anything is sent) and returns (vectors in input order, usage).
* When the connection drops, every waiting call raises ``ConnectionLost`` (with the close code).
* ``NodePool`` spreads requests for a model over the nodes whose latest metrics show it running:
  most free slots first (less the requests this pool sent there since that report), then the
  shortest queue, ties taken in turn; except that a request whose prompt starts with text the pool
  sent to a node before (a conversation's next turn) goes to the node holding the longest such
  prefix, which has its K/V cached, unless that node is too busy (optimanode/routing.py says how
  busy; ``stats`` counts the decisions). A node whose connection closed is skipped; a request that
  failed on a node before producing anything (connection lost, overloaded, not running there) is
  tried on the next one. With two or more nodes, a request that would wait in the chosen node's
  queue waits in the pool instead (``hold_s`` at most; its ``deadline_s`` counts that wait): it is
  decided again whenever one of the pool's requests ends or a report comes, so it goes where a slot
  frees first as routing allows, and never sits in one node's queue while another node is idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from optimanode import routing
from optimanode.errors import OptimaNodeError, RequestError
from optimanode.link import (
    LABEL_GATEWAY,
    LABEL_NODE,
    MAX_GATEWAY_INCOMING,
    GatewayHandshake,
    HandshakeError,
    Link,
    LinkProtocol,
    close_reason,
    format_fingerprint,
    mac,
    parse_fingerprint,
)
from optimanode.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_UNAUTHORIZED,
    Ack,
    CancelInfer,
    Configure,
    Disable,
    EmbedRequest,
    Enable,
    Error,
    EventRecord,
    Events,
    ExecutorStatus,
    GatewayToNode,
    GetModel,
    Infer,
    InferDone,
    InferenceRequest,
    ListModels,
    Metrics,
    MetricsReport,
    Models,
    ModelSettings,
    ModelStatus,
    NodeToGateway,
    ReadEvents,
    Rescan,
    SamplingParams,
    Subscribe,
    TokenChunk,
    Unsubscribe,
    Usage,
    Welcome,
    decode_from_node,
    encode_link,
    peek_id_type,
)

log = logging.getLogger(__name__)

# Re-exported: Gateways written against this module (tools, tests) compute MACs with these.
__all__ = ["LABEL_GATEWAY", "LABEL_NODE", "ClientError", "ConnectionFailed", "ConnectionLost", "FingerprintMismatch",
           "NoNodeAvailable", "NodeAuthFailed", "NodeClient", "NodePool", "RemoteError", "format_fingerprint", "mac",
           "normalize_fingerprint"]

# Node → Gateway frames can be large (a model list, 1000 journal events); the node's own limit
# on what it receives is smaller (Welcome.max_frame_bytes).
MAX_INCOMING_FRAME = MAX_GATEWAY_INCOMING
normalize_fingerprint = parse_fingerprint
RETRY_ELSEWHERE = frozenset({"overloaded", "model_not_running", "unknown_model", "shutting_down"})
# NodePool: how long a request may wait in the pool for a free slot before it goes to its node's
# queue anyway, and how often a held request looks at the nodes' reports again.
HOLD_S = 30.0
HOLD_POLL_S = 0.1

_R = TypeVar("_R")


class ClientError(OptimaNodeError):
    """Something went wrong on the Gateway side of the link (not an answer from the node)."""


class ConnectionFailed(ClientError):
    """Could not open a session: unreachable, TLS, or the node refused the handshake (``close_code``)."""

    def __init__(self, message: str, close_code: int | None = None, reason: str = "") -> None:
        self.close_code, self.reason = close_code, reason
        super().__init__(message)


class FingerprintMismatch(ConnectionFailed):
    """The node's certificate is not the pinned one: possibly not the node at all. Nothing was sent."""

    def __init__(self, expected: str, got: str) -> None:
        self.expected, self.got = expected, got
        super().__init__(f"the node's TLS certificate has fingerprint {got}, not the pinned {expected}; "
                         "refusing to talk to it (if the node's certificate was replaced on purpose, "
                         "pin the new one: `optimanode fingerprint` on the node prints it)")


class NodeAuthFailed(ConnectionFailed):
    """The node could not prove it holds the access key (its Welcome MAC is wrong)."""


class ConnectionLost(ClientError):
    """The connection closed while a call was waiting for its answer."""

    def __init__(self, close_code: int | None, reason: str) -> None:
        self.close_code, self.reason = close_code, reason
        super().__init__(f"connection to the node closed ({close_code}{': ' + reason if reason else ''})")


class NoNodeAvailable(ClientError):
    """No node in the pool can take a request for this model now."""


class RemoteError(RequestError):
    """The node answered ``Error``: ``code`` is stable (docs/protocol.md), ``details`` say more."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code)
        self.details = dict(details or {})


class _Lost:
    __slots__ = ("code", "reason")

    def __init__(self, code: int | None, reason: str) -> None:
        self.code, self.reason = code, reason


class _Unreadable:
    """What a call's queue gets for a frame with its id that does not decode: the call ends with
    ClientError(``problem``)."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


class _Closed:
    """What the handshake's inbox gets when the connection ends."""


_CLOSED = _Closed()


class _GatewayConnection(LinkProtocol):
    """The Gateway's asyncio adapter of the link core: pin, upgrade, then frames to ``on_message``.

    ``connection_made`` runs once TLS is up and before anything was written: the pin is checked
    there, and only then is the HTTP upgrade request written. Until the handshake is done, messages
    wait in ``inbox``; then ``NodeClient`` takes them over from the read callback.
    """

    def __init__(self, link: Link, pin: bytes | None) -> None:
        super().__init__(link)
        self.pin: bytes | None = pin
        self.seen_pin: bytes | None = None  # the SHA-256 of the certificate the node showed
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.inbox: asyncio.Queue[bytes | bytearray | str | _Closed] = asyncio.Queue()
        self.on_message = self.on_text = self.inbox.put_nowait
        self.lost_callback: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.attach(transport)
        if self.pin is not None:
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            self.seen_pin = hashlib.sha256(der).digest() if der else b""
            if not hmac.compare_digest(self.seen_pin, self.pin):
                transport.abort()  # nothing was written: an unpinned peer gets not one byte
                return
        self.link.upgrade()
        self.flush()

    def on_open(self) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    def on_closed(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(str(self.link.handshake_exc or exc or "connection closed")))
            self.opened.exception()  # retrieved: connect() may have stopped waiting already
        self.inbox.put_nowait(_CLOSED)
        if self.lost_callback is not None:
            self.lost_callback()

    async def next_message(self, what: str) -> bytes | bytearray | str:
        """The next message of the handshake; ConnectionFailed when the node closes instead."""
        m = await self.inbox.get()
        if isinstance(m, _Closed):
            code, reason = self.link.close_info()
            hint = " (wrong access key?)" if code == CLOSE_UNAUTHORIZED else ""
            raise ConnectionFailed(f"the node closed the connection while this client waited for {what}: "
                                   f"{code} {reason}{hint}", close_code=code, reason=reason)
        return m

    async def shut(self, code: int = 1000, reason: str = "") -> None:
        """Close and wait (bounded by ``close_timeout_s``) for the connection to end."""
        self.close(code, reason)
        await self.wait_closed()


class NodeClient:
    """One authenticated session with one node. Use ``await NodeClient.connect(...)``."""

    def __init__(self, conn: _GatewayConnection, *, url: str, node_id: str, gateway_id: str, version: int,
                 max_frame_bytes: int, call_timeout: float, minor: int = 0) -> None:
        self.url, self.node_id, self.gateway_id, self.version = url, node_id, gateway_id, version
        # The node's protocol minor version (docs/protocol.md, "Versions"): what it adds to `version`.
        self.minor = minor
        self.max_frame_bytes = max_frame_bytes
        self.call_timeout = call_timeout
        self.latest_metrics: MetricsReport | None = None
        self.metrics_seq = 0
        self._conn = conn
        self._waiting: dict[str, asyncio.Queue[Any]] = {}
        self._ids = itertools.count(1)
        self._lost: _Lost | None = None
        self._metrics_event = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        # From here on every message goes from the read callback straight to _on_data; what came
        # with the Welcome (nothing, as the node waits for a request) is taken first.
        while not conn.inbox.empty():
            m = conn.inbox.get_nowait()
            if not isinstance(m, (str, _Closed)):
                self._on_data(m)
        conn.on_message, conn.on_text = self._on_data, _ignore_text
        conn.lost_callback = self._connection_lost
        if conn.closed.done():
            self._connection_lost()

    # -- connecting ------------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, key: bytes, *, fingerprint: str | None = None, gateway_id: str | None = None,
                      open_timeout: float = 10.0, call_timeout: float = 30.0,
                      ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0,
                      insecure_plaintext_for_development: bool = False) -> NodeClient:
        """Open a session; raises ConnectionFailed (FingerprintMismatch, NodeAuthFailed) on failure."""
        if len(key) != 32:
            raise ValueError("the access key is 32 bytes")
        gateway_id = (gateway_id or f"gateway@{socket.gethostname()}")[:128]
        ctx: ssl.SSLContext | None = None
        pin: bytes | None = None
        if url.startswith("wss://"):
            if not fingerprint:
                raise ValueError("a wss:// node needs the fingerprint of its certificate "
                                 "(`optimanode fingerprint` on the node prints it)")
            pin = parse_fingerprint(fingerprint)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            # The pin is the trust: no CA chain, no host name (a node is reached by any address).
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif url.startswith("ws://"):
            if not insecure_plaintext_for_development:
                raise ValueError("ws:// is plaintext: pass insecure_plaintext_for_development=True (development only)")
            log.warning("connecting to %s WITHOUT TLS (development only)", url)
        else:
            raise ValueError(f"not a node URL: {url!r} (expected wss://host:8022)")
        link = Link.client(url, max_size=MAX_INCOMING_FRAME, ping_interval_s=ping_interval, ping_timeout_s=ping_timeout)
        where = urlsplit(url)
        host, port = where.hostname or "", where.port or (443 if ctx is not None else 80)
        loop = asyncio.get_running_loop()
        conn: _GatewayConnection | None = None

        def factory() -> _GatewayConnection:
            nonlocal conn
            conn = _GatewayConnection(link, pin)
            return conn

        try:
            async with asyncio.timeout(open_timeout):
                await loop.create_connection(factory, host, port, ssl=ctx, server_hostname=host if ctx else None)
                assert conn is not None
                await conn.opened
        except Exception as exc:
            if conn is not None:
                conn.abort()
                if pin is not None and conn.seen_pin is not None and conn.seen_pin != pin:
                    raise FingerprintMismatch(format_fingerprint(pin), format_fingerprint(conn.seen_pin)) from None
            if isinstance(exc, TimeoutError):
                raise ConnectionFailed(f"cannot connect to {url}: no WebSocket within {open_timeout:g} s") from None
            raise ConnectionFailed(f"cannot connect to {url}: {type(exc).__name__}: {exc}") from exc
        try:
            async with asyncio.timeout(open_timeout):
                welcome = await _handshake(conn, GatewayHandshake(key, gateway_id))
        except TimeoutError:
            await conn.shut()
            raise ConnectionFailed(f"{url}: the handshake did not finish within {open_timeout:g} s") from None
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.shut()
            raise
        return cls(conn, url=url, node_id=welcome.node_id, gateway_id=gateway_id, version=welcome.version,
                   minor=welcome.minor, max_frame_bytes=welcome.max_frame_bytes, call_timeout=call_timeout)

    # -- plumbing --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._lost is not None

    async def close(self) -> None:
        await self._conn.shut()

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connection_lost(self, lost: _Lost | None = None) -> None:
        if self._lost is None:
            self._lost = lost or _Lost(*self._conn.link.close_info())
            for q in self._waiting.values():
                q.put_nowait(self._lost)
            self._metrics_event.set()  # wakes wait_metrics, which then raises ConnectionLost

    def _on_data(self, data: bytes | bytearray) -> None:
        try:
            msg = decode_from_node(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._unreadable(data, exc)
            return
        self._route(msg)

    def _unreadable(self, data: bytes | bytearray, exc: Exception) -> None:
        """A frame that does not decode (a newer or buggy node): dropping it could leave a call
        waiting for ever (a stream's InferDone), so the call its ``id`` names ends with ClientError;
        a frame without a usable id could have been for any call, so the connection is failed
        (close 4400) and every waiting call ends with ConnectionLost."""
        rid, kind = peek_id_type(data)
        what = f"a {kind!r} frame" if kind else "a frame"
        if rid:
            problem = f"node {self.node_id} sent {what} for {rid} that this client cannot read: {exc}"
            q = self._waiting.get(rid)
            if q is None:
                log.warning("%s (no call waits for it: dropped)", problem)
                return
            log.warning("%s", problem)
            q.put_nowait(_Unreadable(problem))
            return
        reason = f"unreadable frame from the node: {exc}"
        log.warning("node %s sent %s without an id that this client cannot read (%s): closing the connection "
                    "(%d)", self.node_id, what, exc, CLOSE_BAD_FRAME)
        if self._lost is None:
            # Every waiting call ends now, with this reason, not after the closing handshake.
            self._connection_lost(_Lost(CLOSE_BAD_FRAME, close_reason(reason)))
        self._conn.close(CLOSE_BAD_FRAME, reason)

    def _route(self, msg: NodeToGateway) -> None:
        if isinstance(msg, Metrics):
            self.latest_metrics = msg.report
            self.metrics_seq += 1
            self._metrics_event.set()
        rid = getattr(msg, "id", None)
        q = self._waiting.get(rid) if rid else None
        if q is not None:
            q.put_nowait(msg)
        elif isinstance(msg, Error) and not msg.id:
            log.warning("node %s: %s: %s %s", self.node_id, msg.code, msg.message, msg.details)

    def new_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    def _register(self, rid: str) -> asyncio.Queue[Any]:
        if rid in self._waiting:
            raise ValueError(f"request id {rid!r} is already in use on this connection")
        q: asyncio.Queue[Any] = asyncio.Queue()
        if self._lost is not None:
            q.put_nowait(self._lost)
        self._waiting[rid] = q
        return q

    async def send(self, msg: GatewayToNode) -> None:
        """Send one frame as it is (for callers speaking the protocol directly)."""
        if self._lost is not None:
            raise ConnectionLost(self._lost.code, self._lost.reason)
        conn = self._conn
        if not conn.send(encode_link(msg)):  # closing: the close frame is on its way
            raise ConnectionLost(*conn.link.close_info())
        await conn.drain()  # waits only while the socket does not take what was written

    def _send_later(self, msg: GatewayToNode) -> None:
        async def go() -> None:
            with contextlib.suppress(ClientError):
                await self.send(msg)

        if self._lost is None:
            t = asyncio.ensure_future(go())
            self._background.add(t)
            t.add_done_callback(self._background.discard)

    @staticmethod
    def _check(msg: Any) -> None:
        if isinstance(msg, _Lost):
            raise ConnectionLost(msg.code, msg.reason)
        if isinstance(msg, _Unreadable):
            raise ClientError(msg.problem)
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message, msg.details)

    async def _call(self, msg: GatewayToNode, reply: type[_R], timeout: float | None = None) -> _R:
        rid: str = msg.id  # type: ignore[union-attr]
        q = self._register(rid)
        try:
            await self.send(msg)
            async with asyncio.timeout(timeout or self.call_timeout):
                answer = await q.get()
        finally:
            self._waiting.pop(rid, None)
        self._check(answer)
        if not isinstance(answer, reply):
            raise ClientError(f"unexpected answer to {type(msg).__name__}: {type(answer).__name__}")
        return answer

    # -- inference -------------------------------------------------------------------------

    async def infer(self, model: str, request: InferenceRequest, *,
                    request_id: str | None = None) -> AsyncIterator[TokenChunk | InferDone]:
        """TokenChunk..., then InferDone; RemoteError on the node's Error. Leaving early cancels it."""
        rid = request_id or self.new_id("r")
        q = self._register(rid)
        finished = False
        try:
            await self.send(Infer(id=rid, model=model, request=request))
            while True:
                msg = await q.get()
                if isinstance(msg, (Error, _Lost)):
                    finished = True
                    self._check(msg)
                if isinstance(msg, _Unreadable):
                    self._check(msg)  # not `finished`: the CancelInfer stops it if the node still runs it
                if isinstance(msg, InferDone):
                    finished = True
                    yield msg
                    return
                if isinstance(msg, TokenChunk):
                    yield msg
        finally:
            self._waiting.pop(rid, None)
            if not finished:
                self._send_later(CancelInfer(id=rid))

    async def embed(self, model: str, inputs: list[str], normalize: bool = True, *,
                    deadline_s: float | None = None) -> tuple[list[list[float]], Usage]:
        """One vector per input, in order, and the usage (docs/protocol.md, "Embeddings"); the
        node's Error raises RemoteError. Needs a node of protocol minor 2 or later."""
        if self.minor < 2:
            raise ClientError(f"node {self.node_id} speaks protocol minor {self.minor}; embeddings need minor 2")
        return await _embedded(self.infer(model, _embed_request(inputs, normalize, deadline_s)))

    async def cancel(self, request_id: str) -> None:
        """Ask the node to stop request ``request_id``; its stream ends with InferDone or Error(cancelled)."""
        await self.send(CancelInfer(id=request_id))

    # -- control ---------------------------------------------------------------------------

    async def models(self) -> list[ExecutorStatus]:
        return (await self._call(ListModels(id=self.new_id("c")), Models)).models

    async def status(self, model: str) -> ExecutorStatus:
        return (await self._call(GetModel(id=self.new_id("c"), model=model), ModelStatus)).status

    async def enable(self, model: str) -> ExecutorStatus:
        return (await self._call(Enable(id=self.new_id("c"), model=model), ModelStatus)).status

    async def disable(self, model: str, *, now: bool = False) -> ExecutorStatus:
        """Stop the model: its worker drains first, or with ``now`` its running requests are cut."""
        return (await self._call(Disable(id=self.new_id("c"), model=model, now=now), ModelStatus)).status

    async def configure(self, model: str, settings: ModelSettings) -> ExecutorStatus:
        return (await self._call(Configure(id=self.new_id("c"), model=model, settings=settings), ModelStatus)).status

    async def rescan(self) -> list[ExecutorStatus]:
        return (await self._call(Rescan(id=self.new_id("c")), Models, timeout=max(self.call_timeout, 120.0))).models

    async def events(self, model: str | None = None, limit: int = 100) -> list[EventRecord]:
        return (await self._call(ReadEvents(id=self.new_id("c"), model=model, limit=limit), Events)).events

    # -- metrics ---------------------------------------------------------------------------

    async def metrics(self, interval: float = 1.0) -> AsyncIterator[MetricsReport]:
        """Reports every ``interval`` s (the first at once) until the loop is left (then Unsubscribe).

        A session has one subscription: this replaces any other on this connection (``subscribe``).
        """
        sid = self.new_id("m")
        q = self._register(sid)
        try:
            await self.send(Subscribe(id=sid, interval_s=interval))
            while True:
                msg = await q.get()
                self._check(msg)
                if isinstance(msg, Metrics):
                    yield msg.report
        finally:
            self._waiting.pop(sid, None)
            self._send_later(Unsubscribe(id=self.new_id("c")))

    async def subscribe(self, interval: float = 1.0) -> None:
        """Keep ``latest_metrics`` fresh in the background (what NodePool ranks by)."""
        await self._call(Subscribe(id=self.new_id("m"), interval_s=interval), Ack)

    async def wait_metrics(self, timeout: float) -> MetricsReport:
        """The latest report, waiting up to ``timeout`` for a first one."""
        async with asyncio.timeout(timeout):
            while self.latest_metrics is None:
                if self._lost is not None:
                    raise ConnectionLost(self._lost.code, self._lost.reason)
                self._metrics_event.clear()
                await self._metrics_event.wait()
        return self.latest_metrics


def _embed_request(inputs: list[str], normalize: bool, deadline_s: float | None) -> EmbedRequest:
    if isinstance(inputs, str):  # a lone string would be embedded character by character
        raise TypeError("inputs must be a list of strings, not a string")
    params = SamplingParams(deadline_s=deadline_s) if deadline_s is not None else SamplingParams()
    return EmbedRequest(input=list(inputs), normalize=normalize, params=params)


async def _embedded(stream: AsyncIterator[TokenChunk | InferDone]) -> tuple[list[list[float]], Usage]:
    """The vectors and usage of an embed request's stream (an InferDone, no chunks)."""
    async with contextlib.aclosing(stream):
        async for msg in stream:
            if isinstance(msg, InferDone):
                if msg.embeddings is msgspec.UNSET:
                    raise ClientError(f"the node answered an embed request without vectors ({msg.finish_reason})")
                return msg.embeddings, msg.usage
    raise ClientError("the stream ended without InferDone")


async def _handshake(conn: _GatewayConnection, handshake: GatewayHandshake) -> Welcome:
    """Challenge → Hello → Welcome, checking the node's proof; ConnectionFailed otherwise."""
    try:
        hello = handshake.receive_challenge(await conn.next_message("its challenge"))
        conn.send(hello)
        return handshake.receive_welcome(await conn.next_message("its welcome"))
    except HandshakeError as exc:
        await conn.shut(exc.close_code, exc.reason)
        if exc.close_code == CLOSE_UNAUTHORIZED:
            raise NodeAuthFailed("the node did not prove it holds the access key (its welcome MAC is wrong)",
                                 close_code=exc.close_code) from None
        raise ConnectionFailed(exc.reason, close_code=exc.close_code if exc.close_code != 1000 else None) from None


def _ignore_text(text: str) -> None:
    return None  # text frames are not part of the protocol; the node sends none


def _room(load: float | None, known: int) -> bool:
    """Send now: the chosen node has a free slot for the request (its load with it at most 1), or
    there is no other node with a report to wait for (one node: its own queue is the place)."""
    return load is None or load <= 1.0 or known < 2


@dataclass(eq=False)
class _Held:
    """A request waiting in a NodePool for a free slot: what it is decided by, and its answer."""

    model: str
    exclude: list[NodeClient]
    hashes: list[bytes]
    since: float
    fut: asyncio.Future[tuple[NodeClient, float]]


class NodePool:
    """Requests for a model go to the node best placed to serve them (see the module docstring)."""

    def __init__(self, clients: Iterable[NodeClient], *, prefix_routing: bool = True,
                 block_chars: int = routing.BLOCK_CHARS, index_entries: int = routing.INDEX_ENTRIES,
                 busy_limit: float = routing.BUSY_LIMIT, load_slack: float = routing.LOAD_SLACK,
                 hold_s: float = HOLD_S) -> None:
        self.clients: list[NodeClient] = list(clients)
        # How long a request may wait in the pool for a slot (0: never; it queues on its node).
        self.hold_s = hold_s
        # Requests waiting in the pool for a free slot, oldest first (``_placed``), and the task that
        # looks at them again while there are any.
        self._held: collections.deque[_Held] = collections.deque()
        self._poller: asyncio.Task[None] | None = None
        self._turn = itertools.count()
        # Requests this pool sent to a client since its metrics report number `seq` and not yet
        # ended: {client: (seq, sent)}; and requests sent before that report that ended after it
        # (the report may still count them as running): {client: (seq, ended)}. Reports come at the
        # subscription's interval, or later on a busy node: a conversation's next turn comes sooner.
        self._sent: dict[int, tuple[int, int]] = {}
        self._ended: dict[int, tuple[int, int]] = {}
        # Prefix-aware routing (optimanode/routing.py): what this pool sent to each node, by node id.
        self.prefix_routing = prefix_routing
        self.block_chars, self.index_entries = block_chars, index_entries
        self.busy_limit, self.load_slack = busy_limit, load_slack
        self._indexes: dict[str, routing.PrefixIndex] = {}
        self.stats = routing.RoutingStats()

    def add(self, client: NodeClient) -> None:
        self.clients.append(client)

    async def watch(self, interval: float = 1.0, timeout: float = 10.0) -> None:
        """Subscribe every client to metrics and wait (bounded) for a first report from each."""
        async def one(c: NodeClient) -> None:
            with contextlib.suppress(ClientError, RequestError, TimeoutError):
                await c.subscribe(interval)
                await c.wait_metrics(timeout)

        await asyncio.gather(*(one(c) for c in self.clients if not c.closed))

    def _pending(self, c: NodeClient) -> int:
        seq, sent = self._sent.get(id(c), (c.metrics_seq, 0))
        return sent if seq == c.metrics_seq else 0

    def _finished(self, c: NodeClient, seq: int) -> None:
        """A request sent to ``c`` when its report number was ``seq`` has ended: it no longer counts
        against the node, whether it was sent since the latest report or counted in it."""
        if seq == c.metrics_seq:
            sent_seq, sent = self._sent.get(id(c), (-1, 0))
            if sent_seq == seq and sent > 0:
                self._sent[id(c)] = (seq, sent - 1)
        else:
            self._ended[id(c)] = (c.metrics_seq, self._ended_since_report(c) + 1)
        self._release_held()  # its slot may be the one a held request waits for

    def _ended_since_report(self, c: NodeClient) -> int:
        seq, ended = self._ended.get(id(c), (c.metrics_seq, 0))
        return ended if seq == c.metrics_seq else 0

    def index(self, c: NodeClient) -> routing.PrefixIndex:
        """The prefixes this pool sent to ``c``'s node (kept across reconnects: keyed by node id)."""
        return self._indexes.setdefault(c.node_id or str(id(c)), routing.PrefixIndex(self.index_entries))

    def _scored(self, model: str, exclude: Iterable[NodeClient]) -> list[tuple[NodeClient, float | None]]:
        """Connected clients that can serve ``model``, best-loaded first, with their load with one
        more request (None: no metrics report yet)."""
        skip = {id(c) for c in exclude}
        start = next(self._turn)
        n = max(1, len(self.clients))
        known: list[tuple[tuple[int, int, int], NodeClient, float]] = []
        unknown: list[NodeClient] = []
        for i, c in enumerate(self.clients):
            if c.closed or id(c) in skip:
                continue
            report = c.latest_metrics
            if report is None:
                unknown.append(c)  # no report yet: a last resort rather than never
                continue
            em = next((e for e in report.executors if e.id == model and e.state == "running"), None)
            if em is None:
                continue
            pending = self._pending(c)
            # Requests of this pool that the report counts as running but that have ended since.
            ended = min(self._ended_since_report(c), max(0, em.parallel - em.free_slots))
            free = em.free_slots + ended - pending
            queue = em.queue_depth + max(0, -free)
            load = (em.parallel - em.free_slots - ended + em.queue_depth + pending + 1) / max(1, em.parallel)
            known.append(((-free, queue, (i - start) % n), c, load))
        known.sort(key=lambda kc: kc[0])
        return [(c, load) for _, c, load in known] + [(c, None) for c in unknown]

    def ranked(self, model: str, exclude: Iterable[NodeClient] = ()) -> list[NodeClient]:
        """Connected clients that can serve ``model``, best-loaded first."""
        return [c for c, _ in self._scored(model, exclude)]

    def pick(self, model: str, exclude: Iterable[NodeClient] = (), request: InferenceRequest | None = None) -> NodeClient:
        """The node for a request: the one holding its prompt's longest prefix unless too busy
        (optimanode/routing.py), else the best-loaded; counted in ``stats``."""
        hashes = self._hashes(request)
        c, _, _, why = self._choice(model, exclude, hashes)
        return self._commit(c, why, hashes)

    def _hashes(self, request: InferenceRequest | None) -> list[bytes]:
        return (routing.block_hashes(routing.prompt_text(request), self.block_chars)
                if self.prefix_routing and request is not None else [])

    def _choice(self, model: str, exclude: Iterable[NodeClient],
                hashes: list[bytes]) -> tuple[NodeClient, float | None, int, str]:
        """(the node, its load with this request, how many nodes have reports, why); changes nothing."""
        scored = self._scored(model, exclude)
        if not scored:
            raise NoNodeAvailable(f"no connected node reports model {model!r} running")
        c, load = scored[0]
        why = "no_prefix"
        known = [(cl, ld) for cl, ld in scored if ld is not None]
        if hashes:
            if len(known) > 1:
                candidates = [routing.Candidate(key=k, matched=self.index(cl).matched(hashes), load=ld)
                              for k, (cl, ld) in enumerate(known)]
                key, why = routing.choose(candidates, busy_limit=self.busy_limit, load_slack=self.load_slack)
                c, load = known[key]
            elif self.index(c).matched(hashes):
                why = "prefix"
        return c, load, len(known), why

    def _commit(self, c: NodeClient, why: str, hashes: list[bytes]) -> NodeClient:
        if hashes:
            self.index(c).record(hashes)
        self.stats.requests += 1
        setattr(self.stats, why, getattr(self.stats, why) + 1)
        self._sent[id(c)] = (c.metrics_seq, self._pending(c) + 1)
        return c

    async def _placed(self, model: str, exclude: Iterable[NodeClient], request: InferenceRequest,
                      deadline_s: float | None = None) -> tuple[NodeClient, float]:
        """``pick``, but while the chosen node has no free slot for it (load with it over 1) and
        another node reports too, wait in the pool for at most ``hold_s`` (and ``deadline_s``).
        Returns the node and the seconds held.

        Why in the pool and not in the node's queue: once queued on a node a request stays there,
        even when another node goes idle meanwhile (seen at the end of the pooled benchmark: one
        node's last conversations queued while the other had nothing to do). Held requests are
        decided again in the order they came (``_release_held``), whenever one of the pool's
        requests ends and every HOLD_POLL_S (for the reports): first come, first served, as a
        node's own queue is. An earlier version let each held request look again on its own
        timer; the order scrambled and, in the pooled benchmark, the median TTFT fell while the
        90th percentile doubled (docs/benchmarks.md)."""
        loop = asyncio.get_running_loop()
        limit = self.hold_s if deadline_s is None else min(self.hold_s, deadline_s)
        hashes = self._hashes(request)
        c, load, known, why = self._choice(model, exclude, hashes)
        # At most as many held as the nodes have slots: past that the nodes' queues (and their
        # `overloaded`) take the overflow, so an overload still shows where it is.
        if _room(load, known) or limit <= 0 or len(self._held) >= self._slots(model):
            return self._commit(c, why, hashes), 0.0
        held = _Held(model, list(exclude), hashes, loop.time(), loop.create_future())
        self._held.append(held)
        self.stats.held += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_held(), name="nodepool-held")
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(held.fut)
        except TimeoutError:
            if held.fut.done():
                return held.fut.result()
            # Held as long as it may: to the node chosen now, to wait in its queue (``finally``
            # takes it off the held list; nothing runs in between).
            c, _, _, why = self._choice(model, exclude, hashes)
            return self._commit(c, why, hashes), loop.time() - held.since
        finally:
            with contextlib.suppress(ValueError):
                self._held.remove(held)  # the caller went away while held

    @property
    def holding(self) -> int:
        """Requests waiting in the pool now (a Gateway may show it beside the nodes' queues)."""
        return len(self._held)

    def _release_held(self) -> None:
        """Send every held request whose chosen node now has a free slot for it, oldest first."""
        if not self._held:
            return
        now = asyncio.get_running_loop().time()
        for held in list(self._held):
            if held.fut.done():
                continue
            try:
                c, load, known, why = self._choice(held.model, held.exclude, held.hashes)
            except NoNodeAvailable as exc:
                self._held.remove(held)
                held.fut.set_exception(exc)
                continue
            if _room(load, known):
                self._held.remove(held)
                held.fut.set_result((self._commit(c, why, held.hashes), now - held.since))

    async def _poll_held(self) -> None:
        """While requests are held: look again every HOLD_POLL_S (a report may show a free slot)."""
        while self._held:
            await asyncio.sleep(HOLD_POLL_S)
            self._release_held()

    def _slots(self, model: str) -> int:
        """The slots of the connected nodes whose latest report shows ``model`` running."""
        total = 0
        for c in self.clients:
            report = None if c.closed else c.latest_metrics
            if report is not None:
                total += sum(e.parallel for e in report.executors if e.id == model and e.state == "running")
        return total

    async def infer(self, model: str, request: InferenceRequest) -> AsyncIterator[TokenChunk | InferDone]:
        """Like NodeClient.infer, on the best node; moves on if a node fails before the first frame."""
        tried: list[NodeClient] = []
        last: Exception | None = None
        while True:
            try:
                client, held = await self._placed(model, tried, request, request.params.deadline_s)
            except NoNodeAvailable:
                if last is not None:
                    raise last from None
                raise
            deadline_s = request.params.deadline_s
            if held and deadline_s is not None:
                # The wait in the pool counts against the request's deadline, as a node queue's would.
                if held >= deadline_s:
                    raise RemoteError("deadline_exceeded", f"the request's deadline of {deadline_s:g} s passed "
                                      "while it waited in the pool for a free slot",
                                      {"deadline_ms": round(deadline_s * 1000)})
                request = msgspec.structs.replace(
                    request, params=msgspec.structs.replace(request.params, deadline_s=deadline_s - held))
            started = False
            seq = client.metrics_seq
            try:
                async with contextlib.aclosing(client.infer(model, request)) as stream:
                    async for msg in stream:
                        started = True
                        yield msg
                return
            except ConnectionLost as exc:
                if started:
                    raise
                last = exc
            except RemoteError as exc:
                if started or exc.code not in RETRY_ELSEWHERE:
                    raise
                last = exc
            finally:
                self._finished(client, seq)
            log.info("node %s could not take a request for %s (%s); trying the next", client.node_id, model, last)
            tried.append(client)

    async def embed(self, model: str, inputs: list[str], normalize: bool = True, *,
                    deadline_s: float | None = None) -> tuple[list[list[float]], Usage]:
        """Like NodeClient.embed, on the best node (moving on as ``infer`` does)."""
        return await _embedded(self.infer(model, _embed_request(inputs, normalize, deadline_s)))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
