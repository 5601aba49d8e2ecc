"""``python -m optimanode.worker``: run ``process.main`` and end the process with its exit code."""

from __future__ import annotations

import os
import sys

from optimanode.worker.process import main

if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # os._exit: the reader thread may sit in a blocking read, and the model is already freed.
    os._exit(code)
