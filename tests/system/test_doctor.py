"""``optimanode doctor``'s outside checks: llama_cpp probed in real subprocesses, a real port, run_doctor whole.

llama_cpp is this environment's interpreter (the real llama-cpp-python) and the same interpreter
with a broken (or fake) ``llama_cpp`` put first on its path.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import pytest

from optimanode.doctor import FIX_AMX, Check, check_llama_cpp, check_port, print_checks, run_doctor
from optimanode.testing import FakeNvml
from unit.test_doctor import EPYC_MILAN, SAPPHIRE_RAPIDS, SPR_BUILD, SPR_BUILD_NO_AMX, settings_for


def test_port_free_ok_and_in_use_fails(tmp_path):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        c = check_port(settings_for(tmp_path, **{"listen.host": "127.0.0.1", "listen.port": str(port)}))
        assert c.status == "fail" and "in use" in c.detail
    c = check_port(settings_for(tmp_path, **{"listen.host": "127.0.0.1", "listen.port": str(port)}))
    assert c.status == "ok"
    c = check_port(settings_for(tmp_path, **{"listen.host": "192.0.2.1", "listen.port": str(port)}))
    assert c.status == "fail"  # TEST-NET-1: not an address of this machine


def test_the_port_of_the_node_running_on_this_state_directory_is_ok(tmp_path):
    """operations.md's upgrade steps run doctor beside the running node: its own port (the node
    holds state_dir/node.lock) is reported ok with its pid, not as a failure (exit 1)."""
    from optimanode.node import _StateLock, running_node

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = settings_for(tmp_path, **{"listen.host": "127.0.0.1", "listen.port": str(port)})
        assert running_node(settings.state_path) is None and not (settings.state_path / "node.lock").exists()
        lock = _StateLock.acquire(settings.state_path)
        try:
            c = check_port(settings)
            assert c.status == "ok" and f"pid {os.getpid()}" in c.detail, c
        finally:
            lock.release()
        assert running_node(settings.state_path) is None
        c = check_port(settings)  # the lock let go: whoever holds the port now is someone else
        assert c.status == "fail" and "in use" in c.detail


def test_llama_cpp_check_holds_the_build_against_the_cpu(tmp_path):
    (tmp_path / "llama_cpp.py").write_text(
        "__version__ = '0.3.99'\n"
        "def llama_supports_gpu_offload():\n    return True\n"
        f"def llama_print_system_info():\n    return {SPR_BUILD.encode()!r}\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    c = check_llama_cpp(env=env, cpuinfo=SAPPHIRE_RAPIDS)
    assert c.status == "warn" and "issue 20824" in c.detail and "AMX_INT8" in c.detail and c.fix == FIX_AMX
    assert c.detail.startswith("llama-cpp-python 0.3.99, GPU offload yes; CUDA/CPU: ")
    c = check_llama_cpp(env=env, cpuinfo=EPYC_MILAN)
    assert c.status == "warn" and "rebuild on this machine" in c.fix and "20824" not in c.fix
    # Two problems at once: both named, both fixes given.
    (tmp_path / "llama_cpp.py").write_text(
        "def llama_supports_gpu_offload():\n    return False\n"
        f"def llama_print_system_info():\n    return {SPR_BUILD.encode()!r}\n")
    c = check_llama_cpp(env=env, cpuinfo=SAPPHIRE_RAPIDS, gpu_present=True)
    assert c.status == "warn" and "20824" in c.detail and "CPU only" in c.detail
    assert "20824" in c.fix and "GGML_CUDA" in c.fix
    (tmp_path / "llama_cpp.py").write_text(
        f"def llama_print_system_info():\n    return {SPR_BUILD_NO_AMX.encode()!r}\n")
    assert check_llama_cpp(env=env, cpuinfo=SAPPHIRE_RAPIDS).status == "ok"


@pytest.mark.timeout(180)
def test_llama_cpp_importable_in_a_subprocess_reports_its_build():
    c = check_llama_cpp()
    assert c.status == "ok", c
    assert c.detail.startswith("llama-cpp-python 0.3") and "GPU offload" in c.detail and "CPU:" in c.detail
    # Only the probe process imports llama_cpp (a fresh interpreter, since other tests here may have).
    out = subprocess.run([sys.executable, "-c", "import sys; from optimanode.doctor import check_llama_cpp; "
                          "c = check_llama_cpp(); print(c.status, 'llama_cpp' in sys.modules)"],
                         capture_output=True, text=True, timeout=150)
    assert out.stdout.split() == ["ok", "False"], out.stdout + out.stderr
    # With a GPU present, a CPU-only build is a warning that says how to rebuild.
    warn = check_llama_cpp(gpu_present=True)
    assert warn.status == "warn" and "GGML_CUDA" in warn.fix


def test_llama_cpp_that_cannot_be_imported_fails(tmp_path):
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('libllama.so: cannot open shared object file')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    c = check_llama_cpp(env=env)
    assert c.status == "fail" and "libllama.so" in c.detail
    (tmp_path / "llama_cpp.py").write_text("import os\nos.abort()\n")  # a build that kills its importer
    c = check_llama_cpp(env=env)
    assert c.status == "fail" and "died" in c.detail


@pytest.mark.timeout(180)
def test_run_doctor_and_its_exit_code(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = settings_for(tmp_path, **{"listen.host": "127.0.0.1", "listen.port": str(port)})
    checks = run_doctor(s, nvml=FakeNvml.without_driver())
    assert [c.name for c in checks] == ["models", "state", "key", "certificate", "port", "cpu", "nvidia",
                                        "llama_cpp"]
    checks = run_doctor(s, nvml=FakeNvml.without_driver(), cpuinfo=EPYC_MILAN)
    assert checks[5].detail.startswith("AMD EPYC 7763 ")
    buf = io.StringIO()
    assert print_checks(checks, buf) == 1  # models missing, no key
    assert "FAIL  models" in buf.getvalue() and "→ create one: optimanode keygen" in buf.getvalue()
    good = [Check("models", "ok", "x"), Check("nvidia", "warn", "no driver", "install it")]
    buf = io.StringIO()
    assert print_checks(good, buf, as_json=True) == 0
    assert json.loads(buf.getvalue())["ok"] is True


def test_the_metrics_port_is_checked_when_the_endpoint_is_on(tmp_path):
    from optimanode.doctor import check_metrics_port

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = settings_for(tmp_path, **{"metrics_http.listen": f"127.0.0.1:{port}"})
        c = check_metrics_port(settings)
        assert (c.name, c.status) == ("metrics port", "fail") and "in use" in c.detail, c
        assert "metrics_http.listen" in c.fix
        assert [x for x in run_doctor(settings, nvml=FakeNvml.without_driver()) if x.name == "metrics port"] == [c]
    assert check_metrics_port(settings).status == "ok"
    assert check_metrics_port(settings_for(tmp_path)).detail == "metrics_http.listen is off"
