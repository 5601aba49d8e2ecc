"""The model and the serving loop: everything of the worker that calls llama.cpp.

This, ``embed`` and ``prefix`` (the cross-slot copy and the host prompt cache) are the only modules
of the package that import ``llama_cpp`` (``process`` gets
it only by importing this one); ``import-linter`` keeps the pure modules free of it. ``Engine`` loads the model, makes one
context with ``parallel`` sequences (slot *i* owns sequence *i*, per-sequence KV cells), attaches a
persistent CPU threadpool (``_Threadpool``), warms up (``Engine._warm_up``: every kernel a request
will run, before Ready) and then ``serve``s: each loop step takes what the reader queued, ends
cancelled requests, admits waiting ones into free slots (``slots.choose_slot``), keeps the running
sequences consecutive (``slots.compaction_moves``), builds one batch (``slots.plan_step``), calls
``llama_decode`` once and samples every sequence that has a logits row (its own sampler chain,
``_argmax`` for plain greedy, or ``_Constrained`` under a response_format's grammar, compiled by
``_grammar`` before the request takes a slot). Chats are rendered by the operator's template (a
llama.cpp built-in name, ``_BuiltinChat``, or Jinja text), else the GGUF's, else ``chatml``; a
Jinja template renders a chat's tools, and a reply that may hold tool calls streams through
``toolcalls.CallStream`` (under its grammar when tool_choice requires a call). Embed requests skip
the slots: ``serve`` hands them to ``embed.Embedder``, which decodes them on a context of its own
after each step. docs/architecture.md, "The worker, step by step", has the details.

llama.cpp functions are always called as attributes of the ``llama_cpp`` module
(``llama_cpp.llama_decode(...)``), so a test that patches the module is seen here.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import re
import secrets
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

import llama_cpp
from llama_cpp import llama_grammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from optimanode import protocol as p
from optimanode.worker import toolcalls
from optimanode.worker.blackbox import _blackbox, _decode_hang, _fault_injection
from optimanode.worker.embed import Embedder
from optimanode.worker.jobs import _done, _Job, _Jobs, _Reject
from optimanode.worker.log import STEP_LOG, TRACE, StepLog, _log
from optimanode.worker.prefix import Prefixes
from optimanode.worker.prompt_cache import prompt_cache_bytes
from optimanode.worker.progress import Progress
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
# Lists that _StderrCapture blocks open: error lines logged meanwhile are appended to each.
_log_captures: list[list[str]] = []


@llama_cpp.llama_log_callback
def _on_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # 4 is GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp/_logger.py's table is out of date); the
    # rest is the chatter that verbose=False hides.
    if level == 4:
        line = text.decode("utf-8", "replace").rstrip()
        if line:
            _llama_errors.append(line)
            for capture in _log_captures:
                capture.append(line)
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
        self._attach = attach

    def attach_to(self, ctx: Any) -> None:
        """Attach the pool to another context driven by the same thread (the embedding context)."""
        if self.handle is not None:
            self._attach(ctx, self.handle, self.handle)

    def free(self) -> None:
        """After ``llama_free`` of the context that uses it."""
        if self.handle is not None:
            self._free(self.handle)
            self.handle = None


class Engine:
    """The model, one llama.cpp context with ``parallel`` sequences, and the loop serving them.

    ``send_many`` receives the messages of each step (chunks, Done, Failed) in order; ``progress``
    counts the serving steps, for the heartbeat (``progress.py``).
    """

    def __init__(self, settings: p.WorkerSettings, send_many: Callable[[list[Any]], None],
                 progress: Progress | None = None) -> None:
        self._send_many = send_many
        self.progress = progress if progress is not None else Progress()
        self._out: list[Any] = []
        self._jobs: _Jobs | None = None
        self._waiting: collections.deque[_Job] = collections.deque()
        self._order = 0
        # Runs that asked for logprobs: (how many alternatives, entries not yet in a chunk).
        self._logprobs: dict[_Run, tuple[int, list[p.TokenLogprob]]] = {}
        self._pieces: dict[int, bytes] = {}  # token -> its bytes, for logprobs (at most the vocabulary)
        # Counters for tests and the trace: prompt tokens asked for, and those actually evaluated.
        self.prompt_tokens_total = 0
        self.prompt_tokens_evaluated = 0
        # The decode steps, timed, when OPTIMANODE_WORKER_STEP_LOG names a file (log.StepLog).
        self._steps = StepLog.open(STEP_LOG)

        llama_cpp.llama_backend_init()
        # A template the operator set is checked before the model loads, so a bad one fails the
        # load with its own message (not with the last line llama.cpp logged).
        self._chat_setting = check_chat_template(settings.chat_template)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers
        # Safe mode: no extra buffer types (the CPU "repack" and AMX buffers, what llama-server's
        # --no-repack turns off): the weights stay in the file's layout and the plain kernels run.
        self.safe_mode = settings.safe_mode
        mparams.use_extra_bufts = not settings.safe_mode
        _shares = self._gpu_params(mparams, settings)  # referenced until the model is loaded
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

    @staticmethod
    def _gpu_params(mparams: Any, settings: p.WorkerSettings) -> Any:
        """Split mode, main GPU and tensor split into ``mparams``; indices count among the GPUs the
        node pinned this worker to (CUDA_VISIBLE_DEVICES). Returns the shares array to keep alive."""
        modes = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
                 "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}
        mparams.split_mode = modes.get(settings.split_mode, llama_cpp.LLAMA_SPLIT_MODE_LAYER)
        mparams.main_gpu = settings.main_gpu
        if not settings.tensor_split:
            return None
        n = llama_cpp.llama_max_devices()
        shares = (ctypes.c_float * n)(*settings.tensor_split[:n])
        mparams.tensor_split = shares
        return shares

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
        # The KV cache's element type and flash attention (docs/configuration.md, "GPUs and memory");
        # llama.cpp refuses a quantized V cache without flash attention (the node refuses it first).
        kv_types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
        flash = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                 "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        if settings.kv_cache_type not in kv_types or settings.flash_attn not in flash:
            raise ValueError(f"kv_cache_type {settings.kv_cache_type!r} / flash_attn {settings.flash_attn!r}: "
                             f"expected one of {', '.join(kv_types)} / {', '.join(flash)}")
        cparams.type_k = cparams.type_v = kv_types[settings.kv_cache_type]
        cparams.flash_attn_type = flash[settings.flash_attn]
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
        self.one_prompt_per_step = settings.prefill in ("one_per_step", "shortest_first") or (
            settings.prefill == "auto" and not on_gpu)
        self.shortest_first = settings.prefill == "shortest_first"
        # Each sequence has its own n_ctx_seq cells (n_ctx / parallel, rounded up to 256).
        self.window = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.slots = [_Slot(seq=i) for i in range(parallel)]
        # Prefixes shared across slots and the host-RAM prompt cache (prefix.py, prompt_cache.py).
        self.prefixes = Prefixes(self.ctx, self.mem, self.model, self.slots, self.window,
                                 prompt_cache_bytes(settings.prompt_cache_mib), self.progress)
        self.progress.cache = self.prefixes.stats
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):  # every token of ours belongs to exactly one sequence
            self.batch.n_seq_id[i] = 1
        self._piece_buf = ctypes.create_string_buffer(256)
        self._tok_buf = (llama_cpp.llama_token * 4096)()
        self.chat, self.chat_template_in_force = self._chat_formatter()
        # Control tokens that are a tool-call marker of the template's family (Llama 3's
        # <|python_tag|>, Mistral's [TOOL_CALLS]): rendered for a request whose reply is parsed.
        self._marker_pieces = self._markers()
        t0 = time.monotonic()
        self.warmup = self._warm_up()
        self.warmup_s = time.monotonic() - t0
        # Embed requests (embed.py): their own context, made on the first one.
        self.embeds = Embedder(self.model, settings, self.tokenize, self.progress, self.threadpool.attach_to)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        for slot in getattr(self, "slots", []):
            if slot.run is not None:
                _free_sampler(slot.run.sampler)
                slot.run = None
        if getattr(self, "embeds", None) is not None:
            self.embeds.close()
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
        try:
            messages = toolcalls.template_messages(request.messages)
            # The model's own template renders the tools (as transformers and llama-server do).
            text = (self.chat(messages, toolcalls.template_tools(request.tools)) if request.tools
                    else self.chat(messages))
        except Exception as exc:  # the template's raise_exception, e.g. roles out of order
            raise _Reject("bad_request", f"chat template: {exc}") from exc
        tokens = self.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        # Templates usually write the BOS themselves; add it only where the model wants one and
        # the template left it out.
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        if llama_cpp.llama_vocab_get_add_bos(self.vocab) and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    def _chat_formatter(self) -> tuple[Callable[..., str], str]:
        """How chats are rendered, and its name for Ready: the operator's built-in name or Jinja
        text ("custom"), else the GGUF's own template ("file"), else FALLBACK_CHAT_TEMPLATE."""
        kind, value = self._chat_setting
        # The tool-call family of a Jinja template (toolcalls.detect); built-in ones have none.
        self.tool_family: toolcalls.Family | None = None
        if kind == "builtin":
            self.template_name = f"the built-in {value!r} chat template"
            return _BuiltinChat(value), value
        if kind == "jinja":
            self.tool_family, self.template_name = toolcalls.detect(value), "the configured chat template"
            return self._jinja_chat(value), "custom"
        template = llama_cpp.llama_model_chat_template(self.model, None)
        if template:
            text = template.decode("utf-8", "replace")
            self.tool_family, self.template_name = toolcalls.detect(text), "the model's chat template"
            return self._jinja_chat(text), "file"
        self.template_name = f"the built-in {FALLBACK_CHAT_TEMPLATE!r} chat template (the file has none)"
        return _BuiltinChat(FALLBACK_CHAT_TEMPLATE), FALLBACK_CHAT_TEMPLATE

    def _markers(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for marker in self.tool_family.markers if self.tool_family else ():
            tokens = self.tokenize(marker.encode("utf-8"), add_bos=False, special=True)
            if len(tokens) == 1 and not self.piece(tokens[0]):
                out[tokens[0]] = marker.encode("utf-8")
        return out

    def _jinja_chat(self, template: str) -> Callable[..., str]:
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self.vocab)),
            bos_token=self._token_text(llama_cpp.llama_vocab_bos(self.vocab)),
            add_generation_prompt=True,
        )
        return lambda messages, tools=None: formatter(messages=messages, tools=tools).prompt

    def _sampler(self, params: p.SamplingParams, prompt: list[int], calls: p.ChatRequest | None = None) -> Any:
        """The request's sampler chain; None for plain greedy, which ``_argmax`` serves; a
        ``_Constrained`` (the chain or None, and the grammar) for a response_format, or for the
        tool call that ``calls`` (a chat whose tool_choice is required or a function) must make.

        The chain: the logit bias, the repeat penalty, the frequency / presence penalties, then
        greedy or top-k / top-p / min-p / temperature / dist. Raises _Reject (bad_request) when a
        logit_bias token is not in the vocabulary or the grammar does not compile.
        """
        outside = [t for t in params.logit_bias if t >= self.n_vocab]
        if outside:
            raise _Reject("bad_request", f"logit_bias: token {outside[0]} is not in the model's vocabulary "
                                         f"(ids 0..{self.n_vocab - 1})")
        grammar = self._grammar(params.response_format) if params.response_format is not None else None
        if calls is not None:
            assert self.tool_family is not None  # toolcalls.check said so
            for tool in calls.tools:
                _check_counts(tool.parameters, "tools")
            try:
                gbnf = _strict_json_chars(toolcalls.grammar(self.tool_family, calls.tools, calls.tool_choice,
                                                            llama_grammar.SchemaConverter))
            except ValueError as exc:
                raise _Reject("bad_request", str(exc)) from None
            grammar = self._compile(gbnf, "tools")
        chain = self._chain(params, prompt)
        return chain if grammar is None else _Constrained(chain, grammar, self._row_type)

    def _chain(self, params: p.SamplingParams, prompt: list[int]) -> Any:
        penalized = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        if params.temperature == 0.0 and params.repeat_penalty == 1.0 and not penalized and not params.logit_bias:
            return None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if params.logit_bias:
            # First, as in llama.cpp's common_sampler: the bias is part of what everything after sees.
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for entry, (token, bias) in zip(biases, params.logit_bias.items()):
                entry.token, entry.bias = token, bias
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
                self.n_vocab, len(biases), biases))  # llama.cpp copies the array
        if params.repeat_penalty != 1.0:
            penalties = llama_cpp.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, params.repeat_penalty,
                                                               0.0, 0.0)
            # The penalty window starts in the prompt (fed to the penalty alone: nothing else
            # in the chain keeps a history).
            for token in prompt[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(penalties, token)
            llama_cpp.llama_sampler_chain_add(chain, penalties)
        if penalized:
            # A penalties sampler of their own, fed nothing from the prompt: OpenAI (and
            # llama-cpp-python's create_completion) count only the tokens generated so far. The
            # chain's accept feeds it each generated token; it looks at the last PENALTY_LAST_N
            # (llama-cpp-python's last_n_tokens_size).
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, 1.0, params.frequency_penalty, params.presence_penalty))
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
        return chain

    def _grammar(self, fmt: p.ResponseFormat) -> Any:
        """llama.cpp's grammar sampler for a response_format, or _Reject(bad_request) with the
        converter's or the grammar compiler's own message."""
        if isinstance(fmt, p.JsonSchemaFormat):
            _check_counts(fmt.schema, "response_format.schema")
            try:
                # llama-cpp-python's converter (a port of llama.cpp's json_schema_to_grammar.py).
                gbnf = _strict_json_chars(llama_grammar.json_schema_to_gbnf(json.dumps(fmt.schema)))
            except Exception as exc:  # an unsupported or broken schema: KeyError, ValueError, ...
                raise _Reject("bad_request", f"response_format.schema does not convert to a grammar: "
                                             f"{type(exc).__name__}: {exc}") from None
        elif isinstance(fmt, p.JsonObjectFormat):
            gbnf = llama_grammar.JSON_GBNF
        else:
            gbnf = fmt.gbnf
        return self._compile(gbnf, "response_format." + ("schema" if isinstance(fmt, p.JsonSchemaFormat) else "gbnf"))

    def _compile(self, gbnf: str, field: str) -> Any:
        """llama.cpp's grammar sampler for GBNF text, or _Reject(bad_request) naming ``field``.

        Bounds checked first, since what passes them is what llama.cpp's parser gets: it recurses
        once per parenthesis and dies of SIGSEGV (the whole worker) at about 18,700 levels on an
        8 MiB stack, so GRAMMAR_MAX_NESTING; a chain of rules each starting with the next crashes
        it at about 65,000 (1.1 MB of GBNF), so a converted grammar gets a direct one's size,
        GRAMMAR_MAX_CHARS (at most about 6,500 rules)."""
        what = "the grammar" if field == "response_format.gbnf" else "the grammar it converts to"
        if len(gbnf) > GRAMMAR_MAX_CHARS:
            raise _Reject("bad_request", f"{field}: {what} is {len(gbnf)} characters, more than {GRAMMAR_MAX_CHARS}")
        depth = _nesting(gbnf)
        if depth > GRAMMAR_MAX_NESTING:
            raise _Reject("bad_request", f"{field}: {what} nests parentheses {depth} deep, more than "
                                         f"{GRAMMAR_MAX_NESTING}")
        # llama.cpp's grammar parser prints its reason to stderr (fd 2), not through the log
        # callback, which gets only "failed to parse grammar": catch what it prints.
        with _StderrCapture() as printed:
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            reason = [line for line in printed.text().splitlines() if "error" in line]
            reason += [line for line in printed.logged if line not in reason]
            raise _Reject("bad_request", f"{field}: the grammar does not compile: "
                                         + ("; ".join(reason) or "llama_sampler_init_grammar failed"))
        return sampler

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
            idle = not running and not self._waiting and not self.embeds.busy
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
                elif isinstance(job.request, p.EmbedRequest):
                    refused = self.embeds.add(job)
                    if refused is not None:
                        self._answer(job, refused)
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
            if self.embeds.busy:
                self.embeds.step(self._answer)
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
        # Tools and tool_choice that cannot be served (toolcalls.check): bad_request, first.
        parse: toolcalls.Family | None = None
        constrained = False
        if isinstance(job.request, p.ChatRequest):
            try:
                parse, constrained = toolcalls.check(job.request, self.tool_family, self.template_name)
            except ValueError as exc:
                raise _Reject("bad_request", str(exc)) from None
        tokens = self.prompt_tokens(job.request)
        if not tokens:
            raise _Reject("bad_request", "the prompt is empty")
        room = self.window - len(tokens)
        if room < 1:
            per = f" per slot ({len(self.slots)} slots)" if len(self.slots) > 1 else ""
            raise _Reject("context_overflow",
                          f"the prompt is {len(tokens)} tokens; the context window is {self.window}{per}")
        # Before the request takes a slot: a response_format whose grammar does not compile is
        # refused here (bad_request), and nothing of a slot has changed.
        sampler = self._sampler(params, tokens, job.request if constrained else None)  # type: ignore[arg-type]
        # Longest shared prefix, then fewest runs of running ids, then the lowest (slots.choose_slot).
        slot, n_common = choose_slot(free, [s.seq for s in self.slots if s.run is not None], tokens)
        # Its own cells, another slot's (copied) or the host cache's (restored), whichever saves
        # the most; what the slot loses is saved to the host cache first (prefix.Prefixes).
        n_common, _ = self.prefixes.prepare(slot, n_common, tokens)
        self._order += 1
        out = self._out
        job_id = job.id
        # Logprob entries not yet in a chunk: the tokens fed since the last one, exactly those the
        # next chunk covers (_sample appends; the chunk takes them all).
        pending: list[p.TokenLogprob] = []

        def emit(text: str, n: int, calls: list[p.ToolCall] | None = None) -> None:
            more: dict[str, Any] = {"tool_calls": calls} if calls else {}
            if params.logprobs is None:
                out.append(p.Chunk(id=job_id, text=text, tokens=n, **more))
            else:
                out.append(p.Chunk(id=job_id, text=text, tokens=n, logprobs=pending[:], **more))
                pending.clear()

        # A reply that may hold tool calls goes through their parser (toolcalls.CallStream).
        stream = TextStream(params.stop, emit) if parse is None else toolcalls.CallStream(params.stop, parse, emit)
        slot.run = _Run(
            job=job, prompt=tokens, max_tokens=min(params.max_tokens, room),
            sampler=sampler, stream=stream,
            order=self._order, reused=n_common, pos=n_common)
        if params.logprobs is not None:
            self._logprobs[slot.run] = (params.logprobs, pending)
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
            self.prefixes.before_overwrite(dst)  # the hole's cells go to the host cache
            llama_cpp.llama_memory_seq_cp(self.mem, src.seq, dst.seq, -1, -1)
            self.prefixes.moved(src, dst)
            dst.run, src.run = src.run, None
            dst.cached = list(src.cached)
            if TRACE:
                _log(f"request {dst.run.job.id}: moved from slot {src.seq} to slot {dst.seq}")  # type: ignore[union-attr]

    def _step(self) -> None:
        """Build one batch, decode it, sample every sequence that has a logits row."""
        self._compact()
        plan = plan_step(self.slots, self.n_batch, self.one_prompt_per_step, self.shortest_first)
        self._rebind(plan)
        self._decode(plan)

    def _rebind(self, plan: list[_Slot]) -> None:
        """A prompt about to be evaluated for the first time looks for its prefix again.

        Admission chose the prefix when the request took its slot, but a prompt may wait steps
        for its turn to be evaluated (one prompt a step on the CPU), and meanwhile another slot
        may have evaluated the same beginning: requests that arrive together with one system
        prompt all take a slot at once, cold, and without this each would evaluate the system
        prompt again. Now the first goes, and the others copy its cells when their turn comes.
        """
        for slot in plan:
            run = slot.run
            assert run is not None
            # Only before its first chunk (nothing of its own evaluated yet: pos is still what it
            # reused), and not when just the last token is left (always evaluated).
            if not run.chunk or run.pos != run.reused or run.pos >= len(run.prompt) - 1:
                continue
            n, _ = self.prefixes.prepare(slot, run.pos, run.prompt, again=True)
            if n != run.pos:
                self.prompt_tokens_evaluated -= n - run.pos
                if TRACE:
                    _log(f"request {run.job.id}: prefix {run.pos} -> {n} tokens before its prompt was evaluated")
                run.reused = run.pos = n
                run.chunk = min(run.chunk, len(run.prompt) - n)

    def _commit(self, plan: list[_Slot]) -> None:
        """The plan's tokens are in the cells now: advance each run, sample where there is a row.

        In the requests' arrival order (not the slots'), so a step's chunks go out oldest request first.
        """
        for slot in sorted(plan, key=lambda s: s.run.order):  # type: ignore[union-attr]
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
        _decode_hang.check(self.progress.steps)
        steps = self._steps
        start = time.monotonic() if steps is not None else 0.0
        rc = llama_cpp.llama_decode(self.ctx, b)
        if steps is not None:
            prompts = [s.run.chunk for s in plan if s.run.chunk]  # type: ignore[union-attr]
            steps.write(start, time.monotonic() - start, b.n_tokens, len(plan), sum(prompts), len(prompts))
        _blackbox.leave()
        self.progress.stepped()
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

    def _token_logprob(self, row: int, token: int, top: int) -> p.TokenLogprob:
        """``token``'s log-probability and the ``top`` likeliest tokens of ``row``: a log-softmax
        over the whole vocabulary of the model's raw logits, before the logit bias, penalties,
        temperature or truncation (what OpenAI and llama-cpp-python's create_completion report)."""
        addr = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx, row), ctypes.c_void_p).value
        logits = np.frombuffer(self._row_type.from_address(addr), dtype=np.float32)
        high = float(logits.max())
        norm = high + float(np.log(np.exp(logits - high).sum(dtype=np.float64)))
        alternatives: list[p.TopLogprob] = []
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.lexsort((ids, -logits[ids]))]  # likeliest first; ties by id
            for t in ids.tolist():
                piece = self._piece_of(t)
                alternatives.append(p.TopLogprob(id=t, text=piece.decode("utf-8", "replace"), bytes=piece,
                                                 logprob=float(logits[t]) - norm))
        piece = self._piece_of(token)
        return p.TokenLogprob(id=token, text=piece.decode("utf-8", "replace"), bytes=piece,
                              logprob=float(logits[token]) - norm, top=alternatives)

    def _piece_of(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.piece(token)
        return piece

    def _sample(self, slot: _Slot, run: _Run) -> None:
        if run.sampler is None:
            token = self._argmax(run.row)
        elif isinstance(run.sampler, _Constrained):
            token = run.sampler.sample(self.ctx, run.row)
        else:
            token = llama_cpp.llama_sampler_sample(run.sampler, self.ctx, run.row)
        now = time.monotonic()
        if run.t_first is None:
            run.t_first = now
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop")
            return
        asked = self._logprobs.get(run)
        if asked is not None:
            asked[1].append(self._token_logprob(run.row, token, asked[0]))
        run.n_out += 1
        run.t_last = now
        piece = self.piece(token)
        if not piece and token in self._marker_pieces and isinstance(run.stream, toolcalls.CallStream):
            piece = self._marker_pieces[token]  # a call marker that is a control token: the parser needs it
        if run.stream.feed(piece):
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
        self._logprobs.pop(run, None)
        if TRACE:
            _log(f"request {run.job.id}: slot {slot.seq}, prompt {len(run.prompt)} tokens "
                 f"({run.reused} reused, {len(run.prompt) - run.reused} evaluated), "
                 f"{run.n_out} generated, {reason}")
        done = _done(run.job, reason, len(run.prompt), run.n_out, run.t_first, run.t_last, cached=run.reused)
        calls = run.stream.parser.calls if isinstance(run.stream, toolcalls.CallStream) else None
        if calls:
            # As OpenAI: a reply that made calls ends with "tool_calls" (unless cut by length or a cancel).
            done = msgspec.structs.replace(done, tool_calls=calls,
                                           finish_reason="tool_calls" if reason == "stop" else reason)
        self._answer(run.job, done)

    def _fail(self, slot: _Slot, code: str, message: str) -> None:
        """End the slot's request with Failed and clear its cells (they may be incomplete)."""
        run = slot.run
        assert run is not None
        slot.run = None
        _free_sampler(run.sampler)
        self._logprobs.pop(run, None)
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.cached.clear()
        _log(f"request {run.job.id} failed ({code}): {message}")
        self._answer(run.job, p.Failed(id=run.job.id, code=code, message=message))


# What chats are rendered with where the GGUF has no template and the operator set none: what
# llama-server falls back to (executors/effective.py names the same one for ExecutorStatus).
FALLBACK_CHAT_TEMPLATE = "chatml"


def builtin_chat_templates() -> list[str]:
    """The names of the chat templates this llama.cpp build has built in."""
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(names, n)
    return [name.decode("utf-8") for name in names]


def check_chat_template(setting: str) -> tuple[str, str]:
    """("builtin", name), ("jinja", text) or ("", "") for the operator's ``chat_template``.

    Raises ValueError naming the problem: a name this build does not know, or Jinja text that
    does not compile (jinja2's message, with its line).
    """
    if not setting:
        return "", ""
    names = builtin_chat_templates()
    if setting in names:
        return "builtin", setting
    if "{{" not in setting and "{%" not in setting:
        raise ValueError(f"chat_template {setting[:64]!r} is neither a template llama.cpp knows "
                         f"({', '.join(names)}) nor Jinja text")
    try:
        Jinja2ChatFormatter(template=setting, eos_token="", bos_token="")
    except Exception as exc:  # jinja2.TemplateSyntaxError and kin
        line = getattr(exc, "lineno", None)
        raise ValueError(f"chat_template does not compile: {exc}" + (f" (line {line})" if line else "")) from None
    return "jinja", setting


class _BuiltinChat:
    """Renders a chat with one of llama.cpp's built-in templates (``llama_chat_apply_template``),
    as llama-server does for a model whose file carries none."""

    def __init__(self, name: str) -> None:
        self._name = name.encode("utf-8")
        self._buf = ctypes.create_string_buffer(4096)

    def __call__(self, messages: list[dict[str, str]]) -> str:
        chat = (llama_cpp.llama_chat_message * len(messages))()
        # The bytes must outlive the call: the structs only point at them.
        keep = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
        for slot, (role, content) in zip(chat, keep):
            slot.role, slot.content = role, content
        for _ in range(2):  # the second time with a buffer of the size it asked for
            n = llama_cpp.llama_chat_apply_template(self._name, chat, len(messages), True,
                                                    self._buf, len(self._buf))
            if n < 0:
                raise ValueError(f"llama.cpp could not apply the {self._name.decode()!r} template ({n})")
            if n <= len(self._buf):
                return self._buf.raw[:n].decode("utf-8", "replace")
            self._buf = ctypes.create_string_buffer(n)
        raise RuntimeError("llama_chat_apply_template kept asking for a larger buffer")


class _StderrCapture:
    """What is written to fd 2 (and logged as an error by llama.cpp) while the block runs.

    The worker's own log goes to a private copy of stderr (log._err_fd), so what lands here is
    what llama.cpp printed (C's stderr is unbuffered); ``text()`` has it after the block.
    """

    def __enter__(self) -> _StderrCapture:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self._saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(self._file.fileno(), 2)
        self.logged: list[str] = []
        self._text = ""
        _log_captures.append(self.logged)
        return self

    def __exit__(self, *exc: object) -> None:
        _log_captures.remove(self.logged)
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self._text = self._file.read(65536).decode("utf-8", "replace")
        self._file.close()

    def text(self) -> str:
        return self._text


# What llama.cpp's grammar parser is given (docs/protocol.md, "Structured output"). Measured on
# llama-cpp-python 0.3.36 (a subprocess per grammar, bisecting): parenthesis nesting crashes the
# parser (SIGSEGV, stack overflow) at 18,710 levels, compiles at 18,671; a chain of rules each
# starting with the next crashes at about 66,000. Repetitions do not: "a"{0,10000000} compiles in
# 0.4 s and 61 MB, and llama.cpp refuses an exact count over 2,000 itself. So: a converted grammar
# gets a direct one's size, nesting is bounded with an 18x margin (the converter writes maxLength n
# as n nested groups, and llama.cpp refuses any maxLength over 1,000 anyway), and a schema's counts
# are bounded before the converter writes them out (it writes 8 characters per unit of maxLength,
# 21 per maxItems: maxLength 10**9 would be 8 GB), at a total no grammar of GRAMMAR_MAX_CHARS could hold.
GRAMMAR_MAX_CHARS = p.GBNF_MAX_CHARS
GRAMMAR_MAX_NESTING = 1024
SCHEMA_MAX_COUNTS = GRAMMAR_MAX_CHARS
_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems")
_NOT_SCHEMA_KEYS = ("enum", "const", "default", "examples")  # values, not schemas
_PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
# What llama.cpp's parser skips (a literal, a character class, a comment) or counts (a group).
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*|[()]', re.DOTALL)


def _nesting(gbnf: str) -> int:
    """How deep ``gbnf`` nests parenthesized groups (an unclosed literal counts what follows: more, never less)."""
    depth = most = 0
    for m in _GBNF_TOKEN.finditer(gbnf):
        c = m.group()
        if c == "(":
            depth += 1
            most = max(most, depth)
        elif c == ")":
            depth = max(0, depth - 1)
    return most


def _check_counts(schema: Any, field: str) -> None:
    """_Reject(bad_request) when a schema's repetition counts (minLength, maxLength, minItems,
    maxItems, and every {m,n} of a pattern) add up to more than SCHEMA_MAX_COUNTS: the converter
    would write at least a character per unit, in memory, before any size could be checked."""
    total = 0
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    total += max(0, int(min(value, 1e18)))
                elif key == "pattern" and isinstance(value, str):
                    for m in _PATTERN_COUNT.finditer(value):
                        total += max(int(m.group(1)), int(m.group(2) or 0))
                elif key not in _NOT_SCHEMA_KEYS:
                    todo.append(value)
        elif isinstance(node, list):
            todo.extend(node)
    if total > SCHEMA_MAX_COUNTS:
        raise _Reject("bad_request", f"{field}: its repetition counts (minLength, maxLength, minItems, maxItems, "
                                     f"a pattern's {{m,n}}) add up to {total}, more than {SCHEMA_MAX_COUNTS}")


# llama-cpp-python 0.3.36's schema converter lets a JSON string hold raw control characters (its
# `char` rule is [^"\\] | escapes), which JSON forbids: json.loads refuses such a reply. llama.cpp's
# own converter (and json.gbnf) exclude them; the same rule replaces the old one in the output.
_JSON_CHAR_LOOSE = "char ::= " + llama_grammar.PRIMITIVE_RULES["char"].content
_JSON_CHAR_STRICT = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def _strict_json_chars(gbnf: str) -> str:
    return "\n".join(_JSON_CHAR_STRICT if line == _JSON_CHAR_LOOSE else line for line in gbnf.split("\n"))


# llama_token_data as a numpy record, so a row of logits becomes candidates in one copy.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _Constrained:
    """Sampling under a grammar, the way llama.cpp's common_sampler does it.

    The grammar sampler costs a walk of its parse stacks for every token of the vocabulary it is
    applied to (49152 for SmolLM2). So the token is first picked without it (``_argmax``, or the
    request's chain applied to the full row), then the grammar is applied to that one candidate:
    if the grammar allows it (it usually does: the model mostly follows the format it is shown),
    it is taken; otherwise the candidates are rebuilt, the grammar masks the whole row and the
    pick is made again. Either way the grammar and the chain then accept the token.
    """

    # False: mask the whole row every token (tools/bench-grammar compares the two).
    check_first = True

    def __init__(self, chain: Any, grammar: Any, row_type: Any) -> None:
        self.chain, self.grammar = chain, grammar
        self._row_type = row_type
        n = ctypes.sizeof(row_type) // ctypes.sizeof(ctypes.c_float)
        self._ids = np.arange(n, dtype=np.int32)
        self._cand = np.zeros(n, dtype=_TOKEN_DATA)
        self._all = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._cand.ctypes.data, ctypes.POINTER(llama_cpp.llama_token_data)),
            size=n, selected=-1, sorted=False)
        self._one_data = (llama_cpp.llama_token_data * 1)()
        self._one = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._one_data, ctypes.POINTER(llama_cpp.llama_token_data)),
            size=1, selected=-1, sorted=False)
        self.rejected = 0  # picks the grammar refused

    def _logits(self, ctx: Any, row: int) -> np.ndarray:
        addr = ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, row), ctypes.c_void_p).value
        return np.frombuffer(self._row_type.from_address(addr), dtype=np.float32)

    def _pick(self, logits: np.ndarray, masked: bool) -> int:
        if self.chain is None and not masked:
            return int(logits.argmax())
        cand, arr = self._cand, self._all
        cand["id"] = self._ids  # a chain may have sorted the array in place
        cand["logit"] = logits
        cand["p"] = 0.0
        arr.size, arr.selected, arr.sorted = len(cand), -1, False
        if masked:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        if self.chain is None:
            return int(cand["logit"].argmax())  # the grammar does not reorder
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        return int(cand["id"][arr.selected])

    def sample(self, ctx: Any, row: int) -> int:
        logits = self._logits(ctx, row)
        if self.check_first:
            token = self._pick(logits, masked=False)
            one = self._one_data[0]
            one.id, one.logit, one.p = token, 0.0, 0.0
            self._one.size, self._one.selected, self._one.sorted = 1, -1, False
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._one))
        if not self.check_first or one.logit == float("-inf"):
            self.rejected += 1
            token = self._pick(logits, masked=True)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        if self.chain is not None:
            llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.grammar)
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)


def _free_sampler(sampler: Any) -> None:
    if isinstance(sampler, _Constrained):
        sampler.free()
    elif sampler is not None:
        llama_cpp.llama_sampler_free(sampler)
