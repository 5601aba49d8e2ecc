"""The service files in contrib/: the systemd unit as systemd itself reads it, and the other platforms'.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` run on copies of the unit
(the unit alone; the unit with its NVIDIA drop-in beside it, which systemd-analyze loads from
``optimanode.service.d/``). ``verify`` checks that ExecStart's program exists, so the copy points it
at this virtual environment's ``optimanode``; the original is also verified as it is, where the
only complaint allowed is that /opt/optimanode/venv/bin/optimanode is not installed.

systemd-analyze comes with Debian's ``systemd`` package, which tools/setup installs when it runs as
root with apt-get. Where it is missing although it could have been installed (root, apt-get
present: CI, a developer's container) these tests FAIL; they skip only where it cannot be
installed (not root, or no apt-get). The same holds for libseccomp (a dependency of systemd),
which the MemoryDenyWriteExecute test uses.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "optimanode.service"
DROPIN = REPO / "contrib" / "systemd" / "optimanode.service.d" / "nvidia.conf"
INSTALLED_BINARY = "/opt/optimanode/venv/bin/optimanode"


def _installable() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if _installable():
        pytest.fail(f"{name} is missing but could be installed here: tools/setup installs Debian's systemd "
                    f"package when run as root (apt-get install --no-install-recommends systemd)")
    pytest.skip(f"{name} is missing and cannot be installed here (not root, or no apt-get)")


def unit_copy(tmp_path: Path, *, dropin: bool) -> Path:
    """The unit with ExecStart pointing at this environment's optimanode (and the drop-in beside it)."""
    here = Path(sys.executable).parent / "optimanode"
    assert here.exists(), f"{here} is missing: the package is not installed in this environment"
    d = tmp_path / ("with-dropin" if dropin else "alone")
    d.mkdir()
    copy = d / "optimanode.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(here)))
    if dropin:
        (d / "optimanode.service.d").mkdir()
        shutil.copy(DROPIN, d / "optimanode.service.d" / "nvidia.conf")
    return copy


def parse_unit(*paths: Path) -> dict[str, list[str]]:
    """``Section.Key`` → every value, in order (drop-ins after the unit, as systemd merges them)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def exposure(unit: Path) -> float:
    analyze = need_tool("systemd-analyze")
    out = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr
    return float(m.group(1))


@pytest.mark.parametrize("dropin", [False, True], ids=["unit", "unit+nvidia"])
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path, dropin):
    analyze = need_tool("systemd-analyze")
    out = subprocess.run([analyze, "verify", str(unit_copy(tmp_path, dropin=dropin))],
                         capture_output=True, text=True, timeout=120)
    # Unknown keys and bad values are only warnings for systemd: any output at all is a failure.
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_verify_of_the_shipped_unit_complains_only_about_the_missing_installation(tmp_path):
    analyze = need_tool("systemd-analyze")
    alone = tmp_path / "optimanode.service"
    shutil.copy(UNIT, alone)
    out = subprocess.run([analyze, "verify", str(alone)], capture_output=True, text=True, timeout=120)
    if os.path.exists(INSTALLED_BINARY):
        assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    else:
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        assert out.returncode != 0
        assert lines == [f"optimanode.service: Command {INSTALLED_BINARY} is not executable: No such file or directory"], lines


@pytest.mark.parametrize("dropin", [False, True], ids=["unit", "unit+nvidia"])
def test_systemd_analyze_security_rates_the_exposure_at_2_or_lower(tmp_path, dropin):
    level = exposure(unit_copy(tmp_path, dropin=dropin))
    # docs/operations.md gives the figures from Debian 12's systemd 252: 1.2, and 1.4 with the drop-in.
    assert level <= 2.0, level


SANDBOXED_NODE = r"""
import asyncio, json, sys
from optimanode.config import load_settings
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, Done, SamplingParams

async def main(models, state):
    settings = load_settings(environ={}, overrides={"models_dir": models, "state_dir": state,
        "scan.enable_new": "true", "scan.hash_models": "false", "model_defaults.n_ctx": "256"})
    async with Node(settings) as node:
        (eid,) = node.executors
        await node.wait_for_state(eid, {"running", "crashed", "failed"}, timeout=120)
        assert node.status(eid).state == "running", node.status(eid).reason
        async for msg in node.infer(eid, CompletionRequest(prompt="The capital of France is",
                                                           params=SamplingParams(temperature=0, max_tokens=8))):
            if isinstance(msg, Done):
                print(json.dumps({"tokens": msg.usage.completion_tokens, "backend": node.status(eid).backend}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def unit_syscall_filter() -> str:
    """The unit's SystemCallFilter= lines as one sandbox_exec --syscalls spec."""
    return " ".join(parse_unit(UNIT)["Service.SystemCallFilter"])


def need_libseccomp() -> None:
    need_tool("systemd-analyze")  # libseccomp comes with systemd
    if ctypes.util.find_library("seccomp") is None:
        if _installable():
            pytest.fail("libseccomp is missing but could be installed (it comes with Debian's systemd package)")
        pytest.skip("libseccomp is missing and cannot be installed here")


@pytest.mark.timeout(300)
def test_a_node_and_its_worker_run_under_the_units_seccomp_rules(tmp_path, smollm2_path):
    """MemoryDenyWriteExecute=yes and the SystemCallFilter= allow list, as systemd would install them."""
    need_libseccomp()
    models = tmp_path / "models"
    models.mkdir()
    (models / "smollm2.gguf").symlink_to(smollm2_path)
    out = subprocess.run([sys.executable, str(REPO / "tests" / "sandbox_exec.py"), "--mdwe",
                          "--syscalls", unit_syscall_filter(), "--", sys.executable, "-c", SANDBOXED_NODE,
                          str(models), str(tmp_path / "state")], capture_output=True, text=True, timeout=280,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["tokens"] > 0


def test_the_sandbox_really_refuses_what_the_unit_forbids():
    need_libseccomp()
    probe = ("import mmap, os\n"
             "try:\n    mmap.mmap(-1, 4096, prot=7); print('wx allowed')\nexcept PermissionError: print('wx refused')\n"
             "try:\n    os.setuid(0); print('setuid allowed')\nexcept PermissionError: print('setuid refused')\n")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "sandbox_exec.py"), "--mdwe",
                          "--syscalls", unit_syscall_filter(), "--", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["wx", "refused", "setuid", "refused"], out.stdout + out.stderr


# -- the other platforms and the installer -------------------------------------------------------


def test_the_windows_service_module_imports_on_linux_without_pywin32():
    path = REPO / "contrib" / "windows" / "optimanode_service.py"
    spec = importlib.util.spec_from_file_location("optimanode_service_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "win32serviceutil" not in sys.modules and module.OptimaNodeService is None
    assert module.SERVICE_NAME == "OptimaNode"
    out = subprocess.run([sys.executable, str(path), "install"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "contrib/systemd" in out.stderr


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_the_install_scripts_parse_and_explain_themselves(script):
    path = REPO / "contrib" / script
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], timeout=30).returncode == 0
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("Usage: contrib/" + script)
    assert "set -euo pipefail" in path.read_text()
    bad = subprocess.run(["bash", str(path), "--no-such-option"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_the_install_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    out = subprocess.run([shellcheck, str(REPO / "contrib" / "install.sh"), str(REPO / "contrib" / "uninstall.sh")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
