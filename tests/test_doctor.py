"""``optimanode doctor``: each check's passing and failing case, on temporary directories.

NVIDIA is exercised through ``optimanode.testing.FakeNvml`` (a machine with GPUs, and one without
the driver); llama_cpp through real subprocesses: this environment's interpreter (the real
llama-cpp-python) and the same interpreter with a broken ``llama_cpp`` put first on its path.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from optimanode.config import load_settings
from optimanode.doctor import (
    Check,
    check_certificate,
    check_key,
    check_llama_cpp,
    check_models,
    check_nvidia,
    check_port,
    check_state,
    print_checks,
    run_doctor,
)
from optimanode.testing import FakeGpu, FakeNvml

ROOT_CAN_READ_ANYTHING = os.geteuid() == 0


def settings_for(tmp_path: Path, **overrides: str):
    base = {"models_dir": str(tmp_path / "models"), "state_dir": str(tmp_path / "state")}
    base.update(overrides)
    return load_settings(environ={}, overrides=base)


# -- models ---------------------------------------------------------------------------------------


def test_models_ok_counts_the_gguf_files_in_subdirectories(tmp_path):
    (tmp_path / "models" / "sub").mkdir(parents=True)
    (tmp_path / "models" / "a.gguf").write_bytes(b"x")
    (tmp_path / "models" / "sub" / "b.gguf").write_bytes(b"x")
    (tmp_path / "models" / "notes.txt").write_text("x")
    c = check_models(settings_for(tmp_path))
    assert c.status == "ok" and "2 .gguf files" in c.detail


def test_models_missing_fails_and_an_empty_directory_warns(tmp_path):
    c = check_models(settings_for(tmp_path))
    assert c.status == "fail" and "does not exist" in c.detail and "mkdir -p" in c.fix
    (tmp_path / "models").mkdir()
    assert check_models(settings_for(tmp_path)).status == "warn"
    (tmp_path / "file").write_text("x")
    assert check_models(settings_for(tmp_path, models_dir=str(tmp_path / "file"))).status == "fail"


@pytest.mark.skipif(ROOT_CAN_READ_ANYTHING, reason="root reads any directory whatever its mode")
def test_models_unreadable_fails(tmp_path):
    (tmp_path / "models").mkdir(mode=0)
    try:
        assert check_models(settings_for(tmp_path)).status == "fail"
    finally:
        (tmp_path / "models").chmod(0o755)


# -- state ----------------------------------------------------------------------------------------


def test_state_writable_ok_and_not_yet_created_warns(tmp_path):
    assert check_state(settings_for(tmp_path)).status == "warn"  # the node creates it
    (tmp_path / "state").mkdir()
    c = check_state(settings_for(tmp_path))
    assert c.status == "ok" and "no journal yet" in c.detail
    assert list((tmp_path / "state").iterdir()) == []  # the probe file is gone


def test_state_that_cannot_be_written_fails(tmp_path):
    (tmp_path / "file").write_text("x")
    c = check_state(settings_for(tmp_path, state_dir=str(tmp_path / "file")))
    assert c.status == "fail" and "not a directory" in c.detail
    # Under a regular file nothing can be created, whoever we are.
    c = check_state(settings_for(tmp_path, state_dir=str(tmp_path / "file" / "state")))
    assert c.status == "fail" and "install -d" in c.fix


# -- key ------------------------------------------------------------------------------------------


def test_key_0600_ok(tmp_path):
    (tmp_path / "state").mkdir()
    key = tmp_path / "state" / "access.key"
    key.write_text("k" * 43)
    key.chmod(0o600)
    c = check_key(settings_for(tmp_path))
    assert c.status == "ok" and "0600" in c.detail


def test_key_missing_readable_by_others_or_empty_fails(tmp_path):
    key = tmp_path / "access.key"
    s = settings_for(tmp_path, **{"listen.key_file": str(key)})
    c = check_key(s)
    assert c.status == "fail" and "keygen --key-file" in c.fix
    key.write_text("k" * 43)
    key.chmod(0o640)
    c = check_key(s)
    assert c.status == "fail" and "0640" in c.detail and c.fix == f"chmod 600 {key}"
    key.chmod(0o604)
    assert check_key(s).status == "fail"
    key.write_text("")
    key.chmod(0o600)
    assert check_key(s).status == "fail"


# -- certificate ----------------------------------------------------------------------------------


def make_cert(path: Path, not_before: datetime, not_after: datetime) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "optimanode")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def test_certificate_ok_shows_its_sha256_fingerprint(tmp_path):
    now = datetime.now(UTC)
    pem = tmp_path / "state" / "tls" / "cert.pem"
    fp = make_cert(pem, now - timedelta(days=1), now + timedelta(days=365))
    c = check_certificate(settings_for(tmp_path))
    assert c.status == "ok" and fp in c.detail and len(fp) == len("sha256:") + 95
    # The very string the Gateway pins and `optimanode fingerprint` prints.
    from optimanode.gateway.tls import fingerprint_file

    assert fingerprint_file(pem) == fp


def test_certificate_from_listen_cert_file_and_its_failures(tmp_path):
    now = datetime.now(UTC)
    cert = tmp_path / "elsewhere.pem"
    s = settings_for(tmp_path, **{"listen.cert_file": str(cert)})
    assert check_certificate(s).status == "fail"  # configured but absent
    assert check_certificate(settings_for(tmp_path)).status == "warn"  # default: generated on first start
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert check_certificate(s).status == "fail"
    make_cert(cert, now - timedelta(days=400), now - timedelta(days=1))
    c = check_certificate(s)
    assert c.status == "fail" and "expired" in c.detail
    make_cert(cert, now - timedelta(days=1), now + timedelta(days=5))
    assert check_certificate(s).status == "warn"
    make_cert(cert, now + timedelta(days=2), now + timedelta(days=30))
    assert check_certificate(s).status == "fail"  # not valid yet


# -- port -----------------------------------------------------------------------------------------


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


# -- nvidia ---------------------------------------------------------------------------------------


def test_nvidia_with_gpus_ok():
    c = check_nvidia(FakeNvml([FakeGpu(name="NVIDIA H100 80GB HBM3"), FakeGpu(name="NVIDIA H100 80GB HBM3")]))
    assert c.status == "ok" and c.detail.startswith("2 GPUs: NVIDIA H100")


def test_nvidia_without_the_driver_warns_and_a_gpu_that_errors_fails():
    c = check_nvidia(FakeNvml.without_driver())
    assert c.status == "warn" and "CPU" in c.detail
    from optimanode.testing import NVML_ERROR_GPU_IS_LOST

    broken = FakeNvml([FakeGpu()])
    broken.errors = {"nvmlDeviceGetName": NVML_ERROR_GPU_IS_LOST}
    assert check_nvidia(broken).status == "fail"


# -- llama_cpp ------------------------------------------------------------------------------------


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


# -- all together ---------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_run_doctor_and_its_exit_code(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = settings_for(tmp_path, **{"listen.host": "127.0.0.1", "listen.port": str(port)})
    checks = run_doctor(s, nvml=FakeNvml.without_driver())
    assert [c.name for c in checks] == ["models", "state", "key", "certificate", "port", "nvidia", "llama_cpp"]
    buf = io.StringIO()
    assert print_checks(checks, buf) == 1  # models missing, no key
    assert "FAIL  models" in buf.getvalue() and "→ create one: optimanode keygen" in buf.getvalue()
    good = [Check("models", "ok", "x"), Check("nvidia", "warn", "no driver", "install it")]
    buf = io.StringIO()
    assert print_checks(good, buf, as_json=True) == 0
    assert json.loads(buf.getvalue())["ok"] is True
