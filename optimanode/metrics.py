"""The metrics sampler: one ``MetricsReport`` of the host, its NVIDIA GPUs and each executor, on demand.

``Sampler(executors, node_id=..., nvml=...)`` holds the state that turns counters into rates, and
``sample()`` reads everything once and returns a report. It is synchronous and cheap (a few /proc
reads per executor, a handful of NVML calls per GPU: about 1 ms and 0.1 % of one core at one report
a second on a slow 2-vCPU VM; docs/benchmarks.md "Metrics report cost"), so the node can call it
inline on its event loop: a thread buys little, since the sampler holds the GIL for most of that
millisecond anyway (measured there). A lock serialises callers all the same.

* **Host.** ``psutil.cpu_percent(interval=None)`` measures since the previous call, so the
  constructor primes it and each report covers the time since the last one. That state is
  process-wide in psutil: anything else in the process calling ``psutil.cpu_percent()`` shortens
  the sampler's interval. Core counts are read once; load averages, RAM and swap on every sample.
* **GPUs.** NVML (``pynvml`` unless ``nvml=`` injects e.g. ``optimanode.testing.FakeNvml``) is
  initialised lazily on the first sample. If that fails (no driver: ``NVML Shared Library Not
  Found`` / ``Driver Not Loaded``, or any other NVML error), the report has ``gpus=[]`` and
  ``gpu_status`` says why, and init is tried again at most every ``nvml_retry_s`` (60 s), since a
  failing init costs a dlopen each time. Handles, names and UUIDs are read once, each GPU's on its own:
  a GPU whose handle NVML refuses (NoPermission for a device a DeviceAllow= or container restriction
  keeps from this process, GPU lost) is left out, the others keep their own NVML indices, ``gpu_status``
  names the one left out on every report and the log says it once (``GpuProbe`` the same); when no GPU
  opens at all NVML is shut down and init retried as above. Utilization, memory,
  temperature, power and the enforced power limit on every sample, each field on its own: a field the
  driver refuses (NotSupported, NoPermission, GPU lost) becomes None (or 0 for memory) rather than
  failing the report, and a lost GPU is also named in ``gpu_status``. An unexpected failure of the
  whole GPU section is reported in ``gpu_status``, never raised: a report is always produced.
* **Executors.** For each ``ExecutorStatus`` the callable returns: the worker's RSS and CPU% through
  one ``psutil.Process`` kept per pid with its CPU seconds, so ``cpu_percent`` covers the interval
  since the last sample (None on the first sample of a pid: there is no interval yet; % of one
  core, so a multi-threaded worker can pass 100).
  A pid that changes, exits or turns zombie is dropped and gives None, never an exception.
  ``vram_bytes`` sums NVML's compute and graphics process lists over GPUs (per GPU the larger of
  the two, since a process with both contexts is listed in both); None when NVML does not list the
  pid with a known size (no GPU context, no NVML, or a container whose pid namespace hides it).
  ``tokens_per_s`` is the change in ``tokens_generated`` over the time since the previous sample,
  0 on the first sample, after a pid change or when the counter goes backwards. ``free_slots`` is
  ``max(0, parallel - in_flight)`` for a running executor and 0 otherwise.

``sample_cost_s`` is the wall time ``sample()`` took, so the report states its own cost. Each
``GpuReport`` also carries NVML's free memory and the executors placed on that GPU (from
``ExecutorStatus.gpus``, starting or running).

``GpuProbe`` is the small NVML reader memory admission uses (``executors/runtime.py``): each
call gives one ``GpuReport`` per GPU with its index, name, UUID, total and free memory only, or []
without NVML (init retried at most every ``retry_s``), never an exception. Every init that succeeds
but finds nothing usable is matched by its ``nvmlShutdown``, so retries do not pile up NVML's refcount.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import psutil

from optimanode.protocol import (
    CpuReport,
    ExecutorMetrics,
    ExecutorStatus,
    GpuReport,
    JournalReport,
    MemoryReport,
    MetricsReport,
)

log = logging.getLogger(__name__)

# NVML's C error codes (stable ABI) that mean "this machine has no usable NVIDIA driver".
_NO_DRIVER_CODES = frozenset({9, 12})  # NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_LIBRARY_NOT_FOUND


class NvmlLike(Protocol):
    """The subset of ``pynvml`` the sampler calls (``optimanode.testing.FakeNvml`` provides it too)."""

    NVMLError: type[Exception]
    NVML_TEMPERATURE_GPU: int

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]: ...


def _text(value: Any) -> str:
    # Old nvidia-ml-py releases returned bytes for names and UUIDs.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def describe_nvml_error(exc: BaseException) -> str:
    """What ``gpu_status`` says about an NVML failure."""
    if getattr(exc, "value", None) in _NO_DRIVER_CODES:
        return f"no NVIDIA driver (NVML: {exc})"
    return f"NVML: {exc}"


def open_gpus(nvml: Any, count: int) -> tuple[list[tuple[int, Any, str, str]], list[str]]:
    """Each GPU index's (index, handle, name, UUID), looked up one by one, and a note per index left out.

    One refused handle (NoPermission under a device restriction, GPU lost) costs that GPU only: the
    others keep their NVML indices, which placement and ``CUDA_VISIBLE_DEVICES`` go by. A name or
    UUID NVML will not give is "".
    """
    gpus, skipped = [], []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            skipped.append(f"GPU {index} left out ({describe_nvml_error(exc)})")
            continue
        texts = []
        for fn in (nvml.nvmlDeviceGetName, nvml.nvmlDeviceGetUUID):
            try:
                texts.append(_text(fn(handle)))
            except nvml.NVMLError:
                texts.append("")
        gpus.append((index, handle, texts[0], texts[1]))
    return gpus, skipped


class _SkipLog:
    """Logs the GPUs left out at init once, and again only when that changes."""

    def __init__(self, who: str) -> None:
        self._who = who
        self._last: tuple[str, ...] = ()

    def __call__(self, skipped: Sequence[str]) -> None:
        if skipped and tuple(skipped) != self._last:
            log.warning("%s: %s; the other GPUs are used", self._who, "; ".join(skipped))
        self._last = tuple(skipped)


class Sampler:
    """Turns the executors callable, psutil and NVML into MetricsReports; see the module docstring."""

    def __init__(self, executors: Callable[[], Sequence[ExecutorStatus]], *, node_id: str = "",
                 nvml: NvmlLike | None = None, clock: Callable[[], float] = time.monotonic,
                 nvml_retry_s: float = 60.0, journal: Callable[[], JournalReport | None] | None = None) -> None:
        self._executors = executors
        # The journal's size against its cap (Node.journal_report), passed on as it is.
        self._journal = journal
        self._node_id = node_id
        self._nvml: Any = nvml
        self._clock = clock
        self._nvml_retry_s = nvml_retry_s
        self._lock = threading.Lock()
        # NVML state: None until an init succeeds; then one (index, handle, name, uuid) per GPU that
        # opened, and a note per GPU index whose handle NVML refused (said in every report's status).
        self._gpus: list[tuple[int, Any, str, str]] | None = None
        self._skipped: list[str] = []
        self._log_skipped = _SkipLog("metrics")
        self._gpu_status = ""
        self._next_init = float("-inf")
        # pid → (process, user+system CPU seconds, time.monotonic()) at the previous sample.
        self._procs: dict[int, tuple[psutil.Process, float, float]] = {}
        # executor id → (pid, tokens_generated, clock) at the previous sample.
        self._tokens: dict[str, tuple[int | None, int, float]] = {}
        self._cores_logical = psutil.cpu_count(logical=True) or 1
        self._cores_physical = psutil.cpu_count(logical=False) or self._cores_logical
        # Prime the interval-based counters, so the first report covers construction → first sample.
        psutil.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None, percpu=True)

    def sample(self) -> MetricsReport:
        start = time.perf_counter()
        with self._lock:
            now = self._clock()
            statuses = list(self._executors())
            gpus, gpu_status, vram = self._sample_gpus(now)
            placed: dict[int, list[str]] = {}
            for st in statuses:
                if st.state in ("starting", "running", "restarting"):
                    for i in st.gpus:
                        placed.setdefault(i, []).append(st.id)
            gpus = [msgspec.structs.replace(g, models=placed.get(g.index, [])) for g in gpus]
            executors = [self._sample_executor(st, now, vram) for st in statuses]
            live_pids, live_ids = {st.pid for st in statuses}, {st.id for st in statuses}
            self._procs = {pid: p for pid, p in self._procs.items() if pid in live_pids}
            self._tokens = {eid: t for eid, t in self._tokens.items() if eid in live_ids}
            cpu, memory = self._sample_cpu(), self._sample_memory()
            return MetricsReport(ts=time.time(), node_id=self._node_id, cpu=cpu, memory=memory, gpus=gpus,
                                 gpu_status=gpu_status, executors=executors,
                                 journal=self._journal() if self._journal is not None else None,
                                 sample_cost_s=time.perf_counter() - start)

    def close(self) -> None:
        """Release NVML (pynvml counts inits; each successful one needs its shutdown)."""
        with self._lock:
            self._shutdown_nvml()

    # -- host -------------------------------------------------------------------------------

    def _sample_cpu(self) -> CpuReport:
        load = psutil.getloadavg()
        return CpuReport(percent=psutil.cpu_percent(interval=None),
                         per_core=psutil.cpu_percent(interval=None, percpu=True),
                         cores_logical=self._cores_logical, cores_physical=self._cores_physical,
                         load_1m=load[0], load_5m=load[1], load_15m=load[2])

    @staticmethod
    def _sample_memory() -> MemoryReport:
        vm, sw = psutil.virtual_memory(), psutil.swap_memory()
        return MemoryReport(total_bytes=vm.total, available_bytes=vm.available, used_bytes=vm.used,
                            swap_total_bytes=sw.total, swap_used_bytes=sw.used)

    # -- GPUs -------------------------------------------------------------------------------

    def _sample_gpus(self, now: float) -> tuple[list[GpuReport], str, dict[int, int]]:
        try:
            if self._gpus is None:
                if now < self._next_init:
                    return [], self._gpu_status, {}
                self._init_nvml(now)
                if self._gpus is None:
                    return [], self._gpu_status, {}
            return self._read_gpus(now)
        except Exception as exc:  # noqa: BLE001  (a report is always produced; the text says what broke)
            return [], f"NVML: unexpected {type(exc).__name__}: {exc}", {}

    def _init_nvml(self, now: float) -> None:
        self._next_init = now + self._nvml_retry_s
        if self._nvml is None:
            try:
                import pynvml  # here, not at the top: a machine without GPUs never needs it
            except ImportError as exc:
                self._gpu_status = f"no NVML bindings ({exc})"
                return
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self._gpu_status = describe_nvml_error(exc)
            return
        try:
            gpus, skipped = open_gpus(nvml, nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            self._gpu_status = describe_nvml_error(exc)
            self._try(nvml.nvmlShutdown)
            return
        except BaseException:
            self._try(nvml.nvmlShutdown)  # each successful init has its shutdown, whatever happened after
            raise
        self._log_skipped(skipped)
        if skipped and not gpus:
            # None opened: start over after the retry interval, as when init fails.
            self._try(nvml.nvmlShutdown)
            self._gpu_status = "; ".join([*skipped, f"NVML re-init in {self._nvml_retry_s:g} s"])
            return
        self._gpus, self._skipped = gpus, skipped
        self._gpu_status = "; ".join(skipped) if gpus else "no NVIDIA GPU (NVML found none)"

    def _shutdown_nvml(self) -> None:
        if self._gpus is not None:
            self._gpus, self._skipped = None, []
            self._try(self._nvml.nvmlShutdown)

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def _processes(self, handle: Any, kind: str) -> list[Any]:
        nvml = self._nvml
        try:
            return getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses")(handle)
        except nvml.NVMLError:
            return []
        except getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError):
            # A driver older than these bindings lacks the _v3 listing; _v2 has the same fields.
            legacy = getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v2", None)
            return (self._try(legacy, handle) or []) if legacy else []

    def _read_gpus(self, now: float) -> tuple[list[GpuReport], str, dict[int, int]]:
        nvml, t = self._nvml, self._try
        reports, vram, problems = [], {}, []
        for index, h, name, uuid in self._gpus or []:
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            except nvml.NVMLError as exc:  # every board reports memory: its failure is news (e.g. GPU lost)
                mem = None
                problems.append(f"GPU {index}: {describe_nvml_error(exc)}")
            util = t(nvml.nvmlDeviceGetUtilizationRates, h)
            temp = t(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
            power, limit = t(nvml.nvmlDeviceGetPowerUsage, h), t(nvml.nvmlDeviceGetEnforcedPowerLimit, h)
            reports.append(GpuReport(
                index=index, name=name, uuid=uuid,
                utilization_percent=float(util.gpu) if util is not None else None,
                memory_total_bytes=int(mem.total) if mem is not None else 0,
                memory_used_bytes=int(mem.used) if mem is not None else 0,
                memory_free_bytes=int(mem.free) if mem is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=power / 1000 if power is not None else None,  # NVML gives milliwatts
                power_limit_w=limit / 1000 if limit is not None else None))
            on_this_gpu: dict[int, int] = {}
            for proc in self._processes(h, "Compute") + self._processes(h, "Graphics"):
                if proc.usedGpuMemory is not None:
                    on_this_gpu[proc.pid] = max(on_this_gpu.get(proc.pid, 0), int(proc.usedGpuMemory))
            for pid, used in on_this_gpu.items():
                vram[pid] = vram.get(pid, 0) + used
        problems = [*self._skipped, *problems]
        if reports and len(problems) - len(self._skipped) == len(reports):
            # No GPU answers (driver reloaded, handles stale): start over after the retry interval.
            self._shutdown_nvml()
            self._next_init = now + self._nvml_retry_s
            problems.append(f"NVML re-init in {self._nvml_retry_s:g} s")
            self._gpu_status = "; ".join(problems)
        return reports, "; ".join(problems), vram

    # -- executors --------------------------------------------------------------------------

    def _sample_executor(self, st: ExecutorStatus, now: float, vram: dict[int, int]) -> ExecutorMetrics:
        rss, cpu = self._sample_process(st.pid) if st.pid is not None else (None, None)
        prev = self._tokens.get(st.id)
        tokens_per_s = 0.0
        if (prev is not None and st.pid is not None and prev[0] == st.pid and now > prev[2]
                and st.tokens_generated >= prev[1]):
            tokens_per_s = (st.tokens_generated - prev[1]) / (now - prev[2])
        self._tokens[st.id] = (st.pid, st.tokens_generated, now)
        return ExecutorMetrics(
            id=st.id, state=st.state, pid=st.pid, rss_bytes=rss, cpu_percent=cpu,
            vram_bytes=vram.get(st.pid) if st.pid is not None else None,
            queue_depth=st.queue_depth, in_flight=st.in_flight, parallel=st.parallel,
            queue_size=st.queue_size,
            free_slots=max(0, st.parallel - st.in_flight) if st.state == "running" else 0,
            tokens_per_s=tokens_per_s, requests_served=st.requests_served, restarts=st.restarts,
            gpus=list(st.gpus), memory_estimate_bytes=st.memory_estimate_bytes,
            vram_estimate_bytes=sum(st.vram_estimate_bytes.values()), loaded=st.loaded, last_used=st.last_used,
            evictions=st.evictions, prompt_cache=st.prompt_cache)

    def _sample_process(self, pid: int) -> tuple[int | None, float | None]:
        held = self._procs.get(pid)
        try:
            proc = held[0] if held is not None else psutil.Process(pid)
            with proc.oneshot():  # one read of /proc/<pid>/stat serves status and cpu times
                if proc.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.ZombieProcess(pid)
                times = proc.cpu_times()
                rss = proc.memory_info().rss
        except psutil.Error:  # gone, zombie, or not ours to read
            self._procs.pop(pid, None)
            return None, None
        # Process.cpu_percent() would do the same arithmetic but asks the OS for the core count on
        # every call (a file read on Linux); user + system seconds per wall second, x100 = % of one core.
        now, busy = time.monotonic(), times.user + times.system
        self._procs[pid] = (proc, busy, now)
        if held is None or now <= held[2]:
            return rss, None
        return rss, max(0.0, (busy - held[1]) / (now - held[2]) * 100)


class GpuProbe:
    """Each GPU's memory, for admission: ``probe()`` → [GpuReport(index, name, uuid, total, free)]."""

    def __init__(self, nvml: NvmlLike | None = None, *, clock: Callable[[], float] = time.monotonic,
                 retry_s: float = 60.0) -> None:
        self._nvml: Any = nvml
        self._clock = clock
        self._retry_s = retry_s
        self._gpus: list[tuple[int, Any, str, str]] | None = None
        self._log_skipped = _SkipLog("memory admission")
        self._next_init = float("-inf")
        self.status = ""

    def __call__(self) -> list[GpuReport]:
        try:
            if self._gpus is None and not self._init():
                return []
            nvml, out = self._nvml, []
            for index, h, name, uuid in self._gpus or []:
                try:
                    mem = nvml.nvmlDeviceGetMemoryInfo(h)
                except nvml.NVMLError:
                    continue  # a GPU that cannot say its memory takes no model
                out.append(GpuReport(index=index, name=name, uuid=uuid, memory_total_bytes=int(mem.total),
                                     memory_used_bytes=int(mem.used), memory_free_bytes=int(mem.free)))
            return out
        except Exception as exc:  # noqa: BLE001  (admission goes on without GPUs; the status says why)
            self.status = f"NVML: unexpected {type(exc).__name__}: {exc}"
            return []

    def _init(self) -> bool:
        now = self._clock()
        if now < self._next_init:
            return False
        self._next_init = now + self._retry_s
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                self.status = f"no NVML bindings ({exc})"
                return False
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.status = describe_nvml_error(exc)
            return False
        try:
            gpus, skipped = open_gpus(nvml, nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            gpus, skipped = [], [describe_nvml_error(exc)]
        except BaseException:
            self._shutdown(nvml)
            raise
        self._log_skipped([s for s in skipped if s.startswith("GPU ")])
        if skipped and not gpus:
            # Nothing usable after an init that worked: undo it (NVML counts inits), retry later.
            self.status = "; ".join(skipped)
            self._shutdown(nvml)
            return False
        self._gpus = gpus
        self.status = "; ".join(skipped) if gpus else "no NVIDIA GPU (NVML found none)"
        return True

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass

    def close(self) -> None:
        if self._gpus is not None:
            self._gpus = None
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
