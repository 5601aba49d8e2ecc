"""The worker's side of the pipe protocol: reading frames from stdin, writing them to stdout.

A frame is ``optimanode.protocol``'s: a 4-byte big-endian length, then a MessagePack body.
``read_frame`` reads with ``os.read`` on the raw descriptor (a daemon thread blocked inside a
``BufferedReader`` can abort interpreter shutdown) and raises ``_StreamBroken`` for a length over
``MAX_FRAME``: the stream cannot be resynchronised. ``_Writer`` serialises writes through one lock
so frames never interleave, sends a loop step's frames in one write, and exits the process when
nobody reads stdout any more.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from optimanode import protocol as p
from optimanode.worker.log import EXIT_OK, _log


class _StreamBroken(Exception):
    """The frame stream cannot be resynchronised."""


def _read_exact(fd: int, n: int) -> bytes | None:
    # os.read, not sys.stdin.buffer: a daemon thread blocked inside a BufferedReader can abort
    # interpreter shutdown ("could not acquire lock for <stdin>").
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = os.read(fd, n - got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_frame(fd: int) -> bytes | None:
    """The next frame body from ``fd``, or None at EOF."""
    header = _read_exact(fd, p.FRAME_HEADER.size)
    if header is None:
        return None
    (length,) = p.FRAME_HEADER.unpack(header)
    if length > p.MAX_FRAME:
        raise _StreamBroken(f"frame length {length} is over the limit of {p.MAX_FRAME} bytes")
    return _read_exact(fd, length) if length else b""


class _Writer:
    def __init__(self, out: Any) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, msg: Any) -> None:
        self._write(p.frame(msg))

    def send_many(self, msgs: Iterable[Any]) -> None:
        """Several frames in one write: one system call per loop step, however many streams."""
        self._write(b"".join(p.frame(m) for m in msgs))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            with self._lock:
                while view:
                    view = view[self._out.write(view):]
        except OSError:  # BrokenPipeError and friends: nobody is listening any more
            _log("stdout closed: the node is gone; exiting")
            os._exit(EXIT_OK)
