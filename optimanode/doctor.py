"""``optimanode doctor``: check that this machine can run the node, and say what to do when not.

How it works: ``run_doctor(settings)`` runs each check in turn and returns a list of ``Check``
(name, status ``ok``/``warn``/``fail``, what was found, what to do). Nothing is changed on disk
except a temporary file created and removed in the state directory (the only honest test of
"writable": permission bits lie under ACLs, read-only mounts and systemd's ProtectSystem=).

* models: the models directory exists and can be listed; how many ``.gguf`` files it holds.
* state: the state directory exists (or can be created) and a file can be written in it.
* key: the access key file exists, is not empty, and is not readable by group or others (0600).
* certificate: the TLS certificate (``listen.cert_file``, else ``<state_dir>/tls/cert.pem``) parses,
  its validity dates, and its SHA-256 fingerprint as ``sha256:AB:CD:...`` (what the Gateway pins).
* port: ``listen.host:listen.port`` can be bound, or is held by the node running on this state
  directory (its ``node.lock``: doctor beside a running node reports its port ok).
* cpu: the CPU's model name and the ISA extensions llama.cpp uses that it has (``/proc/cpuinfo``:
  AVX2, AVX-512, VNNI, AMX...; elsewhere only ``platform.processor()``). A CPU without AVX2 is a
  warning: llama.cpp runs, much more slowly.
* nvidia: NVML initialises (driver present), with the GPU count and driver version.
* gpu N (one per GPU, when NVML answers): its free memory, and which models of the models
  directory fit on it with every layer offloaded (or with ``model_defaults.n_gpu_layers`` when
  that is set), at one slot and the default context, less ``vram_reserve_mb``: the memory
  estimate the node admits models by (``executors/memory.py``), from their headers alone.
* llama_cpp: imported *in a subprocess* (``python -c``): only the worker process may load
  llama.cpp, and a broken build can crash the interpreter that imports it. The probe reports the
  version, ``llama_supports_gpu_offload()`` and ``llama_print_system_info()`` (the CPU features
  and backends the build has). The build's CPU features are then held against this CPU's flags
  (``build_cpu_problems``): a warning when the build uses instructions the CPU lacks (built on
  another machine: SIGILL), or has ggml's AMX kernels on a CPU with AMX (llama.cpp issue 20824).

``print_checks`` writes them as a table (or JSON) and returns the exit code: 0 when no check
failed, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

from optimanode.config import Settings, metrics_address
from optimanode.executors.effective import effective
from optimanode.executors.memory import estimate
from optimanode.executors.registry import Registry
from optimanode.metrics import GpuProbe
from optimanode.node import running_node
from optimanode.protocol import ModelSettings

Status = Literal["ok", "warn", "fail"]

CPUINFO = Path("/proc/cpuinfo")
# The /proc/cpuinfo flags llama.cpp's x86 kernels use, in the order the cpu check lists them.
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# A feature llama_print_system_info() reports on (``AVX2 = 1``) → the /proc/cpuinfo flags it executes.
# ggml reports them from its compile-time macros (-march=native: what the machine that built it
# has), not from the CPU it runs on; hence the comparison.
BUILD_NEEDS: dict[str, tuple[str, ...]] = {
    "SSE3": ("pni",), "SSSE3": ("ssse3",), "AVX": ("avx",), "AVX_VNNI": ("avx_vnni",), "AVX2": ("avx2",),
    "F16C": ("f16c",), "FMA": ("fma",), "BMI2": ("bmi2",), "AVX512": ("avx512f",),
    "AVX512_VBMI": ("avx512vbmi",), "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",),
    "AMX_INT8": ("amx_tile", "amx_int8"), "AMX_BF16": ("amx_tile", "amx_bf16"),
}
FIX_AMX = ("ggml's AMX kernels crash on this CPU (llama.cpp issue 20824, segfault in ggml_backend_amx_mul_mat); "
           "rebuild with tools/build-llama-cpp (it builds without AMX by default), or run the model with "
           'safe_mode = "on"')
FIX_FOREIGN_BUILD = ("this llama.cpp build uses instructions this CPU lacks: rebuild on this machine "
                     "(tools/build-llama-cpp)")

# Certificates expiring sooner than this are a warning: time to plan the re-pin with the Gateway.
CERT_WARN_DAYS = 30
LLAMA_PROBE_TIMEOUT_S = 120.0
# Printed by the probe subprocess as one JSON line; nothing else it prints is read.
_LLAMA_PROBE = r"""
import json, sys
try:
    import llama_cpp
except BaseException as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
info = {"version": getattr(llama_cpp, "__version__", "?")}
try:
    info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
except Exception as exc:
    info["gpu_offload"] = None
try:
    raw = llama_cpp.llama_print_system_info()
    info["system_info"] = (raw.decode() if isinstance(raw, bytes) else str(raw)).strip()
except Exception as exc:
    info["system_info"] = f"unavailable: {exc}"
print(json.dumps(info))
"""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def run_doctor(settings: Settings, *, nvml: Any = None, python: str = sys.executable,
               env: dict[str, str] | None = None, cpuinfo: str | None = None) -> list[Check]:
    """Every check, in order. ``nvml`` replaces pynvml (tests pass optimanode.testing.FakeNvml);
    ``python``/``env`` are the interpreter and environment of the llama_cpp probe; ``cpuinfo``
    replaces the text of /proc/cpuinfo."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    checks: list[Callable[[], Check]] = [
        lambda: check_models(settings),
        lambda: check_state(settings),
        lambda: check_key(settings),
        lambda: check_certificate(settings),
        lambda: check_port(settings),
        # Only when the OpenMetrics endpoint is on (it is off by default).
        *([lambda: check_metrics_port(settings)] if metrics_address(settings.metrics_http.listen) else []),
        lambda: check_cpu(cpuinfo),
    ]
    out = [c() for c in checks]
    gpu = check_nvidia(nvml)
    out.append(gpu)
    if gpu.status == "ok":
        out.extend(check_gpus(settings, nvml))
    out.append(check_llama_cpp(python=python, env=env, gpu_present=gpu.status == "ok", cpuinfo=cpuinfo))
    return out


def check_models(settings: Settings) -> Check:
    path = settings.models_path
    if not path.exists():
        return Check("models", "fail", f"{path} does not exist",
                     f"create it (mkdir -p {path}) and copy .gguf files into it, or set models_dir")
    if not path.is_dir():
        return Check("models", "fail", f"{path} is not a directory", "set models_dir to a directory")
    try:
        count = sum(1 for p in path.rglob("*.gguf") if p.is_file())
    except OSError as exc:
        return Check("models", "fail", f"{path} cannot be read: {exc.strerror or exc}",
                     f"let the node's user read it (e.g. chgrp -R optimanode {path}; chmod -R g+rX {path})")
    if not os.access(path, os.R_OK | os.X_OK):
        return Check("models", "fail", f"{path} cannot be listed by this user",
                     f"let the node's user read it (e.g. chgrp -R optimanode {path}; chmod -R g+rX {path})")
    if count == 0:
        return Check("models", "warn", f"{path} holds no .gguf files",
                     "copy a model into it (tools/fetch-models prints the path of the default one)")
    return Check("models", "ok", f"{path}: {count} .gguf file{'s' if count != 1 else ''}")


def check_state(settings: Settings) -> Check:
    path = settings.state_path
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and _writable(parent):
            return Check("state", "warn", f"{path} does not exist yet; the node creates it on start")
        return Check("state", "fail", f"{path} does not exist and cannot be created here",
                     f"create it for the node's user: install -d -o optimanode -g optimanode -m 0700 {path}")
    if not path.is_dir():
        return Check("state", "fail", f"{path} is not a directory", "set state_dir to a directory")
    if not _writable(path):
        return Check("state", "fail", f"{path} is not writable by this user",
                     f"chown -R optimanode:optimanode {path} (the journal and the key live there)")
    journal = settings.journal_path
    if not journal.exists():
        return Check("state", "ok", f"{path} is writable (no journal yet)")
    # The file and its WAL, as retention counts them against journal.max_bytes.
    size = sum(p.stat().st_size for p in (journal, journal.with_name(journal.name + "-wal")) if p.exists())
    cap = settings.journal.max_bytes
    what = f"journal {size // 1024} KiB of its {cap // (1 << 20)} MiB cap"
    if size >= 0.9 * cap:
        return Check("state", "warn", f"{path} is writable; {what}: near the cap, retention folds requests early",
                     "raise journal.max_bytes, or shorten journal.request_retention_days"
                     " (docs/configuration.md, [journal])")
    return Check("state", "ok", f"{path} is writable ({what})")


def _writable(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-", delete=True):
            return True
    except OSError:
        return False


def check_key(settings: Settings) -> Check:
    path = settings.key_path
    fix_make = f"optimanode keygen --key-file {path}"
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("key", "fail", f"no access key at {path}", f"create one: {fix_make}")
    except OSError as exc:
        return Check("key", "fail", f"{path} cannot be read: {exc.strerror or exc}",
                     f"make it readable by the node's user only: chown optimanode {path}; chmod 600 {path}")
    if not stat.S_ISREG(st.st_mode):
        return Check("key", "fail", f"{path} is not a regular file", f"create one: {fix_make}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return Check("key", "fail", f"{path} has mode {mode:04o}: group or others can read the key",
                     f"chmod 600 {path}")
    if st.st_size == 0:
        return Check("key", "fail", f"{path} is empty", f"create one: {fix_make}")
    if not os.access(path, os.R_OK):
        return Check("key", "fail", f"{path} is not readable by this user",
                     f"chown optimanode {path} (the node runs as that user)")
    return Check("key", "ok", f"{path} present, mode {mode:04o}")


def cert_path(settings: Settings) -> Path:
    return Path(settings.listen.cert_file) if settings.listen.cert_file else settings.state_path / "tls" / "cert.pem"


def check_certificate(settings: Settings, now: datetime | None = None) -> Check:
    path = cert_path(settings)
    if not path.exists():
        if settings.listen.cert_file:
            return Check("certificate", "fail", f"listen.cert_file {path} does not exist",
                         "point listen.cert_file at a PEM certificate, or leave it empty to generate one")
        return Check("certificate", "warn", f"no certificate at {path} yet; the node generates one on first start",
                     "start the node once, then run `optimanode fingerprint` and pin it in the Gateway")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ImportError:
        return Check("certificate", "warn", f"{path} present; cryptography is not installed to read it",
                     "pip install cryptography")
    except (ValueError, OSError) as exc:
        return Check("certificate", "fail", f"{path} is not a readable PEM certificate: {exc}",
                     "replace it, or delete it to have the node generate a new one (then re-pin it)")
    # The same form as `optimanode fingerprint` and the Gateway's pin (gateway/tls.py): sha256:AB:CD:...
    fingerprint = "sha256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()
    now = now or datetime.now(UTC)
    not_after = cert.not_valid_after_utc
    not_before = cert.not_valid_before_utc
    if now > not_after:
        return Check("certificate", "fail", f"{path} expired on {not_after:%Y-%m-%d}; {fingerprint}",
                     "replace it (or delete the generated one and restart), then re-pin the new fingerprint")
    if now < not_before:
        return Check("certificate", "fail", f"{path} is valid only from {not_before:%Y-%m-%d} (check the clock)",
                     "fix the system clock or the certificate")
    if not_after - now < timedelta(days=CERT_WARN_DAYS):
        return Check("certificate", "warn", f"{path} expires on {not_after:%Y-%m-%d}; {fingerprint}",
                     "plan its replacement and the Gateway's re-pin")
    return Check("certificate", "ok", f"{path} valid until {not_after:%Y-%m-%d}; {fingerprint}")


def check_port(settings: Settings) -> Check:
    return _check_bindable("port", settings.listen.host, settings.listen.port, "listen.host", "listen.port",
                           running_node(settings.state_path))


def check_metrics_port(settings: Settings) -> Check:
    """The OpenMetrics endpoint's address (``metrics_http.listen``), as ``check_port`` checks the link's."""
    address = metrics_address(settings.metrics_http.listen)
    if address is None:
        return Check("metrics port", "ok", "metrics_http.listen is off")
    return _check_bindable("metrics port", address[0], address[1], "metrics_http.listen", "metrics_http.listen",
                           running_node(settings.state_path))


def _check_bindable(name: str, host: str, port: int, host_setting: str, port_setting: str,
                    node_pid: str | None = None) -> Check:
    """``node_pid``: the node running on this state directory, if any; it holds the port itself."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Check(name, "fail", f"{host_setting} {host!r} does not resolve: {exc}",
                     f"set {host_setting} to an address")
    family, _, _, _, addr = infos[0]
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        # As the server will: SO_REUSEADDR, so a port in TIME_WAIT after a restart is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and node_pid is not None:
                # The upgrade steps run doctor beside the running node: its own port is no failure.
                return Check(name, "ok", f"{host}:{port} is in use by the node running on this state "
                                         f"directory (pid {node_pid})")
            if exc.errno == errno.EADDRINUSE:
                return Check(name, "fail", f"{host}:{port} is in use (expected if the node is running)",
                             f"stop what holds it (ss -ltnp 'sport = :{port}') or set {port_setting}")
            if exc.errno == errno.EACCES:
                return Check(name, "fail", f"{host}:{port} may not be bound by this user",
                             "use a port above 1023 (the service has no capabilities)")
            return Check(name, "fail", f"{host}:{port} cannot be bound: {exc.strerror or exc}",
                         f"set {host_setting} to an address of this machine")
    return Check(name, "ok", f"{host}:{port} is free")


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo; "" where there is none (not Linux)."""
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo's text, else platform.processor() (or the machine)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(cpuinfo: str) -> frozenset[str] | None:
    """The first ``flags`` line of /proc/cpuinfo's text as a set; None where there is none
    (not Linux, or not x86: ARM lists ``Features`` instead), which is "unknown", not "none"."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


def check_cpu(cpuinfo: str | None = None) -> Check:
    """The CPU's model and which of CPU_FEATURES it has. ``cpuinfo`` replaces /proc/cpuinfo's text."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    model = cpu_model(cpuinfo)
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return Check("cpu", "ok", f"{model} (no x86 flags in /proc/cpuinfo: ISA extensions not read)")
    has = [f for f in CPU_FEATURES if f in flags]
    detail = f"{model}; {' '.join(has) if has else 'no AVX'}"
    if "avx2" not in flags:
        return Check("cpu", "warn", detail + " (no AVX2)",
                     "llama.cpp is much slower on a CPU without AVX2: offload the models to a GPU "
                     "(n_gpu_layers) or run the node on a CPU with AVX2")
    return Check("cpu", "ok", detail)


def check_nvidia(nvml: Any = None) -> Check:
    if nvml is None:
        try:
            import pynvml  # here: a CPU-only machine never needs it
        except ImportError:
            return Check("nvidia", "warn", "nvidia-ml-py is not installed; GPUs are not reported",
                         "pip install nvidia-ml-py")
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Check("nvidia", "warn", f"no NVIDIA driver ({exc}); models run on the CPU",
                     "on a GPU machine: install the NVIDIA driver, then the nvidia.conf drop-in (docs/operations.md)")
    try:
        count = nvml.nvmlDeviceGetCount()
        names = []
        for i in range(count):
            name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        driver = ""
        get_version = getattr(nvml, "nvmlSystemGetDriverVersion", None)
        if get_version is not None:
            with contextlib.suppress(nvml.NVMLError):
                v = get_version()
                driver = f", driver {v.decode() if isinstance(v, bytes) else v}"
    except nvml.NVMLError as exc:
        return Check("nvidia", "fail", f"NVML initialised but the GPUs cannot be read: {exc}",
                     "check `nvidia-smi`; under systemd, the nvidia.conf drop-in must allow /dev/nvidia*")
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    if count == 0:
        return Check("nvidia", "warn", f"NVIDIA driver loaded but no GPU visible{driver}",
                     "under systemd, install the nvidia.conf drop-in (PrivateDevices hides /dev/nvidia*)")
    return Check("nvidia", "ok", f"{count} GPU{'s' if count != 1 else ''}: {', '.join(names)}{driver}")


def check_gpus(settings: Settings, nvml: Any = None) -> list[Check]:
    """One check per GPU: free memory, and the models that fit on it (see the module docstring)."""
    probe = GpuProbe(nvml)
    try:
        gpus = probe()
    finally:
        probe.close()
    try:
        models = Registry(settings.models_path).scan().models if settings.models_path.is_dir() else {}
    except OSError:
        models = {}
    d = settings.model_defaults
    wanted = ModelSettings(n_gpu_layers=d.n_gpu_layers or -1, parallel=1)
    needs = {}
    for eid, info in sorted(models.items()):
        est = estimate(info, effective(info, wanted, d, ""))
        needs[eid] = est.gpu_weights + est.gpu_kv + est.gpu_compute + est.gpu_logits
    mib = 1024 * 1024
    out = []
    for g in gpus:
        free = (g.memory_free_bytes or 0) - settings.vram_reserve_mb * mib
        fits = [f"{eid} ({n // mib} MiB)" for eid, n in needs.items() if n <= free]
        big = [f"{eid} ({n // mib} MiB)" for eid, n in needs.items() if n > free]
        layers = "all layers" if wanted.n_gpu_layers == -1 else f"{wanted.n_gpu_layers} layers"
        detail = (f"{g.name}: {(g.memory_free_bytes or 0) // mib} MiB free of {g.memory_total_bytes // mib} MiB; "
                  f"fits ({layers} offloaded, 1 slot, after vram_reserve_mb): {', '.join(fits) or 'none'}"
                  + (f"; too big: {', '.join(big)}" if big else ""))
        out.append(Check(f"gpu {g.index}", "ok" if fits or not needs else "warn", detail,
                         "" if fits or not needs else "free memory on this GPU, or use a smaller model or quantization"))
    return out


def check_llama_cpp(*, python: str = sys.executable, env: dict[str, str] | None = None,
                    gpu_present: bool = False, cpuinfo: str | None = None) -> Check:
    """Probe llama_cpp in a subprocess (see the module docstring); ``cpuinfo`` replaces the text
    of /proc/cpuinfo the build's CPU features are held against."""
    try:
        out = subprocess.run([python, "-c", _LLAMA_PROBE], capture_output=True, text=True,
                             timeout=LLAMA_PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return Check("llama_cpp", "fail", f"importing llama_cpp took over {LLAMA_PROBE_TIMEOUT_S:g} s",
                     "reinstall llama-cpp-python (docs/operations.md, section Install)")
    except OSError as exc:
        return Check("llama_cpp", "fail", f"cannot run {python}: {exc}", "reinstall the node's virtual environment")
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), "")
    try:
        info = json.loads(line)
    except ValueError:
        tail = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return Check("llama_cpp", "fail", f"the llama_cpp probe died: {tail}",
                     "reinstall llama-cpp-python (docs/operations.md, section Install)")
    if "error" in info:
        return Check("llama_cpp", "fail", f"llama_cpp cannot be imported: {info['error']}",
                     "pip install llama-cpp-python into the node's environment (docs/operations.md)")
    system_info = info.get("system_info", "")
    features = _features(system_info)
    detail = f"llama-cpp-python {info.get('version')}, GPU offload {'yes' if info.get('gpu_offload') else 'no'}"
    if features:
        detail += f"; {features}"
    problems = build_cpu_problems(system_info, cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo))
    if gpu_present and not info.get("gpu_offload"):
        problems.append(("a GPU is present but this build is CPU only",
                         'CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python --no-binary llama-cpp-python '
                         "--force-reinstall --no-cache-dir"))
    if problems:
        return Check("llama_cpp", "warn", detail + "".join(f" ({what})" for what, _ in problems),
                     "; and ".join(fix for _, fix in problems))
    return Check("llama_cpp", "ok", detail)


def build_cpu_problems(system_info: str, flags: Collection[str] | None) -> list[tuple[str, str]]:
    """What is wrong with running this llama.cpp build (``llama_print_system_info()``) on a CPU with
    these /proc/cpuinfo ``flags``, as (what, what to do) pairs; none when the flags are unknown.

    Instructions the build has and the CPU lacks come first (any model dies of SIGILL); then ggml's
    AMX kernels on a CPU that has AMX (they are used, and crash)."""
    if flags is None:
        return []
    on = _cpu_features_on(system_info)
    missing = [f for f in on if any(flag not in flags for flag in _needs(f))]
    problems: list[tuple[str, str]] = []
    if missing:
        problems.append((f"built for {' '.join(missing)}, which this CPU lacks", FIX_FOREIGN_BUILD))
    amx = [f for f in on if f.startswith("AMX") and f not in missing]
    if amx and "amx_tile" in flags:
        problems.append((f"{' '.join(amx)} on a CPU with AMX: llama.cpp issue 20824", FIX_AMX))
    return problems


def _needs(feature: str) -> tuple[str, ...]:
    # An AMX feature this table does not know yet still needs the AMX tiles.
    return BUILD_NEEDS.get(feature, ("amx_tile",) if feature.startswith("AMX") else ())


def _sections(system_info: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``CUDA : ARCHS = 890 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | ...`` → each backend's (key, value)
    pairs, in order. Older builds print the CPU's features with no ``CPU :`` head: backend ""."""
    sections: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    for part in system_info.split("|"):
        part = part.strip()
        head, colon, rest = part.partition(":")
        if colon and "=" not in head:  # "CUDA : ARCHS = 890 | ..." starts a backend's section
            sections.append((head.strip(), []))
            part = rest.strip()
        key, sep, value = part.partition("=")
        if sep and key.strip():
            sections[-1][1].append((key.strip(), value.strip()))
    return sections


def _cpu_features_on(system_info: str) -> list[str]:
    """The CPU backend's features that are on (``AVX2 = 1``): what the build compiled in."""
    return [key for backend, pairs in _sections(system_info) if backend in ("", "CPU")
            for key, value in pairs if value in ("1", "on")]


def _features(system_info: str) -> str:
    """``CPU : SSE3 = 1 | AVX2 = 1 | ...`` → ``CPU: SSE3 AVX2 ...`` (the backends, then the features that are on)."""
    sections = _sections(system_info)
    on = [key for _, pairs in sections for key, value in pairs if value in ("1", "on")]
    head = "/".join(b for b, _ in sections if b)
    return f"{head}: {' '.join(on)}" if head else " ".join(on)


def print_checks(checks: Sequence[Check], stream: TextIO | None = None, *, as_json: bool = False) -> int:
    """Write the checks; return 0 when none failed, else 1."""
    stream = stream or sys.stdout
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        stream.write(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
        return 1 if failed else 0
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        stream.write(f"{mark[c.status]}  {c.name:<{width}}  {c.detail}\n")
        if c.fix and c.status != "ok":
            stream.write(f"      {'':<{width}}  → {c.fix}\n")
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    stream.write(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failed\n")
    return 1 if failed else 0
