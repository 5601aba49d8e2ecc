"""The memory estimate against what llama.cpp reports allocating on the CPU, and the KV cache / flash attention settings in a real worker.

The estimate (optimanode/executors/memory.py) is computed from the GGUF header the registry reads
and the worker's settings; llama.cpp's own figures are its log lines while the worker's Engine
loads ("model buffer size", "KV buffer size", "compute buffer size", "output buffer size").
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optimanode import protocol as p
from optimanode.executors.memory import MIB, estimate
from optimanode.executors.registry import Registry

pytestmark = pytest.mark.timeout(600)

_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([0-9.]+) MiB")


@pytest.fixture
def llama_log() -> Iterator[list[str]]:
    """Every line llama.cpp logs while the test runs."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    from optimanode.worker.engine import route_llama_log

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        route_llama_log()  # the worker's own (errors only), so no callback of ours outlives the test


def _info(path: Path) -> p.ModelInfo:
    (info,) = Registry(path.parent).scan().models.values() if len(list(path.parent.glob("*.gguf"))) == 1 else [
        i for i in Registry(path.parent).scan().models.values() if i.path == str(path)]
    return info


def _reported(lines: list[str]) -> dict[str, float]:
    """MiB by kind (model, KV, compute, output), summed over devices and buffer types."""
    out: dict[str, float] = {"model": 0.0, "KV": 0.0, "compute": 0.0, "output": 0.0}
    for m in _BUFFER.finditer("".join(lines)):
        out[m.group(2)] += float(m.group(3))
    return out


CASES = [
    ("smollm2", dict(n_ctx=2048, parallel=1)),
    ("smollm2", dict(n_ctx=4096, parallel=4, kv_cache_type="q8_0")),
    ("smollm2", dict(n_ctx=2048, parallel=2, flash_attn="off", n_batch=256)),
    ("gemma3", dict(n_ctx=2048, parallel=1)),
    ("gemma3", dict(n_ctx=4096, parallel=2, kv_cache_type="q4_0")),
]


@pytest.mark.parametrize(("model", "settings"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_the_estimate_is_within_10_percent_of_what_llama_cpp_allocates(
        model: str, settings: dict[str, Any], request: pytest.FixtureRequest, llama_log: list[str]) -> None:
    from optimanode.worker.engine import Engine

    path: Path = request.getfixturevalue(f"{model}_path")
    info = _info(path)
    ws = p.WorkerSettings(model_path=str(path), n_threads=2, **settings)
    est = estimate(info, ws)
    engine = Engine(ws, lambda msgs: None)
    engine.close()
    got = _reported(llama_log)
    assert got["model"] and got["KV"] and got["compute"], got
    mine = {"model": est.cpu_weights / MIB, "KV": est.cpu_kv / MIB, "compute": est.cpu_compute / MIB,
            "output": est.output / MIB}
    total_got, total_mine = sum(got.values()), sum(mine.values())
    print(f"{model} {settings}: llama.cpp {got} = {total_got:.1f} MiB; estimate "
          f"{ {k: round(v, 2) for k, v in mine.items()} } = {total_mine:.1f} MiB ({total_mine / total_got - 1:+.1%})")
    assert total_mine == pytest.approx(total_got, rel=0.10)
    for kind in ("model", "KV", "compute"):
        assert mine[kind] == pytest.approx(got[kind], rel=0.10), kind


# -- the KV cache type and flash attention, in a real worker --------------------------------------


@pytest.mark.parametrize("settings", [dict(kv_cache_type="q8_0"), dict(kv_cache_type="q4_0", flash_attn="on"),
                                      dict(flash_attn="on"), dict(flash_attn="off")],
                         ids=["q8_0", "q4_0-fa-on", "fa-on", "fa-off"])
def test_kv_cache_types_and_flash_attention_load_and_generate(smollm2_path: Path, settings: dict[str, Any]) -> None:
    from model.test_worker import GREEDY, Worker, completion, text_of

    w = Worker()
    try:
        w.start(smollm2_path, **settings)
        chunks, done = w.generate(completion("The capital of France is", max_tokens=12, temperature=0.0))
        assert isinstance(done, p.Done), done
        assert done.usage.completion_tokens == 12 and text_of(chunks).strip()
    finally:
        w.kill()
    assert GREEDY.temperature == 0.0


def test_a_quantized_v_cache_without_flash_attention_fails_the_load_with_llama_cpps_reason(smollm2_path: Path) -> None:
    """The node refuses this combination before a worker starts (effective.conflict); a worker
    handed it anyway exits with llama.cpp's own words as its last line (the crash reason), not a signal."""
    from model.test_worker import Worker

    w = Worker()
    try:
        w.send(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=2, kv_cache_type="q8_0",
                                flash_attn="off"))
        assert w.wait(timeout=120) > 0
        assert "quantized V cache requires flash_attn" in w.stderr[-1], w.stderr[-3:]
    finally:
        w.kill()
