"""Embed requests in the worker, checked against llama-cpp-python's own ``Llama.embed`` on real models.

The reference is ``Llama(embedding=True, pooling_type=MEAN, flash_attn=True)``: the pooling the
worker uses for these decoder-only models (they declare none: ModelInfo.pooling "mean") and the
attention kernel llama.cpp picks by default on this CPU (the worker leaves ``flash_attn_type`` at
auto, as llama-server does; llama-cpp-python's Llama turns it off unless asked). With flash
attention off the reference differs from itself on: cosine 0.9995 was seen for one input.

Batching is not bitwise: a sequence packed beside others is computed in a bigger matrix product
(other block splits, other summation order), so the tests hold every vector to cosine > 0.999 of
the reference, whichever way it was batched, and read the worker's trace to show that inputs of
several requests did share one decode.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import msgspec
import numpy as np
import pytest
from model.test_worker import Worker, completion, eventually

from optimanode import protocol as p
from optimanode.executors import gguf

pytestmark = pytest.mark.timeout(600)

N_CTX = 1024
N_BATCH = 512  # the worker's default: the per-input limit of an embed request
INPUTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, 東京, 🚀 and a tab\there",
    "Embeddings map texts to vectors, so that similar texts land close together. " * 6,
    "In the beginning the node served completions only; then came chats, and now vectors. " * 22,
]
DECODE = re.compile(r"embedding decode: (\d+) inputs, (\d+) tokens, requests (\S+)")


def cosines(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def reference(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                           flash_attn=True, n_ctx=N_BATCH, n_batch=N_BATCH, n_threads=1, verbose=False)


def start(path: Path) -> Worker:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTIMANODE_WORKER_TRACE", "1")  # a stderr line per embedding decode
        w = Worker()
    w.send(p.WorkerSettings(model_path=str(path), n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1, parallel=2))
    ready = w.recv(timeout=120)
    assert isinstance(ready, p.Ready), ready
    return w


@pytest.fixture(scope="module")
def started(smollm2_path: Path) -> Iterator[Worker]:
    w = start(smollm2_path)
    try:
        yield w
        w.send(p.Shutdown())
        assert w.wait(timeout=20) == 0
    finally:
        w.kill()


@pytest.fixture
def worker(started: Worker) -> Worker:
    assert started.proc.poll() is None, f"the module's worker died; stderr: {started.stderr[-5:]}"
    return started


@pytest.fixture(scope="module")
def ref(smollm2_path: Path) -> llama_cpp.Llama:
    return reference(smollm2_path)


def embed(w: Worker, inputs: list[str], id: str = "e1", **kw: Any) -> Any:
    chunks, final = w.generate(p.EmbedRequest(input=inputs, **kw), id=id)
    assert chunks == []  # an embed request streams nothing
    return final


def collect(w: Worker, ids: list[str], timeout: float = 300) -> dict[str, Any]:
    """The final message of every id (embed requests send nothing else)."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(ids):
        msg = w.recv(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.id in ids and msg.id not in out, msg
        out[msg.id] = msg
    return out


def decodes_since(w: Worker, mark: int) -> list[tuple[int, int, list[str]]]:
    return [(int(m[1]), int(m[2]), m[3].split(",")) for line in w.stderr[mark:] if (m := DECODE.search(line))]


# ---------------------------------------------------------------------------------------------
# The vectors


def test_the_inputs_differ_in_length_and_fit_one_embedding_context(ref: llama_cpp.Llama) -> None:
    lengths = [len(ref.tokenize(s.encode("utf-8"))) for s in INPUTS]
    assert lengths[0] <= 3 and 300 < lengths[-1] <= N_BATCH, lengths


def test_vectors_equal_llama_cpp_pythons_own_embed(worker: Worker, ref: llama_cpp.Llama) -> None:
    done = embed(worker, INPUTS)
    assert isinstance(done, p.Done), done
    want, n_tokens = ref.embed(INPUTS, normalize=True, return_count=True)
    got = np.asarray(done.embeddings)
    assert got.shape == (len(INPUTS), 576)  # SmolLM2's embedding_length
    assert (cosines(got, want) > 0.999).all(), cosines(got, want)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalize defaults to true
    assert done.finish_reason == "stop"
    assert done.usage == p.Usage(prompt_tokens=n_tokens, completion_tokens=0)
    assert done.timings.tokens_per_s == 0.0 and 0 < done.timings.total_s


def test_normalize_false_gives_the_pooled_vectors_as_they_are(worker: Worker, ref: llama_cpp.Llama) -> None:
    raw = np.asarray(embed(worker, INPUTS, normalize=False).embeddings)
    want = np.asarray(ref.embed(INPUTS, normalize=False))
    assert (cosines(raw, want) > 0.999).all()
    norms, want_norms = np.linalg.norm(raw, axis=1), np.linalg.norm(want, axis=1)
    assert not np.allclose(norms, 1.0, atol=0.05)  # the raw mean is not a unit vector
    assert np.allclose(norms, want_norms, rtol=0.02), (norms, want_norms)
    unit = np.asarray(embed(worker, INPUTS, normalize=True).embeddings)
    assert np.allclose(unit, raw / norms[:, None], atol=1e-4)


def test_one_by_one_in_one_request_and_in_concurrent_requests_give_the_same_vectors(
        worker: Worker, ref: llama_cpp.Llama) -> None:
    want = np.asarray(ref.embed(INPUTS, normalize=True))
    # One request per input, each answered before the next is sent: one input per decode.
    mark = len(worker.stderr)
    alone = np.asarray([embed(worker, [s], id=f"alone{i}").embeddings[0] for i, s in enumerate(INPUTS)])
    assert all(n == 1 for n, _, _ in decodes_since(worker, mark))
    # All in one request.
    together = np.asarray(embed(worker, INPUTS, id="together").embeddings)
    # One input per request, all sent at once: the worker packs them into shared decodes.
    assert eventually(lambda: any(DECODE.search(line) for line in worker.stderr[mark:]))
    mark = len(worker.stderr)
    ids = [f"c{i}" for i in range(len(INPUTS))]
    for rid, s in zip(ids, INPUTS):
        worker.send(p.Generate(id=rid, request=p.EmbedRequest(input=[s])))
    answers = collect(worker, ids)
    concurrent = np.asarray([answers[rid].embeddings[0] for rid in ids])
    for got in (alone, together, concurrent):
        assert (cosines(got, want) > 0.999).all(), cosines(got, want)
        assert (cosines(got, alone) > 0.999).all(), cosines(got, alone)
    assert eventually(lambda: decodes_since(worker, mark))
    shared = [requests for _, _, requests in decodes_since(worker, mark) if len(requests) > 1]
    assert shared, f"no decode carried inputs of several requests: {decodes_since(worker, mark)}"


def test_a_request_bigger_than_one_decode_is_split_over_several_in_order(worker: Worker,
                                                                        ref: llama_cpp.Llama) -> None:
    inputs = [f"{i}: " + INPUTS[3] for i in range(12)]  # ~12 x 90 tokens: three decodes of 512
    mark = len(worker.stderr)
    got = np.asarray(embed(worker, inputs).embeddings)
    want = np.asarray(ref.embed(inputs, normalize=True))
    assert (cosines(got, want) > 0.999).all(), cosines(got, want)
    assert eventually(lambda: decodes_since(worker, mark))
    decodes = decodes_since(worker, mark)
    assert len(decodes) >= 2 and sum(n for n, _, _ in decodes) == len(inputs), decodes
    assert all(tokens <= N_BATCH for _, tokens, _ in decodes)


# ---------------------------------------------------------------------------------------------
# Refusals, cancel, and completions beside embeddings


def test_an_input_longer_than_the_context_is_context_overflow_and_a_concurrent_one_still_succeeds(
        worker: Worker, ref: llama_cpp.Llama) -> None:
    too_long = "word " * (N_BATCH + 50)
    worker.send(p.Generate(id="long", request=p.EmbedRequest(input=["fine", too_long])))
    worker.send(p.Generate(id="short", request=p.EmbedRequest(input=[INPUTS[1]])))
    answers = collect(worker, ["long", "short"])
    failed = answers["long"]
    assert isinstance(failed, p.Failed) and failed.code == "context_overflow", failed
    assert "input[1]" in failed.message and f"{N_BATCH} tokens" in failed.message
    short = answers["short"]
    assert isinstance(short, p.Done), short
    assert cosines(short.embeddings[0], ref.embed(INPUTS[1], normalize=True)) > 0.999
    assert worker.proc.poll() is None


def test_an_input_with_no_tokens_is_a_bad_request(worker: Worker) -> None:
    failed = embed(worker, ["something", ""])
    assert isinstance(failed, p.Failed) and failed.code == "bad_request", failed
    assert "input[1]" in failed.message


def test_a_cancelled_embed_request_ends_with_done_cancelled(worker: Worker) -> None:
    # 256 inputs of ~460 tokens: one input per decode, minutes of work on one thread.
    worker.send(p.Generate(id="big", request=p.EmbedRequest(input=[INPUTS[4]] * 256)))
    worker.send(p.Cancel(id="big"))
    _, final = worker.collect("big", timeout=60)
    assert isinstance(final, p.Done) and final.finish_reason == "cancelled", final
    assert final.embeddings is msgspec.UNSET
    assert worker.proc.poll() is None


def test_a_completion_and_an_embed_request_at_once_both_finish(worker: Worker, ref: llama_cpp.Llama) -> None:
    worker.send(p.Generate(id="text", request=completion("The capital of France is", max_tokens=8)))
    worker.send(p.Generate(id="vec", request=p.EmbedRequest(input=INPUTS[:2])))
    finals: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    while len(finals) < 2:
        msg = worker.recv(timeout=max(0.1, deadline - time.monotonic()))
        if not isinstance(msg, p.Chunk):
            finals[msg.id] = msg
    assert finals["text"].finish_reason == "length" and finals["text"].usage.completion_tokens == 8
    assert (cosines(finals["vec"].embeddings, ref.embed(INPUTS[:2], normalize=True)) > 0.999).all()


# ---------------------------------------------------------------------------------------------
# The pooling a model declares, and Gemma 3


def test_model_info_says_decoder_only_models_pool_by_mean(smollm2_path: Path, gemma3_path: Path) -> None:
    for path in (smollm2_path, gemma3_path):
        h = gguf.read_header(path)
        assert f"{h.architecture}.pooling_type" not in h.metadata
        assert h.pooling == "mean"


def test_gemma3_vectors_equal_llama_cpp_pythons_own_embed(gemma3_path: Path) -> None:
    w = start(gemma3_path)
    try:
        done = embed(w, INPUTS[:4])
        assert isinstance(done, p.Done), done
        want = np.asarray(reference(gemma3_path).embed(INPUTS[:4], normalize=True))
        got = np.asarray(done.embeddings)
        assert got.shape == (4, 640)  # Gemma 3 270M's embedding_length
        assert (cosines(got, want) > 0.999).all(), cosines(got, want)
        w.send(p.Shutdown())
        assert w.wait(timeout=20) == 0
    finally:
        w.kill()


def test_a_failing_embedding_decode_fails_its_requests_only_and_the_engine_goes_on(smollm2_path: Path,
                                                                                  monkeypatch: Any) -> None:
    import ctypes
    import queue
    import threading

    from optimanode.worker.engine import Engine, _on_llama_log
    from optimanode.worker.jobs import _Job, _Jobs

    llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))  # errors only, as in the worker
    sent: queue.Queue[Any] = queue.Queue()
    engine = Engine(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=1, parallel=1),
                    lambda msgs: [sent.put(m) for m in msgs])
    jobs = _Jobs()
    loop = threading.Thread(target=engine.serve, args=(jobs,), daemon=True)
    loop.start()
    try:
        def run(requests: dict[str, p.InferenceRequest]) -> dict[str, Any]:
            for rid, r in requests.items():
                assert jobs.add(_Job(id=rid, request=r))
            finals: dict[str, Any] = {}
            while len(finals) < len(requests):
                msg = sent.get(timeout=120)
                if not isinstance(msg, p.Chunk):
                    finals[msg.id] = msg
            return finals

        assert engine.embeds.ctx is None  # nothing made before the first embed request
        real = llama_cpp.llama_decode

        def failing(ctx: Any, batch: Any) -> int:
            return -3 if ctx == engine.embeds.ctx else real(ctx, batch)  # only the embedding context

        run({"first": p.EmbedRequest(input=["warm"])})
        monkeypatch.setattr(llama_cpp, "llama_decode", failing)
        got = run({"text": completion("The capital of France is", max_tokens=4),
                   "vec": p.EmbedRequest(input=INPUTS[:2])})
        monkeypatch.setattr(llama_cpp, "llama_decode", real)
        assert isinstance(got["vec"], p.Failed) and got["vec"].code == "internal", got["vec"]
        assert isinstance(got["text"], p.Done) and got["text"].usage.completion_tokens == 4
        again = run({"again": p.EmbedRequest(input=INPUTS[:2])})["again"]
        assert isinstance(again, p.Done) and len(again.embeddings) == 2
    finally:
        jobs.close()
        loop.join(timeout=60)
        engine.close()
