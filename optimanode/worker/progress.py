"""Decode progress for the heartbeat: the serving loop counts its steps, the reader thread reports them.

The loop calls ``Progress.stepped`` after each ``llama_decode`` it runs for requests; the reader
thread answers each ``Ping`` with ``Progress.pong``: the steps done, the requests taken and not yet
answered (``_Jobs.pending``), and with some pending, the seconds since the last step ended or
since work arrived at an idle worker, whichever is later. A decode stuck inside llama.cpp does not
stop the reader thread (``llama_decode`` releases the GIL, and so does a blocked Python wait), so
the heartbeat still arrives and says "work pending, no step for N s": the supervisor's stall watch
acts on that (``optimanode.executors.supervisor.stall_reason``). Plain attribute writes and reads
between the two threads: the GIL makes each whole, and a report one step stale is still right
about a decode stuck for seconds. Each ``Pong`` also carries the prompt cache's counters
(``prompt_cache.CacheStats``, which the engine hands to ``Progress.cache``), read the same way.
``Progress.keep_free`` takes each Ping's RAM floor to the prompt cache (``PromptCache.relieve``, on
the reader thread, under the cache's own lock).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from optimanode import protocol as p
from optimanode.worker.prompt_cache import CacheStats, PromptCache


class Progress:
    """The serving loop's step count and the time its last step ended."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.steps = 0
        self.last_step = clock()
        # The engine's prompt cache counters (prompt_cache.CacheStats), once it has made them.
        self.cache: CacheStats | None = None
        # The host prompt cache itself (set by the engine once it has made it), and the RAM floor
        # the last Ping asked for.
        self.prompt_cache: PromptCache | None = None
        self.keep_free_bytes = 0

    def stepped(self) -> None:
        """One llama_decode for requests has returned."""
        self.last_step = self._clock()
        self.steps += 1

    def keep_free(self, n: int) -> None:
        """A Ping's ``keep_free_bytes``: the prompt cache keeps to it from now on, and drops what
        the machine is short of now."""
        self.keep_free_bytes = max(0, n)
        cache = self.prompt_cache
        if cache is not None:
            cache.keep_free = self.keep_free_bytes
            cache.relieve()

    def pong(self, seq: int, pending: int, busy_since: float | None) -> p.Pong:
        """The answer to ``Ping(seq)``; ``busy_since``: when the worker last went from no work to some."""
        c = self.cache
        cache = None if c is None else p.PromptCacheReport(
            tokens_served=c.tokens_served, slot_copies=c.slot_copies, hits=c.hits, misses=c.misses,
            saves=c.saves, evictions=c.evictions, pressure_evictions=c.pressure_evictions, bytes=c.bytes,
            cap_bytes=c.cap_bytes, entries=c.entries)
        if pending <= 0:
            return p.Pong(seq=seq, steps=self.steps, prompt_cache=cache)
        # Work that arrived at an idle worker has waited only since it arrived, not since the
        # step before the idle spell.
        since = self._clock() - max(self.last_step, busy_since if busy_since is not None else self.last_step)
        return p.Pong(seq=seq, steps=self.steps, pending=pending, since_step_s=round(max(since, 0.0), 3),
                      prompt_cache=cache)
