"""The node's side of the Gateway-link handshake: the arithmetic (from optimanode.link) and the limiter.

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

The arithmetic and the handshake's state live in ``optimanode.link``, the one module both ends
import (the labels, ``transcript``, the MACs, ``check_hello``, ``make_hello``, ``check_welcome``,
``NodeHandshake``); they are re-exported here under their old names for the node's code and tests.

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

import time
from collections import deque
from collections.abc import Callable

from optimanode.link import (
    LABEL_GATEWAY,
    LABEL_NODE,
    HandshakeError,
    NodeHandshake,
    check_hello,
    check_welcome,
    choose_version,
    gateway_mac,
    make_hello,
    new_challenge,
    node_mac,
    transcript,
)

__all__ = ["LABEL_GATEWAY", "LABEL_NODE", "FailureLimiter", "HandshakeError", "NodeHandshake", "check_hello",
           "check_welcome", "choose_version", "gateway_mac", "make_hello", "new_challenge", "node_mac", "transcript"]


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
