"""Prefixes shared across slots and the host-RAM prompt cache, on the real SmolLM2 and Gemma 3 models.

The engine is driven in-process (as tests/model/test_worker_batching.py's KV-error case does), so
the test can read its cache and counters. Exactness: a copied or restored prefix holds bitwise the
K/V an evaluation wrote, so a greedy request gives the same text as it does without that cache when
the same prefix is reused inside its own slot (the reference each test runs: the same tokens
evaluated in the same batches). It need not equal a cold run of the whole prompt: llama.cpp's
kernels do not give bit-identical logits for different batch splits (a prompt evaluated in one
batch or as a reused prefix plus the rest), which the in-slot reuse the worker has always done
shows too, as does llama-server's ``cache_prompt`` (its documentation says so); here SmolLM2's
answer to the shop question differs from the cold run after eight tokens (a newline).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from optimanode import protocol as p

pytestmark = pytest.mark.timeout(600)

SYSTEM = ("You are a careful assistant for a small hardware shop. The shop sells screws, nails, "
          "hinges, door handles, paint brushes, rollers, tape measures, spirit levels and ladders. "
          "It opens at eight in the morning and closes at six in the evening, except on Sundays, "
          "when it is closed all day. Answer briefly and politely, and never invent prices.\n")
QUESTIONS = ["Question: When does the shop open on Monday?\nAnswer:",
             "Question: Do you sell ladders?\nAnswer:",
             "Question: Is the shop open on Sunday?\nAnswer:"]
OTHER = ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, "
         "25, 26, 27, 28, 29, 30,")


def completion(prompt: str, max_tokens: int = 16) -> p.CompletionRequest:
    return p.CompletionRequest(prompt=prompt, params=p.SamplingParams(max_tokens=max_tokens, temperature=0.0))


class Served:
    """An Engine serving on a thread; ``run`` sends requests and collects (text, final message)."""

    def __init__(self, model: Path, start: bool = True, **settings: Any) -> None:
        import llama_cpp

        from optimanode.worker.engine import Engine, _on_llama_log
        from optimanode.worker.jobs import _Jobs

        llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))  # errors only, as in the worker
        self.sent: queue.Queue[Any] = queue.Queue()
        self.engine = Engine(p.WorkerSettings(model_path=str(model), n_threads=1, **settings),
                             lambda msgs: [self.sent.put(m) for m in msgs])
        self.jobs = _Jobs()
        self.thread = threading.Thread(target=self.engine.serve, args=(self.jobs,), daemon=True)
        if start:
            self.thread.start()
        self.out: dict[str, tuple[str, Any]] = {}

    def send(self, id: str, request: p.InferenceRequest) -> None:
        from optimanode.worker.jobs import _Job

        self.out[id] = ("", None)
        assert self.jobs.add(_Job(id=id, request=request))

    def pump(self, until: Any) -> None:
        while not until():
            msg = self.sent.get(timeout=120)
            text, _ = self.out[msg.id]
            self.out[msg.id] = (text + msg.text, None) if isinstance(msg, p.Chunk) else (text, msg)

    def run(self, id: str, request: p.InferenceRequest) -> tuple[str, p.Done]:
        self.send(id, request)
        self.pump(lambda: self.out[id][1] is not None)
        text, done = self.out[id]
        assert isinstance(done, p.Done), done
        return text, done

    def close(self) -> None:
        self.jobs.close()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        self.engine.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    made: list[Served] = []

    def make(model: Path, **settings: Any) -> Served:
        made.append(Served(model, **settings))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture(params=["smollm2", "gemma3"])
def model(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_path")


def n_tokens(s: Served, prompt: str) -> int:
    return len(s.engine.prompt_tokens(completion(prompt)))


# ---------------------------------------------------------------------------------------------


def test_a_prompt_copies_the_shared_prefix_from_another_slot_and_answers_as_a_cold_run(serve: Any,
                                                                                        model: Path) -> None:
    a, b = completion(SYSTEM + QUESTIONS[0], max_tokens=48), completion(SYSTEM + QUESTIONS[1])
    # The reference: B after A in A's own slot (in-slot reuse, the same split), no copy possible.
    ref = serve(model, n_ctx=1024, parallel=1, prompt_cache_mib=0)
    assert ref.run("a", a)[1].usage.cached_tokens == 0
    ref_b, ref_done = ref.run("b", b)
    assert ref_done.usage.cached_tokens > 0
    s = serve(model, n_ctx=2048, parallel=2, prompt_cache_mib=0)
    # While A generates, B arrives: the only free slot holds nothing, the running one the prefix.
    s.send("a", a)
    s.pump(lambda: s.out["a"][0] != "")
    s.send("b", b)
    s.pump(lambda: s.out["a"][1] is not None and s.out["b"][1] is not None)
    text_b, done_b = s.out["b"]
    assert text_b == ref_b
    assert done_b.usage.cached_tokens == ref_done.usage.cached_tokens
    shared = n_tokens(s, SYSTEM + QUESTIONS[1]) - 1
    assert 0 < done_b.usage.cached_tokens <= shared
    assert done_b.usage.cached_tokens >= n_tokens(s, SYSTEM) - 2  # the system text at least
    assert done_b.usage.prompt_tokens == shared + 1
    stats = s.engine.prefixes.stats
    assert stats.slot_copies == 1 and stats.saves == 0 and stats.bytes == 0


def test_prompts_that_arrive_together_evaluate_their_shared_system_prompt_once(serve: Any, model: Path) -> None:
    prompts = {f"q{i}": completion(SYSTEM + q, max_tokens=12) for i, q in enumerate(QUESTIONS)}
    # The references: each question after the first in that one's slot (in-slot reuse, the split
    # a copy gives too).
    ref = serve(model, n_ctx=1024, parallel=1, prompt_cache_mib=0)
    expected = {"q0": ref.run("q0", prompts["q0"])[0]}
    for rid in ("q1", "q2"):
        expected[rid] = ref.run(rid, prompts[rid])[0]
        ref.run("q0-again", prompts["q0"])  # the slot holds the first prompt again
    # All three are queued before the loop starts: they take the three slots at once, when no
    # slot holds anything yet. The first prompt is evaluated first (one prompt a step); the
    # other two copy its cells when their turn comes instead of evaluating the system prompt.
    s = serve(model, start=False, n_ctx=3072, parallel=3, prompt_cache_mib=0)
    for rid, req in prompts.items():
        s.send(rid, req)
    s.thread.start()
    s.pump(lambda: all(done is not None for _, done in s.out.values()))
    system = n_tokens(s, SYSTEM)
    cached = {rid: done.usage.cached_tokens for rid, (_, done) in s.out.items()}
    assert cached["q0"] == 0
    assert all(cached[rid] >= system - 2 for rid in ("q1", "q2")), cached
    assert s.engine.prefixes.stats.slot_copies == 2
    assert s.engine.prompt_tokens_evaluated == sum(done.usage.prompt_tokens - done.usage.cached_tokens
                                                   for _, done in s.out.values())
    assert {rid: text for rid, (text, _) in s.out.items()} == expected


def test_a_slot_reused_for_another_prompt_is_saved_and_restored_with_the_same_greedy_text(serve: Any,
                                                                                           model: Path) -> None:
    a = completion(SYSTEM + QUESTIONS[0])
    # The reference, without the host cache: A, then A again and its next turn B in the same slot.
    ref = serve(model, n_ctx=1024, parallel=1, prompt_cache_mib=0)
    cold_a = ref.run("a", a)[0]
    ref_again, ref_done = ref.run("a-again", a)
    # The next turn continues the text of the cells the slot holds now (A's second answer).
    b = completion(SYSTEM + QUESTIONS[0] + ref_again + "\n" + QUESTIONS[2])
    ref_b, ref_done_b = ref.run("b", b)
    s = serve(model, n_ctx=1024, parallel=1, prompt_cache_mib=64)
    assert s.run("a", a)[0] == cold_a  # a fresh context: the same evaluation
    _, done_x = s.run("x", completion(OTHER))  # the one slot is reused: A's cells are saved first
    stats = s.engine.prefixes.stats
    assert done_x.usage.cached_tokens <= 1  # at most the BOS token (Gemma has one)
    assert stats.saves == 1 and stats.entries == 1 and 0 < stats.bytes <= stats.cap_bytes == 64 << 20
    again, done_a = s.run("a-again", a)
    assert again == ref_again
    assert done_a.usage.cached_tokens == done_a.usage.prompt_tokens - 1 == ref_done.usage.cached_tokens
    assert stats.hits == 1
    # A prompt that continues A's (the next turn) restores it too.
    _, done_x2 = s.run("x2", completion(OTHER))  # X's cells were saved when A took the slot back
    assert stats.hits == 2 and done_x2.usage.cached_tokens == done_x2.usage.prompt_tokens - 1
    warm_b, done_b = s.run("b", b)
    assert stats.hits == 3 and done_b.usage.cached_tokens > n_tokens(s, SYSTEM + QUESTIONS[0])
    assert warm_b == ref_b and done_b.usage.cached_tokens == ref_done_b.usage.cached_tokens


def test_with_the_cache_off_nothing_is_saved_or_restored(serve: Any, smollm2_path: Path) -> None:
    s = serve(smollm2_path, n_ctx=1024, parallel=1, prompt_cache_mib=0)
    a = completion(SYSTEM + QUESTIONS[0])
    cold_a, _ = s.run("a", a)
    s.run("x", completion(OTHER))
    again, done = s.run("a-again", a)
    assert again == cold_a and done.usage.cached_tokens == 0
    stats = s.engine.prefixes.stats
    assert s.engine.prefixes.cache is None
    assert (stats.saves, stats.hits, stats.bytes, stats.entries, stats.cap_bytes) == (0, 0, 0, 0, 0)


def test_the_cache_stays_under_its_cap_while_filled_past_it(serve: Any, smollm2_path: Path) -> None:
    cap_mib = 8
    s = serve(smollm2_path, n_ctx=1024, parallel=1, prompt_cache_mib=cap_mib)
    cache = s.engine.prefixes.cache
    assert cache is not None
    proc = psutil.Process()
    s.run("warm", completion(SYSTEM + QUESTIONS[0], max_tokens=4))
    rss0 = proc.memory_info().rss
    for i in range(12):
        # Distinct prompts of ~110 tokens: each takes the slot and the one before it is saved.
        _, done = s.run(f"r{i}", completion(f"Note {i}: " + SYSTEM[i:] + QUESTIONS[i % 3], max_tokens=4))
        assert cache.bytes <= cache.cap_bytes == cap_mib << 20
        assert done.usage.cached_tokens <= 3  # distinct from the first token or so
    stats = cache.stats
    assert stats.saves == 12 and stats.evictions == 12 - len(cache) and len(cache) >= 2
    entry_bytes = sum(e.size for e in cache.entries()) / len(cache)
    saved_total = entry_bytes * stats.saves
    assert saved_total > 2 * cache.cap_bytes  # filled well past the cap
    # What the process grew by is bounded by the cap (plus allocator slack), not by what was saved.
    grown = proc.memory_info().rss - rss0
    assert grown < cache.cap_bytes + (8 << 20), (grown, saved_total)


def test_a_ram_floor_from_the_node_empties_the_cache_and_the_memory_goes_back_to_the_system(
        serve: Any, smollm2_path: Path) -> None:
    s = serve(smollm2_path, n_ctx=1024, parallel=1, prompt_cache_mib=16)
    cache = s.engine.prefixes.cache
    assert cache is not None
    proc = psutil.Process()
    # Filled past its cap, so that some states were freed and later ones came from the heap glibc
    # keeps for reuse (its mmap threshold rises with the first large block freed): giving those
    # back takes malloc_trim.
    for i in range(12):
        s.run(f"r{i}", completion(f"Note {i}: " + SYSTEM[i:] + QUESTIONS[i % 3], max_tokens=4))
    held, entries = cache.bytes, len(cache)
    assert cache.stats.evictions >= 3 and entries >= 4 and held >= 8 << 20, (cache.stats, held)
    rss0 = proc.memory_info().rss
    # What the worker's reader thread does with a Ping whose floor the machine cannot meet with
    # the cache in it (a model loading elsewhere): every entry goes, and the process shrinks.
    s.engine.progress.keep_free(psutil.virtual_memory().available + held + (1 << 30))
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.stats.pressure_evictions == entries
    given_back = rss0 - proc.memory_info().rss
    assert given_back >= 0.8 * held, (given_back, held)
    # While the floor holds no state is copied out at all (each prompt that takes the slot would
    # have saved the one before); the requests are served as ever.
    saves = cache.stats.saves
    assert saves == 11  # every prompt but the first saved the one before it
    _, done = s.run("tight", completion("Note 9: " + SYSTEM + QUESTIONS[0], max_tokens=4))
    s.run("tight2", completion(OTHER, max_tokens=4))
    assert len(cache) == 0 and cache.stats.saves == saves and cache.stats.pressure_evictions == entries + 2
    assert done.usage.completion_tokens == 4
    # The floor lifted (the model loaded): the cache fills again.
    s.engine.progress.keep_free(0)
    s.run("again", completion("Note 10: " + SYSTEM + QUESTIONS[1], max_tokens=4))
    assert len(cache) == 1 and cache.stats.saves == saves + 1
