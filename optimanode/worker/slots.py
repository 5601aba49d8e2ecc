"""Slots, and the choices the serving loop makes about them, as pure functions.

Slot *i* owns KV sequence *i* of the context; ``_Slot.cached`` is the tokens whose K/V its cells
hold (kept after a request, for prefix reuse) and ``_Slot.run`` the request in it. The engine asks
three questions here and does the llama.cpp calls itself:

* ``choose_slot``: which free slot a new prompt goes to (longest shared prefix, then the one that
  keeps the running sequence ids consecutive, then the lowest), and how many tokens it reuses;
* ``compaction_moves``: which running sequences to move into which holes so the running ids are
  consecutive again (llama.cpp runs one pass over the weights per run of consecutive ids);
* ``plan_step``: which slots go into the next batch and how many prompt tokens each (one token
  per generating sequence, then prompt chunks within ``n_batch``: oldest request first, or, with
  ``shortest_first``, the prompt with the fewest tokens left, so a 50-token follow-up turn is not
  held behind a cold 2,000-token prompt; a prompt passed over ``PASS_LIMIT`` times goes next,
  so a stream of short prompts cannot starve a long one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optimanode.worker.jobs import _Job
from optimanode.worker.text import TextStream

# With shortest_first: how many steps a waiting prompt may be passed over by shorter ones before it
# goes first anyway (a 2,000-token prompt waits at most this many 512-token steps).
PASS_LIMIT = 8


def _runs(seqs: list[int]) -> int:
    """How many runs of consecutive ids ``seqs`` holds (0, 1, 2, 5 -> 2)."""
    ids = sorted(seqs)
    return sum(1 for i, s in enumerate(ids) if i == 0 or s != ids[i - 1] + 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case for a follow-up turn: one C-level comparison
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class _Run:
    """One request in a slot, from its first prompt token to its Done."""

    job: _Job
    prompt: list[int]
    max_tokens: int
    sampler: Any  # llama_sampler_p, freed when the run ends; None: greedy by _argmax
    stream: TextStream
    order: int  # admission order: prompt chunks go to the oldest request first
    reused: int  # prompt tokens whose cells were kept from the slot's previous request
    pos: int  # tokens of this sequence in the KV cells == position of the next token
    pending: int = -1  # the token sampled last and not yet decoded (-1: still in the prompt)
    n_out: int = 0
    t_first: float | None = None
    t_last: float | None = None
    # Set while a batch is built: prompt tokens in it, and the batch row to sample (-1: none).
    chunk: int = 0
    row: int = -1
    # Steps in which a shorter prompt went before this one (shortest_first).
    passed: int = 0


@dataclass(eq=False)
class _Slot:
    seq: int
    # Tokens whose K/V sit in this sequence's cells, at positions 0..len-1 (kept after a request
    # ends, for prefix reuse).
    cached: list[int] = field(default_factory=list)
    run: _Run | None = None


def choose_slot(free: list[_Slot], running: list[int], tokens: list[int]) -> tuple[_Slot, int]:
    """The free slot for a prompt of ``tokens`` (not empty), and how many of its cached tokens it keeps.

    The free slot sharing the longest prefix (at least the last prompt token is evaluated: its
    logits give the first token). Among equals, the one that drops the fewest cached tokens of
    another conversation (an empty slot before one holding a conversation that may come back),
    then the one that leaves the fewest runs of consecutive running sequence ids (``running``; a
    hole first, then a neighbour of the running block), so no move is needed to keep them
    consecutive (see ``compaction_moves``); then the lowest id. Reuse comes first: skipped prompt
    tokens are compute saved, a later move only a copy.
    """

    def key(s: _Slot) -> tuple[int, int, int, int]:
        n = min(_common_prefix(s.cached, tokens), len(tokens) - 1)
        return n, -(len(s.cached) - n), -_runs([*running, s.seq]), -s.seq

    slot = max(free, key=key)
    return slot, key(slot)[0]


def compaction_moves(slots: list[_Slot]) -> list[tuple[_Slot, _Slot]]:
    """(source, destination) pairs that make the running sequence ids consecutive; [] if they are.

    ``slots[i].seq == i``. The destinations are the holes of the window of as many consecutive
    slots as there are running sequences that already holds the most of them (the lowest such
    window); the sources are the running slots outside it.
    """
    running = [s for s in slots if s.run is not None]
    n = len(running)
    if n < 2 or running[-1].seq - running[0].seq + 1 == n:
        return []
    # The window of n consecutive slots that already holds the most running sequences.
    start = max(range(len(slots) - n + 1),
                key=lambda w: (sum(w <= s.seq < w + n for s in running), -w))
    holes = [s for s in slots[start:start + n] if s.run is None]
    movers = [s for s in running if not start <= s.seq < start + n]
    return list(zip(movers, holes))


def plan_step(slots: list[_Slot], n_batch: int, one_prompt_per_step: bool,
              shortest_first: bool = False) -> list[_Slot]:
    """The slots that go into the next batch, in sequence order, each run's ``chunk`` set.

    First one token (``chunk`` 0) for every generating run, then the next prompt chunk of the runs
    still in their prompt, oldest first, with what is left of ``n_batch`` (only the first one with
    ``one_prompt_per_step``). ``shortest_first`` orders the prompts by tokens left instead (ties:
    oldest), except that a prompt passed over ``PASS_LIMIT`` times goes first.
    """
    budget = n_batch
    plan: list[_Slot] = []
    for slot in slots:
        run = slot.run
        if run is not None and run.pending >= 0 and budget > 0:
            run.chunk, budget = 0, budget - 1
            plan.append(slot)
    waiting = [s for s in slots if s.run is not None and s.run.pending < 0]
    if shortest_first:
        waiting.sort(key=lambda s: (s.run.passed < PASS_LIMIT, len(s.run.prompt) - s.run.pos,  # type: ignore[union-attr]
                                    s.run.order))  # type: ignore[union-attr]
    else:
        waiting.sort(key=lambda s: s.run.order)  # type: ignore[union-attr]
    taken: list[_Run] = []
    for i, slot in enumerate(waiting):
        if budget <= 0 or (i and one_prompt_per_step):
            break
        run = slot.run
        assert run is not None
        run.chunk = min(budget, len(run.prompt) - run.pos)
        budget -= run.chunk
        taken.append(run)
        plan.append(slot)
    if shortest_first and taken:
        latest = max(r.order for r in taken)
        for run in (s.run for s in waiting):
            if run is not None and run not in taken and run.order < latest:
                run.passed += 1  # an older prompt waits while a younger, shorter one goes first
    plan.sort(key=lambda s: s.seq)
    return plan
