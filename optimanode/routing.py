"""Prefix-aware routing for ``NodePool``: send a conversation's next turn to the node that holds it.

A node keeps the K/V of the prompts it served (in the slot that ran them, and in its worker's
host-RAM prompt cache: optimanode/worker/prefix.py), so a request whose prompt starts with one it
served before costs only its new tokens there, and everything again anywhere else. The pool
cannot see inside the nodes and does not tokenize; it remembers what it sent where, as text:

* ``prompt_text`` renders a request as the text its prompt starts with: a completion's prompt; a
  chat's tools, then each message as one JSON line. Embed requests have none (no prefix to reuse:
  they are routed by load alone).
* ``block_hashes`` cuts that text into blocks of ``block_chars`` characters and hashes each block
  chained to the one before (BLAKE2b, 8 bytes): hash *i* names the whole prefix up to block *i*,
  so two prompts share hash *i* exactly when they share their first *i* blocks. A last partial
  block is left out. 256 characters is about 64 tokens: finer than that, a match saves too little
  to count; coarser, a short new turn would not reach a new block.
* ``PrefixIndex`` is one node's summary: a bounded LRU set of the hashes sent there.
  ``matched(hashes)`` is the number of leading blocks the node is known to hold (the longest hash
  present, scanned from the end, so one evicted early block does not hide a long match).
  ``record`` touches the hashes longest first, so the short, widely shared prefixes (a system
  prompt) stay the most recently used and are evicted last.
* ``choose`` is the decision, given the candidates in load order (``NodePool.ranked``): the node
  with the longest match (ties: the better loaded) wins, unless it is too busy: its load with this
  request (slots in use, queue and requests sent since its last report, over its slots) is above
  ``busy_limit`` *and* above the best-loaded node's by more than ``load_slack``; then load wins.
  So a turn waits a little in its own node's queue rather than be evaluated cold elsewhere, but a
  node never takes its fourth of four slots for a conversation while another node sits idle.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from optimanode.protocol import ChatRequest, CompletionRequest, InferenceRequest

BLOCK_CHARS = 256
# Per node: 16,384 blocks of 256 characters is ~4 M characters (~1 M tokens) of prefixes, more than a
# node's slots and host cache hold; ~1.5 MiB of memory per node.
INDEX_ENTRIES = 16_384
BUSY_LIMIT = 0.8
LOAD_SLACK = 0.5


def prompt_text(request: InferenceRequest) -> str:
    """The text a request's prompt starts with, as far as routing compares prompts ("" for embed)."""
    if isinstance(request, CompletionRequest):
        return request.prompt
    if isinstance(request, ChatRequest):
        # One JSON line per message (fields in a fixed order; JSON escapes every control character,
        # so no content can fake the end of a message), after the tools, which templates render
        # first. A next turn's text starts with the text of the turn before.
        lines = [_json(request.tools)] + [_json(m) for m in request.messages]
        return "\n".join(lines) + "\n"
    return ""


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """One chained hash per whole block of ``text``: hash i names the prefix of i+1 blocks."""
    out: list[bytes] = []
    h = b""
    # Blocks are cut in characters, not bytes: the same text gives the same blocks however a
    # multi-byte character falls.
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hashlib.blake2b(h + text[start:start + block_chars].encode("utf-8", "surrogatepass"),
                            digest_size=8).digest()
        out.append(h)
    return out


class PrefixIndex:
    """One node's summary: the prefix hashes sent there, least recently used dropped first."""

    def __init__(self, entries: int = INDEX_ENTRIES) -> None:
        self.entries = entries
        self._lru: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def matched(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt with these hashes the node is known to hold."""
        for i in range(len(hashes) - 1, -1, -1):
            if hashes[i] in self._lru:
                return i + 1
        return 0

    def record(self, hashes: Sequence[bytes]) -> None:
        for h in reversed(hashes):  # longest first: the shortest, most shared, ends most recent
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.entries:
            self._lru.popitem(last=False)


@dataclass(frozen=True)
class Candidate:
    """A node that can serve the model, as ``choose`` sees it."""

    key: int  # the caller's handle for the node
    matched: int  # leading blocks of the prompt it holds
    load: float  # (slots in use + queue + sent since its report + this request) / slots


@dataclass
class RoutingStats:
    """What the pool decided, since it was made (``NodePool.stats``)."""

    requests: int = 0
    # Sent to the node holding the longest known prefix of the prompt (at least one block).
    prefix: int = 0
    # A node held a prefix but was too busy: sent to the best-loaded node instead.
    load_over_prefix: int = 0
    # No node was known to hold any block of it (a first turn, an embed request): load alone.
    no_prefix: int = 0
    # Requests that waited in the pool for a free slot before being sent (NodePool.hold_s).
    held: int = 0


def choose(candidates: Sequence[Candidate], *, busy_limit: float = BUSY_LIMIT,
           load_slack: float = LOAD_SLACK) -> tuple[int, str]:
    """The key of the node to send to, and why ("prefix", "load_over_prefix" or "no_prefix").

    ``candidates`` come best-loaded first (not empty).
    """
    best_load = candidates[0]
    best = max(candidates, key=lambda c: c.matched)  # max keeps the first (best-loaded) of equals
    if best.matched == 0 or all(c.matched == best.matched for c in candidates):
        return best_load.key, "no_prefix" if best.matched == 0 else "prefix"
    if best.load > busy_limit and best.load - best_load.load > load_slack:
        return best_load.key, "load_over_prefix"
    return best.key, "prefix"
