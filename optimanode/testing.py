"""Fakes for what cannot exist on a machine without NVIDIA hardware, shipped so Gateway authors can use them.

``FakeNvml`` stands in for the ``pynvml`` module (nvidia-ml-py) wherever code takes an ``nvml=``
argument, as ``optimanode.metrics.Sampler`` does. It has the same function names, return shapes and
exceptions as the subset the sampler calls, checked against nvidia-ml-py 13:

* errors are pynvml's own classes (``NVMLError(code)`` becomes ``NVMLError_NotSupported`` etc., with
  the same ``str()``), so ``except nvml.NVMLError`` behaves exactly as with the real library;
* calls before ``nvmlInit`` (or after the matching ``nvmlShutdown``) raise ``NVMLError_Uninitialized``;
* names and UUIDs are ``str``; memory info has ``.total/.free/.used`` in bytes; utilization has
  ``.gpu/.memory`` in percent; temperature is an int in °C; power usage and limits are ints in
  milliwatts; running processes have ``.pid``, ``.usedGpuMemory`` (bytes, or None where the driver
  cannot say, as under Windows WDDM), ``.gpuInstanceId`` and ``.computeInstanceId``;
* ``old_driver=True`` makes the unversioned process listings raise ``NVMLLibraryMismatchError`` (not
  an ``NVMLError``) as pynvml does when the driver lacks the ``_v3`` entry points; ``_v2`` still works.

Configure a machine with ``FakeGpu`` entries, ``unsupported`` function names per GPU, ``errors``
(function name → NVML error code) per GPU or for the whole fake (a GPU's ``errors`` may name
``nvmlDeviceGetHandleByIndex``: that one GPU's lookup fails, as for a device this process may not
open), or ``init_error`` for a machine
without the driver (``FakeNvml.without_driver()``). ``FakeNvml.machine(80, 24, 48, used_gib=...)``
builds a machine of N GPUs of those sizes in GiB (distinct names and UUIDs), for memory admission
and placement. Everything is plain mutable state: change a GPU's numbers between samples, or set
``init_error = None`` to let the driver "appear".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pynvml import (  # noqa: F401  (re-exported: the fake's module-like surface)
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNINITIALIZED,
    NVML_TEMPERATURE_GPU,
    NVMLError,
    NVMLLibraryMismatchError,
)

GiB = 1024**3
# What pynvml reports for gpuInstanceId/computeInstanceId outside MIG (0xFFFFFFFF).
_NO_INSTANCE = 0xFFFFFFFF


@dataclass(eq=False)  # handles compare by identity, as NVML's do
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""  # "" → "GPU-00000000-fake-0000-0000-00000000000<index>"
    memory_total: int = 80 * GiB
    memory_used: int = 0
    utilization_gpu: int = 0
    utilization_memory: int = 0
    temperature_c: int = 35
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    # pid → usedGpuMemory in bytes (None: "not available", as pynvml maps NVML_VALUE_NOT_AVAILABLE).
    compute_processes: dict[int, int | None] = field(default_factory=dict)
    graphics_processes: dict[int, int | None] = field(default_factory=dict)
    # nvmlDeviceGet* names that raise NVMLError_NotSupported on this GPU (e.g. power on some boards).
    unsupported: set[str] = field(default_factory=set)
    # nvmlDeviceGet* name → NVML error code, e.g. {"nvmlDeviceGetPowerUsage": NVML_ERROR_GPU_IS_LOST}.
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _ProcessInfo:
    pid: int
    usedGpuMemory: int | None  # noqa: N815  (pynvml's field name)
    gpuInstanceId: int = _NO_INSTANCE  # noqa: N815
    computeInstanceId: int = _NO_INSTANCE  # noqa: N815


class FakeNvml:
    """A module-like stand-in for ``pynvml``; see the module docstring."""

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None,
                 errors: dict[str, int] | None = None, old_driver: bool = False) -> None:
        self.gpus = list(gpus or [])
        self.init_error = init_error
        self.errors = dict(errors or {})
        self.old_driver = old_driver
        self.refcount = 0
        self.init_calls = 0
        self.calls: dict[str, int] = {}

    @classmethod
    def machine(cls, *sizes_gib: float, used_gib: tuple[float, ...] = ()) -> FakeNvml:
        """N GPUs of ``sizes_gib`` GiB each (``used_gib``: GiB already in use on each, default 0)."""
        gpus = [FakeGpu(name=f"NVIDIA Fake {size:g}GB", uuid=f"GPU-fake{i:04d}-0000-0000-0000-{i:012d}",
                        memory_total=int(size * GiB),
                        memory_used=int(used_gib[i] * GiB) if i < len(used_gib) else 0)
                for i, size in enumerate(sizes_gib)]
        return cls(gpus)

    @classmethod
    def without_driver(cls, code: int = NVML_ERROR_LIBRARY_NOT_FOUND) -> FakeNvml:
        """A machine where nvmlInit fails: no libnvidia-ml.so.1 (default) or DRIVER_NOT_LOADED."""
        return cls(init_error=code)

    # -- plumbing ---------------------------------------------------------------------------

    def _enter(self, fn: str, handle: FakeGpu | None = None) -> None:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        if self.refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if fn in self.errors:
            raise NVMLError(self.errors[fn])
        if handle is not None:
            if not any(handle is g for g in self.gpus):
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            if fn in handle.errors:
                raise NVMLError(handle.errors[fn])
            if fn in handle.unsupported:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)

    def _procs(self, fn: str, handle: FakeGpu, table: dict[int, int | None]) -> list[_ProcessInfo]:
        self._enter(fn, handle)
        if self.old_driver and not fn.endswith("_v2"):
            raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                           "match the NVML lib version. Either use matching pyNVML and "
                                           f"NVML lib versions or use a versioned function such as {fn}_v2")
        return [_ProcessInfo(pid, used) for pid, used in table.items()]

    # -- the pynvml subset ------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self.calls["nvmlInit"] = self.calls.get("nvmlInit", 0) + 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        # A lookup one GPU refuses: NO_PERMISSION for a device this process may not open, GPU_IS_LOST.
        if "nvmlDeviceGetHandleByIndex" in gpu.errors:
            raise NVMLError(gpu.errors["nvmlDeviceGetHandleByIndex"])
        return gpu

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._enter("nvmlDeviceGetName", handle)
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        index = next(i for i, g in enumerate(self.gpus) if g is handle)
        return handle.uuid or f"GPU-00000000-fake-0000-0000-{index:012d}"

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> _Utilization:
        self._enter("nvmlDeviceGetUtilizationRates", handle)
        return _Utilization(handle.utilization_gpu, handle.utilization_memory)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version: int | None = None) -> _Memory:
        self._enter("nvmlDeviceGetMemoryInfo", handle)
        return _Memory(handle.memory_total, handle.memory_total - handle.memory_used, handle.memory_used)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return handle.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        return handle.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit", handle)
        return handle.power_limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[_ProcessInfo]:
        return self._procs("nvmlDeviceGetComputeRunningProcesses", handle, handle.compute_processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeGpu) -> list[_ProcessInfo]:
        return self._procs("nvmlDeviceGetGraphicsRunningProcesses", handle, handle.graphics_processes)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeGpu) -> list[_ProcessInfo]:
        return self._procs("nvmlDeviceGetComputeRunningProcesses_v2", handle, handle.compute_processes)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: FakeGpu) -> list[_ProcessInfo]:
        return self._procs("nvmlDeviceGetGraphicsRunningProcesses_v2", handle, handle.graphics_processes)

