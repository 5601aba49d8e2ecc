"""What the worker says outside its frames: stderr lines, the trace switch and its exit codes.

``_log`` writes one line to ``_err_fd``, a private copy of stderr that ``process.main`` makes at
start-up so that nothing a library does to fd 2 can hide a load failure's explanation. Every call
reads ``_err_fd`` from this module, so main's reassignment reaches every module that logs (import
``_log``, never ``_err_fd`` itself). ``TRACE`` (``OPTIMANODE_WORKER_TRACE=1``) adds one line per
finished request (slot, prompt tokens reused and evaluated, outcome) and one per move.

Exit codes: 0 ``Shutdown`` served, or stdin/stdout closed (the node is gone); 2 protocol broken
(the first frame is not ``WorkerSettings``, or a frame length is over ``MAX_FRAME``); 3 the model
could not be loaded (the last stderr line says why); 1 anything unexpected (a Python traceback
precedes it on stderr).
"""

from __future__ import annotations

import os

EXIT_OK, EXIT_CRASH, EXIT_PROTOCOL, EXIT_LOAD = 0, 1, 2, 3

# One stderr line per finished request (slot, prompt tokens reused/evaluated, outcome).
TRACE = os.environ.get("OPTIMANODE_WORKER_TRACE", "") not in ("", "0")

# stderr for our own lines: a private copy, made in process.main(), so that nothing a library does
# to fd 2 can hide a load failure's explanation.
_err_fd = 2


def _log(msg: str) -> None:
    try:
        os.write(_err_fd, f"optimanode.worker: {msg}\n".encode("utf-8", "replace"))
    except OSError:
        pass
