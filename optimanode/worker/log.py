"""What the worker says outside its frames: stderr lines, the trace switch and its exit codes.

``_log`` writes one line to ``_err_fd``, a private copy of stderr that ``process.main`` makes at
start-up so that nothing a library does to fd 2 can hide a load failure's explanation. Every call
reads ``_err_fd`` from this module, so main's reassignment reaches every module that logs (import
``_log``, never ``_err_fd`` itself). ``TRACE`` (``OPTIMANODE_WORKER_TRACE=1``) adds one line per
finished request (slot, prompt tokens reused and evaluated, outcome) and one per move.
``STEP_LOG`` (``OPTIMANODE_WORKER_STEP_LOG=PATH``) appends one line per decode step of the serving
loop to ``PATH.<pid>`` (``StepLog``): where a workload's time goes, read by ``tools/bench multiturn
--step-log``.

Exit codes: 0 ``Shutdown`` served, or stdin/stdout closed (the node is gone); 2 protocol broken
(the first frame is not ``WorkerSettings``, or a frame length is over ``MAX_FRAME``); 3 the model
could not be loaded (the last stderr line says why); 1 anything unexpected (a Python traceback
precedes it on stderr).
"""

from __future__ import annotations

import os

EXIT_OK, EXIT_CRASH, EXIT_PROTOCOL, EXIT_LOAD = 0, 1, 2, 3

# One stderr line per finished request (slot, prompt tokens reused/evaluated, outcome).
TRACE_VARIABLE = "OPTIMANODE_WORKER_TRACE"
TRACE = os.environ.get(TRACE_VARIABLE, "") not in ("", "0")

# A path prefix: one line per llama_decode of the serving loop goes to "<prefix>.<pid>" (StepLog).
STEP_LOG_VARIABLE = "OPTIMANODE_WORKER_STEP_LOG"
STEP_LOG = os.environ.get(STEP_LOG_VARIABLE, "")

# stderr for our own lines: a private copy, made in process.main(), so that nothing a library does
# to fd 2 can hide a load failure's explanation.
_err_fd = 2


def _log(msg: str) -> None:
    try:
        os.write(_err_fd, f"optimanode.worker: {msg}\n".encode("utf-8", "replace"))
    except OSError:
        pass


class StepLog:
    """One line per decode step: ``start seconds tokens sequences prompt_tokens prompt_sequences``.

    ``start`` is ``time.monotonic()`` before the call, the clock every process on the machine
    shares, so a benchmark can cut the lines by its own rounds; ``seconds`` is the ``llama_decode``
    call alone. ``prompt_tokens`` are the step's tokens that belong to prompts (the rest, one per
    sequence, are generated tokens fed back) and ``prompt_sequences`` the sequences they belong to.
    The file is line-buffered: a worker killed mid-run leaves every finished step on disk.
    """

    def __init__(self, path: str) -> None:
        self._file = open(f"{path}.{os.getpid()}", "a", buffering=1, encoding="ascii")  # noqa: SIM115

    @classmethod
    def open(cls, path: str) -> StepLog | None:
        """The log at ``path``, or None when ``path`` is empty or cannot be opened (said on stderr)."""
        if not path:
            return None
        try:
            return cls(path)
        except OSError as exc:
            _log(f"no step log: {exc}")
            return None

    def write(self, start: float, seconds: float, tokens: int, sequences: int, prompt_tokens: int,
              prompt_sequences: int) -> None:
        self._file.write(f"{start:.6f} {seconds:.6f} {tokens} {sequences} {prompt_tokens} {prompt_sequences}\n")

    def close(self) -> None:
        self._file.close()
