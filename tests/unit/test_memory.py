"""The memory estimate, GPU placement and VRAM-aware admission, on the NVML fake with 1, 2 and 8 GPUs."""

from __future__ import annotations

import pytest

from optimanode.config import ModelDefaults, Restart
from optimanode.executors.effective import conflict, effective, gpu_wish
from optimanode.executors.memory import (
    MIB,
    GpuMemory,
    GpuWish,
    Placement,
    Shortfall,
    estimate,
    kv_cells,
    place,
)
from optimanode.executors.reconciler import Facts, decide
from optimanode.metrics import GpuProbe
from optimanode.protocol import ModelInfo, ModelSettings, WorkerSettings
from optimanode.testing import GiB, FakeNvml

POLICY = Restart()

# A 7B-like model: 32 layers of 200 MiB, 500 MiB of embedding/output/norms (output head 250 MiB,
# untied), 8 KV heads of 128 + 128, vocabulary 32000.
BIG = ModelInfo(path="/m/big.gguf", files=["/m/big.gguf"], size_bytes=32 * 200 * MIB + 500 * MIB, mtime_ns=1,
                block_count=32, embedding_length=4096, head_count=32, head_count_kv=8,
                layer_bytes=[200 * MIB] * 32, other_bytes=500 * MIB, n_vocab=32000, output_bytes=250 * MIB)


def ws(**kw) -> WorkerSettings:
    return WorkerSettings(**{"model_path": "/m/big.gguf", "n_ctx": 4096, "n_batch": 512, **kw})


def probe(fake: FakeNvml) -> list[GpuMemory]:
    """What admission sees of the fake machine (through the same GpuProbe the node uses)."""
    return [GpuMemory(index=g.index, name=g.name, total_bytes=g.memory_total_bytes,
                      free_bytes=g.memory_free_bytes or 0, uuid=g.uuid) for g in GpuProbe(fake)()]


def free_of(gpus: list[GpuMemory]) -> dict[int, int]:
    return {g.index: g.free_bytes for g in gpus}


# -- the estimate ---------------------------------------------------------------------------------


def test_cpu_only_estimate_adds_weights_kv_compute_output() -> None:
    e = estimate(BIG, ws())
    assert e.gpu_layers == 0 and e.gpu_weights == e.gpu_kv == e.gpu_compute == e.gpu_logits == 0
    assert e.cpu_weights == 32 * 200 * MIB + 500 * MIB
    # 32 layers × 8 heads × (128 + 128) × 4096 cells × 2 bytes = 512 MiB
    assert e.cpu_kv == 512 * MIB
    logits = 32000 * 512 * 4
    assert e.cpu_compute > logits and e.output == 32000 * 4
    assert e.ram_bytes == e.total_bytes == e.cpu_weights + e.cpu_kv + e.cpu_compute + e.output


def test_kv_cache_type_and_flash_attention_change_the_estimate() -> None:
    f16, q8, q4 = (estimate(BIG, ws(kv_cache_type=t)).cpu_kv for t in ("f16", "q8_0", "q4_0"))
    assert (q8 / f16, q4 / f16) == (pytest.approx(34 / 64), pytest.approx(18 / 64))
    on, off = estimate(BIG, ws(flash_attn="on")), estimate(BIG, ws(flash_attn="off"))
    # Without flash attention the scores (32 heads × 512 tokens × 4096 cells, f32) are materialised,
    # and a layer's peak passes the output head's.
    scores = 32 * 512 * 4096 * 4
    assert off.cpu_compute > scores > on.cpu_compute >= 32000 * 512 * 4


def test_cells_are_padded_per_sequence_like_llama_cpp() -> None:
    assert kv_cells(ws(n_ctx=1000, parallel=1)) == 1024
    assert kv_cells(ws(n_ctx=1000, parallel=4)) == 4 * 256
    assert kv_cells(ws(n_ctx=4096, parallel=3)) == 3 * 1536


def test_partial_offload_moves_the_last_layers_and_their_kv() -> None:
    e = estimate(BIG, ws(n_gpu_layers=8))
    assert e.gpu_layers == 8 and e.gpu_weights == 8 * 200 * MIB and e.gpu_kv == 8 * 16 * MIB
    assert e.cpu_weights == 24 * 200 * MIB + 500 * MIB and e.cpu_kv == 24 * 16 * MIB
    assert e.gpu_logits == 0  # the output head stays on the CPU until every layer is offloaded
    full = estimate(BIG, ws(n_gpu_layers=-1))
    assert full.gpu_weights == 32 * 200 * MIB + 250 * MIB and full.cpu_weights == 250 * MIB
    # The GPU holding the head reserves its peak (the logits), the CPU only a staging buffer.
    assert full.gpu_compute + full.gpu_logits > 32000 * 512 * 4 > full.cpu_compute and full.cpu_kv == 0
    assert estimate(BIG, ws(n_gpu_layers=33)) == full
    # Without an NVIDIA GPU (or in a CPU build) llama.cpp ignores n_gpu_layers: all in RAM.
    assert estimate(BIG, ws(n_gpu_layers=-1), gpus_available=False) == estimate(BIG, ws())


def test_a_record_without_per_layer_figures_spreads_the_file_size() -> None:
    old = ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=3200 * MIB, mtime_ns=1, block_count=32,
                    embedding_length=4096, head_count=32, head_count_kv=8)
    e = estimate(old, ws(n_gpu_layers=16))
    assert e.gpu_weights == 1600 * MIB and e.cpu_weights == 1600 * MIB


# -- placement ------------------------------------------------------------------------------------


def test_one_gpu_fits_or_names_the_device_and_the_shortfall() -> None:
    e = estimate(BIG, ws(n_gpu_layers=-1))
    need = e.gpu_weights + e.gpu_kv + e.gpu_compute + e.gpu_logits
    gpus = probe(FakeNvml.machine(24))
    placed = place(e, gpus, GpuWish(), free_of(gpus))
    assert isinstance(placed, Placement) and placed.gpus == (0,) and placed.vram == {0: need}
    small = probe(FakeNvml.machine(6))
    refused = place(e, small, GpuWish(), free_of(small))
    assert isinstance(refused, Shortfall)
    assert refused.device == "GPU 0 (NVIDIA Fake 6GB)" and refused.need == need and refused.have == 6 * GiB
    assert "GPU 0 (NVIDIA Fake 6GB)" in refused.reason and f"{-(-(need - 6 * GiB) // MIB)} MiB short" in refused.reason


def test_two_gpus_auto_takes_the_one_with_most_free_memory_then_splits() -> None:
    e = estimate(BIG, ws(n_gpu_layers=-1))
    gpus = probe(FakeNvml.machine(24, 48, used_gib=(0, 30)))  # free: 24 and 18 GiB
    placed = place(e, gpus, GpuWish(), free_of(gpus))
    assert isinstance(placed, Placement) and placed.gpus == (0,)
    # Neither holds it alone (free 5 and 6 GiB): split over both, by free memory as llama.cpp does.
    gpus = probe(FakeNvml.machine(10, 12, used_gib=(5, 6)))
    placed = place(e, gpus, GpuWish(), free_of(gpus))
    assert isinstance(placed, Placement) and placed.gpus == (1, 0)
    assert placed.vram[1] > placed.vram[0] and sum(placed.vram.values()) > e.gpu_weights + e.gpu_kv
    # split_mode none: one GPU or none.
    refused = place(e, gpus, GpuWish(split_mode="none"), free_of(gpus))
    assert isinstance(refused, Shortfall) and refused.device.startswith("GPU 1")


def test_listed_gpus_and_tensor_split_are_taken_as_given() -> None:
    e = estimate(BIG, ws(n_gpu_layers=-1))
    gpus = probe(FakeNvml.machine(24, 24))
    placed = place(e, gpus, GpuWish(gpus=(1, 0), tensor_split=(3, 1)), free_of(gpus))
    assert isinstance(placed, Placement) and placed.gpus == (1, 0)
    part = e.gpu_weights + e.gpu_kv
    assert placed.vram[1] == int(part * 3 / 4) + e.gpu_compute
    assert placed.vram[0] == int(part / 4) + e.gpu_compute + e.gpu_logits
    missing = place(e, gpus, GpuWish(gpus=(2,)), free_of(gpus))
    assert isinstance(missing, Shortfall) and missing.reason == "no GPU 2: this machine has 2 usable NVIDIA GPU(s): 0, 1"


def test_eight_gpus_of_different_sizes() -> None:
    sizes = (16, 24, 80, 40, 48, 24, 80, 12)
    gpus = probe(FakeNvml.machine(*sizes, used_gib=(0, 0, 70, 0, 2, 0, 1, 0)))  # the 80s: 10 and 79 free
    e = estimate(BIG, ws(n_gpu_layers=-1))
    placed = place(e, gpus, GpuWish(), free_of(gpus))
    assert isinstance(placed, Placement) and placed.gpus == (6,)
    # A model too big for any one GPU goes on the fewest GPUs with the most free memory.
    huge = ModelInfo(path="/m/h.gguf", files=["/m/h.gguf"], size_bytes=0, mtime_ns=1, block_count=80,
                     embedding_length=8192, head_count=64, head_count_kv=8, layer_bytes=[1700 * MIB] * 80,
                     other_bytes=2 * GiB, n_vocab=128000, output_bytes=GiB)
    e = estimate(huge, ws(n_gpu_layers=-1, model_path="/m/h.gguf"))
    placed = place(e, gpus, GpuWish(), free_of(gpus))
    assert isinstance(placed, Placement) and placed.gpus == (6, 4, 3)
    for i in placed.gpus:
        assert placed.vram[i] <= gpus[i].free_bytes


# -- admission (the reconciler) -------------------------------------------------------------------


def opts(info: ModelInfo, settings: ModelSettings, defaults: ModelDefaults = ModelDefaults()):
    counts = (4, 3, 2, 1) if (settings.parallel or defaults.parallel) == "auto" else (settings.parallel,)
    return tuple((n, estimate(info, effective(info, settings, defaults, "", auto_parallel=n))) for n in counts)


def test_a_model_too_big_for_the_gpu_waits_with_a_reason_naming_it() -> None:
    settings = ModelSettings(n_gpu_layers=-1, parallel=1)
    f = Facts(state="enabled", enabled=True, options=opts(BIG, settings), wish=gpu_wish(settings, ModelDefaults()))
    gpus = probe(FakeNvml.machine(6))
    d = decide({"a": f}, 0, 64 * GiB, POLICY, gpus=gpus)
    assert [(a.trigger, a.reason.split(":")[0]) for a in d.actions] == \
        [("hold", "not enough memory on GPU 0 (NVIDIA Fake 6GB)")]
    # With a bigger card it starts, placed, and the start says where.
    gpus = probe(FakeNvml.machine(6, 16))
    (a,) = decide({"a": f}, 0, 64 * GiB, POLICY, gpus=gpus).actions
    assert a.trigger == "start" and a.placement.gpus == (1,) and a.estimate is not None


def test_ram_shortfall_is_named_too() -> None:
    settings = ModelSettings(parallel=1)
    f = Facts(state="enabled", enabled=True, options=opts(BIG, settings))
    (a,) = decide({"a": f}, 0, 4 * GiB, POLICY, reserve_bytes=GiB).actions
    assert a.trigger == "hold" and a.reason.startswith("not enough memory in RAM: needs about")
    assert "3072 MiB available" in a.reason


def test_loading_models_hold_their_vram_until_they_allocate() -> None:
    settings = ModelSettings(n_gpu_layers=-1, parallel=1)
    o = opts(BIG, settings)
    need = estimate(BIG, effective(BIG, settings, ModelDefaults(), "")).gpu_weights
    gpus = probe(FakeNvml.machine(24))
    loading = Facts(state="starting", enabled=True, placed={0: 20 * GiB})
    d = decide({"a": loading, "b": Facts(state="enabled", enabled=True, options=o)}, 0, 64 * GiB, POLICY, gpus=gpus)
    assert [a.trigger for a in d.actions] == ["hold"] and need > 4 * GiB
    # Two admitted in one decision: the second sees what the first took.
    two = {"a": Facts(state="enabled", enabled=True, options=o), "b": Facts(state="enabled", enabled=True, options=o)}
    d = decide(two, 0, 64 * GiB, POLICY, gpus=probe(FakeNvml.machine(12, 12)))
    assert [(a.trigger, a.placement.gpus) for a in d.actions] == [("start", (0,)), ("start", (1,))]
    d = decide(two, 0, 64 * GiB, POLICY, gpus=probe(FakeNvml.machine(12)), vram_reserve_bytes=GiB)
    assert [a.trigger for a in d.actions] == ["start", "hold"]


def test_parallel_auto_takes_the_most_slots_that_fit() -> None:
    settings = ModelSettings(n_gpu_layers=-1)  # parallel: the default, "auto"
    o = opts(BIG, settings)
    assert [n for n, _ in o] == [4, 3, 2, 1]
    vram = {n: e.gpu_weights + e.gpu_kv + e.gpu_compute + e.gpu_logits for n, e in o}
    # A GPU with room for 2 slots of the whole window, not 3.
    size = (vram[2] + vram[3]) / 2 / GiB
    (a,) = decide({"a": Facts(state="enabled", enabled=True, options=o)}, 0, 64 * GiB, POLICY,
                  gpus=probe(FakeNvml.machine(size))).actions
    assert (a.trigger, a.parallel) == ("start", 2)
    (a,) = decide({"a": Facts(state="enabled", enabled=True, options=o)}, 0, 64 * GiB, POLICY,
                  gpus=probe(FakeNvml.machine(1))).actions
    assert a.trigger == "hold" and "with parallel 1" in a.reason


def test_auto_parallel_gives_each_slot_the_whole_window() -> None:
    w = effective(BIG, ModelSettings(n_ctx=2048), ModelDefaults(), "", auto_parallel=3)
    assert (w.parallel, w.n_ctx) == (3, 6144)
    w = effective(BIG, ModelSettings(n_ctx=2048, parallel=2), ModelDefaults(), "", auto_parallel=3)
    assert (w.parallel, w.n_ctx) == (2, 2048)


def test_settings_llama_cpp_refuses_are_named() -> None:
    d = ModelDefaults()
    assert conflict(ModelSettings(kv_cache_type="q8_0", flash_attn="off"), d)[0] == "kv_cache_type"
    assert conflict(ModelSettings(kv_cache_type="q8_0", flash_attn="auto"), d) is None
    assert conflict(ModelSettings(gpus=[0, 0]), d)[0] == "gpus"
    assert conflict(ModelSettings(gpus=[0, 1], tensor_split=[1.0]), d)[0] == "tensor_split"
    assert conflict(ModelSettings(gpus=[3], main_gpu=1), d)[0] == "main_gpu"
    assert conflict(ModelSettings(gpus=[3, 1], tensor_split=[1.0, 2.0], main_gpu=1), d) is None


def test_the_probe_reports_free_memory_and_survives_a_machine_without_nvml() -> None:
    fake = FakeNvml.machine(24, 80, used_gib=(4, 0))
    (a, b) = GpuProbe(fake)()
    assert (a.memory_free_bytes, b.memory_free_bytes) == (20 * GiB, 80 * GiB)
    assert a.uuid != b.uuid and a.name == "NVIDIA Fake 24GB"
    none = GpuProbe(FakeNvml.without_driver())
    assert none() == [] and "no NVIDIA driver" in none.status
