"""The Gateway link server: TLS WebSocket on listen.host:listen.port, authenticated sessions.

How it works:

* ``start`` makes sure the TLS certificate (gateway/tls.py) and the access key (gateway/keys.py)
  exist, generating them on first start, then listens with ``loop.create_server`` and one
  ``NodeConnection`` per TCP connection: the node's asyncio adapter of the link core
  (``optimanode.link``: a websockets ``ServerProtocol`` underneath, no extension so no compression,
  ``max_size`` 1 MiB per incoming message, a bigger one closes the connection with 1009; keepalive
  pings every 20 s, a Gateway that stops answering for 20 s more is closed, 1011, and its requests
  cancelled). Plain ``ws://`` is available only with ``insecure_plaintext_for_development=True``,
  and says so loudly in the log.
* Each connection: the listener is plain TCP and TLS is each connection's own, so an address can be
  turned away at TCP accept, before any handshake work. An address locked out by the
  ``FailureLimiter`` (too many failed handshakes) is closed at once with 4008, the first
  ``POLITE_REFUSALS`` times in a lockout; after that its connections are dropped at accept. So is
  a connection past the bound on connections not yet authenticated (``MAX_PENDING`` in all,
  ``MAX_PENDING_PER_ADDRESS`` from one address): each holds a descriptor, a TLS state and up to a
  frame's buffer until its deadlines, and without a bound a keyless peer holding a few hundred idle
  ones would use up the node's descriptors and keep real Gateways out. Otherwise ``connection_made`` pauses the raw transport and upgrades it with ``loop.start_tls``;
  bytes that reach the connection between the TLS handshake and the upgrade's return are kept and
  fed in order. TCP, TLS and the HTTP upgrade must finish within ``listen.open_timeout_s`` (10 s,
  from the accept; the connection is cut otherwise, with no close code: there is no WebSocket
  yet). Then the node sends its Challenge and the authenticated Hello must follow within
  ``listen.hello_timeout_s`` (5 s; 4002 otherwise). ``NodeHandshake`` (optimanode.link) judges the
  first frame: any other message 4001, a frame that does not decode 4400, a wrong MAC 4001, an
  unoffered version 4003. Every connection that ends without a Welcome counts as a failure
  against the remote address, wherever it ended (TLS, the HTTP upgrade, the open deadline, the
  handshake), except a 4008 refusal and the node's own stop (an address counts as itself; an IPv6
  one by its /64 network, ``limit_key``); nothing but the handshake is read
  before it succeeds. A refusal's reason is logged escaped and cut short (``printable``): it may
  quote what the peer sent. The keys are re-read when the key files change (rotation
  needs no restart).
* After the Welcome, a ``Session`` (gateway/session.py) serves the connection: the connection hands
  it every message from its read callback (``Session.on_frame``). Several Gateways may be connected
  at once; each has its own session, queue and tasks. A session is one INFO line ("Gateway 'gw'
  connected from ADDR (session SID)"); its end is INFO only when the close was not clean.
  websockets' own per-connection INFO lines go to DEBUG with the address and session as fields
  (``_LinkLog``), so a busy node's log is not a line per handshake step.
* ``stop`` ends every session at once: its running requests get ``shutting_down`` (and are
  cancelled on the workers), then close code 1001; connections still in their handshake are closed
  with 1001 too (or cut, before the upgrade); then the listener closes. For a graceful stop,
  ``await node.drain()`` first (new requests are refused with ``shutting_down`` while running ones
  finish), then ``await server.stop()``, then ``await node.stop()``.
* Metrics come from the ``sample`` callable (optimanode.metrics.Sampler.sample in the node). Its
  report is reused for 0.1 s so that many subscribed Gateways do not multiply its cost.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from optimanode.config import Settings
from optimanode.errors import ConfigError
from optimanode.gateway.handshake import FailureLimiter
from optimanode.gateway.keys import KeyRing, ensure_key
from optimanode.gateway.session import Session
from optimanode.gateway.tls import ensure_certificate, fingerprint_file, server_context
from optimanode.link import (
    MAX_FRAME_BYTES,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    SEND_BUFFER_BYTES,
    HandshakeError,
    Link,
    LinkProtocol,
    NodeHandshake,
)
from optimanode.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_RATE_LIMITED,
    MetricsReport,
)

if TYPE_CHECKING:
    from optimanode.node import Node

log = logging.getLogger(__name__)
_ws_log = logging.getLogger("optimanode.gateway.websockets")


class _LinkLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger for one connection: its INFO lines ("connection open", "connection closed",
    "connection rejected") go to DEBUG, with the peer's address and, once there is one, the session.

    The node writes the one INFO line a Gateway's connection is worth itself (``NodeConnection._serve``);
    websockets' warnings and errors keep their level.
    """

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)  # type: ignore[arg-type]


SAMPLE_REUSE_S = 0.1
CLOSE_INTERNAL_ERROR = 1011
# A locked-out address gets the WebSocket close 4008 ("retry in N s") this many times per lockout;
# its later connections in the same lockout are dropped at accept, before any TLS, so a peer that
# ignores 4008 and reconnects in a loop costs the node no handshake (a TLS handshake is the bulk of
# what a wrong-key flood costs: docs/reliability.md).
POLITE_REFUSALS = 3
# Connections accepted and not yet authenticated that the node holds at once, in all and from one
# address (a Gateway opens one connection per node; a few Gateways behind one NAT address stay far
# below). Past either a new connection is dropped at accept, before TLS.
MAX_PENDING = 256
MAX_PENDING_PER_ADDRESS = 16
# How often (seconds) a full pending bound is logged at WARNING; the drops between go to DEBUG.
PENDING_WARN_INTERVAL_S = 60.0

__all__ = ["MAX_FRAME_BYTES", "MAX_PENDING", "MAX_PENDING_PER_ADDRESS", "PING_INTERVAL_S", "PING_TIMEOUT_S",
           "POLITE_REFUSALS", "SEND_BUFFER_BYTES", "GatewayServer", "NodeConnection", "limit_key", "printable"]


def _address(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def limit_key(addr: str) -> str:
    """What the failure limiter and the pending bounds count by: an IPv4 address itself (an
    IPv4-mapped IPv6 one too), an IPv6 address's /64 network (one host is usually given a whole /64,
    and would otherwise get a fresh budget from each of its addresses)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def printable(text: str, limit: int = 200) -> str:
    """``text`` for a log line: control characters escaped (a peer's newline cannot start a forged
    line of its own) and cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit + 1])
    return out[:limit] + "..." if len(out) > limit else out


class NodeConnection(LinkProtocol):
    """One Gateway's TCP connection on the node: the lockout check, TLS, the handshake, then a Session.

    The node's asyncio adapter of ``optimanode.link`` (see the module docstring for the order of
    things); the Session reads and writes through it.
    """

    def __init__(self, server: GatewayServer) -> None:
        # Fields of websockets' log lines for this connection; filled in as they become known.
        self.log_fields: dict[str, object] = {"peer": "?"}
        super().__init__(Link.server(max_frame_bytes=server.max_frame_bytes, logger=_LinkLog(_ws_log, self.log_fields),
                                     ping_interval_s=server.ping_interval_s, ping_timeout_s=server.ping_timeout_s,
                                     send_buffer_bytes=server.send_buffer_bytes))
        self.server = server
        self.addr = "?"
        self.key = "?"  # what the limits count by (limit_key)
        self.session: Session | None = None
        self._raw: asyncio.Transport | None = None  # the TCP transport, before TLS
        self._early: list[bytes] | None = None  # bytes that arrived before start_tls returned
        self._timer: asyncio.TimerHandle | None = None  # the open, then the hello deadline
        self._handshake: NodeHandshake | None = None
        # Whether this connection's outcome is settled for the limiter: a Welcome, a failure
        # counted, a 4008 refusal, the node's stop. One that ends unsettled is a failure.
        self._settled = False
        self._holds_pending = False  # counted in the server's connections not yet authenticated

    # -- accept, TLS ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        srv = self.server
        self.addr = _address(transport.get_extra_info("peername"))
        self.log_fields["peer"] = self.addr
        self.key = limit_key(self.addr)
        if not srv._admit(self.key):
            transport.abort()
            return
        self._raw = transport
        srv._connections.add(self)
        srv._pending_add(self.key, 1)
        self._holds_pending = True
        self._timer = self.loop.call_later(srv.open_timeout_s, self._open_timeout)
        if srv._tls is None:
            self.attach(transport)
            return
        transport.pause_reading()  # start_tls resumes it; a ClientHello must not reach the link
        self._early = []
        task = self.loop.create_task(self._upgrade(transport, srv._tls), name="gateway-tls")
        srv._tls_tasks.add(task)
        task.add_done_callback(srv._tls_tasks.discard)

    async def _upgrade(self, raw: asyncio.Transport, tls: ssl.SSLContext) -> None:
        try:
            secure = await self.loop.start_tls(raw, self, tls, server_side=True,
                                               ssl_handshake_timeout=self.server.open_timeout_s)
        except asyncio.CancelledError:
            raw.abort()  # the server is stopping
            raise
        except Exception as exc:  # noqa: BLE001 - a failed or timed-out TLS handshake: the peer's problem
            log.debug("TLS handshake from %s failed: %s", self.addr, exc)
            raw.abort()
            self.connection_lost(None)  # asyncio does not say so when TLS never came up
            return
        if secure is None:
            raw.abort()
            self.connection_lost(None)
            return
        early, self._early = self._early or [], None
        self.attach(secure)
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
        elif self.transport is not None:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return super().eof_received() if self.transport is not None else None

    def abort(self) -> None:
        (self.transport or self._raw or _NoTransport).abort()

    def _open_timeout(self) -> None:
        self._timer = None
        if not self.link.opened:
            log.debug("connection from %s did not open (TLS and HTTP upgrade) within %g s", self.addr,
                      self.server.open_timeout_s)
            self.abort()

    # -- the WebSocket is open: the handshake -----------------------------------------------

    def on_open(self) -> None:
        srv = self.server
        self._cancel_timer()
        if srv._stopping:
            self._settled = True
            self.close(CLOSE_GOING_AWAY, "node shutting down")
            return
        wait = srv.limiter.blocked_for(self.key)
        if wait > 0:
            self._settled = True  # a refused attempt does not extend the lockout
            srv._refuse(self.key, wait)
            self.close(CLOSE_RATE_LIMITED, f"too many failed handshakes; retry in {math.ceil(wait)} s")
            return
        self._handshake = NodeHandshake(srv.node_id, srv.keyring.keys, max_frame_bytes=srv.max_frame_bytes)
        self.on_message = self.on_text = self._on_handshake_frame
        self._timer = self.loop.call_later(srv.handshake_timeout_s, self._hello_timeout)
        self.send(self._handshake.challenge())

    def _fail(self, code: int, reason: str) -> None:
        """A failed handshake: counted against the address, answered with nothing but the close."""
        self._handshake = None
        self.on_message = self.on_text = _drop
        self._cancel_timer()
        self.close(code, reason)

    def _hello_timeout(self) -> None:
        self._timer = None
        if self._handshake is None:
            return
        t = self.server.handshake_timeout_s
        self._count_failure()
        log.warning("Gateway handshake from %s did not finish within %g s", self.addr, t)
        self._fail(CLOSE_HANDSHAKE_TIMEOUT, f"handshake not finished within {t:g} s")

    def _on_handshake_frame(self, data: bytes | bytearray | str) -> None:
        handshake, srv = self._handshake, self.server
        if handshake is None:
            return
        try:
            welcome = handshake.receive(data if isinstance(data, str) else bytes(data))
        except HandshakeError as exc:
            self._count_failure()
            log.warning("refused a Gateway from %s: %s", self.addr, printable(exc.reason))
            self._fail(exc.close_code, exc.reason)
            return
        except ConfigError as exc:
            log.error("cannot check Gateway handshakes: %s", exc)
            self._fail(CLOSE_INTERNAL_ERROR, "the node's access key is misconfigured")
            return
        hello = handshake.hello
        assert hello is not None
        self._handshake = None
        self._cancel_timer()
        self._settled = True
        self._release_pending()
        srv.limiter.success(self.key)
        self.send(welcome)
        session = Session(conn=self, node=srv.node, gateway_id=hello.gateway_id, sample=srv.sample,
                          send_buffer_bytes=srv.send_buffer_bytes)
        self.session = session
        self.on_message = self.on_text = session.on_frame  # from here on, straight to the session
        task = self.loop.create_task(self._serve(session), name=f"gateway-session-{session.sid}")
        srv._session_tasks.add(task)
        task.add_done_callback(srv._session_tasks.discard)

    async def _serve(self, session: Session) -> None:
        srv = self.server
        srv.sessions.add(session)
        self.log_fields["session"] = session.sid
        # The one INFO line of a connection; its clean end (1000, 1001, or ours still closing) is DEBUG.
        log.info("Gateway %r connected from %s (session %s)", session.gateway_id, self.addr, session.sid)
        try:
            await session.run()
        finally:
            srv.sessions.discard(session)
            code = self.link.close_info()[0]
            log.log(logging.DEBUG if code in (None, 1000, 1001) else logging.INFO,
                    "Gateway %r from %s disconnected (session %s, close code %s)", session.gateway_id, self.addr,
                    session.sid, code)

    # -- the end ----------------------------------------------------------------------------

    def on_closed(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._handshake is not None:  # gone in the middle of the handshake: a failure too
            self._handshake = None
            self._count_failure()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._raw is None or self.closed.done():
            return  # dropped at accept, or already ended
        self._cancel_timer()
        self.server._connections.discard(self)
        self._release_pending()
        if not self._settled and not self.server._stopping:
            # Ended before a Welcome anywhere else: a failed or abandoned TLS handshake, a request
            # that was not a WebSocket upgrade, the open deadline. A peer that never finishes the
            # upgrade is locked out like one that sends a wrong key.
            log.debug("connection from %s ended before the handshake; counted as a failed attempt", self.addr)
            self._count_failure()
        super().connection_lost(exc)

    def _count_failure(self) -> None:
        if not self._settled:
            self._settled = True
            self.server.limiter.failure(self.key)

    def _release_pending(self) -> None:
        if self._holds_pending:
            self._holds_pending = False
            self.server._pending_add(self.key, -1)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _NoTransport:
    @staticmethod
    def abort() -> None:
        return None


def _drop(data: object) -> None:
    return None


class GatewayServer:
    """``GatewayServer(node, settings, sample, node_id)``; ``await start()``, ``.port``, ``await stop()``.

    ``host``/``port`` override ``settings.listen`` (tests use port 0); ``start`` raises ConfigError
    for an unusable key file or certificate. The keyword arguments after those are the limits
    docs/protocol.md states, adjustable for tests.
    """

    def __init__(self, node: Node, settings: Settings, sample: Callable[[], MetricsReport], node_id: str, *,
                 host: str | None = None, port: int | None = None,
                 insecure_plaintext_for_development: bool = False,
                 handshake_timeout_s: float | None = None,
                 limiter: FailureLimiter | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES,
                 ping_interval_s: float | None = PING_INTERVAL_S,
                 ping_timeout_s: float | None = PING_TIMEOUT_S,
                 send_buffer_bytes: int = SEND_BUFFER_BYTES,
                 max_pending: int = MAX_PENDING,
                 max_pending_per_address: int = MAX_PENDING_PER_ADDRESS) -> None:
        self.node, self.settings, self.node_id = node, settings, node_id
        self._sample = sample
        self.host = settings.listen.host if host is None else host
        self._port = settings.listen.port if port is None else port
        self.insecure = insecure_plaintext_for_development
        self.handshake_timeout_s = settings.listen.hello_timeout_s if handshake_timeout_s is None else handshake_timeout_s
        self.open_timeout_s = settings.listen.open_timeout_s
        self.limiter = limiter or FailureLimiter()
        self.max_frame_bytes = max_frame_bytes
        self.ping_interval_s, self.ping_timeout_s = ping_interval_s, ping_timeout_s
        self.send_buffer_bytes = send_buffer_bytes
        self.keyring = KeyRing(settings.key_path)
        self.fingerprint: str | None = None
        self.sessions: set[Session] = set()
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        self._connections: set[NodeConnection] = set()  # every accepted connection not yet lost
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._sampled: tuple[float, MetricsReport] | None = None
        self._refusals: dict[str, tuple[float, int]] = {}  # address → (lockout end, 4008 closes sent in it)
        self._tls_tasks: set[asyncio.Task[None]] = set()
        self.dropped_before_tls = 0  # connections of locked-out addresses dropped at accept
        self.max_pending, self.max_pending_per_address = max_pending, max_pending_per_address
        self._pending: dict[str, int] = {}  # address → its connections not yet authenticated
        self._pending_total = 0
        self.dropped_pending = 0  # connections dropped at accept because a pending bound was full
        self._pending_warned: dict[str, float] = {}  # "" (all) or address → last WARNING

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        ctx: ssl.SSLContext | None = None
        if self.insecure:
            log.warning("THE GATEWAY LINK IS NOT ENCRYPTED (insecure_plaintext_for_development): anyone on the "
                        "network can read prompts and completions. Never run a node like this outside development.")
        else:
            cert, key = ensure_certificate(self.settings, self.node_id)
            ctx = server_context(cert, key)
            self.fingerprint = fingerprint_file(cert)
        self._tls = ctx
        ensure_key(self.settings.key_path)
        self.keyring.keys()  # a key file with the wrong permissions stops the start, not the first Gateway
        try:
            # Plain TCP: TLS is done per connection (NodeConnection), after the lockout check.
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: NodeConnection(self), self.host or None, self._port)
        except OSError as exc:
            # A port in use or an address not on this machine is the operator's to fix: one line
            # (the service exits with 3), not a traceback.
            raise ConfigError("listen.host/listen.port", f"{self.host}:{self._port}",
                              "an address of this machine with a free port for the Gateway link (is another "
                              "node or program using it?)", got=exc.strerror or str(exc)) from exc
        log.info("Gateway link listening on %s:%d (%s)", self.host, self.port,
                 "PLAINTEXT" if self.insecure else f"TLS, certificate {self.fingerprint}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Sessions end (running requests get ``shutting_down``, close 1001); the listener closes."""
        self._stopping = True
        for task in list(self._tls_tasks):
            task.cancel()
        if self.sessions:
            await asyncio.wait([asyncio.ensure_future(s.shutdown()) for s in list(self.sessions)], timeout=timeout)
        if self._server is not None:
            self._server.close()  # no new connections
        for conn in list(self._connections):
            conn.close(CLOSE_GOING_AWAY, "node shutting down")  # (one still opening is cut)
        waiting = [c.closed for c in self._connections if not c.closed.done()]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=timeout)
            if late:
                log.warning("%d Gateway connections did not close within %g s; cutting them", len(late), timeout)
                for conn in list(self._connections):
                    conn.abort()
        if self._server is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("the Gateway listener did not close within %g s", timeout)

    def sample(self) -> MetricsReport:
        now = time.monotonic()
        if self._sampled is not None and now - self._sampled[0] < SAMPLE_REUSE_S:
            return self._sampled[1]
        report = self._sample()
        self._sampled = (now, report)
        return report

    def _admit(self, addr: str) -> bool:
        """At TCP accept: False drops the connection before TLS (a locked-out address that was
        already told 4008 ``POLITE_REFUSALS`` times in this lockout, or a full pending bound)."""
        if self._pending_total >= self.max_pending:
            return self._drop_pending(addr, "", f"{self.max_pending} connections in all are still in their handshake")
        if self._pending.get(addr, 0) >= self.max_pending_per_address:
            return self._drop_pending(addr, addr, f"{self.max_pending_per_address} connections from it are still "
                                                  "in their handshake")
        if self.limiter.blocked_for(addr) <= 0:
            return True
        until, told = self._refusals.get(addr, (0.0, 0))
        if until > time.monotonic() and told >= POLITE_REFUSALS:
            self.dropped_before_tls += 1
            log.debug("dropped a connection from %s before TLS: locked out and told %d times", addr, told)
            return False
        return True

    def _pending_add(self, addr: str, n: int) -> None:
        self._pending_total += n
        left = self._pending.get(addr, 0) + n
        if left > 0:
            self._pending[addr] = left
        else:
            self._pending.pop(addr, None)

    def _drop_pending(self, addr: str, key: str, why: str) -> bool:
        """Drop a connection at accept for a full pending bound: one WARNING per bound (``key``: ""
        for the total, else the address) per ``PENDING_WARN_INTERVAL_S``, the rest at DEBUG."""
        self.dropped_pending += 1
        now = time.monotonic()
        if now - self._pending_warned.get(key, -math.inf) >= PENDING_WARN_INTERVAL_S:
            if len(self._pending_warned) >= 10_000:  # bounded, like the limiter
                self._pending_warned = {k: t for k, t in self._pending_warned.items()
                                        if now - t < PENDING_WARN_INTERVAL_S}
            self._pending_warned[key] = now
            log.warning("dropped a Gateway connection from %s at accept: %s (further drops for %.0f s are "
                        "logged at DEBUG)", addr, why, PENDING_WARN_INTERVAL_S)
        else:
            log.debug("dropped a Gateway connection from %s at accept: %s", addr, why)
        return False

    def _refuse(self, addr: str, wait: float) -> None:
        """Count a 4008 close of a locked-out address (``_admit`` drops it after ``POLITE_REFUSALS``)
        and log it: one WARNING per address per lockout, the rest at DEBUG, so a peer retrying in a
        loop (the flood test saw about 150 connections a second) cannot fill the log."""
        now = time.monotonic()
        until, told = self._refusals.get(addr, (0.0, 0))
        if until <= now:
            until, told = now + wait, 0
        if len(self._refusals) >= 10_000 and addr not in self._refusals:  # bounded, like the limiter
            self._refusals = {a: r for a, r in self._refusals.items() if r[0] > now}
        self._refusals[addr] = (until, told + 1)
        if told:
            log.debug("refused a Gateway connection from %s: locked out for %.0f s more", addr, wait)
        else:
            log.warning("refused a Gateway connection from %s: locked out for %.0f s more after failed handshakes"
                        " (further refusals until then are logged at DEBUG)", addr, wait)
