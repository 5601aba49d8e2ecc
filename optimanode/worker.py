"""The model worker: one child process per enabled model, ``python -m optimanode.worker``.

This is the only module that imports ``llama_cpp``; the node talks to it over its stdin/stdout
pipes with the frames of ``optimanode.protocol`` (4-byte big-endian length, then a MessagePack
body). It serves up to ``WorkerSettings.parallel`` requests at once with continuous batching on
llama.cpp's low-level API (``llama_decode`` on a ``llama_batch`` we fill ourselves, one sampler
chain per request); llama-cpp-python's high-level ``Llama`` is not used at all (it would allocate
a second, single-sequence KV cache and copy every logits row into numpy).

Start-up
    File descriptor 1 is duplicated into a private frame writer, then fd 2 is copied over fd 1:
    whatever llama.cpp or a library prints to "stdout" lands on stderr and cannot corrupt the
    frame stream. On Linux the worker asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG;
    note that it fires when the *thread* that spawned the worker exits, so the node must spawn
    from a long-lived thread); stdin reaching EOF is the portable guarantee and also ends it.
    SIGINT is ignored: a Ctrl-C at the node's terminal reaches the whole process group, and the
    node, not the terminal, decides when its workers stop (Shutdown, EOF, or SIGTERM/SIGKILL).
    The first frame must be a ``WorkerSettings``. The reader thread starts before the model
    loads, so pings are answered and EOF is noticed while loading. The context gets a persistent
    ggml CPU threadpool, as llama-server's does (``_Threadpool``: about 5 % more tokens/s for one
    stream than llama.cpp's pool-per-decode default). The model is loaded and
    warmed up (``Engine._warm_up``: one full micro-batch of prompt, four generated tokens, a step
    of two sequences, both sampling paths), so that a kernel that crashes does so while the node
    still calls the model ``starting``, never on a request; then ``Ready`` is sent, with what the
    warm-up ran. ``WorkerSettings.safe_mode`` loads the model without llama.cpp's extra buffer
    types (repacked weights, AMX) and keeps llama.cpp's default threadpool: the node sets it after
    a worker died of a fatal signal while loading.

Crash evidence
    ``faulthandler`` writes every thread's Python stack to stderr on SIGSEGV, SIGBUS, SIGILL,
    SIGFPE and SIGABRT (the node keeps stderr's tail in the crash event), and ``_BlackBox`` keeps
    what the worker is doing (phase, the decode step's tokens, sequences and request ids) in a
    page shared with the supervisor, which reads it after the process died.

Threads
    * The reader thread reads frames: ``Ping`` is answered with ``Pong`` at once (even while a
      batch is decoded: llama.cpp releases the GIL), ``Cancel`` sets the flag of that request,
      ``Generate`` is queued, ``Shutdown`` cancels everything and ends the serving loop, EOF
      exits the process at once (the node is gone). A frame that does not decode is reported on
      stderr and skipped.
    * The main thread runs the batching loop below. Every ``Generate`` ends with exactly one
      ``Done`` or ``Failed``; the frames of one step are written together (one write).
    * Writes to stdout go through one lock (frames never interleave).

Slots and the context
    The llama.cpp context has ``n_seq_max = parallel`` sequences; slot *i* owns sequence *i*.
    The KV cache is llama.cpp's per-sequence layout (``kv_unified = false``, what ``llama-server
    -np N`` uses): each sequence has its own ``n_ctx / parallel`` cells, which llama.cpp rounds
    up to a multiple of 256 (so ``Ready.n_ctx``, the real total, can exceed the configured
    ``n_ctx``: 512 with parallel=4 becomes 4 x 256 = 1024). That per-slot size is the window a
    request must fit in. A slot never holds more than its window, so the cache as a whole never
    overflows whatever the mix of requests, and a sequence's attention reads only its own
    cells (with the unified layout every token attends over all sequences' cells). Flash
    attention is left to llama.cpp's automatic choice, as in llama-server.

The loop (one iteration = one ``llama_decode``)
    a. Take what the reader queued (blocking only when nothing runs; woken from idle, wait
       1 ms so that requests sent together start in the same batch). A running request whose
       cancel flag is set ends at once with ``Done(finish_reason="cancelled")`` (so a cancel
       lands within one token); a waiting one is answered the same way without evaluating
       anything. Requests beyond the free slots wait in arrival order (the node's admission
       bounds them).
    b. A waiting request is checked (params, template, prompt length vs. the slot window) and
       put in a free slot: the one whose cached tokens share the longest prefix with its
       prompt (prefix reuse, below); among equals the one that keeps the running sequence
       ids consecutive (a hole left by a finished request, else a neighbour of the running
       block), then the lowest.
    c. The running sequence ids are kept consecutive: llama.cpp splits a batch of per-sequence
       cells into one micro-batch (one pass over the weights) per run of consecutive ids, so
       sequences 0, 2 and 5 would cost three passes a step. When a request in the middle ends
       and leaves a hole, a running sequence is moved into it: ``llama_memory_seq_cp`` across
       streams replaces the destination's cells with a copy of the source's at once in the
       cache's bookkeeping and queues a copy of the whole stream buffer (a few MiB for a small
       model), which llama.cpp performs, in order, at the start of the next ``llama_decode``
       before that batch writes any cell. That decode follows in the same step, so the source
       (which keeps its cells and tokens as a reusable cache) may take a new request at once.
       The destination's own cached tokens are lost. Models with a recurrent state are never
       moved (``seq_cp`` shares their state instead of copying it).
    d. One ``llama_batch`` is built: one token (the last one sampled) for every generating
       sequence, then, with what is left of ``n_batch``, the next chunk of prompt tokens of the
       sequences still in prompt processing, oldest request first (chunked prefill: a long
       prompt is spread over several steps of at most ``n_batch`` tokens, so the streams that
       are generating still get a token every step). On the CPU only the oldest request's
       prompt goes into a step: there a step costs about one pass over the weights (W) plus a
       per-token compute (c) that is large, so k prompts of p tokens evaluated together give
       every one of them its first token after W + k·c·p, while one per step gives the i-th
       its first token after i·(W + c·p): the same time for the last, much sooner for the
       others whenever c·p > W (a few tokens on a CPU; SmolLM2 on 2 cores: W ≈ 9 ms,
       c ≈ 3 ms). With layers on a GPU, c is small and prompts share steps up to ``n_batch``.
       The cost of one per step: the last of several prompts that arrived together gets its
       first token later (one more pass over the weights per prompt before it, and the started
       streams' tokens ride in those steps). ``WorkerSettings.prefill`` ("auto", the above;
       "one_per_step"; "together": every waiting prompt, up to ``n_batch``) lets the operator
       choose. Tokens are ordered by sequence id: a
       micro-batch takes consecutive ids in batch order. Logits are asked for only where a token
       will be sampled: each generating token, and the last prompt token of a sequence whose
       prompt completes in this batch.
    e. ``llama_decode`` once. Each sequence with a logits row is sampled with its own chain,
       ``llama_sampler_sample(chain, ctx, i)``: llama.cpp reads row *i* in place, nothing is
       copied into Python. Plain greedy requests (temperature 0, no repeat penalty) have no
       chain: ``_argmax`` takes the first highest logit of the row through a numpy view of it,
       which is what the greedy sampler picks without the chain's copy of the row into a
       candidates array. Then end of generation / stop string / max tokens are checked; a
       finished request gets its ``Done`` and leaves its slot at once. The step's frames are
       written with one write.
    ``llama_decode`` returning 1 (no KV cells for the batch; the slot windows make it
    unexpected) leaves the cache as it was: each sequence of the batch is then decoded on its
    own, and the ones that still do not fit fail with ``context_overflow`` while the others go
    on. Any other error fails the sequences of that batch with ``internal`` and clears their
    cells; the other slots go on.

Prefix reuse
    A slot remembers the tokens whose K/V its sequence holds (``_Slot.cached``); when a request
    ends they stay (freeing them would give no other slot any room: the cells are per
    sequence) until the slot is reused. A new request goes to the free slot sharing the
    longest prefix with its prompt; ``llama_memory_seq_rm(mem, seq, n_common, -1)`` drops the
    rest and only the remaining prompt tokens are evaluated (at least the last one, whose
    logits give the first token). The second turn of a chat thus evaluates only the new turn.
    A cancelled request keeps its cells too; a failed one clears them. Set
    ``OPTIMANODE_WORKER_TRACE=1`` to get one stderr line per request (slot, prompt tokens
    reused and evaluated) and per move.

Requests
    * Text completion: the prompt is tokenized with the model's own BOS rule (special tokens are
      parsed, like llama-cpp-python's ``create_completion``). Chat: the messages are rendered with
      the GGUF ``tokenizer.chat_template`` (``Jinja2ChatFormatter``, generation prompt added);
      no template → ``Failed(code="bad_request")``.
    * Context: a prompt that leaves no room for one token in its slot (``prompt_tokens >=``
      the slot window) fails with ``code="context_overflow"``. A ``max_tokens`` beyond the
      window is clamped to what fits and the request ends with ``finish_reason="length"``
      there, like any length limit.
    * Sampling: one llama.cpp sampler chain per request. Temperature 0 is greedy (the chain
      ends in a greedy sampler, so it is deterministic); otherwise top-k, top-p, min-p,
      temperature and a distribution sampler seeded from ``params.seed`` (None: a fresh random
      seed). Seeds are taken modulo 2**32 - 1 so none hits llama.cpp's "random" value. A repeat
      penalty (over the last 64 tokens, prompt included) is added only when it is not 1.
      Each chain is private to its request, so a seeded request repeats whatever else runs
      beside it. Each row of a batch is computed on its own (the CPU kernels do not mix rows),
      so a greedy request gives the same text alone, batched, or after a reused prefix; the
      tests check this on SmolLM2.
    * Streaming: one ``Chunk`` per token once its text is whole: token bytes pass through an
      incremental UTF-8 decoder, so a character split over tokens is sent once complete
      (``Chunk.tokens`` counts the tokens it covers), and text that could be the start of a stop
      string is held back until it cannot be. Only the held-back tail is searched for stop
      strings, never the whole output. The stop string and anything after it is not sent.
      ``sum(Chunk.tokens) == usage.completion_tokens`` always holds, so the last chunk may
      carry empty text (for example the tokens of a stop string). An end-of-generation token
      (``llama_vocab_is_eog``) ends with "stop" and is not counted.
    * An exception inside one request becomes ``Failed(code="internal")`` and the worker goes on.
    * ``Timings``: ``ttft_s`` is from the worker reading the ``Generate`` frame to the first
      sampled token (time waiting for a slot included); ``tokens_per_s`` counts completion
      tokens after the first.

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
import faulthandler
import os
import queue
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from optimanode import protocol as p

EXIT_OK, EXIT_CRASH, EXIT_PROTOCOL, EXIT_LOAD = 0, 1, 2, 3

# How many recent tokens a repeat penalty looks at (llama-cpp-python's last_n_tokens_size).
PENALTY_LAST_N = 64
# How long the loop, woken from idle by a request, waits for the others sent with it.
COALESCE_S = 0.001
# One stderr line per finished request (slot, prompt tokens reused/evaluated, outcome).
TRACE = os.environ.get("OPTIMANODE_WORKER_TRACE", "") not in ("", "0")
# The warm-up (Engine._warm_up): the longest prompt batch it decodes, the tokens it generates, and
# the text its prompt is made of.
WARMUP_MAX_BATCH = 512
WARMUP_GENERATE = 4
WARMUP_TEXT = (b"The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
               b"a single step; numbers like 3.14159, 2718 and 42 mix with words, punctuation and code: "
               b"def f(x): return x * 2\n")

# stderr for our own lines: a private copy, made in main(), so that nothing a library does to fd 2
# can hide a load failure's explanation.
_err_fd = 2
# The last error lines llama.cpp logged, to name the reason of a failed load.
_llama_errors: collections.deque[str] = collections.deque(maxlen=16)


def _log(msg: str) -> None:
    try:
        os.write(_err_fd, f"optimanode.worker: {msg}\n".encode("utf-8", "replace"))
    except OSError:
        pass


class _BlackBox:
    """What the worker is doing, written where the supervisor can read it after a crash.

    The supervisor passes an unlinked file of BLACKBOX_SIZE bytes as an inherited descriptor
    (``OPTIMANODE_WORKER_BLACKBOX_FD``); the worker maps it and, before each ``llama_decode``,
    writes one record: ``D`` (in llama_decode) or ``A`` (after it), the phase, the batch's tokens
    and sequences, and the ids of the requests in it (tab-separated, NUL-terminated). A fatal
    signal leaves the last record in the page cache, so the crash event can say "SIGSEGV in
    llama_decode during prompt evaluation of a 31-token batch, request X" without the dead
    process writing anything. One small memory write a step; no record when there is no fd
    (a worker started by hand, or Windows).
    """

    def __init__(self) -> None:
        self._map: Any = None

    def open_from_env(self) -> None:
        fd = os.environ.get("OPTIMANODE_WORKER_BLACKBOX_FD", "")
        if not fd.isdigit():
            return
        import mmap

        try:
            self._map = mmap.mmap(int(fd), p.BLACKBOX_SIZE)
        except (OSError, ValueError) as exc:
            _log(f"no black box ({exc})")

    def enter(self, phase: str, tokens: int, seqs: int, requests: Iterable[str]) -> None:
        m = self._map
        if m is None:
            return
        rec = f"D\t{phase}\t{tokens}\t{seqs}\t{','.join(requests)}".encode("utf-8", "replace")
        rec = rec[: p.BLACKBOX_SIZE - 1] + b"\0"
        m[: len(rec)] = rec

    def leave(self) -> None:
        if self._map is not None:
            self._map[0] = 65  # "A": llama_decode returned; what follows is sampling and streaming


_blackbox = _BlackBox()


def _fault_injection(safe_mode: bool) -> None:
    """Tests only: ``OPTIMANODE_TEST_FAULT`` makes the warm-up die of a real signal.

    ``warmup-segv`` (a read of address 0), ``warmup-sigill`` or ``warmup-sigbus``; with the suffix
    ``-always`` also in safe mode, otherwise only outside it (the shape of the AMX fault, which
    safe mode avoids). Unset in production: the check is one dictionary look-up per load.
    """
    fault = os.environ.get("OPTIMANODE_TEST_FAULT", "")
    if not fault.startswith("warmup-") or (safe_mode and not fault.endswith("-always")):
        return
    kind = fault.removeprefix("warmup-").removesuffix("-always")
    _log(f"OPTIMANODE_TEST_FAULT={fault}: dying of {kind} in the warm-up")
    if kind == "segv":
        ctypes.string_at(0)  # a real invalid read: SIGSEGV
    sig = {"sigill": signal.SIGILL, "sigbus": signal.SIGBUS}.get(kind)
    if sig is not None:
        os.kill(os.getpid(), sig)


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
        self._write(p.frame(msg))

    def send_many(self, msgs: Iterable[Any]) -> None:
        """Several frames in one write: one system call per loop step, however many streams."""
        self._write(b"".join(p.frame(m) for m in msgs))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            with self._lock:
                while view:
                    view = view[self._out.write(view):]
        except OSError:  # BrokenPipeError and friends: nobody is listening any more
            _log("stdout closed: the node is gone; exiting")
            os._exit(EXIT_OK)


# ---------------------------------------------------------------------------------------------
# Request state


@dataclass(eq=False)
class _Job:
    id: str
    request: p.InferenceRequest
    # When the reader thread took the Generate frame (ttft counts from here).
    received: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Reject(Exception):
    """A request that cannot be served as sent; becomes ``Failed(code, message)``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Jobs:
    """Requests taken but not finished, and the queue the main thread takes them from."""

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

    def take(self, block: bool, timeout: float | None = None) -> list[_Job | None]:
        """Everything queued so far (None marks Shutdown); with ``block``, wait for at least one."""
        out: list[_Job | None] = []
        if block:
            try:
                out.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def finished(self, job: _Job) -> None:
        with self._lock:
            self._active.pop(job.id, None)

    def unanswered(self) -> int:
        with self._lock:
            return len(self._active)


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
# The model and the batching loop


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


def _runs(seqs: list[int]) -> int:
    """How many runs of consecutive ids ``seqs`` holds (0, 1, 2, 5 -> 2)."""
    ids = sorted(seqs)
    return sum(1 for i, s in enumerate(ids) if i == 0 or s != ids[i - 1] + 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case for a follow-up turn: one C-level comparison
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class _Run:
    """One request in a slot, from its first prompt token to its Done."""

    job: _Job
    prompt: list[int]
    max_tokens: int
    sampler: Any  # llama_sampler_p, freed when the run ends; None: greedy by _argmax
    stream: TextStream
    order: int  # admission order: prompt chunks go to the oldest request first
    reused: int  # prompt tokens whose cells were kept from the slot's previous request
    pos: int  # tokens of this sequence in the KV cells == position of the next token
    pending: int = -1  # the token sampled last and not yet decoded (-1: still in the prompt)
    n_out: int = 0
    t_first: float | None = None
    t_last: float | None = None
    # Set while a batch is built: prompt tokens in it, and the batch row to sample (-1: none).
    chunk: int = 0
    row: int = -1


@dataclass(eq=False)
class _Slot:
    seq: int
    # Tokens whose K/V sit in this sequence's cells, at positions 0..len-1 (kept after a request
    # ends, for prefix reuse).
    cached: list[int] = field(default_factory=list)
    run: _Run | None = None



# ---------------------------------------------------------------------------------------------
# A persistent CPU threadpool (what llama-server attaches through common_init_from_params)


class _ThreadpoolParams(ctypes.Structure):
    """``struct ggml_threadpool_params`` (ggml.h; GGML_MAX_N_THREADS = 512)."""

    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


class _Threadpool:
    """ggml's CPU threadpool, created once and attached to the context.

    Without one, llama.cpp makes a disposable pool for every ``llama_decode``: its threads are
    created and joined each token, and sleep between graph nodes rather than poll. llama-server
    attaches a persistent pool (ggml's default params: polling level 50) and so does this worker.
    llama-cpp-python 0.3.36 does not bind these functions: they are reached through ctypes, by
    ggml's backend registry as llama.cpp's common code does, so a build whose CPU backend is a
    loadable module works too. Anything missing (another build, another platform) leaves the
    context with llama.cpp's default and says so on stderr; ``OPTIMANODE_WORKER_THREADPOOL=0``
    turns it off (for comparisons).
    """

    def __init__(self, ctx: Any, n_threads: int, enabled: bool = True) -> None:
        self.handle: int | None = None
        self._free: Any = None
        if not enabled or os.environ.get("OPTIMANODE_WORKER_THREADPOOL", "1") == "0":
            return
        try:
            self._attach(ctx, n_threads)
        except (OSError, AttributeError) as exc:
            _log(f"no persistent threadpool ({exc}); llama.cpp makes one per decode")

    def _attach(self, ctx: Any, n_threads: int) -> None:
        lib = llama_cpp.llama_cpp._base_path  # type: ignore[attr-defined]
        names = {"linux": "libggml{}.so", "darwin": "libggml{}.dylib", "win32": "ggml{}.dll"}
        pattern = names.get(sys.platform, "libggml{}.so")
        ggml = ctypes.CDLL(str(lib / pattern.format("")))
        base = ctypes.CDLL(str(lib / pattern.format("-base")))
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        if not dev:
            raise OSError("no CPU backend")
        reg = ggml.ggml_backend_dev_backend_reg(dev)
        new_addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
        free_addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free")
        if not new_addr or not free_addr:
            raise OSError("the CPU backend exports no ggml_threadpool_new")
        new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ThreadpoolParams))(new_addr)
        self._free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free_addr)
        base.ggml_threadpool_params_init.restype = None
        base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
        params = _ThreadpoolParams()
        base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        handle = new(ctypes.byref(params))
        if not handle:
            raise OSError(f"ggml_threadpool_new failed for {n_threads} threads")
        attach = llama_cpp.llama_cpp._lib.llama_attach_threadpool  # type: ignore[attr-defined]
        attach.restype = None
        attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        # One pool for generation and prompts: the worker sets n_threads_batch = n_threads.
        attach(ctx, handle, handle)
        self.handle = handle

    def free(self) -> None:
        """After ``llama_free`` of the context that uses it."""
        if self.handle is not None:
            self._free(self.handle)
            self.handle = None


class Engine:
    """The model, one llama.cpp context with ``parallel`` sequences, and the loop serving them.

    ``send_many`` receives the messages of each step (chunks, Done, Failed) in order.
    """

    def __init__(self, settings: p.WorkerSettings, send_many: Callable[[list[Any]], None]) -> None:
        self._send_many = send_many
        self._out: list[Any] = []
        self._jobs: _Jobs | None = None
        self._waiting: collections.deque[_Job] = collections.deque()
        self._order = 0
        # Counters for tests and the trace: prompt tokens asked for, and those actually evaluated.
        self.prompt_tokens_total = 0
        self.prompt_tokens_evaluated = 0

        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers
        # Safe mode: no extra buffer types (the CPU "repack" and AMX buffers, what llama-server's
        # --no-repack turns off): the weights stay in the file's layout and the plain kernels run.
        self.safe_mode = settings.safe_mode
        mparams.use_extra_bufts = not settings.safe_mode
        self.model = llama_cpp.llama_model_load_from_file(settings.model_path.encode("utf-8"), mparams)
        if not self.model:
            raise RuntimeError("llama_model_load_from_file failed")
        self.ctx: Any = None
        self.threadpool: _Threadpool | None = None
        self.batch: llama_cpp.llama_batch | None = None
        try:
            self._init_context(settings)
        except BaseException:
            self.close()
            raise

    def _init_context(self, settings: p.WorkerSettings) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._row_type = ctypes.c_float * self.n_vocab  # one row of logits, for _argmax
        parallel = max(1, settings.parallel)
        if parallel > llama_cpp.llama_max_parallel_sequences():
            _log(f"parallel={parallel} is over llama.cpp's limit; "
                 f"using {llama_cpp.llama_max_parallel_sequences()}")
            parallel = llama_cpp.llama_max_parallel_sequences()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx
        # One token per generating sequence must always fit in a batch.
        n_batch = max(parallel, min(settings.n_batch, settings.n_ctx) if settings.n_ctx else settings.n_batch)
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = parallel
        cparams.n_threads = cparams.n_threads_batch = settings.n_threads
        cparams.kv_unified = False
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        # Safe mode keeps llama.cpp's default (per-decode) threadpool.
        self.threadpool = _Threadpool(self.ctx, settings.n_threads, enabled=not settings.safe_mode)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        # Sequences are moved between slots only where a move is a plain copy of KV cells
        # (llama_kv_cache across streams); a recurrent state is shared, not copied, by seq_cp.
        self.movable = parallel > 1 and not (llama_cpp.llama_model_is_recurrent(self.model)
                                             or llama_cpp.llama_model_is_hybrid(self.model))
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        # Prompt processing on the CPU is compute-bound (see step d of the module docstring): one
        # request's prompt per step. Offloaded to a GPU, prompts are cheap per token: fill n_batch.
        on_gpu = settings.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        self.one_prompt_per_step = settings.prefill == "one_per_step" or (settings.prefill == "auto" and not on_gpu)
        # Each sequence has its own n_ctx_seq cells (n_ctx / parallel, rounded up to 256).
        self.window = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.slots = [_Slot(seq=i) for i in range(parallel)]
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):  # every token of ours belongs to exactly one sequence
            self.batch.n_seq_id[i] = 1
        self._piece_buf = ctypes.create_string_buffer(256)
        self._tok_buf = (llama_cpp.llama_token * 4096)()
        self.chat: Jinja2ChatFormatter | None = None
        template = llama_cpp.llama_model_chat_template(self.model, None)
        if template:
            self.chat = Jinja2ChatFormatter(
                template=template.decode("utf-8", "replace"),
                eos_token=self._token_text(llama_cpp.llama_vocab_eos(self.vocab)),
                bos_token=self._token_text(llama_cpp.llama_vocab_bos(self.vocab)),
                add_generation_prompt=True,
            )
        t0 = time.monotonic()
        self.warmup = self._warm_up()
        self.warmup_s = time.monotonic() - t0

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        for slot in getattr(self, "slots", []):
            if slot.run is not None:
                _free_sampler(slot.run.sampler)
                slot.run = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.threadpool is not None:
            self.threadpool.free()
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    # -- tokens -------------------------------------------------------------------------------

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        n = llama_cpp.llama_tokenize(self.vocab, text, len(text), self._tok_buf, len(self._tok_buf),
                                     add_bos, special)
        if n < 0:  # the buffer is too small: -n is the count; keep the bigger buffer
            self._tok_buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), self._tok_buf, -n, add_bos, special)
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n})")
        return self._tok_buf[:n]

    def piece(self, token: int) -> bytes:
        """The bytes of one token (not rendering control tokens), in a buffer reused across calls."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, -n, 0, False)
        return self._piece_buf.raw[:n]

    def prompt_tokens(self, request: p.InferenceRequest) -> list[int]:
        if isinstance(request, p.CompletionRequest):
            return self.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
        if self.chat is None:
            raise _Reject("bad_request", "model has no chat template")
        try:
            text = self.chat(messages=[{"role": m.role, "content": m.content} for m in request.messages]).prompt
        except Exception as exc:  # the template's raise_exception, e.g. roles out of order
            raise _Reject("bad_request", f"chat template: {exc}") from exc
        tokens = self.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        # Templates usually write the BOS themselves; add it only where the model wants one and
        # the template left it out.
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        if llama_cpp.llama_vocab_get_add_bos(self.vocab) and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    def _sampler(self, params: p.SamplingParams, prompt: list[int]) -> Any:
        """The request's sampler chain; None for plain greedy, which ``_argmax`` serves."""
        if params.temperature == 0.0 and params.repeat_penalty == 1.0:
            return None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
        if params.temperature == 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = params.seed if params.seed is not None else secrets.randbits(32)
            for s in (llama_cpp.llama_sampler_init_top_k(params.top_k),
                      llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
                      llama_cpp.llama_sampler_init_min_p(params.min_p, 1),
                      llama_cpp.llama_sampler_init_temp(params.temperature),
                      llama_cpp.llama_sampler_init_dist(seed % 0xFFFFFFFF)):
                llama_cpp.llama_sampler_chain_add(chain, s)
        if params.repeat_penalty != 1.0:  # the penalty window starts in the prompt
            for token in prompt[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(chain, token)
        return chain

    def _warm_up(self) -> tuple[int, int, int]:
        """Run every kernel a request will run before Ready, so that one that crashes does so here.

        A 2-token warm-up once declared a model ready whose first real prompt then crashed
        (ggml's AMX kernels on Sapphire Rapids take another path for large batches): so the
        warm-up decodes one full micro-batch of prompt (``n_batch``, at most WARMUP_MAX_BATCH,
        spread over several sequences where one slot's window is smaller), generates
        WARMUP_GENERATE tokens one at a time (the single-row kernels), with ``parallel > 1``
        decodes one step of two sequences at once, samples through both paths (a chain and
        ``_argmax``), and clears the cells. Returns (prompt batch tokens, generated tokens, most
        sequences in one step).
        """
        b = self.batch
        assert b is not None
        target = min(self.n_batch, WARMUP_MAX_BATCH)
        room = max(1, self.window - WARMUP_GENERATE - 2)  # cells one sequence may fill here
        text = self.tokenize(WARMUP_TEXT, add_bos=False, special=False) or [0]
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        pos = [0] * len(self.slots)
        rows: list[int] = []
        n = 0
        for seq in range(len(self.slots)):
            take = min(room, target - n)
            if take <= 0:
                break
            for k in range(take):
                t = bos if k == 0 and bos >= 0 else text[k % len(text)]
                b.token[n], b.pos[n], b.seq_id[n][0], b.logits[n] = t, k, seq, k == take - 1
                n += 1
            pos[seq] = take
            rows.append(n - 1)
        b.n_tokens = n
        self._decode_checked(n, len(rows), "warm-up", fault=True)
        # Both sampling paths once: a chain (the penalty makes _sampler build one) and _argmax.
        chain = self._sampler(p.SamplingParams(temperature=0.0, repeat_penalty=1.1), text[:8])
        llama_cpp.llama_sampler_sample(chain, self.ctx, rows[0])
        llama_cpp.llama_sampler_free(chain)
        last = [self._argmax(r) for r in rows]
        most = len(rows)
        for step in range(WARMUP_GENERATE):
            # The last step decodes two sequences at once where there are two slots.
            seqs = [0, 1] if step == WARMUP_GENERATE - 1 and len(self.slots) > 1 else [0]
            for i, seq in enumerate(seqs):
                t = last[seq] if seq < len(last) else max(bos, 0)
                b.token[i], b.pos[i], b.seq_id[i][0], b.logits[i] = t, pos[seq], seq, 1
                pos[seq] += 1
            b.n_tokens = len(seqs)
            self._decode_checked(len(seqs), len(seqs), "warm-up")
            last = [self._argmax(i) for i in range(len(seqs))]
            most = max(most, len(seqs))
        llama_cpp.llama_memory_clear(self.mem, True)
        return n, WARMUP_GENERATE, most

    def _decode_checked(self, n_tokens: int, n_seqs: int, phase: str, fault: bool = False) -> None:
        _blackbox.enter(phase, n_tokens, n_seqs, ())
        if fault:
            _fault_injection(self.safe_mode)
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        _blackbox.leave()
        if rc != 0:
            raise RuntimeError(f"{phase} llama_decode of {n_tokens} tokens returned {rc}")

    # -- the loop -----------------------------------------------------------------------------

    def serve(self, jobs: _Jobs) -> None:
        """Serve until Shutdown has been seen and every request taken has been answered."""
        self._jobs = jobs
        closing = False
        while True:
            running = any(s.run is not None for s in self.slots)
            idle = not running and not self._waiting
            if closing and idle and jobs.unanswered() == 0:
                return
            # Block only when there is nothing to decode; after Shutdown, poll for a Generate
            # that was accepted just before it and is still on its way into the queue.
            taken = jobs.take(block=idle, timeout=0.05 if closing else None)
            if idle and taken and not closing:
                # Woken from idle: requests sent together are usually still being decoded by
                # the reader thread. A millisecond lets them join the first batch instead of
                # waiting behind the first request's prompt.
                time.sleep(COALESCE_S)
                taken += jobs.take(block=False)
            for job in taken:
                if job is None:
                    closing = True
                else:
                    self._waiting.append(job)
            # Running requests first, so each request's messages stay in order (a cancelled
            # running request ends before a cancelled waiting one is answered).
            for slot in self.slots:
                if slot.run is not None and slot.run.job.cancelled.is_set():
                    self._finish(slot, "cancelled")
            self._admit()
            if any(s.run is not None for s in self.slots):
                self._step()
            self._flush()

    def _flush(self) -> None:
        if self._out:
            # A copy: the list itself stays, the text streams' emit callbacks append to it.
            msgs = list(self._out)
            self._out.clear()
            self._send_many(msgs)

    def _answer(self, job: _Job, msg: Any) -> None:
        """Queue a request's final message; its id is free from now on."""
        assert self._jobs is not None
        self._jobs.finished(job)
        self._out.append(msg)

    def _admit(self) -> None:
        if any(job.cancelled.is_set() for job in self._waiting):
            keep: collections.deque[_Job] = collections.deque()
            for job in self._waiting:
                if job.cancelled.is_set():
                    self._answer(job, _done(job, "cancelled", 0, 0, None, None))
                else:
                    keep.append(job)
            self._waiting = keep
        while self._waiting:
            free = [s for s in self.slots if s.run is None]
            if not free:
                return
            job = self._waiting.popleft()
            try:
                self._start(job, free)
            except _Reject as r:
                self._answer(job, p.Failed(id=job.id, code=r.code, message=r.message))
            except Exception as exc:
                _log(f"request {job.id} failed:\n{traceback.format_exc().rstrip()}")
                self._answer(job, p.Failed(id=job.id, code="internal", message=str(exc) or type(exc).__name__))

    def _start(self, job: _Job, free: list[_Slot]) -> None:
        params = job.request.params
        try:
            params.check()
        except ValueError as exc:
            raise _Reject("bad_request", str(exc)) from exc
        tokens = self.prompt_tokens(job.request)
        if not tokens:
            raise _Reject("bad_request", "the prompt is empty")
        room = self.window - len(tokens)
        if room < 1:
            per = f" per slot ({len(self.slots)} slots)" if len(self.slots) > 1 else ""
            raise _Reject("context_overflow",
                          f"the prompt is {len(tokens)} tokens; the context window is {self.window}{per}")
        # The free slot sharing the longest prefix (at least the last prompt token is evaluated:
        # its logits give the first token). Among equals, the one that leaves the fewest runs of
        # consecutive running sequence ids (a hole first, then a neighbour of the running block),
        # so no move is needed to keep them consecutive (see _compact); then the lowest id.
        # Reuse comes first: skipped prompt tokens are compute saved, a later move only a copy.
        running = [s.seq for s in self.slots if s.run is not None]

        def key(s: _Slot) -> tuple[int, int, int]:
            n = min(_common_prefix(s.cached, tokens), len(tokens) - 1)
            return n, -_runs([*running, s.seq]), -s.seq

        slot = max(free, key=key)
        n_common = key(slot)[0]
        if n_common < len(slot.cached):
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, n_common, -1):
                # A memory that cannot drop a tail (recurrent models): start this sequence over.
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                n_common = 0
            del slot.cached[n_common:]
        self._order += 1
        out = self._out
        job_id = job.id
        slot.run = _Run(
            job=job, prompt=tokens, max_tokens=min(params.max_tokens, room),
            sampler=self._sampler(params, tokens),
            stream=TextStream(params.stop, lambda text, n: out.append(p.Chunk(id=job_id, text=text, tokens=n))),
            order=self._order, reused=n_common, pos=n_common)
        self.prompt_tokens_total += len(tokens)
        self.prompt_tokens_evaluated += len(tokens) - n_common

    def _compact(self) -> None:
        """Keep the running sequence ids consecutive, moving sequences into holes if needed.

        With per-sequence KV cells llama.cpp splits a batch into one micro-batch per run of
        consecutive sequence ids (each a full pass over the weights): running sequences 0, 2
        and 5 would cost three passes a step instead of one. A move is ``llama_memory_seq_cp``
        across streams: the bookkeeping changes now, the buffer copy is queued and done at the
        start of the next ``llama_decode``, before it writes any cell; ``_step`` calls that
        right after this, so no cell of the source can be rewritten before it is copied. The
        source keeps its cells and tokens as a reusable cache.
        """
        running = [s for s in self.slots if s.run is not None]
        n = len(running)
        if not self.movable or n < 2 or running[-1].seq - running[0].seq + 1 == n:
            return
        # The window of n consecutive slots that already holds the most running sequences.
        start = max(range(len(self.slots) - n + 1),
                    key=lambda w: (sum(w <= s.seq < w + n for s in running), -w))
        holes = [s for s in self.slots[start:start + n] if s.run is None]
        movers = [s for s in running if not start <= s.seq < start + n]
        for src, dst in zip(movers, holes):
            llama_cpp.llama_memory_seq_cp(self.mem, src.seq, dst.seq, -1, -1)
            dst.run, src.run = src.run, None
            dst.cached = list(src.cached)
            if TRACE:
                _log(f"request {dst.run.job.id}: moved from slot {src.seq} to slot {dst.seq}")  # type: ignore[union-attr]

    def _step(self) -> None:
        """Build one batch, decode it, sample every sequence that has a logits row."""
        self._compact()
        budget = self.n_batch
        plan: list[_Slot] = []
        for slot in self.slots:
            run = slot.run
            if run is not None and run.pending >= 0 and budget > 0:
                run.chunk, budget = 0, budget - 1
                plan.append(slot)
        prefill = sorted((s for s in self.slots if s.run is not None and s.run.pending < 0),
                         key=lambda s: s.run.order)  # type: ignore[union-attr]
        for i, slot in enumerate(prefill):
            if budget <= 0 or (i and self.one_prompt_per_step):
                break
            run = slot.run
            assert run is not None
            run.chunk = min(budget, len(run.prompt) - run.pos)
            budget -= run.chunk
            plan.append(slot)
        plan.sort(key=lambda s: s.seq)
        self._decode(plan)

    def _commit(self, plan: list[_Slot]) -> None:
        """The plan's tokens are in the cells now: advance each run, sample where there is a row."""
        for slot in plan:
            run = slot.run
            assert run is not None
            if run.chunk:
                slot.cached.extend(run.prompt[run.pos:run.pos + run.chunk])
                run.pos += run.chunk
            else:
                slot.cached.append(run.pending)
                run.pos += 1
            if run.row >= 0:
                self._sample(slot, run)

    def _fill(self, plan: list[_Slot]) -> None:
        b = self.batch
        assert b is not None
        token, pos, seq_id, logits = b.token, b.pos, b.seq_id, b.logits
        n = 0
        for slot in plan:
            run = slot.run
            assert run is not None
            if not run.chunk:
                token[n], pos[n], seq_id[n][0], logits[n] = run.pending, run.pos, slot.seq, 1
                run.row = n
                n += 1
                continue
            seq, start = slot.seq, run.pos
            for k, t in enumerate(run.prompt[start:start + run.chunk]):
                token[n], pos[n], seq_id[n][0], logits[n] = t, start + k, seq, 0
                n += 1
            if start + run.chunk == len(run.prompt):
                logits[n - 1] = 1
                run.row = n - 1
            else:
                run.row = -1
        b.n_tokens = n

    def _decode(self, plan: list[_Slot]) -> None:
        """Decode the plan's tokens with one llama_decode, then sample."""
        self._fill(plan)
        b = self.batch
        assert b is not None
        _blackbox.enter("prompt evaluation" if any(s.run.chunk for s in plan) else "generation",  # type: ignore[union-attr]
                        b.n_tokens, len(plan), (s.run.job.id for s in plan))  # type: ignore[union-attr]
        rc = llama_cpp.llama_decode(self.ctx, b)
        _blackbox.leave()
        if rc == 0:
            self._commit(plan)
        elif rc == 1 and len(plan) > 1:
            # No cells for the batch; the cache is as it was before the call. Find the sequence
            # that does not fit by decoding each on its own (a rare path: the slot windows
            # should make it impossible); the others lose nothing but a shared pass.
            for slot in plan:
                self._decode([slot])
        elif rc == 1:
            slot = plan[0]
            self._fail(slot, "context_overflow",
                       f"no room left in the KV cache for this request (slot {slot.seq}, "
                       f"position {slot.run.pos}, window {self.window}): llama_decode returned 1")  # type: ignore[union-attr]
        else:
            # Invalid batch, abort or a fatal error: the cells of these sequences may hold part
            # of the batch. Fail them and clear their cells; the other slots go on.
            _log(f"llama_decode returned {rc} for a batch of {len(plan)} sequences")
            for slot in plan:
                self._fail(slot, "internal", f"llama_decode returned {rc}")

    def _argmax(self, row: int) -> int:
        """Greedy sampling without a sampler chain: the first highest logit of ``row``, read in
        place (what llama.cpp's greedy sampler picks). The chain would first copy the whole row
        into a candidates array (vocabulary x 12 bytes); this is 85 -> 12 us a token for SmolLM2."""
        addr = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx, row), ctypes.c_void_p).value
        return int(np.frombuffer(self._row_type.from_address(addr), dtype=np.float32).argmax())

    def _sample(self, slot: _Slot, run: _Run) -> None:
        if run.sampler is None:
            token = self._argmax(run.row)
        else:
            token = llama_cpp.llama_sampler_sample(run.sampler, self.ctx, run.row)
        now = time.monotonic()
        if run.t_first is None:
            run.t_first = now
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop")
            return
        run.n_out += 1
        run.t_last = now
        if run.stream.feed(self.piece(token)):
            self._finish(slot, "stop")
        elif run.n_out >= run.max_tokens:
            self._finish(slot, "length")
        else:
            run.pending = token

    def _finish(self, slot: _Slot, reason: str) -> None:
        """End the slot's request with Done; its cells stay for prefix reuse."""
        run = slot.run
        assert run is not None
        if not run.stream.stopped:
            run.stream.finish()
        slot.run = None
        _free_sampler(run.sampler)
        if TRACE:
            _log(f"request {run.job.id}: slot {slot.seq}, prompt {len(run.prompt)} tokens "
                 f"({run.reused} reused, {len(run.prompt) - run.reused} evaluated), "
                 f"{run.n_out} generated, {reason}")
        self._answer(run.job, _done(run.job, reason, len(run.prompt), run.n_out, run.t_first, run.t_last))

    def _fail(self, slot: _Slot, code: str, message: str) -> None:
        """End the slot's request with Failed and clear its cells (they may be incomplete)."""
        run = slot.run
        assert run is not None
        slot.run = None
        _free_sampler(run.sampler)
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.cached.clear()
        _log(f"request {run.job.id} failed ({code}): {message}")
        self._answer(run.job, p.Failed(id=run.job.id, code=code, message=message))


def _free_sampler(sampler: Any) -> None:
    if sampler is not None:
        llama_cpp.llama_sampler_free(sampler)


def _done(job: _Job, finish: str, n_prompt: int, n_out: int, t_first: float | None,
          t_last: float | None) -> p.Done:
    now = time.monotonic()
    total = now - job.received
    span = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
    return p.Done(
        id=job.id, finish_reason=finish,
        usage=p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out),
        timings=p.Timings(ttft_s=(t_first - job.received) if t_first is not None else total,
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
    # A fatal signal (SIGSEGV in a kernel, say) prints every thread's Python stack into the
    # stderr tail the crash event keeps, before the process dies of that same signal.
    faulthandler.enable(file=_err_fd, all_threads=True)
    _blackbox.open_from_env()
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

    jobs = _Jobs()
    threading.Thread(target=_reader, args=(0, writer, jobs), name="reader", daemon=True).start()

    t0 = time.monotonic()
    _blackbox.enter("loading", 0, 0, ())
    if not os.path.isfile(settings.model_path):
        _log(f"cannot load model {settings.model_path}: no such file")
        return EXIT_LOAD
    try:
        engine = Engine(settings, writer.send_many)
    except Exception as exc:
        # llama.cpp logs the root cause first, then "failed to load model" lines around it.
        reason = _llama_errors[0] if _llama_errors else f"{type(exc).__name__}: {exc}"
        _log(f"cannot load model {settings.model_path}: {reason}")
        return EXIT_LOAD
    warm_batch, warm_generated, warm_seqs = engine.warmup
    if settings.safe_mode:
        _log("safe mode: loaded without extra buffer types (weight repacking, AMX) and with "
             "llama.cpp's default threadpool")
    _blackbox.enter("idle", 0, 0, ())
    writer.send(p.Ready(pid=os.getpid(), n_ctx=engine.n_ctx, load_s=time.monotonic() - t0,
                        backend=_backend(), chat_template=engine.chat is not None,
                        warmup_batch=warm_batch, warmup_generated=warm_generated, warmup_seqs=warm_seqs,
                        warmup_s=engine.warmup_s, safe_mode=settings.safe_mode))
    engine.serve(jobs)
    # Shutdown: every request taken has been answered (cancelled ones with Done).
    engine.close()
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # os._exit: the reader thread may sit in a blocking read, and the model is already freed.
    os._exit(code)
