"""Streaming text: token bytes in, chunks of whole characters out, stop strings held back.

Each token's bytes go through an incremental UTF-8 decoder, so a character split over tokens is
sent once it is complete, and a chunk's ``tokens`` counts the tokens it covers (the sum over a
request's chunks is its completion tokens). Text that could be the start of a stop string is
held back until it cannot be; only that held-back tail is searched, never the whole output. The
stop string and anything after it is never sent.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class TextStream:
    """Turns token bytes into chunks of whole characters, holding back possible stop-string starts.

    ``emit(text, tokens)`` receives each chunk; ``tokens`` counts the tokens fed since the last one.
    """

    def __init__(self, stops: list[str], emit: Callable[[str, int], None]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = stops
        self._emit = emit
        self._held = ""
        self._tokens = 0
        self.stopped = False

    def feed(self, piece: bytes) -> bool:
        """Add one token's bytes; True when a stop string was found (the stream is then finished)."""
        self._tokens += 1
        self._held += self._decoder.decode(piece)
        if not self._stops:
            self._release(len(self._held))
            return False
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = self._held[: min(hits)]
            self.stopped = True
            self.finish()
            return True
        self._release(len(self._held) - self._partial_stop())
        return False

    def finish(self) -> None:
        """Send what is left (also the bytes of an unfinished character, as U+FFFD)."""
        if not self.stopped:
            self._held += self._decoder.decode(b"", final=True)
        if self._held or self._tokens:
            self._emit(self._held, self._tokens)
        self._held, self._tokens = "", 0

    def _partial_stop(self) -> int:
        """Length of the longest tail of the held text that is a proper prefix of a stop string."""
        held, best = self._held, 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(held)), best, -1):
                if held.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, n: int) -> None:
        if n > 0:
            self._emit(self._held[:n], self._tokens)
            self._held, self._tokens = self._held[n:], 0
