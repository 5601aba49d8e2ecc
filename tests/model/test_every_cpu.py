"""Every CPU serves (issue 11), in process: the warm-up hands llama_decode full micro-batches; safe mode loads plainly.

The process side (a warm-up SIGSEGV through the supervisor, safe mode in the node) is in
tests/system/test_every_cpu.py.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from optimanode import protocol as p
from optimanode.protocol import CompletionRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------
# The warm-up, in process: what llama_decode is really handed before Ready


def _engine_batches(model: Path, monkeypatch: Any, **settings: Any) -> tuple[Any, list[tuple[int, set[int]]]]:
    """An Engine built with a llama_decode that records each batch: (tokens, sequence ids)."""
    import llama_cpp

    from optimanode.worker.engine import Engine

    seen: list[tuple[int, set[int]]] = []
    real = llama_cpp.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        seen.append((batch.n_tokens, {batch.seq_id[i][0] for i in range(batch.n_tokens)}))
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    engine = Engine(p.WorkerSettings(model_path=str(model), n_threads=2, **settings), lambda msgs: None)
    monkeypatch.setattr(llama_cpp, "llama_decode", real)
    return engine, seen


def test_the_warm_up_decodes_a_full_micro_batch_then_single_tokens(smollm2_path: Path, monkeypatch: Any) -> None:
    engine, seen = _engine_batches(smollm2_path, monkeypatch, n_ctx=1024, n_batch=256, parallel=1)
    try:
        assert seen[0] == (256, {0})  # n_batch (= n_ubatch) tokens in one decode
        singles = [b for b in seen[1:] if b[0] == 1]
        assert len(singles) >= 4, seen  # generation: the one-row kernels
        assert engine.warmup == (256, 4, 1)
        assert engine.prompt_tokens_evaluated == 0  # the warm-up is not a request
    finally:
        engine.close()


def test_the_warm_up_caps_its_batch_at_512_and_steps_two_sequences_at_once(smollm2_path: Path,
                                                                             monkeypatch: Any) -> None:
    # n_batch 2048 > 512: the batch is 512; per-slot windows of 768 cells hold it in one sequence.
    engine, seen = _engine_batches(smollm2_path, monkeypatch, n_ctx=1536, n_batch=2048, parallel=2)
    try:
        assert max(n for n, _ in seen) == 512
        assert (2, {0, 1}) in seen, seen  # one step of two sequences, one token each
        assert engine.warmup == (512, 4, 2)
    finally:
        engine.close()


def test_a_micro_batch_wider_than_one_slot_is_spread_over_several(smollm2_path: Path, monkeypatch: Any) -> None:
    # parallel 4 with n_ctx 1024: each slot holds 256 cells, n_batch is 512: the warm-up batch of
    # 512 tokens spans sequences 0, 1 and 2, as "together" prefill of three prompts would.
    engine, seen = _engine_batches(smollm2_path, monkeypatch, n_ctx=1024, n_batch=512, parallel=4)
    try:
        assert engine.window == 256
        n, seqs = seen[0]
        assert n == 512 and seqs == {0, 1, 2}, seen[0]
    finally:
        engine.close()


def test_safe_mode_loads_without_extra_buffer_types_or_threadpool(smollm2_path: Path, monkeypatch: Any) -> None:
    import llama_cpp

    from optimanode.worker.engine import Engine
    from optimanode.worker.jobs import _Job, _Jobs

    real = llama_cpp.llama_model_load_from_file
    asked: list[bool] = []

    def loading(path: bytes, params: Any) -> Any:
        asked.append(params.use_extra_bufts)
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", loading)
    outputs = {}
    for safe in (False, True):
        sent: queue.Queue[Any] = queue.Queue()
        engine = Engine(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=2, safe_mode=safe),
                        lambda msgs: [sent.put(m) for m in msgs])
        try:
            assert engine.threadpool is not None and (engine.threadpool.handle is None) == safe
            jobs = _Jobs()
            loop = threading.Thread(target=engine.serve, args=(jobs,), daemon=True)
            loop.start()
            assert jobs.add(_Job(id="s", request=CompletionRequest(prompt="The capital of France is",
                                                                  params=GREEDY)))
            text = ""
            while not isinstance(msg := sent.get(timeout=120), p.Done | p.Failed):
                text += msg.text
            assert isinstance(msg, p.Done) and msg.usage.completion_tokens > 0, msg
            outputs[safe] = text
            jobs.close()
            loop.join(30)
        finally:
            engine.close()
    assert asked == [True, False]
    assert outputs[True].strip()  # the plain kernels serve too
