"""The wheel is a whole install: built from this checkout, installed outside it, it runs a node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# The fixture that repacks .venv's packages as wheels and adds setuptools>=68 (an offline install).
from system.test_install import wheelhouse  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_S = 240  # one pip step (build, install) on a loaded 2-core machine
READY_TIMEOUT_S = 60  # `optimanode run` to READY=1: journal, first scan, the Gateway link listening
STOP_TIMEOUT_S = 30  # SIGTERM to exit: nothing to drain, no workers

pytestmark = pytest.mark.timeout(600)

# What contrib/install.sh leaves out of its copy of the checkout: at the top, and anywhere.
TOP_LEVEL_LEFT_OUT = {".git", ".venv", "state", "models", ".cache", ".pytest_cache", ".mypy_cache",
                      ".import_linter_cache", ".hypothesis", "build", "dist"}


def _left_out(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in TOP_LEVEL_LEFT_OUT)}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would let the checkout or its .venv leak in, nor pip's config."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "OPTIMANODE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def check(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                         check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


@dataclass(frozen=True)
class Installed:
    src: Path  # the copy of the checkout the wheel was built from
    wheel: Path
    venv: Path
    cwd: Path  # a working directory outside the checkout, for everything run from the venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheelhouse) -> Installed:  # noqa: F811
    """This checkout built as a wheel (offline, as `install.sh --wheels` does) and installed with
    its dependencies into a fresh virtual environment that sees neither the checkout nor .venv."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv, cwd = base / "src", base / "dist", base / "venv", base / "elsewhere"
    shutil.copytree(REPO, src, ignore=_left_out, symlinks=True)
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip"]
    check([*pip, "wheel", "--quiet", "--no-deps", "--no-index", "--find-links", str(wheelhouse),
           "--wheel-dir", str(dist), str(src)], cwd)
    wheels = sorted(dist.glob("optimanode-*.whl"))
    assert len(wheels) == 1, f"pip wheel gave {wheels}"
    check([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd)
    check([*pip, "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-index", "--find-links",
           str(wheelhouse), str(wheels[0])], cwd)
    return Installed(src=src, wheel=wheels[0], venv=venv, cwd=cwd)


def test_the_wheel_holds_every_module_and_the_journal_migrations(installed):
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        sql = sorted(p for p in (installed.src / "migrations").iterdir() if p.suffix == ".sql")
        assert "optimanode/migrations/0001_initial.sql" in names
        for p in sql:
            assert whl.read(f"optimanode/migrations/{p.name}") == p.read_bytes(), p.name
    modules = {f"optimanode/{p.relative_to(installed.src / 'optimanode').as_posix()}"
               for p in (installed.src / "optimanode").rglob("*.py")}
    missing = modules - names
    assert not missing, f"modules of the checkout missing from the wheel (pyproject.toml's packages): {sorted(missing)}"
    assert not {n for n in names if n.startswith("migrations/")}, "the SQL belongs inside the package"


def test_the_venv_imports_its_own_package_and_migrations_not_the_checkouts(installed):
    out = check([str(installed.venv / "bin" / "python"), "-c",
                 "import json, optimanode, optimanode.journal as j; "
                 "print(json.dumps([optimanode.__file__, str(j.DEFAULT_MIGRATIONS / '0001_initial.sql')]))"],
                installed.cwd)
    package, first = (Path(p) for p in json.loads(out.splitlines()[-1]))
    assert package.resolve().is_relative_to(installed.venv.resolve()), package
    assert first == package.parent / "migrations" / "0001_initial.sql" and first.is_file(), first


def test_the_checkout_reads_the_same_migrations_the_wheel_ships(installed):
    """.venv (tools/setup: an editable install of this checkout), from outside the checkout."""
    out = check([sys.executable, "-c",
                 "import json, optimanode, optimanode.journal as j; "
                 "print(json.dumps([optimanode.__file__, sorted(f.name for f in j.DEFAULT_MIGRATIONS.iterdir()),"
                 " str(j.DEFAULT_MIGRATIONS / '0001_initial.sql')]))"],
                installed.cwd)
    package, listed, first = json.loads(out.splitlines()[-1])
    if Path(package).resolve() != REPO / "optimanode" / "__init__.py":
        pytest.skip(f".venv's optimanode is not this checkout's ({package}): not an editable install of it")
    assert Path(first) == REPO / "migrations" / "0001_initial.sql"
    with zipfile.ZipFile(installed.wheel) as whl:
        shipped = sorted(n.rsplit("/", 1)[1] for n in whl.namelist()
                         if n.startswith("optimanode/migrations/") and n.endswith(".sql"))
    assert [n for n in listed if n.endswith(".sql")] == shipped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_node_started_from_the_wheel_migrates_its_journal_and_stops_cleanly(installed, tmp_path):
    models, state = tmp_path / "models", tmp_path / "state"
    models.mkdir()
    cfg = tmp_path / "optimanode.toml"
    cfg.write_text('log_level = "info"\n[listen]\nhost = "127.0.0.1"\n[scan]\nhash_models = false\n')
    with zipfile.ZipFile(installed.wheel) as whl:
        versions = sorted(int(n.rsplit("/", 1)[1][:4]) for n in whl.namelist()
                          if n.startswith("optimanode/migrations/") and n.endswith(".sql"))
    assert versions and versions[0] == 1
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    log = tmp_path / "node.log"
    cmd = [str(installed.venv / "bin" / "optimanode"), "run", "--config", str(cfg), "--models-dir", str(models),
           "--state-dir", str(state), "--port", str(_free_port())]
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=installed.cwd, env=clean_env(NOTIFY_SOCKET=str(tmp_path / "notify")),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # READY=1 comes once the journal is open and replayed, the models scanned and the link listening.
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = False
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            notify.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
            try:
                ready = "READY=1" in notify.recv(4096).decode("utf-8", "replace").splitlines()
            except TimeoutError:
                pass
        assert ready, f"no READY=1 from the node in {READY_TIMEOUT_S} s (exit {proc.poll()}):\n{log.read_text()}"
        db = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            migrated = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
            types = [r[0] for r in db.execute("SELECT type FROM events ORDER BY seq")]
        finally:
            db.close()
        assert migrated == versions
        assert types[:1] == ["node_started"], types
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_TIMEOUT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
