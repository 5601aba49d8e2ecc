"""The README's first command brings up a node that has registered and started the default model."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from system.test_node import wait_ready

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_quickstart_registers_and_starts_the_default_model(tmp_path, smollm2_path):
    env = dict(os.environ, QUICKSTART_DIR=str(tmp_path))
    proc = subprocess.Popen(["bash", str(REPO / "tools" / "quickstart"), "--set", "model_defaults.n_ctx=512"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("wb"),
                            start_new_session=True)
    try:
        eid = wait_ready(tmp_path / "state" / "journal.sqlite3", 1, 500)
        assert eid.startswith("smollm2-135m-instruct")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    log = (tmp_path / "log").read_text()
    assert "starting → running" in log, log[-2000:]
    out = subprocess.run([sys.executable, str(REPO / "tools" / "inspect-journal"), "--state-dir",
                          str(tmp_path / "state"), "state", "--json"], capture_output=True, text=True, timeout=60)
    assert eid in out.stdout
