"""The metrics sampler's per-executor figures (RSS, CPU%) from a real child process, through to its end."""

from __future__ import annotations

import select
import subprocess
import sys
import time

import psutil
import pytest

from optimanode.metrics import Sampler
from optimanode.testing import FakeNvml
from unit.test_metrics import status


@pytest.fixture
def child():
    """A real process that holds ~60 MB (written, so resident) and spins until killed."""
    code = ("import sys\nb = bytearray(b'x') * 60_000_000\nprint('ready', flush=True)\n"
            "while True:\n    sum(range(10_000))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline().strip() == b"ready", "child did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_child_process_rss_and_cpu_then_none_once_it_is_gone(child):
    """RSS > 50 MB at once, CPU% > 0 from the second sample, None (no exception) as zombie and when reaped."""
    sampler = Sampler(lambda: [status(child.pid)], nvml=FakeNvml())
    first = sampler.sample().executors[0]
    assert first.pid == child.pid and first.rss_bytes is not None and first.rss_bytes > 50_000_000
    assert first.cpu_percent is None  # no interval yet
    time.sleep(0.3)
    second = sampler.sample().executors[0]
    assert second.rss_bytes > 50_000_000 and second.cpu_percent is not None and 0 < second.cpu_percent < 150
    child.kill()
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # not reaped yet: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    zombie = sampler.sample().executors[0]
    assert (zombie.rss_bytes, zombie.cpu_percent) == (None, None)
    child.wait(timeout=10)
    gone = sampler.sample().executors[0]
    assert (gone.pid, gone.rss_bytes, gone.cpu_percent) == (child.pid, None, None)
