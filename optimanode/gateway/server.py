"""The Gateway link server: TLS WebSocket on listen.host:listen.port, authenticated sessions.

How it works:

* ``start`` makes sure the TLS certificate (gateway/tls.py) and the access key (gateway/keys.py)
  exist, generating them on first start, then listens with ``websockets.asyncio.server.serve``:
  TLS (1.2 minimum), no compression (permessage-deflate over secrets invites CRIME-style length
  leaks, and token frames are tiny anyway), ``max_size`` 1 MiB per incoming frame (a bigger one
  closes the connection with 1009), keepalive pings every 20 s (a Gateway that stops answering
  for 20 s more is closed, and its requests cancelled). Plain ``ws://`` is available only with
  ``insecure_plaintext_for_development=True``, and says so loudly in the log.
* Each connection: TLS is not the listener's but each connection's (``_gated_connection``), so
  an address can be turned away at TCP accept, before any handshake work. An address locked out
  by the ``FailureLimiter`` (too many failed handshakes) is closed at once with 4008, the first
  ``POLITE_REFUSALS`` times in a lockout; after that its connections are dropped at accept.
  TCP, TLS and the HTTP upgrade must finish within ``listen.open_timeout_s`` (10 s; the
  connection is cut otherwise, with no close code: there is no WebSocket yet). Then the node
  sends its Challenge and the authenticated Hello must follow within ``listen.hello_timeout_s``
  (5 s; 4002 otherwise). The first frame must be a Hello (any
  other message: 4001; a frame that does not decode: 4400); a wrong MAC is 4001, an unoffered
  version 4003. Every failure counts against the remote address; nothing but the handshake is
  read before it succeeds. The keys are re-read when the key files change (rotation needs no restart).
* After the Welcome, a ``Session`` (gateway/session.py) serves the connection. Several Gateways
  may be connected at once; each has its own session, queue and tasks.
* ``stop`` ends every session at once: its running requests get ``shutting_down`` (and are
  cancelled on the workers), then close code 1001; then the listener closes. For a graceful stop,
  ``await node.drain()`` first (new requests are refused with ``shutting_down`` while running ones
  finish), then ``await server.stop()``, then ``await node.stop()``.
* Metrics come from the ``sample`` callable (optimanode.metrics.Sampler.sample in the node). Its
  report is reused for 0.1 s so that many subscribed Gateways do not multiply its cost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from optimanode.config import Settings
from optimanode.errors import ConfigError
from optimanode.gateway.handshake import FailureLimiter, HandshakeError, check_hello, new_challenge
from optimanode.gateway.keys import KeyRing, ensure_key
from optimanode.gateway.session import Session
from optimanode.gateway.tls import ensure_certificate, fingerprint_file, server_context
from optimanode.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_GOING_AWAY,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_RATE_LIMITED,
    CLOSE_UNAUTHORIZED,
    PROTOCOL_VERSIONS,
    Hello,
    MetricsReport,
    decode_from_gateway,
    encode_link,
)

if TYPE_CHECKING:
    from optimanode.node import Node

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 1 << 20
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
SEND_BUFFER_BYTES = 4 << 20  # per session, what the socket has not taken yet (Session.send)
SAMPLE_REUSE_S = 0.1
CLOSE_INTERNAL_ERROR = 1011
# A locked-out address gets the WebSocket close 4008 ("retry in N s") this many times per lockout;
# its later connections in the same lockout are dropped at accept, before any TLS, so a peer that
# ignores 4008 and reconnects in a loop costs the node no handshake (a TLS handshake is the bulk of
# what a wrong-key flood costs: docs/reliability.md).
POLITE_REFUSALS = 3


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455 §5.5)."""
    data = text.encode()
    return data[:123].decode(errors="ignore") if len(data) > 123 else text


def _address(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _gated_connection(admit: Callable[[str], bool], tls: ssl.SSLContext | None, tls_timeout_s: float,
                      tasks: set[asyncio.Task[None]]) -> type[ServerConnection]:
    """A ``ServerConnection`` that asks ``admit(address)`` at TCP accept, then does TLS itself.

    asyncio's own server-side TLS (``ssl=`` on the listener) handshakes before the protocol sees the
    connection, so a refused peer would still cost a handshake. Here the listener is plain TCP:
    ``connection_made`` gets the raw transport, drops it when ``admit`` says no, and otherwise
    pauses it and upgrades it with ``loop.start_tls`` before websockets sees it. Bytes that arrive
    between the upgrade and websockets' ``connection_made`` are kept and handed over in order.
    """

    class GatedConnection(ServerConnection):
        _started = False
        _early: list[bytes] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if not admit(_address(transport.get_extra_info("peername"))):
                transport.abort()
                return
            if tls is None:
                self._started = True
                super().connection_made(transport)
                return
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # start_tls resumes it; a ClientHello must not reach websockets
            self._early = []
            task = asyncio.get_running_loop().create_task(self._upgrade(transport), name="gateway-tls")
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def _upgrade(self, transport: asyncio.Transport) -> None:
            loop = asyncio.get_running_loop()
            try:
                secure = await loop.start_tls(transport, self, tls, server_side=True,
                                              ssl_handshake_timeout=tls_timeout_s)
            except asyncio.CancelledError:
                transport.abort()  # the server is stopping
                raise
            except Exception as exc:  # noqa: BLE001 - a failed or timed-out TLS handshake: the peer's problem
                log.debug("TLS handshake from %s failed: %s", _address(transport.get_extra_info("peername")), exc)
                transport.abort()
                return
            if secure is None:
                transport.abort()
                return
            self._started = True
            early, self._early = self._early or [], None
            super().connection_made(secure)
            for data in early:
                super().data_received(data)

        def data_received(self, data: bytes) -> None:
            if self._early is not None:
                self._early.append(data)
            elif self._started:
                super().data_received(data)

        def eof_received(self) -> bool | None:
            return super().eof_received() if self._started else None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._started:
                super().connection_lost(exc)

    return GatedConnection


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
                 send_buffer_bytes: int = SEND_BUFFER_BYTES) -> None:
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
        self._server: Server | None = None
        self._stopping = False
        self._sampled: tuple[float, MetricsReport] | None = None
        self._refusals: dict[str, tuple[float, int]] = {}  # address → (lockout end, 4008 closes sent in it)
        self._tls_tasks: set[asyncio.Task[None]] = set()
        self.dropped_before_tls = 0  # connections of locked-out addresses dropped at accept

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
        ensure_key(self.settings.key_path)
        self.keyring.keys()  # a key file with the wrong permissions stops the start, not the first Gateway
        try:
            # TLS is done per connection by the gated connection class, after the lockout check.
            self._server = await serve(
                self._handle, self.host, self._port, compression=None, max_size=self.max_frame_bytes,
                ping_interval=self.ping_interval_s, ping_timeout=self.ping_timeout_s, open_timeout=self.open_timeout_s,
                close_timeout=5, server_header=None, logger=logging.getLogger("optimanode.gateway.websockets"),
                create_connection=_gated_connection(self._admit, ctx, self.open_timeout_s, self._tls_tasks))
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
            self._server.close(code=CLOSE_GOING_AWAY, reason="node shutting down")
            try:
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("Gateway connections did not close within %g s", timeout)

    def sample(self) -> MetricsReport:
        now = time.monotonic()
        if self._sampled is not None and now - self._sampled[0] < SAMPLE_REUSE_S:
            return self._sampled[1]
        report = self._sample()
        self._sampled = (now, report)
        return report

    def _admit(self, addr: str) -> bool:
        """At TCP accept: False drops the connection before TLS (a locked-out address that was
        already told 4008 ``POLITE_REFUSALS`` times in this lockout)."""
        if self.limiter.blocked_for(addr) <= 0:
            return True
        until, told = self._refusals.get(addr, (0.0, 0))
        if until > time.monotonic() and told >= POLITE_REFUSALS:
            self.dropped_before_tls += 1
            log.debug("dropped a connection from %s before TLS: locked out and told %d times", addr, told)
            return False
        return True

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

    # -- one connection --------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        addr = _address(ws.remote_address)
        if self._stopping:
            await ws.close(CLOSE_GOING_AWAY, "node shutting down")
            return
        wait = self.limiter.blocked_for(addr)
        if wait > 0:
            self._refuse(addr, wait)
            await ws.close(CLOSE_RATE_LIMITED, f"too many failed handshakes; retry in {math.ceil(wait)} s")
            return
        try:
            async with asyncio.timeout(self.handshake_timeout_s):
                hello = await self._handshake(ws)
        except TimeoutError:
            self.limiter.failure(addr)
            log.warning("Gateway handshake from %s did not finish within %g s", addr, self.handshake_timeout_s)
            await ws.close(CLOSE_HANDSHAKE_TIMEOUT, f"handshake not finished within {self.handshake_timeout_s:g} s")
            return
        except HandshakeError as exc:
            self.limiter.failure(addr)
            log.warning("refused a Gateway from %s: %s", addr, exc.reason)
            await ws.close(exc.close_code, _reason(exc.reason))
            return
        except ConnectionClosed:
            self.limiter.failure(addr)
            return
        except ConfigError as exc:
            log.error("cannot check Gateway handshakes: %s", exc)
            await ws.close(CLOSE_INTERNAL_ERROR, "the node's access key is misconfigured")
            return
        self.limiter.success(addr)
        session = Session(ws=ws, node=self.node, gateway_id=hello.gateway_id, sample=self.sample,
                          send_buffer_bytes=self.send_buffer_bytes)
        self.sessions.add(session)
        log.info("Gateway %r connected from %s (session %s)", hello.gateway_id, addr, session.sid)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.info("Gateway %r disconnected (session %s, close code %s)", hello.gateway_id, session.sid,
                     ws.close_code)

    async def _handshake(self, ws: ServerConnection) -> Hello:
        challenge = new_challenge(self.node_id, PROTOCOL_VERSIONS)
        await ws.send(encode_link(challenge))
        data = await ws.recv()
        if isinstance(data, str):
            raise HandshakeError(CLOSE_BAD_FRAME, "expected a binary frame holding a MessagePack hello")
        try:
            msg = decode_from_gateway(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise HandshakeError(CLOSE_BAD_FRAME, f"bad hello: {exc}") from None
        if not isinstance(msg, Hello):
            raise HandshakeError(CLOSE_UNAUTHORIZED, "unauthorized: the first frame must be a hello")
        welcome = check_hello(self.keyring.keys(), challenge, msg, max_frame_bytes=self.max_frame_bytes)
        await ws.send(encode_link(welcome))
        return msg
