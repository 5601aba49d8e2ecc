"""The metrics sampler in process: host figures, GPUs from the real pynvml (driver-less here) and FakeNvml, rates."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time

import psutil
import pynvml
import pytest

from optimanode.metrics import GpuProbe, Sampler
from optimanode.protocol import ExecutorStatus, ModelInfo
from optimanode.testing import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NO_PERMISSION,
    FakeGpu,
    FakeNvml,
)

GiB = 1024**3
INFO = ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=1, mtime_ns=0)


def status(pid: int | None = None, *, id: str = "a", state: str = "running", **kw) -> ExecutorStatus:
    return ExecutorStatus(id=id, state=state, enabled=True, info=INFO, pid=pid, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def has_nvidia_driver() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


def test_real_pynvml_on_this_machine_fails_cleanly_or_reports_gpus():
    """The real library path: no driver gives gpus == [] and a status that says so; a driver gives GPUs."""
    sampler = Sampler(lambda: [])
    try:
        report = sampler.sample()
    finally:
        sampler.close()
    if has_nvidia_driver():
        assert report.gpus and report.gpu_status == ""
    else:
        assert report.gpus == []
        assert report.gpu_status.startswith("no NVIDIA driver (NVML: "), report.gpu_status
    assert 0 < report.sample_cost_s < 1


def test_cpu_and_memory_are_sane():
    """per_core has one entry per logical core, percentages are in range, totals are positive."""
    sampler = Sampler(lambda: [], nvml=FakeNvml())
    time.sleep(0.05)
    report = sampler.sample()
    cpu, mem = report.cpu, report.memory
    assert len(cpu.per_core) == cpu.cores_logical == psutil.cpu_count(logical=True)
    assert 1 <= cpu.cores_physical <= cpu.cores_logical
    assert 0.0 <= cpu.percent <= 100.0 and all(0.0 <= p <= 100.0 for p in cpu.per_core)
    assert cpu.load_1m >= 0 and cpu.load_5m >= 0 and cpu.load_15m >= 0
    assert mem.total_bytes > 0 and 0 < mem.available_bytes <= mem.total_bytes
    assert 0 < mem.used_bytes <= mem.total_bytes and 0 <= mem.swap_used_bytes <= max(mem.swap_total_bytes, 0)
    assert abs(report.ts - time.time()) < 5


def test_two_fake_gpus_give_two_reports_in_bytes_and_watts():
    """Memory in bytes, power converted from NVML's milliwatts, utilization and temperature as given."""
    fake = FakeNvml([
        FakeGpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-a", memory_total=80 * GiB, memory_used=20 * GiB,
                utilization_gpu=87, temperature_c=61, power_mw=412_345, power_limit_mw=700_000),
        FakeGpu(name="NVIDIA L4", memory_total=24 * GiB, memory_used=GiB, utilization_gpu=3,
                temperature_c=40, power_mw=16_500, power_limit_mw=72_000),
    ])
    report = Sampler(lambda: [], nvml=fake).sample()
    assert report.gpu_status == ""
    a, b = report.gpus
    assert (a.index, a.name, a.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-a")
    assert (a.memory_total_bytes, a.memory_used_bytes) == (80 * GiB, 20 * GiB)
    assert (a.utilization_percent, a.temperature_c, a.power_w, a.power_limit_w) == (87.0, 61.0, 412.345, 700.0)
    assert (b.index, b.name, b.memory_total_bytes, b.memory_used_bytes) == (1, "NVIDIA L4", 24 * GiB, GiB)
    assert b.uuid.startswith("GPU-") and (b.power_w, b.power_limit_w) == (16.5, 72.0)


def test_not_supported_fields_become_none():
    """A field the driver refuses is None in the report; the other fields and GPUs are unaffected."""
    fake = FakeNvml([FakeGpu(unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
                                          "nvmlDeviceGetTemperature", "nvmlDeviceGetUtilizationRates",
                                          "nvmlDeviceGetComputeRunningProcesses"}), FakeGpu(power_mw=1000)])
    report = Sampler(lambda: [], nvml=fake).sample()
    a, b = report.gpus
    assert (a.power_w, a.power_limit_w, a.temperature_c, a.utilization_percent) == (None, None, None, None)
    assert a.memory_total_bytes == 80 * GiB and b.power_w == 1.0 and report.gpu_status == ""


def test_driverless_fake_reports_status_and_retries_init_only_after_the_interval():
    """nvmlInit failing gives the NVML text; it is tried again only once nvml_retry_s has passed."""
    clock, fake = Clock(), FakeNvml.without_driver(NVML_ERROR_DRIVER_NOT_LOADED)
    sampler = Sampler(lambda: [], nvml=fake, clock=clock, nvml_retry_s=60)
    for _ in range(5):
        report = sampler.sample()
        clock.t += 11.0  # 5 samples span 44 s < 60 s
    assert fake.init_calls == 1
    assert report.gpus == [] and report.gpu_status == "no NVIDIA driver (NVML: Driver Not Loaded)"
    fake.init_error = None  # the driver is loaded now
    fake.gpus.append(FakeGpu())
    clock.t = 1059.9
    assert sampler.sample().gpus == [] and fake.init_calls == 1
    clock.t = 1060.0
    report = sampler.sample()
    assert fake.init_calls == 2 and len(report.gpus) == 1 and report.gpu_status == ""
    sampler.close()
    assert fake.refcount == 0


def test_lost_gpu_is_named_and_nvml_reinitialised_after_the_interval():
    """When no GPU answers, the status says why and NVML is shut down and re-initialised 60 s later."""
    clock, gpu = Clock(), FakeGpu()
    fake = FakeNvml([gpu])
    sampler = Sampler(lambda: [], nvml=fake, clock=clock)
    assert sampler.sample().gpus[0].memory_total_bytes == 80 * GiB
    gpu.errors = {name: NVML_ERROR_GPU_IS_LOST for name in (
        "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit")}
    report = sampler.sample()
    assert report.gpus[0].memory_total_bytes == 0 and report.gpus[0].power_w is None
    assert report.gpu_status.startswith("GPU 0: NVML: GPU is lost"), report.gpu_status
    assert fake.refcount == 0
    clock.t += 30
    assert sampler.sample().gpus == [] and fake.init_calls == 1
    gpu.errors = {}
    clock.t += 30
    assert sampler.sample().gpus[0].memory_total_bytes == 80 * GiB and fake.init_calls == 2


@pytest.mark.parametrize(("code", "text"), [(NVML_ERROR_NO_PERMISSION, "Insufficient Permissions"),
                                            (NVML_ERROR_GPU_IS_LOST, "GPU is lost")], ids=["no-permission", "lost"])
def test_one_gpu_refusing_its_handle_leaves_the_other_three_with_their_own_indices(code, text, caplog):
    """GPU 1 of four refused (DeviceAllow= keeps it from us, or it fell off the bus): 0, 2, 3 stay, named."""
    fake = FakeNvml.machine(80, 24, 48, 40)
    fake.gpus[1].errors = {"nvmlDeviceGetHandleByIndex": code}
    fake.gpus[2].compute_processes = {os.getpid(): GiB}
    note = f"GPU 1 left out (NVML: {text})"
    sampler = Sampler(lambda: [status(os.getpid(), gpus=[2])], nvml=fake)
    probe = GpuProbe(fake)
    with caplog.at_level(logging.WARNING, logger="optimanode.metrics"):
        reports = [sampler.sample() for _ in range(3)]
        probed = [probe() for _ in range(3)]
    for report in reports:
        assert [(g.index, g.uuid, g.memory_total_bytes) for g in report.gpus] == \
            [(i, fake.gpus[i].uuid, fake.gpus[i].memory_total) for i in (0, 2, 3)]
        assert report.gpu_status == note  # on every report, not only the first
        assert [g.models for g in report.gpus] == [[], ["a"], []]  # placed by NVML index, not list position
        assert report.executors[0].vram_bytes == GiB
    for gpus in probed:
        assert [(g.index, g.name, g.memory_free_bytes) for g in gpus] == \
            [(i, fake.gpus[i].name, fake.gpus[i].memory_total) for i in (0, 2, 3)]
    assert probe.status == note
    # Said once in the log by each reader, however many samples and probes.
    warned = [r.getMessage() for r in caplog.records if note in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("metrics: ") and warned[1].startswith("memory admission: ")
    sampler.close()
    probe.close()
    assert fake.refcount == 0


def test_no_gpu_opening_shuts_nvml_down_and_retries_after_the_interval():
    """Every handle refused: nothing usable, so the init is undone and tried again 60 s later."""
    clock, fake = Clock(), FakeNvml.machine(80, 80)
    for gpu in fake.gpus:
        gpu.errors = {"nvmlDeviceGetHandleByIndex": NVML_ERROR_NO_PERMISSION}
    sampler = Sampler(lambda: [], nvml=fake, clock=clock)
    probe = GpuProbe(fake, clock=clock)
    for _ in range(3):
        report = sampler.sample()
        assert report.gpus == [] and probe() == [] and fake.refcount == 0
        assert report.gpu_status == ("GPU 0 left out (NVML: Insufficient Permissions); GPU 1 left out (NVML: "
                                     "Insufficient Permissions); NVML re-init in 60 s"), report.gpu_status
        assert probe.status.startswith("GPU 0 left out (NVML: Insufficient Permissions); GPU 1 left out")
        clock.t += 60
    assert fake.init_calls == 6  # one each per 60 s, each undone
    fake.gpus[0].errors = {}
    assert [g.index for g in sampler.sample().gpus] == [0] and [g.index for g in probe()] == [0]
    sampler.close()
    probe.close()
    assert fake.refcount == 0


def test_gpu_probe_balances_init_and_shutdown_after_a_failed_init():
    """An init that works followed by a failing call is undone before the next try: the refcount stays 0."""
    clock = Clock()
    fake = FakeNvml(FakeNvml.machine(80, 80).gpus, errors={"nvmlDeviceGetCount": NVML_ERROR_GPU_IS_LOST})
    probe = GpuProbe(fake, clock=clock, retry_s=60)
    for _ in range(5):  # five 60 s retries, as the node's admission makes them
        assert probe() == [] and fake.refcount == 0
        clock.t += 60
    assert probe.status == "NVML: GPU is lost"
    assert fake.init_calls == fake.calls["nvmlShutdown"] == 5
    # A name NVML will not give no longer costs the GPU: it is "" and the memory still counts.
    fake.errors = {"nvmlDeviceGetName": NVML_ERROR_GPU_IS_LOST}
    assert [(g.index, g.name, g.memory_total_bytes) for g in probe()] == [(0, "", 80 * GiB), (1, "", 80 * GiB)]
    probe.close()
    assert fake.refcount == 0 and fake.init_calls == fake.calls["nvmlShutdown"] == 6


def test_vram_per_pid_from_the_fake():
    """A pid's VRAM sums over GPUs, counts a pid listed as compute and graphics once, skips unknown sizes."""
    me = os.getpid()
    fake = FakeNvml([
        FakeGpu(compute_processes={me: 3 * GiB, 4242: GiB}),
        FakeGpu(compute_processes={me: 2 * GiB}, graphics_processes={me: 2 * GiB, 4343: None}),
    ])
    statuses = [status(me, id="a"), status(4242, id="b"), status(4343, id="c"), status(4444, id="d"),
                status(None, id="e", state="enabled")]
    by_id = {e.id: e for e in Sampler(lambda: statuses, nvml=fake).sample().executors}
    assert by_id["a"].vram_bytes == 5 * GiB
    assert by_id["b"].vram_bytes == GiB
    assert by_id["c"].vram_bytes is None and by_id["d"].vram_bytes is None and by_id["e"].vram_bytes is None


def test_vram_falls_back_to_v2_listings_on_an_old_driver():
    """An old driver makes the unversioned listings raise NVMLLibraryMismatchError; _v2 is used instead."""
    me = os.getpid()
    fake = FakeNvml([FakeGpu(compute_processes={me: GiB})], old_driver=True)
    report = Sampler(lambda: [status(me)], nvml=fake).sample()
    assert report.executors[0].vram_bytes == GiB and fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 1


def test_tokens_per_s_from_two_samples_with_a_fake_clock():
    """Tokens over elapsed clock time: 0 first, the rate next, 0 again after a pid change or a counter reset."""
    clock, me = Clock(), os.getpid()
    current = [status(me, tokens_generated=100)]
    sampler = Sampler(lambda: current, nvml=FakeNvml(), clock=clock)
    assert sampler.sample().executors[0].tokens_per_s == 0.0
    clock.t += 2.0
    current[0] = status(me, tokens_generated=150)
    assert sampler.sample().executors[0].tokens_per_s == 25.0
    clock.t += 1.0
    current[0] = status(me + 1_000_000, tokens_generated=170)  # a new worker (pid) after a restart
    assert sampler.sample().executors[0].tokens_per_s == 0.0
    clock.t += 1.0
    current[0] = status(me + 1_000_000, tokens_generated=0)
    assert sampler.sample().executors[0].tokens_per_s == 0.0
    clock.t += 0.5
    current[0] = status(me + 1_000_000, tokens_generated=10)
    assert sampler.sample().executors[0].tokens_per_s == 20.0


def test_free_slots_and_capacity_fields():
    """free_slots = max(0, parallel - in_flight) when running, 0 in any other state; the rest is copied."""
    statuses = [
        status(None, id="a", parallel=4, in_flight=1, queue_depth=0, queue_size=8),
        status(None, id="b", parallel=2, in_flight=2, queue_depth=3, queue_size=8, requests_served=7, restarts=2),
        status(None, id="c", parallel=2, in_flight=5),
        status(None, id="d", state="starting", parallel=4),
        status(None, id="e", state="crashed", parallel=4),
    ]
    by_id = {e.id: e for e in Sampler(lambda: statuses, nvml=FakeNvml()).sample().executors}
    assert [by_id[i].free_slots for i in "abcde"] == [3, 0, 0, 0, 0]
    b = by_id["b"]
    assert (b.state, b.parallel, b.in_flight, b.queue_depth, b.queue_size, b.requests_served, b.restarts) == \
        ("running", 2, 2, 3, 8, 7, 2)


def test_fake_nvml_matches_pynvml_names_and_shapes():
    """Every nvml* function of the fake exists in pynvml, and its structs carry the real structs' fields."""
    fake_functions = [n for n in vars(FakeNvml) if n.startswith("nvml")]
    assert fake_functions and all(hasattr(pynvml, n) for n in fake_functions)
    fake = FakeNvml([FakeGpu(compute_processes={1: None})])
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)

    def fields(obj: object) -> set[str]:
        return {f.name for f in dataclasses.fields(obj)}

    assert fields(fake.nvmlDeviceGetMemoryInfo(h)) == {f[0] for f in pynvml.c_nvmlMemory_t._fields_}
    assert fields(fake.nvmlDeviceGetUtilizationRates(h)) == {f[0] for f in pynvml.c_nvmlUtilization_t._fields_}
    assert fields(fake.nvmlDeviceGetComputeRunningProcesses(h)[0]) == \
        {f[0] for f in pynvml.c_nvmlProcessInfo_v3_t._fields_}
    gpu = FakeGpu(unsupported={"nvmlDeviceGetPowerUsage"})
    other = FakeNvml([gpu])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        other.nvmlDeviceGetCount()  # before nvmlInit, as with the real library
    other.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported) as refused:
        other.nvmlDeviceGetPowerUsage(gpu)
    assert str(refused.value) == "Not Supported"
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
