"""Where a new prompt's cached prefix comes from: its slot's cells, another slot's, or the host cache.

How it works: ``Engine._start`` has picked a free slot (``slots.choose_slot``: the one whose own
cells share the longest prefix) and asks ``Prefixes.prepare`` to fill it; ``Engine._rebind`` asks
again (``again=True``) just before the prompt's first chunk is evaluated, since a prompt that
waited for its turn may find that another slot has evaluated the same beginning meanwhile (requests
that arrive together with one system prompt). Three sources compete,
each worth the prompt tokens it saves less what it costs, in evaluated-token units measured on
SmolLM2 (docs/benchmarks.md, "Prompt cache: restore vs evaluate"):

* the slot's own cells (free: the tail past the shared prefix is dropped);
* another slot's cells, running or idle (``llama_memory_seq_cp``): with per-sequence KV cells
  (``kv_unified`` off) a copy across streams copies the source's whole stream (``COPY_COST``
  per cell of the window), queued by llama.cpp and done at the start of the next ``llama_decode``,
  before any cell is written; the destination then drops the tail past the shared prefix. Not for
  recurrent or hybrid models (their state is not cells: ``llama_model_is_recurrent`` /
  ``llama_model_is_hybrid``, which llama-cpp-python 0.3.36 binds), the same rule as the engine's
  sequence moves;
* the host cache (``prompt_cache.PromptCache``; ``llama_state_seq_set_data``), costing
  ``RESTORE_COST`` per token of the entry plus ``RESTORE_FIXED``.

Before the slot's cells are dropped (it loses ``SAVE_MIN_TOKENS`` or more), their state is saved
to the host cache (``llama_state_seq_get_data``), keyed by ``_Slot.cached``. Ordering: a queued
copy reads its source and writes its destination at the next decode, while a save reads and a
restore writes at once; so a stream that is a pending copy's destination (a copy of ours, or the
engine's sequence move: ``moved``) is neither saved nor restored into, nor is a pending copy's
source restored into, until a decode has run (``Progress.steps`` moved). On a sliding-window model
(Gemma 3) a copied or restored sequence is checked with ``llama_memory_seq_pos_min``: if the SWA
layers lack a cell the next position attends to, the cells are dropped and the prompt evaluated in
full.

llama.cpp functions are called as attributes of ``llama_cpp`` (a test that patches them is seen).
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from optimanode.worker.log import TRACE, _log
from optimanode.worker.progress import Progress
from optimanode.worker.prompt_cache import CacheStats, PromptCache
from optimanode.worker.slots import _common_prefix, _Slot

# Costs in prompt tokens evaluated (docs/benchmarks.md, "Prompt cache: restore vs evaluate"):
# restoring an entry, per token it holds, plus a fixed part; copying another slot's stream, per
# cell of the window (the whole stream is copied). Measured on SmolLM2 (2 threads): a restore
# costs 0.0004-0.001 of an evaluated token per token it holds, a copy at most ~0.001 per cell;
# these are ten times that, so a restore or copy is taken only where it clearly saves compute
# (e.g. a 1,000-token entry must serve 11 tokens more than the slot's own cells).
RESTORE_COST = 0.01
RESTORE_FIXED = 1.0
COPY_COST = 0.005
# A slot losing fewer cached tokens than this is not saved (a follow-up turn usually drops only
# the last few tokens its template re-renders).
SAVE_MIN_TOKENS = 32
class Prefixes:
    """The cross-slot copy and the host cache of one context (``cap_bytes`` 0: no host cache)."""

    def __init__(self, ctx: Any, mem: Any, model: Any, slots: list[_Slot], window: int, cap_bytes: int,
                 progress: Progress) -> None:
        self.ctx, self.mem, self.slots, self.window = ctx, mem, slots, window
        self.progress = progress
        recurrent = bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self.share = len(slots) > 1 and not recurrent
        self.n_swa = max(0, int(llama_cpp.llama_model_n_swa(model)))
        self.stats = CacheStats()
        self.cache = PromptCache(cap_bytes, self.n_swa, self.stats) if cap_bytes > 0 and not recurrent else None
        if self.cache is not None:
            self.cache.keep_free = progress.keep_free_bytes
            progress.prompt_cache = self.cache
        # Copies queued since the last decode: (source stream, destination stream).
        self._pending: list[tuple[int, int]] = []
        self._pending_step = progress.steps

    def _busy(self) -> tuple[set[int], set[int]]:
        """(sources, destinations) of the copies not done yet."""
        if self.progress.steps != self._pending_step:
            self._pending.clear()
        return {s for s, _ in self._pending}, {d for _, d in self._pending}

    def prepare(self, slot: _Slot, n_local: int, tokens: list[int], again: bool = False) -> tuple[int, str]:
        """Fill ``slot`` (free) with the best cached prefix of ``tokens``; its cells and ``cached``
        hold that prefix afterwards. Returns (tokens reused, "slot" | "copy" | "host" | "").

        ``again``: the slot already holds what the first call chose (``cached`` is ``tokens[:n_local]``)
        and its prompt is about to be evaluated (``Engine._rebind``): another source may hold more
        by now. Its own cells are then not saved (a copy or restore covers them), a miss is not
        counted twice, and ``tokens_served`` grows only by what this call adds."""
        limit = len(tokens) - 1  # the last prompt token is always evaluated: its logits give the first token
        sources, dests = self._busy()
        # Each source is worth the tokens it serves less its cost (in evaluated tokens).
        best, covered, how, src, entry = float(n_local), n_local, "slot", None, None
        if self.share:
            for other in self.slots:
                if other is slot:
                    continue
                n = min(_common_prefix(other.cached, tokens), limit)
                if n - COPY_COST * self.window > best:
                    best, covered, how, src = n - COPY_COST * self.window, n, "copy", other
        if self.cache is not None:
            e, n = self.cache.lookup(tokens, limit)
            if (e is not None and n - RESTORE_COST * len(e.tokens) - RESTORE_FIXED > best
                    and slot.seq not in sources and slot.seq not in dests):
                how, entry, src = "host", e, None
            elif covered < limit and not again:  # evaluated from ``covered`` on: the cache had nothing better
                self.cache.missed()
        keep = n_local if how == "slot" else 0
        if (self.cache is not None and not again and len(slot.cached) - keep >= SAVE_MIN_TOKENS
                and slot.seq not in dests):
            self._save(slot)
        if how == "copy":
            assert src is not None
            n = self._copy(src, slot, tokens, limit)
        elif how == "host":
            assert entry is not None
            n = self._restore(entry, slot, tokens, limit)
        else:
            n = self._trim(slot, n_local)
        self.stats.tokens_served += n - (n_local if again else 0)
        return n, how if n else ""

    def moved(self, src: _Slot, dst: _Slot) -> None:
        """A copy from ``src`` to ``dst`` was queued (``llama_memory_seq_cp``: ours, or the engine's
        sequence move): until the next decode ``dst``'s buffer is stale, so it is neither saved
        nor restored into, and ``src`` is not restored into."""
        self._busy()
        self._pending.append((src.seq, dst.seq))
        self._pending_step = self.progress.steps

    def before_overwrite(self, slot: _Slot) -> None:
        """``slot``'s cells are about to be replaced (a sequence move): save them if worth it."""
        if (self.cache is not None and len(slot.cached) >= SAVE_MIN_TOKENS
                and slot.seq not in self._busy()[1]):
            self._save(slot)

    def _trim(self, slot: _Slot, n: int) -> int:
        if n < len(slot.cached):
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, n, -1):
                # A memory that cannot drop a tail (recurrent models): start this sequence over.
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                n = 0
            del slot.cached[n:]
        return n

    def _save(self, slot: _Slot) -> None:
        assert self.cache is not None
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq)
        if size <= 0 or self.cache.size_of(slot.cached, size) > self.cache.cap_bytes:
            return
        if not self.cache.make_room(self.cache.size_of(slot.cached, size)):
            if TRACE:
                _log(f"slot {slot.seq}: not saved: the machine is short of the RAM the node keeps free")
            return
        blob = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, blob, size, slot.seq)
        if written <= 0:
            _log(f"slot {slot.seq}: llama_state_seq_get_data failed; not cached")
            return
        stored = self.cache.put(list(slot.cached), blob)
        if TRACE:
            _log(f"slot {slot.seq}: {len(slot.cached)} tokens {'saved' if stored else 'not saved'} "
                 f"({size} bytes; cache {self.cache.bytes}/{self.cache.cap_bytes} bytes, {len(self.cache)} entries)")

    def _copy(self, src: _Slot, dst: _Slot, tokens: list[int], limit: int) -> int:
        n = min(_common_prefix(src.cached, tokens), limit)
        llama_cpp.llama_memory_seq_cp(self.mem, src.seq, dst.seq, -1, -1)
        self.moved(src, dst)
        llama_cpp.llama_memory_seq_rm(self.mem, dst.seq, n, -1)
        dst.cached = list(src.cached[:n])
        self.stats.slot_copies += 1
        return self._check_window(dst, n)

    def _restore(self, entry: Any, dst: _Slot, tokens: list[int], limit: int) -> int:
        assert self.cache is not None
        n = min(_common_prefix(entry.tokens, tokens), limit)
        llama_cpp.llama_memory_seq_rm(self.mem, dst.seq, -1, -1)
        dst.cached.clear()
        read = llama_cpp.llama_state_seq_set_data(self.ctx, entry.blob, len(entry.blob), dst.seq)
        if read <= 0:
            _log(f"slot {dst.seq}: llama_state_seq_set_data failed; the prompt is evaluated")
            self.cache.remove(entry)
            llama_cpp.llama_memory_seq_rm(self.mem, dst.seq, -1, -1)
            return 0
        self.cache.taken(entry, n)
        dst.cached = list(entry.tokens)
        return self._check_window(dst, self._trim(dst, n))

    def _check_window(self, slot: _Slot, n: int) -> int:
        """On a sliding-window model: keep the cells only if the SWA layers hold every cell the
        next position attends to (llama-server's check); otherwise start the sequence over."""
        if not self.n_swa or n == 0:
            return n
        pos_min = llama_cpp.llama_memory_seq_pos_min(self.mem, slot.seq)
        if pos_min <= max(0, n - self.n_swa + 1):
            return n
        _log(f"slot {slot.seq}: the sliding window lacks cells below position {pos_min}; evaluating in full")
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.cached.clear()
        return 0
