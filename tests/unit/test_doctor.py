"""``optimanode doctor``'s checks in process: models, state, key, certificate, CPU, NVIDIA (FakeNvml), build vs CPU.

The CPU through /proc/cpuinfo texts of a Sapphire Rapids Xeon (AMX), an EPYC (AVX2 only) and a
Sandy Bridge Xeon (AVX, no AVX2), and this machine's own. The llama_cpp probe (a subprocess), the
port check and run_doctor as a whole are in tests/system/test_doctor.py.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from optimanode.config import load_settings
from optimanode.doctor import (
    FIX_AMX,
    build_cpu_problems,
    check_certificate,
    check_cpu,
    check_key,
    check_models,
    check_nvidia,
    check_state,
    cpu_flags,
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


# -- cpu ------------------------------------------------------------------------------------------

# Two processors of each, as /proc/cpuinfo has them (flags abridged, in the kernel's order).
SAPPHIRE_RAPIDS = "".join(f"""processor\t: {i}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse \
sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 \
x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch fsgsbase bmi1 avx2 \
smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni \
avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip \
pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid \
movdiri movdir64b fsrm md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d \
arch_capabilities

""" for i in range(2))
EPYC_MILAN = "".join(f"""processor\t: {i}
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse \
sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid \
extd_apicid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c \
rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext \
fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec \
xgetbv1 xsaves clzero xsaveerptr wbnoinvd arat npt nrip_save umip pku ospke vaes vpclmulqdq rdpid fsrm

""" for i in range(2))
SANDY_BRIDGE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep sse sse2 ht syscall nx lm pni pclmulqdq ssse3 \
cx16 sse4_1 sse4_2 x2apic popcnt aes xsave avx hypervisor lahf_lm

"""
# llama_print_system_info() of a build made on a Sapphire Rapids (-march=native, AMX left on),
# CUDA first as the backend registry lists it, and the same build made without AMX.
SPR_BUILD = ("CUDA : ARCHS = 900 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : SSE3 = 1 | SSSE3 = 1 | "
             "AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | "
             "AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")
SPR_BUILD_NO_AMX = SPR_BUILD.replace("AMX_INT8 = 1 | ", "")
ZEN3_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
              "OPENMP = 1 | REPACK = 1 |")


def test_cpu_on_a_sapphire_rapids_names_it_and_its_amx():
    c = check_cpu(SAPPHIRE_RAPIDS)
    assert c.status == "ok", c
    # Every feature of the list, in the list's order (not the kernel's).
    assert c.detail == ("Intel(R) Xeon(R) Platinum 8480+; avx avx2 fma f16c avx512f avx512bw avx512vl "
                        "avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16")


def test_cpu_on_an_epyc_with_avx2_only():
    c = check_cpu(EPYC_MILAN)
    assert c.status == "ok", c
    assert c.detail == "AMD EPYC 7763 64-Core Processor; avx avx2 fma f16c"
    assert "avx512" not in c.detail and "amx" not in c.detail


def test_cpu_without_avx2_warns_that_llama_cpp_is_slow():
    c = check_cpu(SANDY_BRIDGE)
    assert c.status == "warn" and c.detail.startswith("Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz; avx ")
    assert "(no AVX2)" in c.detail and "without AVX2" in c.fix and "slower" in c.fix


def test_cpu_without_a_flags_line_reports_the_model_and_does_not_warn():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sha1 sha2 crc32\nmodel name\t: Neoverse-V2\n"
    c = check_cpu(arm)
    assert c.status == "ok" and c.detail.startswith("Neoverse-V2 ") and "not read" in c.detail
    assert cpu_flags(arm) is None  # unknown, which is not "none": the build is not held against it


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="/proc/cpuinfo is Linux's")
def test_cpu_on_this_machine_names_its_model():
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.partition(":")[2].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    if model is None:
        pytest.skip("this CPU's /proc/cpuinfo has no model name (not x86)")
    c = check_cpu()
    assert c.detail.startswith(model + ";"), c
    flags = cpu_flags(text)
    assert flags is not None and ("avx2" in c.detail.split()) == ("avx2" in flags)


def test_an_amx_build_on_an_amx_cpu_warns_of_issue_20824():
    problems = build_cpu_problems(SPR_BUILD, cpu_flags(SAPPHIRE_RAPIDS))
    assert problems == [("AMX_INT8 on a CPU with AMX: llama.cpp issue 20824", FIX_AMX)]
    assert "ggml_backend_amx_mul_mat" in FIX_AMX and "tools/build-llama-cpp" in FIX_AMX and 'safe_mode = "on"' in FIX_AMX
    # Any AMX feature, not only the one ggml reports today.
    assert build_cpu_problems("CPU : AVX2 = 1 | AMX_FP16 = 1 |", cpu_flags(SAPPHIRE_RAPIDS))[0][1] == FIX_AMX


def test_a_build_without_amx_on_an_amx_cpu_is_fine():
    assert build_cpu_problems(SPR_BUILD_NO_AMX, cpu_flags(SAPPHIRE_RAPIDS)) == []
    assert build_cpu_problems(ZEN3_BUILD, cpu_flags(EPYC_MILAN)) == []
    # AMX_INT8 = 0 (older builds print the features that are off too, with no "CPU :" head) is off.
    assert build_cpu_problems("AVX = 1 | AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 0 |", cpu_flags(SAPPHIRE_RAPIDS)) == []


def test_a_build_from_another_machine_warns_to_rebuild_here():
    problems = build_cpu_problems(SPR_BUILD, cpu_flags(EPYC_MILAN))
    assert len(problems) == 1, problems  # not issue 20824: this CPU has no AMX to run those kernels on
    what, fix = problems[0]
    assert what == "built for AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_INT8, which this CPU lacks"
    assert "rebuild on this machine" in fix and "tools/build-llama-cpp" in fix
    assert build_cpu_problems(ZEN3_BUILD, cpu_flags(SANDY_BRIDGE))[0][0].startswith("built for AVX2 F16C FMA BMI2,")
    # Unknown flags (no /proc/cpuinfo) are no evidence of anything.
    assert build_cpu_problems(SPR_BUILD, None) == []


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


# -- each GPU: free memory, and which models fit where --------------------------------------------


def test_each_gpu_is_listed_with_free_memory_and_the_models_that_fit_on_it(tmp_path):
    import gguf_files as g

    from optimanode.doctor import check_gpus
    from optimanode.executors.effective import effective
    from optimanode.executors.memory import estimate
    from optimanode.protocol import ModelSettings
    from optimanode.executors.registry import Registry
    from optimanode.testing import GiB

    models = tmp_path / "models"
    models.mkdir()
    p = g.write_model(models / "tiny.gguf")
    os.utime(p, (1, 1))  # settled: registered at the first look
    settings = settings_for(tmp_path, vram_reserve_mb="0")
    ((eid, info),) = Registry(models).scan().models.items()
    fake = FakeNvml.machine(80, 24, used_gib=(0, 24))  # GPU 1: full
    est = estimate(info, effective(info, ModelSettings(n_gpu_layers=-1, parallel=1), settings.model_defaults, ""))
    need_mib = (est.gpu_weights + est.gpu_kv + est.gpu_compute + est.gpu_logits) // (1024 * 1024)
    c0, c1 = check_gpus(settings, fake)
    assert (c0.name, c0.status) == ("gpu 0", "ok")
    assert c0.detail == (f"NVIDIA Fake 80GB: {80 * GiB // 2**20} MiB free of {80 * GiB // 2**20} MiB; fits (all "
                         f"layers offloaded, 1 slot, after vram_reserve_mb): {eid} ({need_mib} MiB)")
    assert (c1.name, c1.status) == ("gpu 1", "warn")
    assert c1.detail.endswith(f"fits (all layers offloaded, 1 slot, after vram_reserve_mb): none; too big: {eid} "
                              f"({need_mib} MiB)") and "0 MiB free of 24576 MiB" in c1.detail
    assert fake.refcount == 0  # NVML released
    # No GPUs: no GPU checks.
    assert check_gpus(settings, FakeNvml.without_driver()) == []
