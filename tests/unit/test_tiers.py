"""The test tree itself: three tiers, each test module opening with a one-line summary, unit tests kept pure."""

from __future__ import annotations

import ast
import asyncio
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TierError

TESTS = Path(__file__).resolve().parents[1]
TIERS = ("unit", "model", "system")


def test_every_test_module_is_in_a_tier() -> None:
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []
    for tier in TIERS:
        assert (TESTS / tier / "__init__.py").is_file(), tier


@pytest.mark.parametrize("path", sorted(p for tier in TIERS for p in (TESTS / tier).glob("test_*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_test_module_opens_with_a_one_line_summary(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert doc, f"{path.name} has no module docstring"
    lines = doc.splitlines()
    assert lines[0].strip() and lines[0] == lines[0].lstrip(), f"{path.name}: the docstring starts on its first line"
    assert len(lines) == 1 or not lines[1].strip(), f"{path.name}: the summary is one line, then a blank line"


def test_the_tiers_are_what_run_tests_selects() -> None:
    script = (TESTS.parent / "tools" / "run-tests").read_text()
    for tier in TIERS:
        assert f"--{tier}" in script
    assert 'tiers+=("tests/${arg#--}")' in script


# -- the guard in conftest.py ------------------------------------------------------------------


def test_a_unit_test_cannot_start_a_process() -> None:
    with pytest.raises(TierError, match="tests/system"):
        subprocess.run([sys.executable, "-c", "pass"], timeout=10)
    with pytest.raises(TierError):
        os.fork()
    with pytest.raises(TierError):
        multiprocessing.get_context("spawn").Process(target=print).start()


async def test_a_unit_test_cannot_start_a_process_from_asyncio() -> None:
    with pytest.raises(TierError):
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_unit_test_cannot_open_an_ip_socket(family: int) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        with pytest.raises(TierError, match="network socket"):
            s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        with pytest.raises(TierError, match="network socket"):
            s.connect(("127.0.0.1" if family == socket.AF_INET else "::1", 9))


def test_a_unit_test_may_use_a_socket_pair_and_the_event_loop(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    assert asyncio.run(asyncio.sleep(0, result=7)) == 7
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as u:
        u.bind(str(tmp_path / "sock"))  # a local socket file is not a network
