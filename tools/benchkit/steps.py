"""Where a node's round went, from its workers' step logs, and the floor the replies alone set.

A worker started with ``OPTIMANODE_WORKER_STEP_LOG=PREFIX`` appends one line per ``llama_decode``
of its serving loop to ``PREFIX.<pid>`` (``optimanode.worker.log.StepLog``: start on the monotonic
clock, seconds, tokens, sequences, prompt tokens, prompt sequences). ``read`` keeps the steps that
started inside a round's window (the bench takes ``time.monotonic()`` too); ``breakdown`` sums them:
the share of the wall inside ``llama_decode``, the steps that only generate, those that carry
prompt tokens, and the **generation floor**: the generated tokens fed back in the round (every
reply token but each reply's last) times the cost of a generated token in a full step (all
``parallel`` sequences generating, the cheapest a token gets on a CPU, where a step of 4 costs
about 3 single ones). Any system that serves the same replies with the same kernels and slots
needs at least that long, whatever it caches; the multi-turn bench sets it against llama-server's
wall and later-turn TTFT in the same round (issue 16's goals).

Nothing here runs anything: the functions read files and lists, so tests can drive them on their own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple


class Step(NamedTuple):
    start: float
    seconds: float
    tokens: int
    sequences: int
    prompt_tokens: int
    prompt_sequences: int


def parse(text: str) -> list[Step]:
    """The lines of one step log; a torn last line (a worker killed mid-write) is left out."""
    out: list[Step] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) != 6:
            continue
        try:
            out.append(Step(float(f[0]), float(f[1]), *(int(x) for x in f[2:])))
        except ValueError:
            continue
    return out


def read(prefixes: list[Path], t0: float, t1: float) -> list[Step]:
    """Every step of every worker under ``prefixes`` (``PREFIX.<pid>``: restarts too) that started in [t0, t1]."""
    steps = [s for prefix in prefixes for path in sorted(prefix.parent.glob(f"{prefix.name}.*"))
             for s in parse(path.read_text(encoding="ascii", errors="replace")) if t0 <= s.start <= t1]
    return sorted(steps)


def breakdown(steps: list[Step], parallel: int, wall_s: float) -> dict[str, Any]:
    """One worker's round: where its time went and its generation floor (seconds)."""
    generating = [s for s in steps if s.prompt_tokens == 0]
    full = [s for s in generating if s.sequences == parallel]
    # Generated tokens fed back: a step's tokens that are not prompt tokens (one per sequence).
    fed = sum(s.tokens - s.prompt_tokens for s in steps)
    per_token = sum(s.seconds for s in full) / (parallel * len(full)) if full else math.nan
    decode_s = sum(s.seconds for s in steps)
    generation_only_s = sum(s.seconds for s in generating)
    fed_in_generation_only = sum(s.tokens for s in generating)
    return {
        "steps": len(steps),
        "decode_s": decode_s,
        "decode_share": decode_s / wall_s if wall_s > 0 else math.nan,
        "generation_only_steps": len(generating),
        "generation_only_s": generation_only_s,
        "full_steps": len(full),
        "full_step_token_s": per_token,
        "prompt_steps": len(steps) - len(generating),
        "prompt_steps_s": decode_s - sum(s.seconds for s in generating),
        # Steps of prompts alone (nothing generating beside them: a cold round's start).
        "prompt_only_s": sum(s.seconds for s in steps if s.prompt_sequences == s.sequences),
        "prompt_tokens_evaluated": sum(s.prompt_tokens for s in steps),
        "generated_fed": fed,
        "generation_floor_s": fed * per_token,
        # decode_s = generation_floor_s + prompt_marginal_s + partial_steps_s, exactly: what the
        # prompt tokens added to the steps that carried them (beyond their generated tokens at the
        # full-step cost), and what generating in steps of fewer sequences cost beyond that.
        "prompt_marginal_s": (decode_s - generation_only_s) - (fed - fed_in_generation_only) * per_token,
        "partial_steps_s": generation_only_s - fed_in_generation_only * per_token,
    }


def floor_of(per_node: list[dict[str, Any]]) -> float:
    """The round's generation floor over nodes that run side by side: the slowest node's own."""
    return max((b["generation_floor_s"] for b in per_node), default=math.nan)


def waiting_share(conversations: int, slots: int, turns: int) -> float:
    """TTFT of a turn ~ wall x this, when every conversation keeps coming back to a busy system.

    A conversation's cycle (wait, reply, gap) is wall / turns, and (conversations - slots) of the
    conversations wait for a slot at any time, so a turn waits (conversations - slots) /
    conversations of its cycle. Session 13 found the later-turn TTFT ratio equal to the wall ratio
    within 0.05 in eight rounds; the bench prints this model beside the measured TTFT.
    """
    if conversations <= slots or turns < 1:
        return math.nan
    return (conversations - slots) / (conversations * turns)
