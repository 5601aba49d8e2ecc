"""The Gateway-link handshake as pure arithmetic (no sockets), and the per-address failure limiter.

How it works (docs/protocol.md, "Handshake", is the reference a Gateway is written from):

1. The node sends ``Challenge(versions, node_id, nonce_n)`` with 32 fresh random bytes.
2. The Gateway answers ``Hello(version, gateway_id, nonce_g, mac_g)`` where
   ``mac_g = HMAC-SHA256(key, b"optimanode/v1 gateway" || T)`` and ``T`` is the *transcript*:
   each of nonce_n, nonce_g, gateway_id (UTF-8), node_id (UTF-8) and version (4-byte big-endian
   unsigned) as a 4-byte big-endian length followed by the bytes.
3. The node recomputes the MAC with its current key and with the previous one (during a key
   rotation both are valid), compares with ``hmac.compare_digest``, and answers
   ``Welcome(version, node_id, mac_n)`` with ``mac_n = HMAC-SHA256(key, b"optimanode/v1 node" || T)``
   under the key that matched. The Gateway checks it, and so knows it reached a node holding the key.

Why it is safe: the key never crosses the wire, only MACs of fresh nonces; both nonces are in the
transcript, so neither side can be made to replay an old answer; the two labels differ, so a MAC
one side produced is never valid as the other side's (a reflected ``mac_g`` fails as ``mac_n``);
the length prefixes make the transcript unambiguous (no field can borrow bytes from its neighbour).
The key only proves membership; confidentiality and the node's identity come from TLS with the
certificate pinned by its fingerprint.

``FailureLimiter`` counts failed handshakes per remote address with an injected clock: after
``max_failures`` within ``window_s``, that address is refused for ``lockout_s``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from optimanode.errors import OptimaNodeError
from optimanode.protocol import (
    CLOSE_UNAUTHORIZED,
    CLOSE_VERSION_UNSUPPORTED,
    MAC_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSIONS,
    Challenge,
    Hello,
    Welcome,
)

LABEL_GATEWAY = b"optimanode/v1 gateway"
LABEL_NODE = b"optimanode/v1 node"


class HandshakeError(OptimaNodeError):
    """The handshake failed; ``close_code`` is the WebSocket close code the node answers with."""

    def __init__(self, close_code: int, reason: str) -> None:
        self.close_code, self.reason = close_code, reason
        super().__init__(f"{close_code}: {reason}")


def _lp(part: bytes) -> bytes:
    return len(part).to_bytes(4, "big") + part


def transcript(nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str, version: int) -> bytes:
    """The bytes both MACs cover (after their label): every field length-prefixed, in this order."""
    return b"".join(_lp(p) for p in (nonce_n, nonce_g, gateway_id.encode(), node_id.encode(),
                                     version.to_bytes(4, "big")))


def gateway_mac(key: bytes, nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str, version: int) -> bytes:
    return hmac.new(key, LABEL_GATEWAY + transcript(nonce_n, nonce_g, gateway_id, node_id, version),
                    hashlib.sha256).digest()


def node_mac(key: bytes, nonce_n: bytes, nonce_g: bytes, gateway_id: str, node_id: str, version: int) -> bytes:
    return hmac.new(key, LABEL_NODE + transcript(nonce_n, nonce_g, gateway_id, node_id, version),
                    hashlib.sha256).digest()


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
    """The Gateway's answer to a Challenge (what optimanode.client does, written against this module)."""
    if version is None:
        version = choose_version(challenge.versions)
        if version is None:
            raise HandshakeError(CLOSE_VERSION_UNSUPPORTED, f"no common protocol version in {challenge.versions}")
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
        mac = gateway_mac(key, challenge.nonce_n, hello.nonce_g, hello.gateway_id, challenge.node_id, hello.version)
        if hmac.compare_digest(mac, hello.mac_g) and matched is None:
            matched = key
    if matched is None:
        # Deliberately says nothing about why: the same answer for a wrong key and a tampered field.
        raise HandshakeError(CLOSE_UNAUTHORIZED, "unauthorized")
    return Welcome(version=hello.version, node_id=challenge.node_id, max_frame_bytes=max_frame_bytes,
                   mac_n=node_mac(matched, challenge.nonce_n, hello.nonce_g, hello.gateway_id, challenge.node_id,
                                  hello.version))


def check_welcome(key: bytes, challenge: Challenge, hello: Hello, welcome: Welcome) -> None:
    """The Gateway's check that the node holds the key; raises HandshakeError if it does not."""
    want = node_mac(key, challenge.nonce_n, hello.nonce_g, hello.gateway_id, challenge.node_id, hello.version)
    if (welcome.version != hello.version or welcome.node_id != challenge.node_id
            or not hmac.compare_digest(want, welcome.mac_n)):
        raise HandshakeError(CLOSE_UNAUTHORIZED, "the node did not prove it holds the access key")


class FailureLimiter:
    """Failed handshakes per address: ``max_failures`` within ``window_s`` locks it out for ``lockout_s``.

    Pure bookkeeping with an injected clock; the server asks ``blocked_for`` before a handshake and
    reports ``failure`` / ``success`` after it. A refused attempt does not extend the lockout (the
    lockout is a fixed penalty, not a trap a legitimate Gateway retrying in a loop never leaves).
    Memory is bounded: at most ``max_addresses`` are tracked, the stalest dropped first.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, lockout_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic, max_addresses: int = 10_000) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self.clock, self.max_addresses = clock, max_addresses
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def blocked_for(self, address: str) -> float:
        """Seconds this address must still wait; 0.0 when it may try."""
        until = self._locked_until.get(address)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._locked_until[address]
            return 0.0
        return left

    def failure(self, address: str) -> None:
        now = self.clock()
        times = self._failures.pop(address, None) or deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        times.append(now)
        if len(times) >= self.max_failures:
            self._locked_until[address] = now + self.lockout_s
            times.clear()
        else:
            self._failures[address] = times  # re-inserted: dict order is staleness order
        self._bound(now)

    def success(self, address: str) -> None:
        self._failures.pop(address, None)

    def _bound(self, now: float) -> None:
        if len(self._failures) + len(self._locked_until) <= self.max_addresses:
            return
        for addr in [a for a, t in self._failures.items() if not t or now - t[-1] > self.window_s]:
            del self._failures[addr]
        for addr in [a for a, u in self._locked_until.items() if u <= now]:
            del self._locked_until[addr]
        while self._failures and len(self._failures) + len(self._locked_until) > self.max_addresses:
            del self._failures[next(iter(self._failures))]
