"""VRAM-aware admission and placement in a running node, with the NVML fake standing in for the GPUs.

The worker is the real one on SmolLM2; this machine's llama.cpp is a CPU build, so the offloaded
layers really run on the CPU, but admission, placement and the worker's pinning
(CUDA_VISIBLE_DEVICES) are the node's own and are what is checked here.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from optimanode.errors import BadRequest
from optimanode.node import Node
from optimanode.protocol import ModelSettings
from optimanode.testing import GiB, FakeNvml
from system.test_node import make_settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def two_models(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("a", "b"):
        (d / f"{name}.gguf").symlink_to(smollm2_path)
    return d


async def test_a_model_too_big_for_the_gpu_waits_naming_it_then_starts_pinned_when_memory_frees(tmp_path, two_models):
    fake = FakeNvml.machine(24, 1, used_gib=(23.9, 0))  # GPU 0: 0.1 GiB free, GPU 1: 1 GiB
    settings = make_settings(tmp_path, **{"model_defaults.n_gpu_layers": "-1", "model_defaults.parallel": "1",
                                          "vram_reserve_mb": "0"})
    async with Node(settings, nvml=fake) as node:
        a, b = sorted(node.executors)
        await node.configure(a, ModelSettings(gpus=[0]))
        await node.enable(a)
        await node.wait_for_state(a, {"waiting"}, timeout=30)
        st = node.status(a)
        assert st.reason.startswith("not enough memory on GPU 0 (NVIDIA Fake 24GB): needs about"), st.reason
        assert "MiB short" in st.reason and st.pid is None
        # The other GPU has room: model b, on "auto", goes there.
        await node.enable(b)
        await node.wait_for_state(b, {"running"}, timeout=120)
        sb = node.status(b)
        assert sb.gpus == [1] and sb.vram_estimate_bytes[1] > 0
        env = psutil.Process(sb.pid).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == fake.gpus[1].uuid and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        # GPU 0 frees up (another process ended): a starts, pinned to it.
        fake.gpus[0].memory_used = 0
        node._p.runtime.wake()
        await node.wait_for_state(a, {"running"}, timeout=120)
        sa = node.status(a)
        assert sa.gpus == [0] and psutil.Process(sa.pid).environ()["CUDA_VISIBLE_DEVICES"] == fake.gpus[0].uuid


async def test_a_cpu_only_model_on_a_gpu_machine_sees_no_gpu_and_is_counted_in_ram(tmp_path, two_models):
    fake = FakeNvml.machine(80)
    async with Node(make_settings(tmp_path, **{"model_defaults.parallel": "1"}), nvml=fake) as node:
        a, _ = sorted(node.executors)
        await node.enable(a)
        await node.wait_for_state(a, {"running"}, timeout=120)
        st = node.status(a)
        assert st.gpus == [] and st.vram_estimate_bytes == {} and st.memory_estimate_bytes > 90 * 2**20
        assert psutil.Process(st.pid).environ()["CUDA_VISIBLE_DEVICES"] == ""
        # A combination llama.cpp would refuse is refused at the configure, naming the field.
        with pytest.raises(BadRequest, match=r"settings\.kv_cache_type: expected f16 when flash_attn is off"):
            await node.configure(a, ModelSettings(kv_cache_type="q8_0", flash_attn="off"))
        assert node.status(a).settings == ModelSettings()


async def test_parallel_auto_resolves_to_the_slots_that_fit_and_gives_each_the_window(tmp_path, two_models):
    # Room on the (fake) GPU for 2 slots of 2048 tokens but not 3: the worker runs 2, n_ctx 4096.
    settings = make_settings(tmp_path, **{"model_defaults.n_gpu_layers": "-1", "model_defaults.n_ctx": "2048",
                                          "model_defaults.parallel": "auto",
                                          "vram_reserve_mb": "0"})
    async with Node(settings, nvml=FakeNvml.machine(1)) as node:
        a, _ = sorted(node.executors)
        opts = dict(node._p.runtime.options(node.executors[a]))
        vram = {n: e.gpu_weights + e.gpu_kv + e.gpu_compute + e.gpu_logits for n, e in opts.items()}
        assert vram[1] < vram[2] < vram[3] < vram[4]
        node.gpu_probe._nvml.gpus[0].memory_total = (vram[2] + vram[3]) // 2
        await node.enable(a)
        await node.wait_for_state(a, {"running"}, timeout=120)
        st = node.status(a)
        assert (st.parallel, st.effective.parallel, st.effective.n_ctx) == (2, 2, 4096)
        assert st.vram_estimate_bytes[0] == vram[2] and GiB > vram[2]


# -- on-demand models -------------------------------------------------------------------------------


@pytest.fixture
def three_models(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("a", "b", "c"):
        (d / f"{name}.gguf").symlink_to(smollm2_path)
    return d


async def test_three_on_demand_models_in_memory_for_two_serve_a_round_robin_evicting_lru(tmp_path, three_models):
    import msgspec

    from optimanode.protocol import CompletionRequest, Done, SamplingParams
    from system.test_node import collect

    settings = make_settings(tmp_path, **{"model_defaults.enable": "on_demand", "model_defaults.keep_alive_s": "3600"})
    async with Node(settings) as node:
        a, b, c = sorted(node.executors)
        for eid in (a, b, c):
            await node.enable(eid)
        one = node.status(a).memory_estimate_bytes
        # Room for two of them, not three.
        node.apply_settings(msgspec.structs.replace(settings, memory_budget_mb=int(2.5 * one) // 2**20))
        await node.reconcile_once()
        assert {node.status(e).state for e in (a, b, c)} == {"enabled"}  # nothing loaded without a request
        order = [a, b, c, a, b, c]
        for eid in order:
            _, done = await collect(node.infer(eid, CompletionRequest(
                prompt="Hello", params=SamplingParams(temperature=0.0, max_tokens=4))))
            assert isinstance(done, Done) and done.usage.completion_tokens == 4
            assert node.status(eid).loaded and node.status(eid).last_used > 0
            assert sum(node.status(e).state in ("running", "starting") for e in (a, b, c)) <= 2
        # a, b loaded; c evicted a (least recently used), a evicted b, b evicted c, c evicted a.
        assert [node.status(e).evictions for e in (a, b, c)] == [2, 1, 1]
        reasons = [ev.body.reason for e in (a, b, c) for ev in await node.events(e, limit=200)
                   if ev.type == "transition" and ev.body.trigger == "stop"]
        assert len(reasons) == 4 and all(r.startswith("evicted: the least recently used idle on-demand") for r in reasons)
        # Idle unload: keep_alive_s 1 s (not a worker setting: nothing restarts), both loaded ones go.
        for eid in (b, c):
            await node.configure(eid, ModelSettings(keep_alive_s=1))
        for eid in (b, c):
            assert await node.wait_for_state(eid, {"enabled"}, timeout=60) == "enabled"
        idle = [ev.body.reason for ev in await node.events(c, limit=200)
                if ev.type == "transition" and ev.body.trigger == "stop"][-1]
        assert idle.startswith("idle for ") and idle.endswith("(keep_alive_s 1)")
        assert not node.status(c).loaded


async def test_a_request_for_an_on_demand_model_that_cannot_fit_ends_model_not_running_with_the_reason(
        tmp_path, three_models):
    from optimanode.errors import ModelNotRunning
    from optimanode.protocol import CompletionRequest
    from system.test_node import collect

    settings = make_settings(tmp_path, **{"model_defaults.enable": "on_demand", "memory_budget_mb": "1"})
    async with Node(settings) as node:
        a = sorted(node.executors)[0]
        await node.enable(a)
        with pytest.raises(ModelNotRunning, match=r"not enough memory in RAM: needs about \d+ MiB"):
            await collect(node.infer(a, CompletionRequest(prompt="Hello")))
        assert node.status(a).state == "waiting" and node.status(a).pid is None
        # Asked again while it waits: refused at once with the same reason, not left to hang.
        with pytest.raises(ModelNotRunning, match=r"is waiting: not enough memory in RAM"):
            await collect(node.infer(a, CompletionRequest(prompt="Hello")))
