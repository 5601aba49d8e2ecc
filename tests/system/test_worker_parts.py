"""The worker's pure parts in fresh interpreters: no llama_cpp import, the writer's exit, injected faults' signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with the repository on the path."""
    full = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=60)


def test_the_pure_parts_import_without_llama_cpp() -> None:
    out = _python("import sys\n"
                  "import optimanode.worker.text, optimanode.worker.jobs, optimanode.worker.framing\n"
                  "import optimanode.worker.slots, optimanode.worker.blackbox, optimanode.worker.log\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp'))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_writer_exits_zero_when_nobody_reads_stdout() -> None:
    out = _python("import os\n"
                  "from optimanode import protocol as p\n"
                  "from optimanode.worker.framing import _Writer\n"
                  "r, w = os.pipe()\n"
                  "os.close(r)\n"
                  "_Writer(os.fdopen(w, 'wb', buffering=0)).send(p.Pong(seq=1))\n"
                  "raise SystemExit(5)\n")
    assert out.returncode == 0, out
    assert "stdout closed: the node is gone; exiting" in out.stderr


@pytest.mark.parametrize(("fault", "safe", "sig"), [("warmup-segv", False, signal.SIGSEGV),
                                                     ("warmup-sigill", False, signal.SIGILL),
                                                     ("warmup-sigbus-always", True, signal.SIGBUS)])
def test_fault_injection_dies_of_a_real_signal(fault: str, safe: bool, sig: int) -> None:
    out = _python(f"from optimanode.worker.blackbox import _fault_injection\n_fault_injection({safe})\n",
                  OPTIMANODE_TEST_FAULT=fault)
    assert out.returncode == -sig, out
    assert f"OPTIMANODE_TEST_FAULT={fault}" in out.stderr
