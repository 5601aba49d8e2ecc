"""The model worker process (``python -m optimanode.worker``) with the real SmolLM2-135M model.

One worker serves the whole module; tests that end a worker start their own. Every read from a
worker is bounded, so a broken worker fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from optimanode import protocol as p
from optimanode.worker.framing import read_frame

ROOT = Path(__file__).resolve().parents[2]
N_CTX = 512
GREEDY = p.SamplingParams(max_tokens=24, temperature=0.0)
pytestmark = pytest.mark.timeout(600)


class Worker:
    """A worker process with bounded reads: pongs and other messages arrive on separate queues."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "optimanode.worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.messages: queue.Queue[Any] = queue.Queue()
        self.pongs: queue.Queue[p.Pong] = queue.Queue()
        self.stderr: list[str] = []
        self.tokens_received = 0  # tokens of every chunk read so far, counted as they arrive
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        while (body := read_frame(self.proc.stdout.fileno())) is not None:  # type: ignore[union-attr]
            msg = p.decode_from_worker(body)
            if isinstance(msg, p.Chunk):
                self.tokens_received += msg.tokens
            (self.pongs if isinstance(msg, p.Pong) else self.messages).put(msg)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(line.decode("utf-8", "replace").rstrip("\n"))

    def send(self, msg: Any) -> None:
        self.send_raw(p.frame(msg))

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def recv(self, timeout: float = 30) -> Any:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no message from the worker in {timeout} s; stderr: {self.stderr[-5:]}")

    def start(self, model: Path, **settings: Any) -> p.Ready:
        self.send(p.WorkerSettings(model_path=str(model), n_ctx=N_CTX, n_threads=2, **settings))
        ready = self.recv(timeout=120)
        assert isinstance(ready, p.Ready), ready
        return ready

    def generate(self, request: p.InferenceRequest, id: str = "r1") -> tuple[list[p.Chunk], Any]:
        """Send one request and collect its chunks up to its Done or Failed."""
        self.send(p.Generate(id=id, request=request))
        return self.collect(id)

    def collect(self, id: str, timeout: float = 300) -> tuple[list[p.Chunk], Any]:
        # Generous: a shared 2-core machine under load can take minutes for a long prompt (seen in CI).
        chunks: list[p.Chunk] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(timeout=max(0.1, deadline - time.monotonic()))
            assert msg.id == id, msg
            if not isinstance(msg, p.Chunk):
                return chunks, msg
            chunks.append(msg)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit in {timeout} s; stderr: {self.stderr[-5:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def eventually(condition: Any, timeout: float = 5) -> bool:
    """Poll ``condition`` until true or ``timeout``; stderr lines arrive on their own thread."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def text_of(chunks: list[p.Chunk]) -> str:
    return "".join(c.text for c in chunks)


def completion(prompt: str, **params: Any) -> p.CompletionRequest:
    return p.CompletionRequest(prompt=prompt, params=p.SamplingParams(**{"temperature": 0.0, **params}))


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Short-lived workers, killed at the end of the test if still alive."""
    workers: list[Worker] = []

    def make() -> Worker:
        workers.append(Worker())
        return workers[-1]

    yield make
    for w in workers:
        w.kill()


@pytest.fixture(scope="module")
def started(smollm2_path: Path) -> Iterator[tuple[Worker, p.Ready]]:
    w = Worker()
    try:
        ready = w.start(smollm2_path)
        yield w, ready
        w.send(p.Shutdown())
        assert w.wait(timeout=10) == 0
    finally:
        w.kill()


@pytest.fixture
def worker(started: tuple[Worker, p.Ready]) -> Worker:
    w = started[0]
    assert w.proc.poll() is None, f"the module's worker died; stderr: {w.stderr[-5:]}"
    return w


# ---------------------------------------------------------------------------------------------
# Start-up and liveness


def test_ready_comes_first_after_the_model_loaded(started: tuple[Worker, p.Ready]) -> None:
    """The first message is Ready, with the worker's pid, the real context size and the template."""
    w, ready = started
    assert ready.pid == w.proc.pid
    assert ready.n_ctx == N_CTX
    assert ready.load_s > 0
    assert ready.backend in {"cpu", "cuda", "metal", "vulkan", "rocm", "sycl", "gpu"}
    assert ready.chat_template is True


def test_ping_is_answered_with_the_same_seq(worker: Worker) -> None:
    worker.send(p.Ping(seq=41))
    assert worker.pongs.get(timeout=5).seq == 41


def test_ping_is_answered_during_a_long_generation(worker: Worker) -> None:
    """The reader thread answers while the main thread generates."""
    worker.send(p.Generate(id="long", request=completion("1, 2, 3, 4, 5,", max_tokens=400)))
    assert isinstance(worker.recv(), p.Chunk)
    sent = time.monotonic()
    worker.send(p.Ping(seq=7))
    pong = worker.pongs.get(timeout=5)
    assert pong.seq == 7 and pong.pending == 1 and pong.steps >= 1  # the decode progress rides along
    assert time.monotonic() - sent < 1.0
    assert not any(isinstance(m, p.Done) for m in list(worker.messages.queue)), \
        "the generation should still be running when the pong arrives"
    worker.send(p.Cancel(id="long"))
    _, done = worker.collect("long")
    assert isinstance(done, p.Done)


def test_a_garbage_frame_is_skipped_and_the_worker_goes_on(worker: Worker) -> None:
    body = b"\xc1 not msgpack"
    worker.send_raw(p.FRAME_HEADER.pack(len(body)) + body)
    unknown = p.frame(p.Pong(seq=1))  # valid MessagePack, but not a message the worker takes
    worker.send_raw(unknown)
    worker.send(p.Ping(seq=9))
    assert worker.pongs.get(timeout=5).seq == 9
    assert eventually(lambda: sum("does not decode" in line for line in worker.stderr) >= 2), worker.stderr
    chunks, done = worker.generate(completion("Hello", max_tokens=3))
    assert done.finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_completion_streams_chunks_that_add_up_to_the_usage(worker: Worker, smollm2_path: Path) -> None:
    """Chunks concatenate to the text, their tokens sum to completion_tokens, max_tokens ends with 'length'."""
    import llama_cpp

    prompt = "The quick brown fox"
    chunks, done = worker.generate(completion(prompt, max_tokens=24))
    assert isinstance(done, p.Done), done
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 24 == sum(c.tokens for c in chunks)
    assert all(c.text for c in chunks[:-1])
    assert text_of(chunks).strip()
    vocab = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    assert done.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), add_bos=True, special=True))
    t = done.timings
    assert 0 < t.ttft_s <= t.total_s and t.tokens_per_s > 0


def test_the_same_greedy_request_gives_the_same_text(worker: Worker) -> None:
    first, _ = worker.generate(completion("Once upon a time", max_tokens=32))
    second, _ = worker.generate(completion("Once upon a time", max_tokens=32))
    assert text_of(first) == text_of(second)


def test_a_seeded_sampled_request_repeats(worker: Worker) -> None:
    req = completion("Once upon a time", max_tokens=32, temperature=1.0, seed=1234)
    first, _ = worker.generate(req)
    worker.generate(completion("Something else entirely", max_tokens=8, temperature=1.0))
    second, _ = worker.generate(req)
    assert text_of(first) == text_of(second)


def test_chat_completion_uses_the_models_template(worker: Worker) -> None:
    req = p.ChatRequest(messages=[p.ChatMessage(role="user", content="What is the capital of France?")],
                        params=p.SamplingParams(max_tokens=48, temperature=0.0))
    chunks, done = worker.generate(req)
    assert isinstance(done, p.Done), done
    assert text_of(chunks).strip()
    # The template wraps the question in role markers: far more tokens than the bare question.
    assert done.usage.prompt_tokens > 15


def test_a_stop_string_ends_early_and_is_not_sent(worker: Worker) -> None:
    prompt = "1, 2, 3, 4, 5,"
    full, _ = worker.generate(completion(prompt, max_tokens=40))
    full_text = text_of(full)
    stop = " 9,"  # spans tokens (" ", "9", ",")
    assert stop in full_text, full_text
    chunks, done = worker.generate(completion(prompt, max_tokens=40, stop=["never there", stop]))
    assert done.finish_reason == "stop"
    assert text_of(chunks) == full_text[: full_text.index(stop)]
    assert done.usage.completion_tokens == sum(c.tokens for c in chunks) < 40


def test_cancel_stops_within_a_couple_of_tokens(worker: Worker) -> None:
    before = worker.tokens_received
    worker.send(p.Generate(id="c1", request=completion("1, 2, 3, 4, 5,", max_tokens=400)))
    first = worker.recv()
    assert isinstance(first, p.Chunk)
    worker.send(p.Cancel(id="c1"))
    seen = worker.tokens_received - before
    chunks, done = worker.collect("c1")
    assert isinstance(done, p.Done)
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens <= seen + 3
    assert done.usage.completion_tokens == first.tokens + sum(c.tokens for c in chunks)


def test_cancel_of_an_unknown_request_is_ignored(worker: Worker) -> None:
    worker.send(p.Cancel(id="no-such-request"))
    worker.send(p.Ping(seq=3))
    assert worker.pongs.get(timeout=5).seq == 3
    _, done = worker.generate(completion("Hi", max_tokens=2))
    assert done.finish_reason == "length"


def test_a_prompt_longer_than_the_context_fails_with_context_overflow(worker: Worker) -> None:
    chunks, failed = worker.generate(completion("hello " * (N_CTX + 10), max_tokens=4))
    assert chunks == []
    assert isinstance(failed, p.Failed)
    assert failed.code == "context_overflow"
    assert str(N_CTX) in failed.message


def test_max_tokens_beyond_the_window_is_clamped_and_ends_with_length(worker: Worker) -> None:
    prompt = ", ".join(str(i) for i in range(1, 111)) + ","  # about 440 tokens of counting
    chunks, done = worker.generate(completion(prompt, max_tokens=200))
    assert isinstance(done, p.Done), done
    assert done.finish_reason == "length"
    assert done.usage.prompt_tokens + done.usage.completion_tokens == N_CTX
    assert sum(c.tokens for c in chunks) == done.usage.completion_tokens


def test_invalid_sampling_params_fail_with_bad_request(worker: Worker) -> None:
    _, failed = worker.generate(completion("Hi", max_tokens=4, top_p=0.0))
    assert isinstance(failed, p.Failed)
    assert failed.code == "bad_request" and failed.message == "request.params.top_p: expected a number in (0, 1]"


def test_chunks_are_whole_unicode_text(worker: Worker) -> None:
    """Accents and emoji arrive as valid str chunks, never a replacement character."""
    req = p.ChatRequest(
        messages=[p.ChatMessage(role="user", content="Écris une phrase en français avec des accents et un emoji 😀.")],
        params=p.SamplingParams(max_tokens=60, temperature=0.0))
    chunks, done = worker.generate(req)
    assert isinstance(done, p.Done)
    text = text_of(chunks)
    assert all(isinstance(c.text, str) for c in chunks)
    assert "\ufffd" not in text
    assert text.encode("utf-8").decode("utf-8") == text
    assert any(ord(ch) > 127 for ch in text), text
    assert all(unicodedata.category(ch) != "Cs" for ch in text)


def test_requests_queue_and_are_answered_in_order(worker: Worker) -> None:
    worker.send(p.Generate(id="q1", request=completion("One", max_tokens=3)))
    worker.send(p.Generate(id="q2", request=completion("Two", max_tokens=3)))
    _, d1 = worker.collect("q1")
    _, d2 = worker.collect("q2")
    assert (d1.id, d2.id) == ("q1", "q2")


# ---------------------------------------------------------------------------------------------
# Ending


def test_closing_stdin_makes_the_worker_exit_promptly(spawn: Any, smollm2_path: Path) -> None:
    w = spawn()
    w.start(smollm2_path)
    w.send(p.Generate(id="g", request=completion("1, 2, 3,", max_tokens=400)))
    assert isinstance(w.recv(), p.Chunk)
    w.proc.stdin.close()
    started = time.monotonic()
    assert w.wait(timeout=5) == 0
    assert time.monotonic() - started < 2


def test_shutdown_cancels_the_running_request_and_exits_zero(spawn: Any, smollm2_path: Path) -> None:
    w = spawn()
    w.start(smollm2_path)
    w.send(p.Generate(id="g", request=completion("1, 2, 3,", max_tokens=400)))
    w.send(p.Generate(id="queued", request=completion("Hi", max_tokens=4)))
    assert isinstance(w.recv(), p.Chunk)
    w.send(p.Shutdown())
    _, done = w.collect("g")
    assert done.finish_reason == "cancelled"
    chunks, done = w.collect("queued")
    assert (chunks, done.finish_reason, done.usage.completion_tokens) == ([], "cancelled", 0)
    assert w.wait(timeout=10) == 0


def test_a_truncated_model_exits_with_code_3_and_says_why(spawn: Any, smollm2_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as src, broken.open("wb") as dst:
        dst.write(src.read(1 << 20))
    w = spawn()
    w.send(p.WorkerSettings(model_path=str(broken), n_ctx=N_CTX, n_threads=2))
    assert w.wait(timeout=60) == 3
    assert w.messages.empty()
    assert eventually(lambda: any("cannot load model" in line for line in w.stderr)), w.stderr
    last = [line for line in w.stderr if "cannot load model" in line]
    assert last and f"{broken}: " in last[-1], w.stderr
    assert last[-1].split(f"{broken}: ", 1)[1].strip(), "the line should give llama.cpp's reason"


def test_a_missing_model_file_exits_with_code_3(spawn: Any, tmp_path: Path) -> None:
    w = spawn()
    w.send(p.WorkerSettings(model_path=str(tmp_path / "nope.gguf")))
    assert w.wait(timeout=30) == 3


def test_a_first_frame_that_is_not_settings_exits_with_code_2(spawn: Any) -> None:
    w = spawn()
    w.send(p.Ping(seq=1))
    assert w.wait(timeout=30) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_worker_dies_with_its_parent_even_if_stdin_stays_open() -> None:
    """A parent killed with SIGKILL takes the worker with it, though this test keeps its stdin open."""
    read_end, write_end = os.pipe()  # kept open here: EOF cannot be what ends the worker
    spawner = ("import subprocess, sys, time\n"
               "w = subprocess.Popen([sys.executable, '-m', 'optimanode.worker'], stdin=0, stdout=subprocess.DEVNULL)\n"
               "print(w.pid, flush=True)\n"
               "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", spawner], cwd=ROOT, stdin=read_end, stdout=subprocess.PIPE)
    try:
        os.close(read_end)
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        time.sleep(0.5)  # let the worker reach prctl
        parent.kill()
        parent.wait(timeout=10)
        assert eventually(lambda: not _alive(pid))
    finally:
        os.close(write_end)
        parent.kill()


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's reaper may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_greedy_shortcut_picks_what_llamas_greedy_sampler_picks(smollm2_path: Path) -> None:
    """``Engine._argmax`` (no sampler chain) against llama.cpp's greedy sampler, token by token."""
    from optimanode.worker.engine import Engine

    engine = Engine(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=2, n_batch=512),
                    lambda msgs: None)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        for prompt in (b"The history of the Roman Empire", b"def fib(n):", b"1, 2, 3,"):
            llama_cpp.llama_memory_seq_rm(engine.mem, 0, -1, -1)
            tokens = engine.tokenize(prompt, add_bos=True, special=False)
            batch = (llama_cpp.llama_token * len(tokens))(*tokens)
            assert llama_cpp.llama_decode(engine.ctx, llama_cpp.llama_batch_get_one(batch, len(tokens))) == 0
            for _ in range(24):
                ours = engine._argmax(-1)
                assert ours == llama_cpp.llama_sampler_sample(chain, engine.ctx, -1)
                one = (llama_cpp.llama_token * 1)(ours)
                assert llama_cpp.llama_decode(engine.ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
    finally:
        llama_cpp.llama_sampler_free(chain)
        engine.close()
