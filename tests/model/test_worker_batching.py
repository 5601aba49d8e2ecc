"""Continuous batching in the worker (``parallel`` > 1) with the real SmolLM2-135M model.

One worker with 4 slots serves most of the module (started as tests/model/test_worker.py starts its
own); the KV-error case drives the engine in-process so llama_decode can be made to fail.

Exactness: llama.cpp's CPU kernels compute each row of a batch on its own, so a greedy request
gives the same tokens alone, batched with others, or after a reused prefix, as long as its prompt
is cut into the same micro-batches (docs/architecture.md, step e: a long prompt evaluated beside
generating streams may be cut otherwise, and then need not give the same text). The tests assert
equal text, not a common prefix; on SmolLM2 Q4_1 (CPU, per-sequence KV cells) no difference was
found, with 1 thread here (kind to a shared 2-core machine) or 2. A sequence moved to another
slot (to keep the running ids consecutive) carries a bitwise copy of its cells, so the same holds.
"""

from __future__ import annotations

import ctypes
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model.test_worker import Worker, completion, eventually, text_of

from optimanode import protocol as p

N_CTX = 1024
PARALLEL = 4
WINDOW = N_CTX // PARALLEL  # 256: llama.cpp's per-sequence cells, already a multiple of 256
pytestmark = pytest.mark.timeout(300)

PROMPTS = [
    "The quick brown fox",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
]
TRACE_LINE = re.compile(r"request (\S+): slot (\d+), prompt (\d+) tokens \((\d+) reused, (\d+) evaluated\)")


@pytest.fixture(scope="module")
def step_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module worker's step log prefix (OPTIMANODE_WORKER_STEP_LOG): its file is ``<prefix>.<pid>``."""
    return tmp_path_factory.mktemp("steps") / "steps"


@pytest.fixture(scope="module")
def started(smollm2_path: Path, step_log: Path) -> Iterator[tuple[Worker, p.Ready]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTIMANODE_WORKER_TRACE", "1")  # one stderr line per request: reuse counts
        mp.setenv("OPTIMANODE_WORKER_STEP_LOG", str(step_log))
        w = Worker()
    try:
        w.send(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=N_CTX, n_threads=1, parallel=PARALLEL))
        ready = w.recv(timeout=120)
        assert isinstance(ready, p.Ready), ready
        yield w, ready
        w.send(p.Shutdown())
        assert w.wait(timeout=20) == 0
    finally:
        w.kill()


@pytest.fixture
def worker(started: tuple[Worker, p.Ready]) -> Worker:
    w = started[0]
    assert w.proc.poll() is None, f"the module's worker died; stderr: {w.stderr[-5:]}"
    return w


def collect_all(w: Worker, ids: list[str], timeout: float = 120,
                order: list[p.Chunk | p.Done | p.Failed] | None = None) -> dict[str, tuple[list[p.Chunk], Any]]:
    """Read interleaved messages until every id has its Done or Failed (``order`` gets them all)."""
    out: dict[str, tuple[list[p.Chunk], Any]] = {i: ([], None) for i in ids}
    deadline = time.monotonic() + timeout
    while any(final is None for _, final in out.values()):
        msg = w.recv(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.id in out and out[msg.id][1] is None, msg
        if order is not None:
            order.append(msg)
        if isinstance(msg, p.Chunk):
            out[msg.id][0].append(msg)
        else:
            out[msg.id] = (out[msg.id][0], msg)
    return out


def solo(w: Worker, request: p.InferenceRequest, id: str) -> str:
    chunks, done = w.generate(request, id=id)
    assert isinstance(done, p.Done), done
    return text_of(chunks)


def trace_of(w: Worker, id: str) -> tuple[int, int, int, int]:
    """(slot, prompt tokens, reused, evaluated) from the worker's trace line for ``id``."""
    def line() -> re.Match[str] | None:
        return next((m for m in map(TRACE_LINE.search, w.stderr) if m and m.group(1) == id), None)
    deadline = time.monotonic() + 5
    while (m := line()) is None:
        assert time.monotonic() < deadline, f"no trace line for {id}: {w.stderr[-5:]}"
        time.sleep(0.02)
    return int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))


# ---------------------------------------------------------------------------------------------


def test_ready_reports_the_whole_context(started: tuple[Worker, p.Ready]) -> None:
    assert started[1].n_ctx == N_CTX


def test_batched_greedy_outputs_equal_each_prompts_solo_output(worker: Worker) -> None:
    reqs = [completion(prompt, max_tokens=48) for prompt in PROMPTS]
    alone = [solo(worker, r, f"solo{i}") for i, r in enumerate(reqs)]
    for i, r in enumerate(reqs):
        worker.send(p.Generate(id=f"batch{i}", request=r))
    got = collect_all(worker, [f"batch{i}" for i in range(len(reqs))])
    for i in range(len(reqs)):
        chunks, done = got[f"batch{i}"]
        assert isinstance(done, p.Done) and done.finish_reason == "length", done
        assert done.usage.completion_tokens == 48 == sum(c.tokens for c in chunks)
        assert text_of(chunks) == alone[i], (PROMPTS[i], text_of(chunks), alone[i])


def test_the_step_log_has_a_line_for_every_decode_step_of_the_requests(worker: Worker, step_log: Path) -> None:
    """OPTIMANODE_WORKER_STEP_LOG: each step's tokens, sequences and prompt tokens add up to what the
    requests evaluated (their prompts less the cached tokens) and generated (every token but the
    last of each is fed back), and the steps are timed on the monotonic clock, one after the other."""
    log = step_log.parent / f"{step_log.name}.{worker.proc.pid}"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    t0 = time.monotonic()
    ids = [f"steps{i}" for i in range(3)]
    frames = b"".join(p.frame(p.Generate(id=i, request=completion(f"Step log {n}. {PROMPTS[n]}", max_tokens=6 + n)))
                      for n, i in enumerate(ids))
    worker.send_raw(frames)
    got = collect_all(worker, ids)
    t1 = time.monotonic()
    dones = [done for _, done in got.values()]
    assert all(isinstance(d, p.Done) for d in dones), dones
    assert eventually(lambda: len(log.read_text().splitlines()) > before)
    rows = [line.split() for line in log.read_text().splitlines()[before:]]
    assert rows and all(len(r) == 6 for r in rows), rows
    start = [float(r[0]) for r in rows]
    seconds = [float(r[1]) for r in rows]
    tokens, seqs, prompt_tokens, prompt_seqs = ([int(r[k]) for r in rows] for k in range(2, 6))
    assert t0 <= start[0] and start[-1] + seconds[-1] <= t1
    assert all(a + s <= b for a, s, b in zip(start, seconds, start[1:])), "the steps overlap"
    assert all(s > 0 for s in seconds)
    evaluated = sum(d.usage.prompt_tokens - d.usage.cached_tokens for d in dones)
    generated_fed = sum(d.usage.completion_tokens - 1 for d in dones)
    assert sum(prompt_tokens) == evaluated
    assert sum(tokens) == evaluated + generated_fed
    # A step's sequences: those with prompt tokens, and one token each for the others.
    assert all(t - pt == n - pn for t, pt, n, pn in zip(tokens, prompt_tokens, seqs, prompt_seqs))
    assert max(seqs) == 3 and sum(prompt_seqs) >= 3


def test_on_the_cpu_prompts_that_arrive_together_are_evaluated_one_per_step(worker: Worker) -> None:
    """Each request gets its first token one step after the one before it, not all after every
    prompt: the first request's second chunk (its next step) comes before the next first chunk."""
    ids = [f"pp{i}" for i in range(3)]
    frames = b"".join(p.frame(p.Generate(id=i, request=completion(f"{n}. {PROMPTS[2]}", max_tokens=8)))
                      for n, i in enumerate(ids))
    worker.send_raw(frames)  # one write: the worker takes all three in the same step
    order: list[Any] = []
    got = collect_all(worker, ids, order=order)
    assert all(isinstance(done, p.Done) for _, done in got.values())
    firsts = [next(k for k, m in enumerate(order) if m.id == i) for i in ids]
    assert firsts == sorted(firsts), firsts  # in arrival order
    for before, after in zip(ids, ids[1:]):
        between = order[firsts[ids.index(before)] + 1:firsts[ids.index(after)]]
        assert any(m.id == before for m in between), [m.id for m in order[:12]]


def test_with_prefill_together_prompts_that_arrive_together_share_one_step(smollm2_path: Path) -> None:
    """The other policy (``prefill = "together"``): all first tokens come out of the same step."""
    w = Worker()
    try:
        w.send(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=N_CTX, n_threads=1, parallel=PARALLEL,
                                prefill="together"))
        assert isinstance(w.recv(timeout=120), p.Ready)
        ids = [f"pt{i}" for i in range(3)]
        w.send_raw(b"".join(p.frame(p.Generate(id=i, request=completion(f"{n}. {PROMPTS[2]}", max_tokens=8)))
                            for n, i in enumerate(ids)))
        order: list[Any] = []
        collect_all(w, ids, order=order)
        assert [m.id for m in order[:3]] == ids, [m.id for m in order[:6]]  # one step: three first chunks
        w.send(p.Shutdown())
        assert w.wait(timeout=20) == 0
    finally:
        w.kill()


def test_requests_beyond_the_slots_wait_and_are_all_served(worker: Worker) -> None:
    reqs = {f"many{i}": completion(f"Item {i}: a list of fruits:", max_tokens=12) for i in range(PARALLEL + 2)}
    alone = {i: solo(worker, r, f"{i}-solo") for i, r in reqs.items()}
    for i, r in reqs.items():
        worker.send(p.Generate(id=i, request=r))
    got = collect_all(worker, list(reqs))
    for i, (chunks, done) in got.items():
        assert isinstance(done, p.Done), done
        assert text_of(chunks) == alone[i]


def test_a_request_joins_a_running_batch_and_leaves_it_early(worker: Worker) -> None:
    """B joins while A streams and finishes first; A streams on; both give their solo text."""
    a, b = completion(PROMPTS[1], max_tokens=120), completion(PROMPTS[0], max_tokens=10)
    alone_a, alone_b = solo(worker, a, "a-solo"), solo(worker, b, "b-solo")
    worker.send(p.Generate(id="a", request=a))
    first = worker.recv()
    assert isinstance(first, p.Chunk) and first.id == "a"
    worker.send(p.Generate(id="b", request=b))
    order: list[Any] = []
    got = collect_all(worker, ["a", "b"], order=order)
    (chunks_a, done_a), (chunks_b, done_b) = got["a"], got["b"]
    assert isinstance(done_a, p.Done) and isinstance(done_b, p.Done)
    assert first.text + text_of(chunks_a) == alone_a
    assert text_of(chunks_b) == alone_b
    assert done_b.usage.completion_tokens == 10 and done_a.usage.completion_tokens == 120
    # B really ran beside A: A streamed before B's first chunk, between B's chunks, and after
    # B's Done (not one after the other).
    ids = [(m.id, type(m).__name__) for m in order]
    b_first, b_done = ids.index(("b", "Chunk")), ids.index(("b", "Done"))
    assert ("a", "Chunk") in ids[b_first:b_done], ids
    assert ("a", "Chunk") in ids[b_done:], ids


def test_runs_counts_runs_of_consecutive_ids() -> None:
    from optimanode.worker.slots import _runs

    assert [_runs(s) for s in ([], [3], [0, 1, 2], [2, 0, 1], [0, 2], [0, 1, 2, 5], [1, 3, 5])] == [0, 1, 1, 1, 2, 2, 3]


def test_a_sequence_moved_to_close_a_gap_streams_on_unchanged(worker: Worker) -> None:
    """The requests in slots 0 and 2 finish early; one in slot 1 or 3 is moved into a hole (one
    micro-batch a step instead of two), and both long ones still give their solo text: the moved
    one attends over a copy of its own cells, not over what its new slot held before."""
    prompts = ["Zebras of the savanna", "Quantum mechanics says", "My grandmother's kitchen", "Volcanoes form when"]
    # Place each prompt in a slot; sending the same prompt again lands in the same slot (prefix reuse).
    for k, prompt in enumerate(prompts):
        worker.send(p.Generate(id=f"place{k}", request=completion(prompt, max_tokens=1)))
    collect_all(worker, [f"place{k}" for k in range(4)])
    slot_of = {trace_of(worker, f"place{k}")[0]: k for k in range(4)}
    assert sorted(slot_of) == [0, 1, 2, 3], slot_of
    reqs = {f"g{s}": completion(prompts[slot_of[s]], max_tokens=6 if s in (0, 2) else 50) for s in range(4)}
    alone = {i: solo(worker, r, f"{i}-solo") for i, r in reqs.items()}
    assert [trace_of(worker, f"g{s}-solo")[0] for s in range(4)] == [0, 1, 2, 3]  # placement is stable
    for i, r in reqs.items():
        worker.send(p.Generate(id=i, request=r))
    got = collect_all(worker, list(reqs))
    for i, (chunks, done) in got.items():
        assert isinstance(done, p.Done), done
        assert text_of(chunks) == alone[i], i
    assert eventually(lambda: any(re.search(r"request g[13]: moved from slot [13] to slot [02]", line)
                                  for line in worker.stderr)), [line for line in worker.stderr if "g" in line][-8:]


def test_every_slot_filled_to_its_window_at_once_never_overflows(worker: Worker) -> None:
    """All slots grow to their full window together: each ends with "length" exactly at the
    window, with its solo text; none fails for want of KV cells."""
    reqs = {f"full{k}": completion(", ".join(str(i) for i in range(k * 100, k * 100 + 30)) + ",", max_tokens=10_000)
            for k in range(PARALLEL)}
    alone = {i: solo(worker, r, f"{i}-solo") for i, r in reqs.items()}
    for i, r in reqs.items():
        worker.send(p.Generate(id=i, request=r))
    got = collect_all(worker, list(reqs), timeout=300)
    for i, (chunks, done) in got.items():
        assert isinstance(done, p.Done) and done.finish_reason == "length", done
        assert done.usage.prompt_tokens + done.usage.completion_tokens == WINDOW, done.usage
        assert text_of(chunks) == alone[i], i


def test_cancel_of_one_sequence_leaves_the_others_streaming(worker: Worker) -> None:
    reqs = {i: completion(PROMPTS[k], max_tokens=40) for k, i in enumerate(["c0", "c1", "c2"])}
    alone = {i: solo(worker, r, f"{i}-solo") for i, r in reqs.items()}
    for i, r in reqs.items():
        worker.send(p.Generate(id=i, request=r))
    out: dict[str, tuple[list[p.Chunk], Any]] = {i: ([], None) for i in reqs}
    order: list[tuple[str, str]] = []
    cancelled_at: int | None = None
    deadline = time.monotonic() + 120
    while any(final is None for _, final in out.values()):
        msg = worker.recv(timeout=max(0.1, deadline - time.monotonic()))
        order.append((msg.id, type(msg).__name__))
        if isinstance(msg, p.Chunk):
            out[msg.id][0].append(msg)
            if msg.id == "c1" and cancelled_at is None:
                worker.send(p.Cancel(id="c1"))
                cancelled_at = sum(c.tokens for c in out["c1"][0])
        else:
            out[msg.id] = (out[msg.id][0], msg)
    chunks, done = out["c1"]
    assert isinstance(done, p.Done) and done.finish_reason == "cancelled"
    assert cancelled_at is not None and done.usage.completion_tokens <= cancelled_at + 3
    for i in ("c0", "c2"):
        chunks, done = out[i]
        assert isinstance(done, p.Done) and done.finish_reason == "length", done
        assert text_of(chunks) == alone[i]
        assert (i, "Chunk") in order[order.index(("c1", "Done")):], order  # still streaming after it


def test_a_request_that_cannot_fit_fails_and_the_others_go_on(worker: Worker) -> None:
    a, b = completion(PROMPTS[1], max_tokens=60), completion(PROMPTS[2], max_tokens=60)
    alone_a, alone_b = solo(worker, a, "fa-solo"), solo(worker, b, "fb-solo")
    worker.send(p.Generate(id="fa", request=a))
    worker.send(p.Generate(id="fb", request=b))
    worker.send(p.Generate(id="big", request=completion("hello " * (WINDOW + 10), max_tokens=4)))
    order: list[Any] = []
    got = collect_all(worker, ["fa", "fb", "big"], order=order)
    chunks, failed = got["big"]
    assert chunks == [] and isinstance(failed, p.Failed) and failed.code == "context_overflow"
    assert str(WINDOW) in failed.message and "per slot" in failed.message
    after = {m.id for m in order[order.index(failed):] if isinstance(m, p.Chunk)}
    assert after == {"fa", "fb"}, after  # both stream on after the refusal
    assert text_of(got["fa"][0]) == alone_a and got["fa"][1].finish_reason == "length"
    assert text_of(got["fb"][0]) == alone_b and got["fb"][1].finish_reason == "length"


def test_max_tokens_is_clamped_to_the_slot_window(worker: Worker) -> None:
    prompt = ", ".join(str(i) for i in range(1, 60)) + ","  # about 230 tokens of counting
    chunks, done = worker.generate(completion(prompt, max_tokens=200), id="clamp")
    assert isinstance(done, p.Done), done
    assert done.finish_reason == "length"
    assert done.usage.prompt_tokens + done.usage.completion_tokens == WINDOW
    assert sum(c.tokens for c in chunks) == done.usage.completion_tokens


def test_a_seeded_sampled_request_repeats_inside_a_batch(worker: Worker) -> None:
    seeded = completion("Once upon a time", max_tokens=32, temperature=1.0, seed=1234)
    alone = solo(worker, seeded, "seed-solo")
    worker.send(p.Generate(id="seed", request=seeded))
    others = [f"noise{i}" for i in range(PARALLEL - 1)]
    for i in others:  # unseeded neighbours draw their own random numbers
        worker.send(p.Generate(id=i, request=completion(PROMPTS[int(i[-1])], max_tokens=32, temperature=1.0)))
    got = collect_all(worker, ["seed", *others])
    assert text_of(got["seed"][0]) == alone


def test_a_second_chat_turn_evaluates_only_the_new_tokens(worker: Worker) -> None:
    turn1 = [p.ChatMessage(role="user", content="Name three colours of the rainbow.")]
    chunks, done1 = worker.generate(p.ChatRequest(messages=turn1, params=p.SamplingParams(max_tokens=24, temperature=0.0)),
                                    id="turn1")
    assert isinstance(done1, p.Done)
    turn2 = [*turn1, p.ChatMessage(role="assistant", content=text_of(chunks)),
             p.ChatMessage(role="user", content="And two more?")]
    req2 = p.ChatRequest(messages=turn2, params=p.SamplingParams(max_tokens=24, temperature=0.0))
    chunks2, done2 = worker.generate(req2, id="turn2")
    assert isinstance(done2, p.Done)
    _, n_prompt1, _, _ = trace_of(worker, "turn1")
    _, n_prompt2, reused, evaluated = trace_of(worker, "turn2")
    assert n_prompt2 == done2.usage.prompt_tokens and reused + evaluated == n_prompt2
    # The whole first prompt (and the reply tokens as the template re-renders them) is reused.
    assert reused >= n_prompt1, (n_prompt1, n_prompt2, reused, evaluated)
    assert evaluated < n_prompt2 - n_prompt1 + 24, (n_prompt1, n_prompt2, reused, evaluated)
    # The reused cells give the same answer as a fresh evaluation would: the same request on a
    # fresh-looking slot (another prompt displaces nothing: the slot keeps the cells) repeats.
    chunks3, _ = worker.generate(req2, id="turn2-again")
    assert text_of(chunks3) == text_of(chunks2)
    assert trace_of(worker, "turn2-again")[3] == 1  # only the last prompt token


# ---------------------------------------------------------------------------------------------
# llama_decode failing (in-process: the engine's loop with a llama_decode that refuses one sequence)


def test_llama_decode_refusing_one_sequence_fails_only_that_request(smollm2_path: Path, monkeypatch: Any) -> None:
    import llama_cpp

    from optimanode.worker.engine import Engine, _on_llama_log
    from optimanode.worker.jobs import _Job, _Jobs

    llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))  # errors only, as in the worker
    sent: queue.Queue[Any] = queue.Queue()
    engine = Engine(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=768, n_threads=1, parallel=3),
                    lambda msgs: [sent.put(m) for m in msgs])
    jobs = _Jobs()
    loop = threading.Thread(target=engine.serve, args=(jobs,), daemon=True)
    loop.start()
    try:
        def run(ids_reqs: dict[str, p.InferenceRequest]) -> dict[str, tuple[str, Any]]:
            for i, r in ids_reqs.items():
                assert jobs.add(_Job(id=i, request=r))
            out: dict[str, tuple[str, Any]] = {i: ("", None) for i in ids_reqs}
            while any(f is None for _, f in out.values()):
                msg = sent.get(timeout=60)
                text, _ = out[msg.id]
                out[msg.id] = (text + msg.text, None) if isinstance(msg, p.Chunk) else (text, msg)
            return out

        a, b = completion(PROMPTS[0], max_tokens=16), completion(PROMPTS[3], max_tokens=16)
        alone = run({"a0": a}), run({"b0": b})
        real = llama_cpp.llama_decode

        def refusing(ctx: Any, batch: Any) -> int:
            """No room whenever request "v" has a token in the batch."""
            victims = {s.seq for s in engine.slots if s.run is not None and s.run.job.id == "v"}
            if any(batch.seq_id[i][0] in victims for i in range(batch.n_tokens)):
                return 1
            return real(ctx, batch)

        monkeypatch.setattr(llama_cpp, "llama_decode", refusing)
        got = run({"a": a, "v": completion(PROMPTS[1], max_tokens=16), "b": b})
        monkeypatch.setattr(llama_cpp, "llama_decode", real)
        assert isinstance(got["v"][1], p.Failed) and got["v"][1].code == "context_overflow", got["v"]
        assert "llama_decode returned 1" in got["v"][1].message
        assert got["a"][0] == alone[0]["a0"][0] and got["a"][1].finish_reason == "length"
        assert got["b"][0] == alone[1]["b0"][0] and got["b"][1].finish_reason == "length"
        # The slot that failed is usable again.
        again = run({"v2": completion(PROMPTS[1], max_tokens=4)})
        assert isinstance(again["v2"][1], p.Done)
    finally:
        jobs.close()
        loop.join(timeout=30)
        assert not loop.is_alive()
        engine.close()


# ---------------------------------------------------------------------------------------------
# The persistent CPU threadpool (what llama-server attaches; about 5 % more tokens/s for one stream)


def _greedy_with_threadpool(model: Path, monkeypatch: Any, enabled: str) -> tuple[bool, str]:
    """(pool attached?, greedy text) of one in-process engine with OPTIMANODE_WORKER_THREADPOOL=enabled."""
    from optimanode.worker.engine import Engine
    from optimanode.worker.jobs import _Job, _Jobs

    monkeypatch.setenv("OPTIMANODE_WORKER_THREADPOOL", enabled)
    sent: queue.Queue[Any] = queue.Queue()
    engine = Engine(p.WorkerSettings(model_path=str(model), n_ctx=512, n_threads=2, parallel=1),
                    lambda msgs: [sent.put(m) for m in msgs])
    try:
        assert engine.threadpool is not None
        attached = engine.threadpool.handle is not None
        jobs = _Jobs()
        loop = threading.Thread(target=engine.serve, args=(jobs,), daemon=True)
        loop.start()
        assert jobs.add(_Job(id="t", request=completion(PROMPTS[2], max_tokens=24)))
        text = ""
        while not isinstance(msg := sent.get(timeout=120), p.Done | p.Failed):
            text += msg.text
        assert isinstance(msg, p.Done), msg
        jobs.close()
        loop.join(30)
    finally:
        engine.close()
    assert engine.threadpool.handle is None  # freed with the context
    return attached, text


def test_the_threadpool_is_attached_unless_turned_off_and_changes_no_output(smollm2_path: Path,
                                                                            monkeypatch: Any) -> None:
    with_pool = _greedy_with_threadpool(smollm2_path, monkeypatch, "1")
    without = _greedy_with_threadpool(smollm2_path, monkeypatch, "0")
    # This build (Linux, llama-cpp-python 0.3.36, CPU backend) has what the pool needs: were it
    # missing, the worker would silently lose the single-stream speed llama-server has.
    assert with_pool[0] and not without[0]
    assert with_pool[1] == without[1] and len(with_pool[1]) > 20
