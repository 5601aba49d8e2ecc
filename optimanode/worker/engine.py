"""The model and the serving loop: everything of the worker that calls llama.cpp.

This is the only module of the package that imports ``llama_cpp`` (``process`` gets it only by
importing this one); ``import-linter`` keeps the pure modules free of it. ``Engine`` loads the model, makes one
context with ``parallel`` sequences (slot *i* owns sequence *i*, per-sequence KV cells), attaches a
persistent CPU threadpool (``_Threadpool``), warms up (``Engine._warm_up``: every kernel a request
will run, before Ready) and then ``serve``s: each loop step takes what the reader queued, ends
cancelled requests, admits waiting ones into free slots (``slots.choose_slot``), keeps the running
sequences consecutive (``slots.compaction_moves``), builds one batch (``slots.plan_step``), calls
``llama_decode`` once and samples every sequence that has a logits row (its own sampler chain, or
``_argmax`` for plain greedy). docs/architecture.md, "The worker, step by step", has the details.

llama.cpp functions are always called as attributes of the ``llama_cpp`` module
(``llama_cpp.llama_decode(...)``), so a test that patches the module is seen here.
"""

from __future__ import annotations

import collections
import ctypes
import os
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from optimanode import protocol as p
from optimanode.worker.blackbox import _blackbox, _fault_injection
from optimanode.worker.jobs import _done, _Job, _Jobs, _Reject
from optimanode.worker.log import TRACE, _log
from optimanode.worker.slots import _Run, _Slot, choose_slot, compaction_moves, plan_step
from optimanode.worker.text import TextStream

# How many recent tokens a repeat penalty looks at (llama-cpp-python's last_n_tokens_size).
PENALTY_LAST_N = 64
# How long the loop, woken from idle by a request, waits for the others sent with it.
COALESCE_S = 0.001
# The warm-up (Engine._warm_up): the longest prompt batch it decodes, the tokens it generates, and
# the text its prompt is made of.
WARMUP_MAX_BATCH = 512
WARMUP_GENERATE = 4
WARMUP_TEXT = (b"The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
               b"a single step; numbers like 3.14159, 2718 and 42 mix with words, punctuation and code: "
               b"def f(x): return x * 2\n")

# The last error lines llama.cpp logged, to name the reason of a failed load.
_llama_errors: collections.deque[str] = collections.deque(maxlen=16)


@llama_cpp.llama_log_callback
def _on_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # 4 is GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp/_logger.py's table is out of date); the
    # rest is the chatter that verbose=False hides.
    if level == 4:
        line = text.decode("utf-8", "replace").rstrip()
        if line:
            _llama_errors.append(line)
            _log(f"llama.cpp: {line}")


def route_llama_log() -> None:
    """Send llama.cpp's log through ``_on_llama_log`` (errors only, to stderr and ``_llama_errors``)."""
    llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))


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
        # Prompt processing on the CPU is compute-bound (docs/architecture.md, "The worker, step by
        # step", step d): one request's prompt per step. Offloaded to a GPU, prompts are cheap per
        # token: fill n_batch.
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
        # The request's limits were checked when its frame was decoded (they are on the types).
        params = job.request.params
        tokens = self.prompt_tokens(job.request)
        if not tokens:
            raise _Reject("bad_request", "the prompt is empty")
        room = self.window - len(tokens)
        if room < 1:
            per = f" per slot ({len(self.slots)} slots)" if len(self.slots) > 1 else ""
            raise _Reject("context_overflow",
                          f"the prompt is {len(tokens)} tokens; the context window is {self.window}{per}")
        # Longest shared prefix, then fewest runs of running ids, then the lowest (slots.choose_slot).
        slot, n_common = choose_slot(free, [s.seq for s in self.slots if s.run is not None], tokens)
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
        if not self.movable:
            return
        for src, dst in compaction_moves(self.slots):
            llama_cpp.llama_memory_seq_cp(self.mem, src.seq, dst.seq, -1, -1)
            dst.run, src.run = src.run, None
            dst.cached = list(src.cached)
            if TRACE:
                _log(f"request {dst.run.job.id}: moved from slot {src.seq} to slot {dst.seq}")  # type: ignore[union-attr]

    def _step(self) -> None:
        """Build one batch, decode it, sample every sequence that has a logits row."""
        self._compact()
        self._decode(plan_step(self.slots, self.n_batch, self.one_prompt_per_step))

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
