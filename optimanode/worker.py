"""The model worker: one child process per enabled model, ``python -m optimanode.worker``.

This is the only module that imports ``llama_cpp``; the node talks to it over its stdin/stdout
pipes with the frames of ``optimanode.protocol`` (4-byte big-endian length, then a MessagePack
body).

Start-up
    File descriptor 1 is duplicated into a private frame writer, then fd 2 is copied over fd 1:
    whatever llama.cpp or a library prints to "stdout" lands on stderr and cannot corrupt the
    frame stream. On Linux the worker asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG;
    note that it fires when the *thread* that spawned the worker exits, so the node must spawn
    from a long-lived thread); stdin reaching EOF is the portable guarantee and also ends it.
    SIGINT is ignored: a Ctrl-C at the node's terminal reaches the whole process group, and the
    node, not the terminal, decides when its workers stop (Shutdown, EOF, or SIGTERM/SIGKILL).
    The first frame must be a ``WorkerSettings``. The reader thread starts before the model
    loads, so pings are answered and EOF is noticed while loading. The model is loaded, one
    token is evaluated and sampled as a warm-up (``Ready`` means able to generate), and then
    ``Ready`` is sent.

Threads
    * The reader thread reads frames: ``Ping`` is answered with ``Pong`` at once (even while a
      generation runs: llama.cpp releases the GIL), ``Cancel`` sets the flag of that request,
      ``Generate`` is queued, ``Shutdown`` cancels everything and ends the serving loop, EOF
      exits the process at once (the node is gone). A frame that does not decode is reported on
      stderr and skipped.
    * The main thread serves queued requests one at a time. Each request's state is a small
      ``_Job`` keyed by its id and every message carries the id, so continuous batching can later
      run several at once. Every ``Generate`` ends with exactly one ``Done`` or ``Failed``.
    * Writes to stdout go through one lock (frames never interleave).

Requests
    * Text completion: the prompt is tokenized with the model's own BOS rule (special tokens are
      parsed, like llama-cpp-python's ``create_completion``). Chat: the messages are rendered with
      the GGUF ``tokenizer.chat_template`` (``Jinja2ChatFormatter``, generation prompt added);
      no template → ``Failed(code="bad_request")``.
    * Context: a prompt that leaves no room for one token (``prompt_tokens >= n_ctx``) fails with
      ``code="context_overflow"``. A ``max_tokens`` beyond the window is clamped to what fits and
      the request ends with ``finish_reason="length"`` there, like any length limit.
    * The KV cache is reset before every request, so a request's output does not depend on the
      previous one (greedy and seeded requests repeat exactly). Prefix reuse can come with the
      batching work.
    * Sampling: llama-cpp-python's sampler chain via ``Llama.generate``; temperature 0 is greedy
      (the chain ends in a greedy sampler, so it is deterministic); otherwise top-k, top-p,
      min-p, temperature and a distribution sampler seeded from ``params.seed`` (None: a fresh
      random seed). Seeds are taken modulo 2**32 - 1 so none hits llama.cpp's "random" value.
    * Streaming: one ``Chunk`` per token once its text is whole: token bytes pass through an
      incremental UTF-8 decoder, so a character split over tokens is sent once complete
      (``Chunk.tokens`` counts the tokens it covers), and text that could be the start of a stop
      string is held back until it cannot be. Only the held-back tail is searched for stop
      strings, never the whole output. The stop string and anything after it is not sent.
      ``sum(Chunk.tokens) == usage.completion_tokens`` always holds, so the last chunk may
      carry empty text (for example the tokens of a stop string). An end-of-generation token
      (``llama_vocab_is_eog``) ends with "stop" and is not counted.
    * Cancel: the flag is checked after each token, before the next is evaluated, so at most
      one more token is produced; the request ends with ``Done(finish_reason="cancelled")``.
      A request cancelled while still queued ends the same way without evaluating anything.
    * An exception inside one request becomes ``Failed(code="internal")`` and the worker goes on.
    * ``Timings``: ``ttft_s`` is from taking the request off the queue to the first sampled
      token; ``tokens_per_s`` counts completion tokens after the first.

Exit codes
    0  ``Shutdown`` served, or stdin/stdout closed (the node is gone)
    2  protocol broken: the first frame is not ``WorkerSettings``, or a frame length is over
       ``MAX_FRAME`` (the stream cannot be resynchronised)
    3  the model could not be loaded; the last stderr line says why
    1  anything unexpected (a Python traceback precedes it on stderr)
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import os
import queue
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from optimanode import protocol as p

EXIT_OK, EXIT_CRASH, EXIT_PROTOCOL, EXIT_LOAD = 0, 1, 2, 3

# stderr for our own lines: a private copy, because llama-cpp-python points fd 2 at /dev/null
# while it loads a model with verbose=False, and a load failure must still be explained.
_err_fd = 2
# The last error lines llama.cpp logged, to name the reason of a failed load.
_llama_errors: collections.deque[str] = collections.deque(maxlen=16)


def _log(msg: str) -> None:
    try:
        os.write(_err_fd, f"optimanode.worker: {msg}\n".encode("utf-8", "replace"))
    except OSError:
        pass


@llama_cpp.llama_log_callback
def _on_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # 4 is GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp/_logger.py's table is out of date); the
    # rest is the chatter that verbose=False hides.
    if level == 4:
        line = text.decode("utf-8", "replace").rstrip()
        if line:
            _llama_errors.append(line)
            _log(f"llama.cpp: {line}")


# ---------------------------------------------------------------------------------------------
# Frames


class _StreamBroken(Exception):
    """The frame stream cannot be resynchronised."""


def _read_exact(fd: int, n: int) -> bytes | None:
    # os.read, not sys.stdin.buffer: a daemon thread blocked inside a BufferedReader can abort
    # interpreter shutdown ("could not acquire lock for <stdin>").
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = os.read(fd, n - got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_frame(fd: int) -> bytes | None:
    """The next frame body from ``fd``, or None at EOF."""
    header = _read_exact(fd, p.FRAME_HEADER.size)
    if header is None:
        return None
    (length,) = p.FRAME_HEADER.unpack(header)
    if length > p.MAX_FRAME:
        raise _StreamBroken(f"frame length {length} is over the limit of {p.MAX_FRAME} bytes")
    return _read_exact(fd, length) if length else b""


class _Writer:
    def __init__(self, out: Any) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, msg: Any) -> None:
        data = memoryview(p.frame(msg))
        try:
            with self._lock:
                while data:
                    data = data[self._out.write(data):]
        except OSError:  # BrokenPipeError and friends: nobody is listening any more
            _log("stdout closed: the node is gone; exiting")
            os._exit(EXIT_OK)


# ---------------------------------------------------------------------------------------------
# Request state


@dataclass(eq=False)
class _Job:
    id: str
    request: p.InferenceRequest
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Reject(Exception):
    """A request that cannot be served as sent; becomes ``Failed(code, message)``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Jobs:
    """Requests taken but not finished, and the queue the main thread serves from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, _Job] = {}
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.closed = False

    def add(self, job: _Job) -> bool:
        with self._lock:
            if self.closed or job.id in self._active:
                return False
            self._active[job.id] = job
        self._queue.put(job)
        return True

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._active.get(job_id)
        if job is not None:  # an unknown id has finished already: nothing to do
            job.cancelled.set()

    def close(self) -> None:
        """Cancel everything taken so far and end the serving loop once they are answered."""
        with self._lock:
            self.closed = True
            jobs = list(self._active.values())
        for job in jobs:
            job.cancelled.set()
        self._queue.put(None)

    def next(self) -> _Job | None:
        return self._queue.get()

    def finished(self, job: _Job) -> None:
        with self._lock:
            self._active.pop(job.id, None)


# ---------------------------------------------------------------------------------------------
# Streaming text


class TextStream:
    """Turns token bytes into chunks of whole characters, holding back possible stop-string starts.

    ``emit(text, tokens)`` receives each chunk; ``tokens`` counts the tokens fed since the last one.
    """

    def __init__(self, stops: list[str], emit: Callable[[str, int], None]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = stops
        self._emit = emit
        self._held = ""
        self._tokens = 0
        self.stopped = False

    def feed(self, piece: bytes) -> bool:
        """Add one token's bytes; True when a stop string was found (the stream is then finished)."""
        self._tokens += 1
        self._held += self._decoder.decode(piece)
        if not self._stops:
            self._release(len(self._held))
            return False
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = self._held[: min(hits)]
            self.stopped = True
            self.finish()
            return True
        self._release(len(self._held) - self._partial_stop())
        return False

    def finish(self) -> None:
        """Send what is left (also the bytes of an unfinished character, as U+FFFD)."""
        if not self.stopped:
            self._held += self._decoder.decode(b"", final=True)
        if self._held or self._tokens:
            self._emit(self._held, self._tokens)
        self._held, self._tokens = "", 0

    def _partial_stop(self) -> int:
        """Length of the longest tail of the held text that is a proper prefix of a stop string."""
        held, best = self._held, 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(held)), best, -1):
                if held.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, n: int) -> None:
        if n > 0:
            self._emit(self._held[:n], self._tokens)
            self._held, self._tokens = self._held[n:], 0


# ---------------------------------------------------------------------------------------------
# The model


def _backend() -> str:
    """What this llama.cpp build can run on (not what the model was offloaded to)."""
    if not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").lower()
    for needle, name in (("cuda", "cuda"), ("metal", "metal"), ("vulkan", "vulkan"),
                         ("hip", "rocm"), ("sycl", "sycl")):
        if needle in info:
            return name
    return "gpu"


class Model:
    def __init__(self, settings: p.WorkerSettings, writer: _Writer) -> None:
        self.llm = llama_cpp.Llama(
            model_path=settings.model_path,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            n_batch=settings.n_batch,
            verbose=False,
        )
        self.writer = writer
        self.n_ctx = self.llm.n_ctx()
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.chat: Jinja2ChatFormatter | None = None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            self.chat = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(self.llm.token_eos()),
                bos_token=self._token_text(self.llm.token_bos()),
                add_generation_prompt=True,
            )
        self._warm_up()

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def _warm_up(self) -> None:
        tokens = self.llm.tokenize(b"Hi", add_bos=True, special=False)
        self.llm.eval(tokens)
        self.llm.sample(temp=0.0)
        self.llm.reset()

    def piece(self, token: int) -> bytes:
        """The bytes of one token (not rendering control tokens), without llama-cpp-python's
        32-byte limit."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, -n, 0, False)
        return self._piece_buf.raw[:n]

    def prompt_tokens(self, request: p.InferenceRequest) -> list[int]:
        if isinstance(request, p.CompletionRequest):
            return self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
        if self.chat is None:
            raise _Reject("bad_request", "model has no chat template")
        try:
            text = self.chat(messages=[{"role": m.role, "content": m.content} for m in request.messages]).prompt
        except Exception as exc:  # the template's raise_exception, e.g. roles out of order
            raise _Reject("bad_request", f"chat template: {exc}") from exc
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        # Templates usually write the BOS themselves; add it only where the model wants one and
        # the template left it out.
        bos = self.llm.token_bos()
        if llama_cpp.llama_vocab_get_add_bos(self.vocab) and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    # -----------------------------------------------------------------------------------------

    def serve(self, job: _Job) -> p.Done | p.Failed:
        """Stream the request's chunks and return its final message (sent once the id is free)."""
        t0 = time.monotonic()
        try:
            return self._generate(job, t0)
        except _Reject as r:
            return p.Failed(id=job.id, code=r.code, message=r.message)
        except Exception as exc:
            _log(f"request {job.id} failed:\n{traceback.format_exc().rstrip()}")
            return p.Failed(id=job.id, code="internal", message=str(exc) or type(exc).__name__)

    def _generate(self, job: _Job, t0: float) -> p.Done:
        params = job.request.params
        try:
            params.check()
        except ValueError as exc:
            raise _Reject("bad_request", str(exc)) from exc
        if job.cancelled.is_set():
            return self._done(job, "cancelled", 0, 0, t0, None, None)
        tokens = self.prompt_tokens(job.request)
        if not tokens:
            raise _Reject("bad_request", "the prompt is empty")
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise _Reject("context_overflow",
                          f"the prompt is {len(tokens)} tokens; the context window is {self.n_ctx}")
        max_tokens = min(params.max_tokens, room)

        seed = params.seed if params.seed is not None else secrets.randbits(32)
        self.llm.set_seed(seed % 0xFFFFFFFF)
        self.llm.reset()
        stream = TextStream(params.stop, lambda text, n: self.writer.send(p.Chunk(id=job.id, text=text, tokens=n)))
        finish, n_out = "length", 0
        t_first: float | None = None
        t_last: float | None = None
        gen = self.llm.generate(tokens, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                temp=params.temperature, repeat_penalty=params.repeat_penalty, reset=True)
        try:
            for token in gen:
                now = time.monotonic()
                if t_first is None:
                    t_first = now
                if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                    finish = "stop"
                    break
                n_out, t_last = n_out + 1, now
                if stream.feed(self.piece(token)):
                    finish = "stop"
                    break
                if n_out >= max_tokens:
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
        finally:
            gen.close()
        if not stream.stopped:
            stream.finish()
        return self._done(job, finish, len(tokens), n_out, t0, t_first, t_last)

    def _done(self, job: _Job, finish: str, n_prompt: int, n_out: int, t0: float,
              t_first: float | None, t_last: float | None) -> p.Done:
        total = time.monotonic() - t0
        span = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
        return p.Done(
            id=job.id, finish_reason=finish,
            usage=p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out),
            timings=p.Timings(ttft_s=(t_first - t0) if t_first is not None else total,
                              tokens_per_s=(n_out - 1) / span if n_out > 1 and span > 0 else 0.0,
                              total_s=total),
        )


# ---------------------------------------------------------------------------------------------
# Process


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(EXIT_OK)


def _reader(fd: int, writer: _Writer, jobs: _Jobs) -> None:
    try:
        while True:
            try:
                body = read_frame(fd)
            except _StreamBroken as exc:
                _log(f"protocol error: {exc}; exiting")
                os._exit(EXIT_PROTOCOL)
            if body is None:
                _log("stdin closed: the node is gone; exiting")
                os._exit(EXIT_OK)
            try:
                msg = p.decode_to_worker(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                _log(f"ignored a frame that does not decode ({len(body)} bytes): {exc}")
                continue
            if isinstance(msg, p.Ping):
                writer.send(p.Pong(seq=msg.seq))
            elif isinstance(msg, p.Cancel):
                jobs.cancel(msg.id)
            elif isinstance(msg, p.Generate):
                if not jobs.add(_Job(id=msg.id, request=msg.request)):
                    code, why = (("shutting_down", "the worker is shutting down") if jobs.closed
                                 else ("bad_request", "a request with this id is already running"))
                    writer.send(p.Failed(id=msg.id, code=code, message=why))
            elif isinstance(msg, p.Shutdown):
                jobs.close()
            else:
                _log(f"ignored a {type(msg).__name__} frame: settings are only read at start")
    except BaseException:
        _log(f"reader thread crashed:\n{traceback.format_exc().rstrip()}")
        os._exit(EXIT_CRASH)


def main() -> int:
    global _err_fd
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    _err_fd = os.dup(2)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))
    writer = _Writer(out)

    try:
        body = read_frame(0)
    except _StreamBroken as exc:
        _log(f"protocol error: {exc}")
        return EXIT_PROTOCOL
    if body is None:
        _log("stdin closed before the settings frame; exiting")
        return EXIT_OK
    try:
        settings = msgspec.msgpack.decode(body, type=p.WorkerSettings)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _log(f"protocol error: the first frame must be WorkerSettings: {exc}")
        return EXIT_PROTOCOL
    if settings.parallel > 1:
        _log(f"parallel={settings.parallel} is not supported yet; serving one request at a time")

    jobs = _Jobs()
    threading.Thread(target=_reader, args=(0, writer, jobs), name="reader", daemon=True).start()

    t0 = time.monotonic()
    if not os.path.isfile(settings.model_path):
        _log(f"cannot load model {settings.model_path}: no such file")
        return EXIT_LOAD
    try:
        model = Model(settings, writer)
    except Exception as exc:
        # llama.cpp logs the root cause first, then "failed to load model" lines around it.
        reason = _llama_errors[0] if _llama_errors else f"{type(exc).__name__}: {exc}"
        _log(f"cannot load model {settings.model_path}: {reason}")
        return EXIT_LOAD
    writer.send(p.Ready(pid=os.getpid(), n_ctx=model.n_ctx, load_s=time.monotonic() - t0,
                        backend=_backend(), chat_template=model.chat is not None))

    while (job := jobs.next()) is not None:
        final = model.serve(job)
        jobs.finished(job)  # first, so the id may be reused as soon as the final message is out
        writer.send(final)
    # Shutdown: every request taken has been answered (cancelled ones with Done).
    model.llm.close()
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # os._exit: the reader thread may sit in a blocking read, and the model is already freed.
    os._exit(code)
