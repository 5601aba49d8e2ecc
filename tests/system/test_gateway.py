"""The Gateway link end to end: real TLS WebSockets on 127.0.0.1, the real node and the real SmolLM2.

One module-scoped node serves the tests that do not disturb each other (``started``); the handshake
tests use a node-less server of their own (``light``), since nothing past the handshake is reached.
Every wait is bounded; every check can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from optimanode import client_cli
from optimanode.client import (
    ConnectionFailed,
    ConnectionLost,
    FingerprintMismatch,
    NodeAuthFailed,
    NodeClient,
    NodePool,
    NoNodeAvailable,
    RemoteError,
)
from optimanode.config import Settings
from system.test_node import make_settings  # noqa: F401  (re-exported: other link tests import it from here)
from optimanode.errors import ConfigError
from optimanode.gateway import keys, tls
from optimanode.gateway.handshake import FailureLimiter, check_welcome, make_hello
from optimanode.gateway.server import GatewayServer
from optimanode.node import Node
from optimanode.protocol import (
    Ack,
    CancelInfer,
    Challenge,
    ChatMessage,
    ChatRequest,
    Chunk,
    CompletionRequest,
    CpuReport,
    Error,
    ExecutorMetrics,
    Hello,
    Infer,
    InferDone,
    ListModels,
    MemoryReport,
    Metrics,
    MetricsReport,
    ModelSettings,
    Models,
    NodeToGateway,
    SamplingParams,
    Subscribe,
    TokenChunk,
    Unsubscribe,
    Welcome,
    decode_from_node,
    encode_link,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.asyncio(loop_scope="module")]

NODE_ID = "test-node"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# Long enough that only a cancel ends it within the test's time (about 6 tokens/s here).
LONG = SamplingParams(temperature=0.0, max_tokens=300)


def fake_sampler(node: Node, node_id: str) -> Callable[[], MetricsReport]:
    """A report built from the node's own status (optimanode.metrics is not what is tested here)."""
    def sample() -> MetricsReport:
        executors = [
            ExecutorMetrics(id=st.id, state=st.state, pid=st.pid, queue_depth=st.queue_depth, in_flight=st.in_flight,
                            parallel=st.parallel, queue_size=st.queue_size,
                            free_slots=max(0, st.parallel - st.in_flight) if st.state == "running" else 0,
                            requests_served=st.requests_served, restarts=st.restarts)
            for st in node.list()
        ]
        return MetricsReport(
            ts=time.time(), node_id=node_id,
            cpu=CpuReport(percent=0.0, per_core=[], cores_logical=1, cores_physical=1, load_1m=0.0, load_5m=0.0,
                          load_15m=0.0),
            memory=MemoryReport(total_bytes=1, available_bytes=1, used_bytes=0, swap_total_bytes=0, swap_used_bytes=0),
            executors=executors)

    return sample


def no_sample() -> MetricsReport:
    raise AssertionError("this server has no node to sample")


@dataclass
class Env:
    node: Node
    settings: Settings
    server: GatewayServer
    eid: str
    idle: str
    key: bytes

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.server.port}"

    @property
    def fingerprint(self) -> str:
        assert self.server.fingerprint
        return self.server.fingerprint


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def started(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> AsyncIterator[Env]:
    """One running node (SmolLM2 enabled, a second copy left idle) behind one GatewayServer."""
    root = tmp_path_factory.mktemp("gateway")
    models = root / "models"
    models.mkdir()
    (models / "smollm2.gguf").symlink_to(smollm2_path)
    (models / "idle.gguf").symlink_to(smollm2_path)
    settings = make_settings(root)
    node = Node(settings)
    await node.start()
    try:
        by_name = {Path(ex.info.path).name: eid for eid, ex in node.executors.items()}
        eid, idle = by_name["smollm2.gguf"], by_name["idle.gguf"]
        await node.enable(eid, by="test")
        await node.wait_for_state(eid, {"running"}, timeout=60)
        server = GatewayServer(node, settings, fake_sampler(node, NODE_ID), NODE_ID, host="127.0.0.1", port=0)
        await server.start()
        try:
            yield Env(node=node, settings=settings, server=server, eid=eid, idle=idle,
                      key=keys.read_key(settings.key_path))
        finally:
            await server.stop()
    finally:
        await node.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def light(tmp_path: Path) -> AsyncIterator[GatewayServer]:
    """A node-less server for handshake tests: a short deadline and a strict limiter."""
    server = GatewayServer(None, make_settings(tmp_path), no_sample, "light-node", host="127.0.0.1",  # type: ignore[arg-type]
                           port=0, handshake_timeout_s=0.5,
                           limiter=FailureLimiter(max_failures=3, window_s=60, lockout_s=60))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- helpers -------------------------------------------------------------------------------------


def _insecure() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def raw_connect(server: GatewayServer) -> ClientConnection:
    return await ws_connect(f"wss://127.0.0.1:{server.port}", ssl=_insecure(), compression=None, proxy=None,
                            open_timeout=5, max_size=16 << 20)


async def recv(ws: ClientConnection, timeout: float = 10.0) -> NodeToGateway:
    async with asyncio.timeout(timeout):
        data = await ws.recv()
    assert isinstance(data, bytes)
    return decode_from_node(data)


async def until_closed(ws: ClientConnection, timeout: float = 10.0) -> list[NodeToGateway]:
    """Every frame received until the connection closes (bounded)."""
    frames = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                frames.append(decode_from_node(await ws.recv()))  # type: ignore[arg-type]
        except ConnectionClosed:
            pass
    return frames


async def raw_session(server: GatewayServer, key: bytes, gateway_id: str = "raw") -> ClientConnection:
    """An authenticated connection speaking frames directly."""
    ws = await raw_connect(server)
    challenge = await recv(ws)
    assert isinstance(challenge, Challenge)
    hello = make_hello(key, challenge, gateway_id)
    await ws.send(encode_link(hello))
    welcome = await recv(ws)
    assert isinstance(welcome, Welcome)
    check_welcome(key, challenge, hello, welcome)
    return ws


async def client(env: Env, gateway_id: str = "gw-test", server: GatewayServer | None = None) -> NodeClient:
    srv = server or env.server
    return await NodeClient.connect(f"wss://127.0.0.1:{srv.port}", env.key, fingerprint=env.fingerprint,
                                    gateway_id=gateway_id, open_timeout=10)


async def collect(stream: AsyncIterator[TokenChunk | InferDone], timeout: float = 60.0
                  ) -> tuple[list[TokenChunk], InferDone]:
    chunks: list[TokenChunk] = []
    done = None
    async with asyncio.timeout(timeout):
        async for msg in stream:
            if isinstance(msg, TokenChunk):
                chunks.append(msg)
            else:
                done = msg
    assert isinstance(done, InferDone)
    return chunks, done


async def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


# -- files: key and certificate ------------------------------------------------------------------


async def test_generated_key_and_certificate_are_private_pinnable_and_kept(tmp_path):
    settings = make_settings(tmp_path)
    old = os.umask(0)  # the files must be private because of how they are created, not thanks to the umask
    try:
        server = GatewayServer(None, settings, no_sample, "files-node", host="127.0.0.1", port=0)  # type: ignore[arg-type]
        await server.start()
    finally:
        os.umask(old)
    await server.stop()
    state = tmp_path / "state"
    for path in (state / "access.key", state / "tls" / "cert.pem", state / "tls" / "key.pem"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (state / "tls").stat().st_mode & 0o777 == 0o700
    assert not [p for p in state.rglob("*.tmp")]
    assert len((state / "access.key").read_text().strip()) == 64
    pem = (state / "tls" / "cert.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "files-node"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest().upper()
    assert server.fingerprint == tls.fingerprint(pem) == "sha256:" + ":".join(
        digest[i:i + 2] for i in range(0, 64, 2))
    # A second start keeps both: Gateways pinned this certificate and hold this key.
    key_before = (state / "access.key").read_bytes()
    again = GatewayServer(None, settings, no_sample, "files-node", host="127.0.0.1", port=0)  # type: ignore[arg-type]
    await again.start()
    await again.stop()
    assert again.fingerprint == server.fingerprint and (state / "access.key").read_bytes() == key_before


async def test_a_key_file_others_can_read_is_refused_and_a_malformed_one_is_not_echoed(tmp_path):
    settings = make_settings(tmp_path)
    path = settings.key_path
    keys.write_private(path, keys.format_key(keys.generate_key()))
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keys.read_key(path)
    server = GatewayServer(None, settings, no_sample, "n", host="127.0.0.1", port=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="permissions"):
        await server.start()
    path.unlink()
    keys.write_private(path, b"secret-but-not-a-key\n")
    with pytest.raises(ConfigError) as info:
        keys.read_key(path)
    assert "secret-but-not-a-key" not in str(info.value) and "64 hex digits" in str(info.value)


# -- handshake over the wire ---------------------------------------------------------------------


async def test_a_wrong_key_is_closed_with_4001_and_nothing_else_is_answered(light):
    ws = await raw_connect(light)
    challenge = await recv(ws)
    assert isinstance(challenge, Challenge) and challenge.node_id == "light-node"
    await ws.send(encode_link(make_hello(b"w" * 32, challenge, "intruder")))
    with pytest.raises(ConnectionClosed):
        await ws.send(encode_link(ListModels(id="x")))
        await ws.send(encode_link(ListModels(id="y")))
        await asyncio.sleep(0.2)
        await ws.send(encode_link(ListModels(id="z")))
    frames = await until_closed(ws)
    assert frames == [] and ws.close_code == 4001
    with pytest.raises(ConnectionFailed) as info:
        await NodeClient.connect(f"wss://127.0.0.1:{light.port}", b"w" * 32, fingerprint=light.fingerprint)
    assert info.value.close_code == 4001 and not isinstance(info.value, FingerprintMismatch)


async def test_a_frame_before_authentication_closes_the_connection(light):
    ws = await raw_connect(light)
    assert isinstance(await recv(ws), Challenge)
    await ws.send(encode_link(ListModels(id="early")))
    assert await until_closed(ws) == [] and ws.close_code == 4001
    ws = await raw_connect(light)
    await recv(ws)
    await ws.send(b"\xc1 not messagepack")
    assert await until_closed(ws) == [] and ws.close_code == 4400


async def test_frames_that_break_the_rules_before_the_handshake_get_the_documented_close(light):
    # docs/protocol.md, "Frames that break the rules": the "before the handshake" column.
    ws = await raw_connect(light)
    assert isinstance(await recv(ws), Challenge)
    await ws.send("a text hello")
    assert await until_closed(ws) == [] and ws.close_code == 4400
    assert ws.close_reason == "expected a binary frame holding a MessagePack hello"
    ws = await raw_connect(light)
    assert isinstance(await recv(ws), Challenge)
    await ws.send(msgspec.msgpack.encode({"type": "hello", "gateway_id": "g", "version": 1}))
    assert await until_closed(ws) == [] and ws.close_code == 4400
    assert ws.close_reason.startswith("bad hello: Object missing required field")
    ws = await raw_connect(light)
    assert isinstance(await recv(ws), Challenge)
    await ws.send(msgspec.msgpack.encode({"type": "nope", "id": "x"}))
    assert await until_closed(ws) == [] and ws.close_code == 4400 and ws.close_reason.startswith("bad hello")


async def test_the_pinning_recipe_in_the_protocol_doc_works(light):
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    start = text.index("```python\n", text.index("create_connection")) + len("```python\n")
    recipe = "\n".join(line.removeprefix("  ") for line in text[start:text.index("```", start)].splitlines())
    scope: dict[str, object] = {}
    exec(compile(recipe, "docs/protocol.md", "exec"), scope)  # noqa: S102 - the doc's own code
    open_link = scope["open_link"]
    ws = await open_link(f"wss://127.0.0.1:{light.port}", light.fingerprint)  # type: ignore[operator]
    try:
        assert isinstance(await recv(ws), Challenge)  # the right pin: the node speaks
    finally:
        await ws.close()
    wrong = "sha256:" + ":".join(["00"] * 32)
    with pytest.raises(Exception):
        await open_link(f"wss://127.0.0.1:{light.port}", wrong)  # type: ignore[operator]


async def test_the_handshake_has_a_deadline(light):
    ws = await raw_connect(light)
    assert isinstance(await recv(ws), Challenge)
    t0 = time.monotonic()
    assert await until_closed(ws, timeout=5) == []
    assert ws.close_code == 4002 and 0.3 < time.monotonic() - t0 < 3.0


async def test_repeated_failures_from_one_address_are_locked_out(light, tmp_path):
    key = keys.read_key(light.settings.key_path)
    url = f"wss://127.0.0.1:{light.port}"
    # A success clears the count: two failures, a success, two failures is not a lockout...
    for attempt in ("bad", "bad", "good", "bad", "bad", "good"):
        if attempt == "good":
            c = await NodeClient.connect(url, key, fingerprint=light.fingerprint)
            await c.close()
        else:
            with pytest.raises(ConnectionFailed) as info:
                await NodeClient.connect(url, b"b" * 32, fingerprint=light.fingerprint)
            assert info.value.close_code == 4001
    # ...but three in a row are, and then even the right key is refused for a while.
    for _ in range(3):
        with pytest.raises(ConnectionFailed):
            await NodeClient.connect(url, b"b" * 32, fingerprint=light.fingerprint)
    with pytest.raises(ConnectionFailed) as info:
        await NodeClient.connect(url, key, fingerprint=light.fingerprint)
    assert info.value.close_code == 4008 and "retry in" in info.value.reason
    # Told 4008 POLITE_REFUSALS times in this lockout; after that its connections are dropped at
    # accept, before TLS: no close code, and the node does no handshake for them.
    from optimanode.gateway.server import POLITE_REFUSALS

    for _ in range(POLITE_REFUSALS - 1):
        with pytest.raises(ConnectionFailed) as info:
            await NodeClient.connect(url, key, fingerprint=light.fingerprint)
        assert info.value.close_code == 4008
    assert light.dropped_before_tls == 0
    for n in range(1, 4):
        with pytest.raises((ConnectionFailed, OSError)) as dropped:
            await NodeClient.connect(url, key, fingerprint=light.fingerprint)
        assert getattr(dropped.value, "close_code", None) is None, dropped.value
        assert light.dropped_before_tls == n


async def _until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (bounded) for the server's side of a connection to have ended: it counts at connection_lost."""
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.02)


async def test_connections_that_end_before_the_handshake_count_as_failed_attempts(light):
    """A peer that never finishes TLS or the WebSocket upgrade is locked out like one with a wrong key."""
    def failures() -> int:
        return len(light.limiter._failures.get("127.0.0.1", ()))

    # TCP only: connected and closed before any TLS.
    _, w = await asyncio.open_connection("127.0.0.1", light.port)
    w.close()
    await _until(lambda: failures() == 1)
    # TLS, then an HTTP request that is not a WebSocket upgrade: the node answers it and closes.
    r, w = await asyncio.open_connection("127.0.0.1", light.port, ssl=_insecure())
    w.write(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
    async with asyncio.timeout(10):
        status = (await r.readline()).split()
        assert status[:2] == [b"HTTP/1.1", b"426"], status
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await r.read()
    w.close()
    await _until(lambda: failures() == 2)
    assert light.limiter.blocked_for("127.0.0.1") == 0.0
    # Bytes that are not a TLS ClientHello: the third failure locks the address out.
    _, w = await asyncio.open_connection("127.0.0.1", light.port)
    w.write(b"\x00" * 64 + b"not tls\r\n\r\n")
    await _until(lambda: light.limiter.blocked_for("127.0.0.1") > 0)
    w.close()
    with pytest.raises(ConnectionFailed) as info:
        await NodeClient.connect(f"wss://127.0.0.1:{light.port}", keys.read_key(light.settings.key_path),
                                 fingerprint=light.fingerprint)
    assert info.value.close_code == 4008


async def test_connections_still_in_their_handshake_are_bounded_per_address_and_in_all(tmp_path, caplog):
    server = GatewayServer(None, make_settings(tmp_path), no_sample, "bounded-node", host="127.0.0.1",  # type: ignore[arg-type]
                           port=0, limiter=FailureLimiter(max_failures=1000), max_pending=5, max_pending_per_address=3)
    await server.start()
    url, key = f"wss://127.0.0.1:{server.port}", keys.read_key(server.settings.key_path)
    held = []

    async def hold(src: str) -> None:
        held.append((await asyncio.open_connection("127.0.0.1", server.port, local_addr=(src, 0)))[1])

    async def dropped_at_accept(src: str) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(src, 0))
        try:
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionError):
                    assert await r.read() == b""  # closed at once, before TLS
        finally:
            w.close()

    caplog.set_level(logging.DEBUG, logger="optimanode.gateway.server")
    try:
        for _ in range(3):
            await hold("127.0.0.1")  # idle: no TLS, held until the open deadline
        await _until(lambda: server._pending_total == 3)
        await dropped_at_accept("127.0.0.1")
        await dropped_at_accept("127.0.0.1")
        assert server.dropped_pending == 2
        for _ in range(2):
            await hold("127.0.0.2")  # another address still gets in, up to the total
        await _until(lambda: server._pending_total == 5)
        await dropped_at_accept("127.0.0.3")
        assert server.dropped_pending == 3
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "at accept" in r.getMessage()]
        assert len(warnings) == 2, warnings  # one per bound; the repeat went to DEBUG
        assert "3 connections from it" in warnings[0] and "5 connections in all" in warnings[1]
        # The held connections end; a real Gateway gets in, and once welcomed it no longer counts.
        for w in held:
            w.close()
        await _until(lambda: server._pending_total == 0 and not server._pending)
        client = await NodeClient.connect(url, key, fingerprint=server.fingerprint)
        assert server._pending_total == 0
        await client.close()
    finally:
        for w in held:
            w.close()
        await server.stop()


async def test_what_a_refused_peer_sent_reaches_the_log_escaped_and_cut_short(light, caplog):
    ws = await raw_connect(light)
    assert isinstance(await recv(ws), Challenge)
    forged = "x'\nINFO optimanode.gateway.server: Gateway 'admin' connected from 10.0.0.1\n" + "y" * 100_000
    await ws.send(msgspec.msgpack.encode({"type": forged, "id": "x"}))
    assert await until_closed(ws) == [] and ws.close_code == 4400
    [line] = [r.getMessage() for r in caplog.records if "refused a Gateway from" in r.getMessage()]
    assert "\n" not in line and "\\nINFO optimanode" in line and len(line) < 300, line[:400]


async def test_the_client_refuses_a_certificate_other_than_the_pinned_one(light, tmp_path):
    other_cert, _ = tls.generate_self_signed("impostor")
    key = keys.read_key(light.settings.key_path)
    url = f"wss://127.0.0.1:{light.port}"
    with pytest.raises(FingerprintMismatch) as info:
        await NodeClient.connect(url, key, fingerprint=tls.fingerprint(other_cert))
    assert info.value.got == light.fingerprint and info.value.expected == tls.fingerprint(other_cert)
    assert light.fingerprint in str(info.value)
    # The node cannot tell a Gateway that refused its certificate from a peer that abandoned TLS:
    # one failed attempt is counted (not a lockout), and the right pin works.
    await _until(lambda: len(light.limiter._failures.get("127.0.0.1", ())) == 1)
    assert light.limiter.blocked_for("127.0.0.1") == 0.0
    c = await NodeClient.connect(url, key, fingerprint=light.fingerprint.lower().replace("sha256:", ""))
    assert c.node_id == "light-node"
    await c.close()
    with pytest.raises(ValueError, match="fingerprint"):
        await NodeClient.connect(url, key)


async def test_the_client_refuses_a_node_that_cannot_prove_the_key():
    """A fake node without the key reflects the Gateway's own MAC back: the client must refuse it."""
    async def fake_node(ws):
        await ws.send(encode_link(Challenge(versions=[1], node_id="fake", nonce_n=os.urandom(32))))
        hello = msgspec.msgpack.decode(await ws.recv(), type=Hello)
        await ws.send(encode_link(Welcome(version=1, node_id="fake", mac_n=hello.mac_g)))
        await ws.wait_closed()

    async with ws_serve(fake_node, "127.0.0.1", 0, compression=None) as srv:
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises(NodeAuthFailed):
            await NodeClient.connect(f"ws://127.0.0.1:{port}", b"k" * 32, insecure_plaintext_for_development=True)


async def test_plaintext_only_with_the_explicit_flag(tmp_path, caplog):
    settings = make_settings(tmp_path)
    server = GatewayServer(None, settings, no_sample, "plain", host="127.0.0.1", port=0,  # type: ignore[arg-type]
                           insecure_plaintext_for_development=True)
    with caplog.at_level(logging.WARNING):
        await server.start()
    try:
        assert any("NOT ENCRYPTED" in r.getMessage() for r in caplog.records)
        url = f"ws://127.0.0.1:{server.port}"
        with pytest.raises(ValueError, match="insecure_plaintext_for_development"):
            await NodeClient.connect(url, keys.read_key(settings.key_path))
        c = await NodeClient.connect(url, keys.read_key(settings.key_path), insecure_plaintext_for_development=True)
        assert c.node_id == "plain"
        await c.close()
    finally:
        await server.stop()


async def test_a_gateway_that_does_not_read_is_closed_and_never_blocks_the_producers(tmp_path):
    """The send policy on its own, on a real connection whose peer stops reading, with a small buffer."""
    limit = 256 * 1024
    settings = make_settings(tmp_path)
    server = GatewayServer(None, settings, no_sample, "slow-node", host="127.0.0.1", port=0,  # type: ignore[arg-type]
                           insecure_plaintext_for_development=True, send_buffer_bytes=limit)
    await server.start()
    try:
        key = keys.read_key(settings.key_path)
        # max_queue=1: once a frame waits unread, websockets stops reading the socket, as a stuck
        # Gateway would; the kernel's buffers fill, then the node's transport buffer.
        async with ws_connect(f"ws://127.0.0.1:{server.port}", compression=None, max_queue=1, close_timeout=1,
                              proxy=None) as ws:
            challenge = await recv(ws)
            assert isinstance(challenge, Challenge)
            hello = make_hello(key, challenge, "slow")
            await ws.send(encode_link(hello))
            check_welcome(key, challenge, hello, await recv(ws))  # type: ignore[arg-type]
            await eventually(lambda: server.sessions, what="the session")
            (session,) = server.sessions
            transport = session.conn.transport
            assert transport is not None
            big = Error(code="internal", message="x" * 16384)
            t0 = time.monotonic()
            dropped_while_alive = False
            for _ in range(10_000):  # bounded: 160 MB at most; it ends far sooner
                if session.closing:
                    break
                session.send(big)  # never waits
                if transport.get_write_buffer_size() * 2 >= limit and not session.closing:
                    session.send(Metrics(id="m", report=fake_report()), droppable=True)
                    dropped_while_alive = session.metrics_dropped > 0 and not session.closing
                await asyncio.sleep(0)  # let the peer's loop run: it still reads nothing
            assert time.monotonic() - t0 < 5
            assert dropped_while_alive  # half full: a snapshot is dropped, the session lives
            assert session.closing
            # It does not take the close frame either: the connection is cut 2 s later.
            await eventually(lambda: session not in server.sessions, timeout=10, what="the session ended")
            close_sent = session.conn.link.protocol.close_sent
            assert close_sent is not None and close_sent.code == 4009
    finally:
        await server.stop()


def fake_report() -> MetricsReport:
    return MetricsReport(ts=0.0, cpu=CpuReport(percent=0, per_core=[], cores_logical=1, cores_physical=1, load_1m=0,
                                               load_5m=0, load_15m=0),
                         memory=MemoryReport(total_bytes=0, available_bytes=0, used_bytes=0, swap_total_bytes=0,
                                             swap_used_bytes=0))


# -- inference over the link ---------------------------------------------------------------------


async def test_stream_a_completion_and_a_chat_completion(started):
    c = await client(started)
    try:
        chunks, done = await collect(c.infer(started.eid, CompletionRequest(prompt="The capital of France is",
                                                                            params=GREEDY), request_id="comp"))
        assert chunks and all(ch.id == "comp" for ch in chunks) and done.id == "comp"
        assert "Paris" in "".join(ch.text for ch in chunks)
        assert done.finish_reason == "length" and done.usage.completion_tokens == 8 == sum(ch.tokens for ch in chunks)
        assert done.usage.prompt_tokens > 0 and done.timings.total_s > 0
        chat = ChatRequest(messages=[ChatMessage(role="user", content="Say hello.")], params=GREEDY)
        chunks, done = await collect(c.infer(started.eid, chat))
        assert "".join(ch.text for ch in chunks).strip() and done.usage.completion_tokens > 0
        assert done.usage.prompt_tokens > 5  # the chat template wrapped the message
    finally:
        await c.close()


async def test_concurrent_requests_over_one_connection_keep_their_ids_apart(started):
    prompts = {"a": "The capital of France is", "b": "1, 2, 3,", "c": "def fib(n):", "d": "Water boils at"}
    expected = {}
    for rid, prompt in prompts.items():  # each alone, in process: what each id must get back
        text = []
        async for msg in started.node.infer(started.eid, CompletionRequest(prompt=prompt, params=GREEDY)):
            if isinstance(msg, Chunk):
                text.append(msg.text)
        expected[rid] = "".join(text)
    assert len(set(expected.values())) == 4
    c = await client(started)
    try:
        results = await asyncio.gather(*(
            collect(c.infer(started.eid, CompletionRequest(prompt=p, params=GREEDY), request_id=rid), timeout=150)
            for rid, p in prompts.items()))
        for rid, (chunks, done) in zip(prompts, results):
            assert {ch.id for ch in chunks} == {rid} and done.id == rid
            assert "".join(ch.text for ch in chunks) == expected[rid], rid
    finally:
        await c.close()


async def test_the_chunks_of_one_decode_step_leave_in_one_socket_write(tmp_path, smollm2_path):
    """Four streams batched on one worker, one connection: a step's four chunks, one TLS write."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").symlink_to(smollm2_path)
    settings = make_settings(tmp_path, **{"model_defaults.parallel": "4", "model_defaults.n_ctx": "1024"})
    async with Node(settings) as node:
        (eid,) = node.executors
        await node.enable(eid, by="test")
        await node.wait_for_state(eid, {"running"}, timeout=60)
        server = GatewayServer(node, settings, fake_sampler(node, NODE_ID), NODE_ID, host="127.0.0.1", port=0)
        await server.start()
        try:
            env = Env(node=node, settings=settings, server=server, eid=eid, idle="", key=keys.read_key(settings.key_path))
            c = await client(env)
            try:
                (session,) = server.sessions
                transport = session.conn.transport
                writes = 0
                write = transport.write

                def counting(data: bytes) -> None:
                    nonlocal writes
                    writes += 1
                    write(data)

                transport.write = counting  # type: ignore[method-assign]
                params = SamplingParams(temperature=0.0, max_tokens=48)
                results = await asyncio.gather(*(
                    collect(c.infer(eid, CompletionRequest(prompt=f"{i}. counting: 1, 2, 3,", params=params)),
                            timeout=120) for i in range(4)))
                frames = sum(len(chunks) + 1 for chunks, _ in results)
                assert all(done.usage.completion_tokens == 48 for _, done in results)
                # Unbatched, every frame would be its own write (192 chunks + 4 InferDone).
                assert writes * 2 <= frames, (writes, frames)
            finally:
                await c.close()
        finally:
            await server.stop()


async def test_cancel_by_id_running_and_queued(started):
    c = await client(started)
    try:
        running = c.infer(started.eid, CompletionRequest(prompt="1, 2,", params=LONG), request_id="run")
        first = await anext(running)
        assert isinstance(first, TokenChunk)
        queued = asyncio.ensure_future(collect(c.infer(started.eid, CompletionRequest(prompt="x", params=LONG),
                                                       request_id="wait")))
        await eventually(lambda: started.node.status(started.eid).queue_depth == 1, what="the second request queued")
        await c.cancel("wait")
        with pytest.raises(RemoteError) as info:
            async with asyncio.timeout(10):
                await queued
        assert info.value.code == "cancelled"
        await c.cancel("run")
        chunks, done = await collect(running, timeout=10)
        assert done.finish_reason == "cancelled" and done.usage.completion_tokens < 30
        # Cancelling what already ended is harmless and answers nothing.
        await c.cancel("run")
        assert (await c.models())
    finally:
        await c.close()


async def test_a_disconnect_cancels_the_gateways_running_requests(started):
    a = await client(started, "gw-dropped")
    stream = a.infer(started.eid, CompletionRequest(prompt="1, 2,", params=LONG), request_id="drop-me")
    assert isinstance(await anext(stream), TokenChunk)
    assert started.node.status(started.eid).in_flight == 1
    a._conn.transport.abort()  # the Gateway vanishes, no closing handshake
    # The worker is freed at once, not after the 300 tokens (most of a minute here).
    await eventually(lambda: started.node.status(started.eid).in_flight == 0, timeout=10, what="the worker freed")
    b = await client(started, "gw-next")
    try:
        chunks, done = await collect(b.infer(started.eid, CompletionRequest(prompt="Hello", params=GREEDY)), timeout=60)
        assert done.usage.completion_tokens == 8

        async def finished() -> dict | None:
            for e in await b.events(started.eid, limit=50):
                if e.type == "request_finished" and e.data["request_id"].endswith("/drop-me"):
                    return e.data
            return None

        deadline = time.monotonic() + 10
        while (got := await finished()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert got is not None and got["outcome"] == "cancelled"
    finally:
        await b.close()
        with pytest.raises(ConnectionLost):
            await anext(stream)


async def test_errors_carry_stable_codes_and_name_the_problem(started):
    c = await client(started)
    try:
        with pytest.raises(RemoteError) as info:
            await anext(c.infer("no-such-model", CompletionRequest(prompt="x")))
        assert info.value.code == "unknown_model"
        with pytest.raises(RemoteError) as info:
            await anext(c.infer(started.idle, CompletionRequest(prompt="x")))
        assert info.value.code == "model_not_running" and info.value.details["state"] == "discovered"
        with pytest.raises(RemoteError) as info:
            await anext(c.infer(started.eid, CompletionRequest(prompt="x", params=SamplingParams(top_p=0))))
        assert info.value.code == "bad_request" and info.value.details["field"] == "request.params.top_p"
        with pytest.raises(RemoteError) as info:
            await c.configure(started.eid, ModelSettings(n_ctx=-5))
        assert info.value.code == "bad_request" and info.value.details["field"] == "settings.n_ctx"
        with pytest.raises(RemoteError) as info:
            await c.configure(started.eid, ModelSettings(prefill="sometimes"))
        assert info.value.code == "bad_request" and info.value.details["field"] == "settings.prefill"
        assert "one_per_step" in info.value.message
        # Overloaded: no queue, one request running.
        await c.configure(started.eid, ModelSettings(queue_size=0))
        hog = c.infer(started.eid, CompletionRequest(prompt="1, 2,", params=LONG), request_id="hog")
        await anext(hog)
        with pytest.raises(RemoteError) as info:
            await anext(c.infer(started.eid, CompletionRequest(prompt="x", params=GREEDY)))
        assert info.value.code == "overloaded"
        await c.cancel("hog")
        _, done = await collect(hog, timeout=10)
        assert done.finish_reason == "cancelled"
    finally:
        await c.configure(started.eid, ModelSettings())
        await c.close()


async def test_frames_that_do_not_decode_get_bad_request_naming_the_field_and_the_session_goes_on(started):
    ws = await raw_session(started.server, started.key)
    try:
        enc = msgspec.msgpack.encode
        cases = [
            (b"\xc1", "", "frame"),
            (enc([1, 2, 3]), "", "frame"),
            (enc({"type": "nope", "id": "g1"}), "g1", "type"),
            (enc({"type": "infer", "id": "g2", "request": {"type": "completion", "prompt": "x"}}), "g2", "model"),
            (enc({"type": "infer", "id": "g3", "model": started.eid,
                  "request": {"type": "completion", "prompt": "x", "params": {"max_tokens": "many"}}}),
             "g3", "request.params.max_tokens"),
            (enc({"type": "infer", "id": "g4", "model": started.eid,
                  "request": {"type": "completion", "prompt": "x", "params": {"max_tokenz": 5}}}),
             "g4", "request.params.max_tokenz"),
            (enc({"type": "subscribe", "id": "g5", "interval_s": 0.1}), "g5", "interval_s"),
            (enc({"type": "configure", "id": "g6", "model": started.idle, "settings": {"n_ctxx": 5}}),
             "g6", "settings.n_ctxx"),
            (enc({"type": "read_events", "id": "g7", "limit": 5000}), "g7", "limit"),
            (enc({"type": "list_models", "id": ""}), "", "id"),
        ]
        for frame, rid, field in cases:
            await ws.send(frame)
            err = await recv(ws)
            assert isinstance(err, Error) and err.code == "bad_request", (frame, err)
            assert err.id == rid and err.details.get("field") == field, (frame, err)
        await ws.send("a text frame")
        err = await recv(ws)
        assert isinstance(err, Error) and err.code == "bad_request" and "binary" in err.message
        assert err.id == "" and err.details == {"field": "frame"}
        # A float where an int is expected is refused; an int where a float is expected is taken.
        await ws.send(enc({"type": "infer", "id": "f1", "model": started.eid,
                           "request": {"type": "completion", "prompt": "x", "params": {"max_tokens": 2.0}}}))
        err = await recv(ws)
        assert isinstance(err, Error) and err.id == "f1" and err.details["field"] == "request.params.max_tokens"
        await ws.send(enc({"type": "infer", "id": "f2", "model": started.eid,
                           "request": {"type": "completion", "prompt": "x",
                                       "params": {"max_tokens": 2, "temperature": 0, "top_p": 1}}}))
        while not isinstance(msg := await recv(ws, timeout=60), InferDone | Error):
            pass
        assert isinstance(msg, InferDone) and msg.id == "f2", msg
        await ws.send(encode_link(ListModels(id="still-here")))
        models = await recv(ws)
        assert isinstance(models, Models) and models.id == "still-here"
    finally:
        await ws.close()


async def test_a_reused_in_flight_id_is_refused_without_ending_the_stream_that_owns_it(started):
    ws = await raw_session(started.server, started.key)
    try:
        first = Infer(id="d1", model=started.eid, request=CompletionRequest(prompt="1, 2,", params=LONG))
        await ws.send(encode_link(first))
        await ws.send(encode_link(Infer(id="d1", model=started.eid, request=CompletionRequest(prompt="x"))))
        seen: list[NodeToGateway] = []
        while not any(isinstance(m, Error) for m in seen):
            seen.append(await recv(ws, timeout=60))
        err = next(m for m in seen if isinstance(m, Error))
        assert err.id == "" and err.code == "bad_request"
        assert err.details == {"field": "id", "duplicate_id": "d1"}
        await ws.send(encode_link(CancelInfer(id="d1")))
        while not isinstance(msg := await recv(ws, timeout=60), InferDone):
            assert isinstance(msg, TokenChunk) and msg.id == "d1", msg
        assert msg.id == "d1" and msg.finish_reason == "cancelled"
    finally:
        await ws.close()


async def test_garbage_from_one_gateway_does_not_disturb_another(started):
    bad = await raw_session(started.server, started.key, "garbage")
    good = await client(started, "good")
    try:
        job = asyncio.ensure_future(collect(good.infer(started.eid, CompletionRequest(prompt="Once upon a time",
                                                                                       params=GREEDY))))
        answered = 0
        while not job.done():
            # Each garbage frame is answered with bad_request, and the session stays open for the next.
            await bad.send(os.urandom(64) if answered % 2 else msgspec.msgpack.encode({"type": "infer", "id": f"x{answered}"}))
            err = await recv(bad)
            assert isinstance(err, Error) and err.code == "bad_request", err
            answered += 1
        chunks, done = await job
        assert done.usage.completion_tokens == 8 and answered > 5
    finally:
        await bad.close()
        await good.close()


# -- control and metrics -------------------------------------------------------------------------


async def test_control_list_status_configure_rescan_and_events(started):
    c = await client(started, "gw-control")
    try:
        ids = {m.id: m for m in await c.models()}
        assert ids[started.eid].state == "running" and ids[started.idle].state == "discovered"
        st = await c.configure(started.idle, ModelSettings(n_ctx=256, queue_size=3))
        assert st.settings.n_ctx == 256 and st.effective.n_ctx == 256 and st.queue_size == 3
        assert (await c.status(started.idle)).settings == ModelSettings(n_ctx=256, queue_size=3)
        after = {m.id for m in await c.rescan()}
        assert after == set(ids)
        events = await c.events(started.idle, limit=10)
        desired = [e for e in events if e.type == "desired"]
        assert desired[-1].data["by"] == "gateway:gw-control" and desired[-1].data["settings"]["n_ctx"] == 256
        assert [e.seq for e in events] == sorted(e.seq for e in events) and all(e.stream == started.idle for e in events)
        node_wide = await c.events(limit=5)
        assert len(node_wide) == 5
        with pytest.raises(RemoteError) as info:
            await c.status("nope")
        assert info.value.code == "unknown_model"
    finally:
        await c.configure(started.idle, ModelSettings())
        await c.close()


async def test_disable_and_enable_through_the_link(started):
    c = await client(started, "gw-ops")
    try:
        st = await c.enable(started.idle)
        assert st.enabled
        await started.node.wait_for_state(started.idle, {"running"}, timeout=60)
        chunks, done = await collect(c.infer(started.idle, CompletionRequest(prompt="Hi", params=GREEDY)))
        assert done.usage.completion_tokens == 8
        st = await c.disable(started.idle)
        assert not st.enabled
        await started.node.wait_for_state(started.idle, {"discovered"}, timeout=30)
        assert (await c.status(started.idle)).pid is None
        triggers = [e.data.get("trigger") for e in await c.events(started.idle, limit=20) if e.type == "transition"]
        assert triggers[-4:] == ["start", "ready", "stop", "stopped"]
    finally:
        await c.close()


async def test_metrics_arrive_at_about_the_interval_and_a_new_subscription_replaces_the_old(started):
    c = await client(started, "gw-metrics")
    try:
        arrivals, reports = [], []
        async with asyncio.timeout(10):
            async for report in c.metrics(0.3):
                arrivals.append(time.monotonic())
                reports.append(report)
                if len(reports) == 6:
                    break
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        # A fixed schedule: single gaps jitter with the machine's load, their mean does not drift.
        assert all(0.1 < g < 1.0 for g in gaps), gaps
        assert 0.25 < sum(gaps) / len(gaps) < 0.45, gaps
        em = {e.id: e for e in reports[-1].executors}
        assert reports[-1].node_id == NODE_ID and em[started.eid].state == "running"
        with pytest.raises(RemoteError) as info:
            async for _ in c.metrics(0.1):
                break
        assert info.value.code == "bad_request" and info.value.details["field"] == "interval_s"
    finally:
        await c.close()
    ws = await raw_session(started.server, started.key, "raw-metrics")
    try:
        await ws.send(encode_link(Subscribe(id="m1", interval_s=0.25)))
        assert await recv(ws) == Ack(id="m1")
        assert (await recv(ws)).id == "m1"
        await ws.send(encode_link(Subscribe(id="m2", interval_s=0.25)))
        frames = []
        async with asyncio.timeout(5):
            while len([f for f in frames if isinstance(f, Metrics) and f.id == "m2"]) < 3:
                frames.append(await recv(ws))
        after_ack = frames[[f == Ack(id="m2") for f in frames].index(True) + 1:]
        assert after_ack and all(isinstance(f, Metrics) and f.id == "m2" for f in after_ack)
        await ws.send(encode_link(Unsubscribe(id="u")))
        async with asyncio.timeout(5):
            while (f := await recv(ws)) != Ack(id="u"):
                assert isinstance(f, Metrics)
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=0.8)  # nothing more comes
    finally:
        await ws.close()


# -- keys, pools, shutdown -----------------------------------------------------------------------


async def test_a_key_rotation_accepts_both_keys_without_a_restart(started, tmp_path):
    key_file = tmp_path / "rotating.key"
    settings = msgspec.structs.replace(started.settings,
                                       listen=msgspec.structs.replace(started.settings.listen, key_file=str(key_file)))
    server = GatewayServer(started.node, settings, no_sample, NODE_ID, host="127.0.0.1", port=0)
    await server.start()
    url = f"wss://127.0.0.1:{server.port}"
    try:
        old = keys.read_key(key_file)
        keys.keygen(key_file)
        new = keys.read_key(key_file)
        for k in (new, old):
            c = await NodeClient.connect(url, k, fingerprint=started.fingerprint)
            assert (await c.status(started.eid)).state == "running"
            await c.close()
        keys.previous_path(key_file).unlink()  # the rotation is over
        with pytest.raises(ConnectionFailed) as info:
            await NodeClient.connect(url, old, fingerprint=started.fingerprint)
        assert info.value.close_code == 4001
        c = await NodeClient.connect(url, new, fingerprint=started.fingerprint)
        await c.close()
    finally:
        await server.stop()


async def test_a_node_pool_spreads_requests_and_moves_on_when_a_node_drops(started):
    second = GatewayServer(started.node, started.settings, fake_sampler(started.node, "second"), "second",
                           host="127.0.0.1", port=0)
    await second.start()
    a = await client(started, "pool-a")
    b = await client(started, "pool-b", server=second)
    served: dict[str, int] = {"pool-a": 0, "pool-b": 0}
    for c in (a, b):  # count where the pool sends each request
        def counting(model, request, _c=c, _infer=c.infer, **kw):
            served[_c.gateway_id] += 1
            return _infer(model, request, **kw)
        c.infer = counting  # type: ignore[method-assign]
    pool = NodePool([a, b])
    try:
        # One report each (Subscribe answers at once), none during the requests: the pool then
        # ranks by what it sent since, which is what this test is about. (With reports every
        # 0.25 s, one taken while a request ran made the spread depend on timing.)
        await pool.watch(interval=60, timeout=10)
        assert a.latest_metrics is not None and b.latest_metrics is not None
        for _ in range(4):
            _, done = await collect(pool.infer(started.eid, CompletionRequest(prompt="Hi", params=GREEDY)))
            assert done.usage.completion_tokens == 8
        assert served == {"pool-a": 2, "pool-b": 2}, served
        await second.stop()
        await eventually(lambda: b.closed, what="the pool's client saw its node go")
        for _ in range(2):
            _, done = await collect(pool.infer(started.eid, CompletionRequest(prompt="Hi", params=GREEDY)))
            assert done.usage.completion_tokens == 8
        assert served == {"pool-a": 4, "pool-b": 2}, served
        assert pool.pick(started.eid) is a
        # A node that does not report the model running is not chosen at all.
        with pytest.raises(NoNodeAvailable):
            pool.pick(started.idle)
    finally:
        await pool.close()
        await second.stop()


async def test_a_node_pool_sends_each_conversations_next_turn_where_its_last_one_went(started):
    # Two Gateway servers with their own node ids in front of the node: the pool sees two nodes.
    second = GatewayServer(started.node, started.settings, fake_sampler(started.node, "second"), "second",
                           host="127.0.0.1", port=0)
    await second.start()
    a = await client(started, "route-a")
    b = await client(started, "route-b", server=second)
    served: list[str] = []
    for c in (a, b):
        def counting(model, request, _c=c, _infer=c.infer, **kw):
            served.append(_c.gateway_id)
            return _infer(model, request, **kw)
        c.infer = counting  # type: ignore[method-assign]
    pool = NodePool([a, b])
    try:
        await pool.watch(interval=60, timeout=10)  # one report each; the pool counts what it sends

        def turn(conv: str, n: int) -> ChatRequest:
            msgs = [ChatMessage(role="system", content=f"Conversation {conv}. " + "Answer briefly. " * 20)]
            for i in range(n):
                msgs += [ChatMessage(role="user", content=f"Question {i}?"), ChatMessage(role="assistant", content="Yes.")]
            return ChatRequest(messages=msgs + [ChatMessage(role="user", content=f"Question {n}?")], params=GREEDY)

        for n in range(3):
            for conv in ("x", "y"):
                await collect(pool.infer(started.eid, turn(conv, n)))
        first_x, first_y = served[0], served[1]
        assert first_x != first_y  # first turns: by load (nothing shared at the start of the text)
        assert served == [first_x, first_y] * 3, served  # later turns: where the conversation is
        assert (pool.stats.requests, pool.stats.prefix, pool.stats.no_prefix) == (6, 4, 2)
    finally:
        await pool.close()
        await second.stop()


async def test_stopping_the_server_ends_running_requests_with_shutting_down_and_closes_1001(started):
    third = GatewayServer(started.node, started.settings, no_sample, NODE_ID, host="127.0.0.1", port=0)
    await third.start()
    c = await client(started, "gw-stop", server=third)
    stream = c.infer(started.eid, CompletionRequest(prompt="1, 2,", params=LONG))
    assert isinstance(await anext(stream), TokenChunk)
    stopping = asyncio.ensure_future(third.stop())
    with pytest.raises(RemoteError) as info:
        await collect(stream, timeout=10)
    assert info.value.code == "shutting_down"
    async with asyncio.timeout(10):
        await stopping
    await eventually(lambda: c.closed, what="the client saw the close")
    assert c._lost is not None and c._lost.code == 1001
    await eventually(lambda: started.node.status(started.eid).in_flight == 0, what="the worker freed")


# -- the command line ----------------------------------------------------------------------------


async def test_the_client_command_line(started, capsys):
    base = ["--url", started.url, "--key-file", str(started.settings.key_path), "--fingerprint", started.fingerprint,
            "--gateway-id", "cli"]

    async def run(*argv: str) -> tuple[int, str, str]:
        rc = await asyncio.to_thread(client_cli.main, [*base, *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = await run("--json", "models")
    assert rc == 0 and {m["id"] for m in json.loads(out)} == {started.eid, started.idle}
    rc, out, _ = await run("models")
    assert rc == 0 and out.splitlines()[0].split()[:2] == ["ID", "STATE"] and started.eid in out
    rc, out, err = await run("infer", started.eid, "--prompt", "The capital of France is", "--max-tokens", "4",
                             "--temperature", "0")
    assert rc == 0 and "Paris" in out and "4 completion tokens" in err
    rc, out, _ = await run("--json", "infer", started.eid, "--prompt", "Hi", "--max-tokens", "3", "--stream")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [x["type"] for x in lines] == ["chunk"] * (len(lines) - 1) + ["done"]
    rc, out, _ = await run("configure", started.idle, "--queue-size", "2")
    assert rc == 0 and "queue_size=2" in out
    grammar = Path(started.settings.state_dir) / "yes-no.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    rc, out, _ = await run("infer", started.eid, "--prompt", "Is the sky blue? Answer:", "--max-tokens", "4",
                           "--grammar", str(grammar), "--deadline-s", "60")
    assert rc == 0 and out.strip() in {"yes", "no"}, out
    rc, _, err = await run("infer", started.eid, "--prompt", "x", "--deadline-s", "0")
    assert rc == 1 and "bad_request" in err and "deadline_s" in err
    rc, _, err = await run("infer", started.eid, "--prompt", "x", "--grammar", str(grammar) + ".missing")
    assert rc == 2 and "yes-no.gbnf.missing" in err
    rc, out, _ = await run("configure", started.idle, "--chat-template", "gemma", "--deadline-s", "5",
                           "--stall-timeout-s", "30")
    assert rc == 0 and "chat_template=gemma" in out and "deadline_s=5.0" in out and "stall_timeout_s=30.0" in out
    rc, _, err = await run("configure", started.idle, "--chat-template", "no-such-template")
    assert rc == 2 and "chat_template" in err  # the client checks as the node does, before sending
    rc, out, _ = await run("configure", started.idle, "--parallel", "auto", "--set", "kv_cache_type=q8_0",
                           "--set", "keep_alive_s=600", "--set", "gpus=[0]")
    assert rc == 0 and "kv_cache_type=q8_0" in out and "keep_alive_s=600" in out and "parallel=auto" in out, out
    rc, _, err = await run("configure", started.idle, "--set", "no_such_setting=1")
    assert rc == 2 and "unknown setting 'no_such_setting'" in err, err
    rc, _, err = await run("configure", started.idle, "--set", "kv_cache_type=q3_k")
    assert rc == 2 and "kv_cache_type" in err, err
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal
        await run("configure", started.idle, "--set", "kv_cache_type")
    assert exit_.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    rc, out, _ = await run("configure", started.idle)
    assert rc == 0 and "settings  defaults" in out
    rc, out, _ = await run("events", started.idle, "--limit", "3")
    assert rc == 0 and len(out.splitlines()) == 3 and "desired" in out
    rc, out, _ = await run("--json", "metrics")
    assert rc == 0 and json.loads(out)["node_id"] == NODE_ID
    rc, _, err = await run("status", "nope")
    assert rc == 1 and "unknown_model" in err
    rc = await asyncio.to_thread(client_cli.main, ["--url", started.url, "--key-file", str(started.settings.key_path),
                                                   "--fingerprint", "sha256:" + "00" * 32, "models"])
    assert rc == 3 and "not the pinned" in capsys.readouterr().err


async def test_a_replayed_answer_from_an_earlier_handshake_is_rejected(light):
    key = keys.read_key(light.settings.key_path)
    ws = await raw_connect(light)
    first = await recv(ws)
    recorded = make_hello(key, first, "honest")
    await ws.send(encode_link(recorded))
    assert isinstance(await recv(ws), Welcome)
    await ws.close()
    # An eavesdropper replays the recorded Hello: the new Challenge has a fresh nonce, so it fails.
    ws = await raw_connect(light)
    second = await recv(ws)
    assert isinstance(second, Challenge) and second.nonce_n != first.nonce_n
    await ws.send(encode_link(recorded))
    assert await until_closed(ws) == [] and ws.close_code == 4001


async def test_a_protocol_version_the_node_does_not_speak_is_closed_with_4003(light):
    key = keys.read_key(light.settings.key_path)
    ws = await raw_connect(light)
    challenge = await recv(ws)
    assert 99 not in challenge.versions
    await ws.send(encode_link(make_hello(key, challenge, "future-gateway", version=99)))
    assert await until_closed(ws) == [] and ws.close_code == 4003


async def test_cancel_stops_decoding_the_workers_token_count_stops_growing(started):
    c = await client(started)
    try:
        stream = c.infer(started.eid, CompletionRequest(prompt="1, 2,", params=LONG), request_id="stopme")
        assert isinstance(await anext(stream), TokenChunk)
        await c.cancel("stopme")
        _, done = await collect(stream, timeout=10)
        assert done.finish_reason == "cancelled"
        worker = started.node.executors[started.eid].worker
        assert worker is not None
        counted = worker.tokens_out
        await asyncio.sleep(0.5)  # a worker still decoding would have sent more tokens by now
        assert worker.tokens_out == counted
    finally:
        await c.close()


# -- property-based: garbage and mutated frames never crash a session ----------------------------

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

from optimanode.protocol import ERROR_CODES, GetModel, Infer, ReadEvents, CancelInfer  # noqa: E402

# Valid frames that leave the shared node as it is (no enable/disable/configure/rescan), to mutate.
SEEDS = [encode_link(m) for m in (
    ListModels(id="l"), GetModel(id="g", model="nope"), ReadEvents(id="e", limit=3),
    Infer(id="i", model="no-such-model", request=CompletionRequest(prompt="hi")),
    CancelInfer(id="c"), Subscribe(id="s", interval_s=0.25), Unsubscribe(id="u"),
)]


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["garbage", "mutated", "truncated"]))
    if kind == "garbage":
        return draw(st.binary(min_size=0, max_size=200))
    seed = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "truncated":
        return bytes(seed[: draw(st.integers(0, max(0, len(seed) - 1)))])
    for _ in range(draw(st.integers(1, 4))):
        seed[draw(st.integers(0, len(seed) - 1))] = draw(st.integers(0, 255))
    return bytes(seed)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frames(), min_size=1, max_size=8))
async def test_generated_garbage_and_mutated_frames_get_documented_errors_and_the_session_survives(started, batch):
    ws = await raw_session(started.server, started.key, gateway_id="fuzzer")
    try:
        for data in batch:
            await ws.send(data)
        await ws.send(encode_link(Unsubscribe(id="end-metrics")))
        await ws.send(encode_link(ListModels(id="sentinel")))
        async with asyncio.timeout(20):
            while True:
                msg = await recv(ws)  # decodes as a documented node message, or the test fails here
                if isinstance(msg, Error):
                    assert msg.code in ERROR_CODES, msg
                if isinstance(msg, Models) and msg.id == "sentinel":
                    break  # the session answered after all the garbage: it is alive and in order
        assert ws.close_code is None
    finally:
        await ws.close()
