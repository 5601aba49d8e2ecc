"""The worker's black box (what it is doing, readable after a crash) and the tests' fault injection.

The supervisor passes an unlinked file of ``BLACKBOX_SIZE`` bytes as an inherited descriptor
(``OPTIMANODE_WORKER_BLACKBOX_FD``); ``_blackbox`` maps it and the engine writes one record before
each ``llama_decode``. ``optimanode.executors.supervisor.read_blackbox`` reads the last one after
the process died. For tests only: ``_fault_injection`` makes the warm-up die of a real signal,
``_decode_hang`` blocks the decode thread for good while the reader thread answers heartbeats.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

from optimanode import protocol as p
from optimanode.worker.log import _log


class _BlackBox:
    """What the worker is doing, written where the supervisor can read it after a crash.

    The supervisor passes an unlinked file of BLACKBOX_SIZE bytes as an inherited descriptor
    (``OPTIMANODE_WORKER_BLACKBOX_FD``); the worker maps it and, before each ``llama_decode``,
    writes one record: ``D`` (in llama_decode) or ``A`` (after it), the phase, the batch's tokens
    and sequences, and the ids of the requests in it (tab-separated, NUL-terminated). A fatal
    signal leaves the last record in the page cache, so the crash event can say "SIGSEGV in
    llama_decode during prompt evaluation of a 31-token batch, request X" without the dead
    process writing anything. One small memory write a step; no record when there is no fd
    (a worker started by hand, or Windows).
    """

    def __init__(self) -> None:
        self._map: Any = None

    def open_from_env(self) -> None:
        fd = os.environ.get("OPTIMANODE_WORKER_BLACKBOX_FD", "")
        if not fd.isdigit():
            return
        import mmap

        try:
            self._map = mmap.mmap(int(fd), p.BLACKBOX_SIZE)
        except (OSError, ValueError) as exc:
            _log(f"no black box ({exc})")

    def enter(self, phase: str, tokens: int, seqs: int, requests: Iterable[str]) -> None:
        m = self._map
        if m is None:
            return
        rec = f"D\t{phase}\t{tokens}\t{seqs}\t{','.join(requests)}".encode("utf-8", "replace")
        rec = rec[: p.BLACKBOX_SIZE - 1] + b"\0"
        m[: len(rec)] = rec

    def leave(self) -> None:
        if self._map is not None:
            self._map[0] = 65  # "A": llama_decode returned; what follows is sampling and streaming


_blackbox = _BlackBox()


def _fault_injection(safe_mode: bool) -> None:
    """Tests only: ``OPTIMANODE_TEST_FAULT`` makes the warm-up die of a real signal.

    ``warmup-segv`` (a read of address 0), ``warmup-sigill`` or ``warmup-sigbus``; with the suffix
    ``-always`` also in safe mode, otherwise only outside it (the shape of the AMX fault, which
    safe mode avoids). Unset in production: the check is one dictionary look-up per load.
    """
    fault = os.environ.get("OPTIMANODE_TEST_FAULT", "")
    if not fault.startswith("warmup-") or (safe_mode and not fault.endswith("-always")):
        return
    kind = fault.removeprefix("warmup-").removesuffix("-always")
    _log(f"OPTIMANODE_TEST_FAULT={fault}: dying of {kind} in the warm-up")
    if kind == "segv":
        ctypes.string_at(0)  # a real invalid read: SIGSEGV
    sig = {"sigill": signal.SIGILL, "sigbus": signal.SIGBUS}.get(kind)
    if sig is not None:
        os.kill(os.getpid(), sig)


class _DecodeHang:
    """Tests only: ``OPTIMANODE_TEST_FAULT=decode-hang:PATH`` blocks the decode thread for good.

    A worker that starts while the file PATH exists takes it (removes it, so only that worker
    hangs and the model's next one serves) and reads N from it (empty: 0): it serves N decode
    steps, then blocks its decode thread right after the black box recorded the next step as
    "in llama_decode", as a kernel wedged inside llama.cpp would. The reader thread goes on
    answering heartbeats, so only the supervisor's stall watch can notice. Unset in production:
    one comparison a step.
    """

    def __init__(self) -> None:
        self.after: int | None = None

    def arm_from_env(self) -> None:
        fault = os.environ.get("OPTIMANODE_TEST_FAULT", "")
        if not fault.startswith("decode-hang:"):
            return
        path = fault.removeprefix("decode-hang:")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
            os.unlink(path)  # taken: the next worker of this model finds nothing
        except OSError:
            return
        self.after = int(text) if text.isdigit() else 0
        _log(f"OPTIMANODE_TEST_FAULT={fault}: the decode thread blocks after {self.after} steps")

    def check(self, steps: int) -> None:
        """Before a step's llama_decode: block for good once ``steps`` steps are done."""
        if self.after is not None and steps >= self.after:
            _log(f"OPTIMANODE_TEST_FAULT: the decode thread blocks at step {steps + 1}")
            threading.Event().wait()


_decode_hang = _DecodeHang()
