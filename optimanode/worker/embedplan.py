"""The pure part of embeddings: which inputs share a decode, and the vectors' arithmetic.

Every input of an embed request becomes one sequence of a decode on the embedding context
(``embed.py``). ``EmbedWork`` is one request's state: its inputs' tokens, the next input not yet
decoded, the vectors so far. ``take`` packs inputs first come, first served (the requests in the
order they arrived, each one's inputs in order) into one decode while they fit: at most
``n_batch`` tokens (the whole decode is one micro-batch, because llama.cpp pools per micro-batch)
and at most ``n_seq_max`` sequences. It stops at the first input that does not fit rather than
skipping ahead, so a long input is never overtaken for ever by short ones. One input alone always
fits: an input longer than ``n_batch`` is refused (``context_overflow``) before it is queued.

``unit`` scales a vector to unit L2 norm, as llama-cpp-python's ``normalize_embedding`` does (a
zero vector stays zero). ``max_inputs`` bounds a request's input count by the size of its reply.
Nothing here imports llama_cpp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optimanode import protocol as p


@dataclass(eq=False)
class EmbedWork:
    """One embed request in the worker: its inputs' tokens and the vectors decoded so far."""

    job: Any  # jobs._Job (Any: this module stays free of the worker's other state)
    tokens: list[list[int]]
    normalize: bool
    vectors: list[np.ndarray | None] = field(default_factory=list)
    # The first input not yet handed to a decode.
    next: int = 0

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.tokens)

    @property
    def complete(self) -> bool:
        return all(v is not None for v in self.vectors)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def take(queue: Iterable[EmbedWork], n_batch: int, n_seq_max: int) -> list[tuple[EmbedWork, int]]:
    """The (request, input index) pairs of the next decode, advancing each request's ``next``.

    First come, first served: stops at the first input that would make the decode more than
    ``n_batch`` tokens or ``n_seq_max`` sequences (an input that fits alone is always taken when
    the decode is empty, so every call makes progress while work is queued).
    """
    out: list[tuple[EmbedWork, int]] = []
    used = 0
    for work in queue:
        while work.next < len(work.tokens):
            n = len(work.tokens[work.next])
            if out and (used + n > n_batch or len(out) >= n_seq_max):
                return out
            out.append((work, work.next))
            used += n
            work.next += 1
    return out


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` scaled to unit L2 norm (in float64 for the sum); a zero vector as it is."""
    norm = math.sqrt(float(np.dot(vector.astype(np.float64), vector.astype(np.float64))))
    return vector / norm if norm > 0.0 else vector


# Bytes msgspec's msgpack spends on one float (a float 64: marker and 8 bytes), and what a Done
# frame spends besides the vectors (its other fields, each vector's array header: generous).
_FLOAT_BYTES = 9
_FRAME_SLACK = 64 * 1024


def max_inputs(dimensions: int, frame_limit: int = p.MAX_FRAME) -> int:
    """How many vectors of ``dimensions`` floats one reply frame can carry, at most
    ``p.EMBED_INPUTS_MAX``: the worker pipe and the link take frames up to 16 MiB, so a model with
    very wide vectors (over ~7000 dimensions) takes fewer inputs per request."""
    per_vector = dimensions * _FLOAT_BYTES + 5
    return max(1, min(p.EMBED_INPUTS_MAX, (frame_limit - _FRAME_SLACK) // per_vector))
