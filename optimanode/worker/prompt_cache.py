"""The worker's host-RAM prompt cache: saved sequence states, keyed by their tokens, in a bounded LRU.

How it works: when a slot is about to be reused for a prompt that does not continue what its cells
hold, the engine saves the state of that sequence (``llama_state_seq_get_data``: the K/V of its
cells) here, keyed by the tokens those cells hold (``PromptCache.put``). A later prompt looks up
the entry sharing its longest prefix (``PromptCache.lookup``); the engine restores it into a slot
(``llama_state_seq_set_data``), drops the cells past the shared prefix and evaluates only the rest.

The bound is in bytes (``cap_bytes``, from ``prompt_cache_mib``): an entry's size is its state
blob plus its key (4 bytes a token); ``put`` evicts least-recently-used entries until the new one
fits, and refuses one larger than the whole cap, so ``bytes`` never exceeds ``cap_bytes``. An entry
whose tokens are a prefix of the new one's is replaced by it (the longer one serves every prompt
the shorter one did); a new one that is a prefix of an entry already held is not stored.

The machine's RAM comes first: the node tells the worker with each heartbeat (``Ping.keep_free_bytes``)
how much RAM it needs left available (its ``memory_reserve_mb`` and what models still loading will
allocate). ``make_room`` keeps a new entry from taking the machine below that floor (least recently
used entries go first; the new one is not stored when they are not enough), and ``relieve``, called
by the reader thread on each Ping, drops entries while the machine has less and hands the freed
pages back to the system (``malloc_trim``): a cache that filled while RAM was plentiful gives it back
to a model loading later, or to anything else on the machine. The two threads meet under ``_lock``.

Sliding-window models (Gemma 3): llama.cpp saves a sequence without the cells its SWA layers no
longer see (those more than ``n_swa`` positions behind the last one), so an entry of L tokens can
only be cut back to n tokens where those layers still have every cell position n will attend to:
``usable`` checks that (the lowest position saved is at most n - n_swa + 1), and the engine checks
the restored cells (``llama_memory_seq_pos_min``) before it relies on them.

Pure Python (no llama_cpp): ``blob`` is any object with a length in bytes (the engine stores the
ctypes buffer llama.cpp wrote into). ``CacheStats`` counts what the heartbeat reports.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from optimanode.worker.slots import _common_prefix

# Bytes an entry's key costs per token (a token id is an int32 in llama.cpp; what Python holds is
# more, but the blob dominates by three orders of magnitude).
KEY_BYTES_PER_TOKEN = 4

# prompt_cache_mib "auto" (-1 in WorkerSettings): this share of the RAM available when the model
# has loaded, at most AUTO_MAX_MIB (llama-server's --cache-ram default). The cache fills only as
# slots are reused, so this is a ceiling, not an allocation.
AUTO_RAM_SHARE = 0.125
AUTO_MAX_MIB = 8192


def prompt_cache_bytes(mib: int, available: int | None = None) -> int:
    """The host cache's cap in bytes for the ``prompt_cache_mib`` setting (-1: auto, 0: off)."""
    if mib >= 0:
        return mib << 20
    if available is None:
        available = psutil.virtual_memory().available
    return min(AUTO_MAX_MIB << 20, int(available * AUTO_RAM_SHARE))


@dataclass
class CacheStats:
    """Counters since the worker started (the heartbeat reports them; the reader thread reads)."""

    # Prompt tokens not evaluated because their K/V came from a cache: the slot's own cells,
    # another slot's (copied) or the host cache (restored).
    tokens_served: int = 0
    # Prompts that copied a prefix from another slot's cells.
    slot_copies: int = 0
    # Host cache: lookups that restored an entry, lookups that found none worth restoring.
    hits: int = 0
    misses: int = 0
    saves: int = 0
    evictions: int = 0
    # Entries dropped, or not stored, to leave the machine the RAM the node asked for.
    pressure_evictions: int = 0
    # Bytes held, the cap, and the entries held.
    bytes: int = 0
    cap_bytes: int = 0
    entries: int = 0


@dataclass(eq=False)
class Entry:
    tokens: list[int]
    blob: Any
    size: int
    # The lowest position whose cells the SWA layers kept (0 without sliding-window layers).
    min_pos: int = 0
    restores: int = field(default=0)


class PromptCache:
    """Saved sequence states keyed by token prefix, least recently used evicted past ``cap_bytes``."""

    def __init__(self, cap_bytes: int, n_swa: int = 0, stats: CacheStats | None = None,
                 available: Callable[[], int] | None = None) -> None:
        self.cap_bytes = max(0, cap_bytes)
        self.n_swa = max(0, n_swa)
        self.stats = stats if stats is not None else CacheStats()
        self.stats.cap_bytes = self.cap_bytes
        # Least recently used first.
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._next = 0
        # The RAM the node wants left available (Ping.keep_free_bytes; 0: none), and how much is.
        self.keep_free = 0
        self._available = available if available is not None else _available
        # The engine thread (put, lookup, ...) and the reader thread (relieve) both change _entries.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self.stats.bytes

    def entries(self) -> list[Entry]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def size_of(self, tokens: list[int], blob_len: int) -> int:
        return blob_len + KEY_BYTES_PER_TOKEN * len(tokens)

    def put(self, tokens: list[int], blob: Any) -> bool:
        """Keep ``blob`` (the state of cells holding ``tokens``); False when it is not stored (too
        big for the cap, empty, or already covered by an entry that extends it)."""
        if not tokens:
            return False
        size = self.size_of(tokens, len(blob))
        if size > self.cap_bytes:
            return False
        with self._lock:
            return self._put(tokens, blob, size)

    def _put(self, tokens: list[int], blob: Any, size: int) -> bool:
        for key, e in list(self._entries.items()):
            n = _common_prefix(e.tokens, tokens)
            if n == len(tokens):  # held already, or a longer entry extends it
                self._entries.move_to_end(key)
                return False
            if n == len(e.tokens):  # the new one extends this entry: it replaces it
                self._drop(key)
        while self.stats.bytes + size > self.cap_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        min_pos = max(0, len(tokens) - self.n_swa) if self.n_swa else 0
        self._entries[self._next] = Entry(tokens=list(tokens), blob=blob, size=size, min_pos=min_pos)
        self._next += 1
        self.stats.bytes += size
        self.stats.entries = len(self._entries)
        self.stats.saves += 1
        return True

    def usable(self, entry: Entry, n: int) -> bool:
        """Whether ``entry`` cut back to its first ``n`` tokens is a complete cache for them."""
        if n <= 0 or n > len(entry.tokens):
            return False
        # The next position, n, attends to positions above n - n_swa in the SWA layers.
        return not self.n_swa or entry.min_pos <= max(0, n - self.n_swa + 1)

    def lookup(self, tokens: list[int], limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest usable prefix with ``tokens`` (at most ``limit`` tokens),
        and that length; (None, 0) when none shares any. Does not count a hit or a miss (the caller
        decides whether restoring is worth it: ``taken`` / ``missed``)."""
        best: Entry | None = None
        best_n = 0
        with self._lock:
            entries = list(self._entries.values())
        for e in entries:
            n = min(_common_prefix(e.tokens, tokens), limit)
            if n > best_n and self.usable(e, n):
                best, best_n = e, n
        return best, best_n

    def taken(self, entry: Entry, n: int) -> None:
        """``entry`` was restored to serve ``n`` prompt tokens: most recently used now."""
        with self._lock:
            for key, e in self._entries.items():
                if e is entry:
                    self._entries.move_to_end(key)
                    break
        entry.restores += 1
        self.stats.hits += 1

    def missed(self) -> None:
        self.stats.misses += 1

    def remove(self, entry: Entry) -> None:
        """Forget ``entry`` (its state did not restore)."""
        with self._lock:
            for key, e in list(self._entries.items()):
                if e is entry:
                    self._drop(key)

    def make_room(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes may be stored without leaving the machine less than
        ``keep_free`` available; least recently used entries are dropped to make that room. Called
        before the state is copied out, so a refused entry never takes the memory at all."""
        with self._lock:
            if self.keep_free <= 0:
                return True
            if self._shed(self.keep_free + size - self._available()):
                return True
            self.stats.pressure_evictions += 1  # this one, not stored
            return False

    def relieve(self) -> int:
        """Drop entries, least recently used first, while the machine has less than ``keep_free``
        available, and return their pages to the system; how many were dropped."""
        with self._lock:
            if self.keep_free <= 0 or not self._entries:
                return 0
            before = len(self._entries)
            self._shed(self.keep_free - self._available())
            dropped = before - len(self._entries)
        if dropped:
            release_freed_memory()
        return dropped

    def _shed(self, deficit: int) -> bool:
        """Drop least recently used entries until ``deficit`` bytes are freed; whether they were."""
        while deficit > 0 and self._entries:
            key = next(iter(self._entries))
            deficit -= self._entries[key].size
            self._drop(key)
            self.stats.pressure_evictions += 1
        return deficit <= 0

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        self.stats.bytes -= e.size
        self.stats.entries = len(self._entries)


def _available() -> int:
    return int(psutil.virtual_memory().available)


_libc: Any = None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``): the states are
    allocated with malloc, and glibc keeps freed blocks of their size in the heap for reuse."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)  # the process's own symbols: libc's on Linux
        except OSError:  # pragma: no cover - a platform without dlopen(NULL)
            _libc = False
    trim = getattr(_libc, "malloc_trim", None) if _libc else None
    if trim is not None:  # glibc; other C libraries return freed memory on their own terms
        trim(0)
