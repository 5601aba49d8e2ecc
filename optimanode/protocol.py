"""Every message and event type, as frozen msgspec Structs in tagged unions, and their codecs.

Four families live here, because they are the node's contracts with what outlives one process:

* **Requests** (``CompletionRequest``, ``ChatRequest``, ``SamplingParams``): what a Gateway asks
  for; the Gateway link (docs/protocol.md) and the worker pipe both carry them unchanged.
* **Worker pipe messages** (supervisor ↔ ``python -m optimanode.worker``): length-prefixed
  MessagePack frames (4-byte big-endian length, then the body). Every request-scoped message
  carries the request id, so one worker can serve several requests at once.
* **Journal events** (``EventBody``): the ``data`` column of the journal, JSON-encoded so that
  ``sqlite3`` and ``tools/inspect-journal`` can read it without this package.
* **Gateway link messages** (``GatewayToNode``, ``NodeToGateway``, at the end): MessagePack, one
  message per binary WebSocket frame; docs/protocol.md is their reference.

Schema rules (journals outlive versions): Structs are frozen and keyword-only, new fields always
get defaults, a field's type never changes, a tag is never reused.
"""

from __future__ import annotations

import struct
import typing
from typing import Annotated, Any, Literal

import msgspec

from optimanode.constraints import (
    CHAT_TEMPLATE_NAMES,
    PREFILL_POLICIES,
    ChatTemplate,
    EnableMode,
    FlashAttn,
    KeepAlive,
    Gpus,
    KvCacheType,
    MainGpu,
    ParallelSetting,
    SAFE_MODES,
    SplitMode,
    TensorSplit,
    LogitBias,
    Penalty,
    TopLogprobs,
    NBatch,
    NCtx,
    NGpuLayers,
    NThreads,
    Prefill,
    PromptCacheMib,
    ModelDeadline,
    QueueSize,
    RequestDeadline,
    SafeMode,
    StallTimeout,
)

# PREFILL_POLICIES, SAFE_MODES and CHAT_TEMPLATE_NAMES are the protocol's names for those choices too
# (re-exported).

# ---------------------------------------------------------------------------------------------
# Requests


# Structured output (docs/protocol.md, "Structured output"): the reply is constrained by a grammar
# (llama.cpp's grammar sampler in the request's chain). The worker compiles it before the request
# takes a slot; one that does not compile is bad_request with the compiler's message.


# The most GBNF llama.cpp's grammar parser is given: a grammar's own length, and (checked by the
# worker) what a schema or tools' parameters convert to.
GBNF_MAX_CHARS = 65536


class JsonSchemaFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                       tag_field="type", tag="json_schema"):
    """JSON valid against ``schema`` (converted to GBNF by llama-cpp-python's own converter)."""

    schema: dict[str, Any]


class JsonObjectFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                       tag_field="type", tag="json_object"):
    """Any JSON value (llama.cpp's json.gbnf)."""


class GrammarFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                    tag_field="type", tag="grammar"):
    """Text in the language of a GBNF grammar (start symbol ``root``)."""

    gbnf: Annotated[str, msgspec.Meta(min_length=1, max_length=GBNF_MAX_CHARS,
                                      description="GBNF text of 1 to 65536 characters")]


ResponseFormat = JsonSchemaFormat | JsonObjectFormat | GrammarFormat


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # The limits are on the types (optimanode/constraints.py): checked while decoding.
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000, description="1..1000000")] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100, description="0..100")] = 0.8
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1, description="a number in (0, 1]")] = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0, description=">= 0")] = 40
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1, description="0..1")] = 0.05
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=10, description="a number in (0, 10]")] = 1.0
    # None: a fresh random seed per request; an int makes sampling repeatable.
    seed: int | None = None
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]],
                    msgspec.Meta(max_length=16, description="at most 16 non-empty strings of at most 256 "
                                                            "characters")] = []
    # Seconds from the node taking the request (queue wait included) to its end; past it the
    # request ends with the error deadline_exceeded. None: only the model's deadline_s, if any.
    deadline_s: RequestDeadline | None = None
    # None: free text. Else the reply is constrained by a grammar (ResponseFormat above).
    response_format: ResponseFormat | None = None
    # OpenAI's penalties, counted over the tokens generated so far (not the prompt), as
    # llama-cpp-python and OpenAI do; 0: off.
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    # Token id -> bias added to its logit before any other sampling step.
    logit_bias: LogitBias = {}
    # None: no logprobs. N: each chunk carries, per token, its log-probability and the N likeliest
    # alternatives (TokenLogprob below), from the model's raw logits.
    logprobs: TopLogprobs | None = None


# Tool calling (docs/protocol.md, "Tool calls", minor 2). The model's chat template renders
# ``tools``; the worker parses calls out of the output (Hermes/Qwen, Llama 3, Mistral families).


class ToolCall(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One function call the model made: ``arguments`` is JSON text (an object), as OpenAI's."""

    # Unique within the reply ("call_" + random hex, made by the node when the model gives none).
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    arguments: str = "{}"


class Tool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A function the model may call: ``parameters`` is a JSON Schema of its arguments object."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.-]+$",
                                      description="1 to 256 of A-Z a-z 0-9 _ . -")]
    description: str = ""
    parameters: dict[str, Any] = {}


class NamedToolChoice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """tool_choice naming one function: the reply is exactly one call of it."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# "auto": the model chooses; "none": no call (tools still rendered, output not parsed); "required":
# at least one call, decoding constrained by a grammar so it parses.
ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    # system, user, assistant, tool (and any role the model's template knows).
    role: str
    content: str = ""
    # An assistant turn's calls (sent back in the history of the next request).
    tool_calls: list[ToolCall] = []
    # A "tool" turn: the id of the call whose result ``content`` is.
    tool_call_id: str | None = None
    # A "tool" turn: the function's name (templates that show it need it).
    name: str | None = None


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True, tag="completion"):
    prompt: str
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, tag="chat", omit_defaults=True):
    messages: list[ChatMessage]
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128, description="at most 128 tools")] = []
    tool_choice: ToolChoice = "auto"


# Embeddings (docs/protocol.md, "Embeddings", minor 2): one vector per input, in input order.
EMBED_INPUTS_MAX = 256


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, tag="embed"):
    input: Annotated[list[Annotated[str, msgspec.Meta(max_length=1 << 20)]],
                     msgspec.Meta(min_length=1, max_length=EMBED_INPUTS_MAX,
                                  description=f"1 to {EMBED_INPUTS_MAX} strings")]
    # True: each vector scaled to unit L2 norm (what cosine similarity wants).
    normalize: bool = True
    # Only deadline_s is read; the sampling fields mean nothing to an embedding.
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)


InferenceRequest = CompletionRequest | ChatRequest | EmbedRequest


class Usage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    # Minor 2: prompt tokens whose K/V came from a cache (the slot's own cells, another slot's or
    # the worker's host-RAM prompt cache) instead of being evaluated; left out of a frame when 0.
    cached_tokens: int = 0


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    # Seconds from the worker taking the request to its first token.
    ttft_s: float
    # Completion tokens per second after the first token.
    tokens_per_s: float
    total_s: float


# An executor's states and the triggers between them (optimanode/executors/lifecycle.py has the
# table; docs/architecture.md draws it).
State = Literal["discovered", "enabled", "waiting", "starting", "running", "stopping", "crashed", "restarting",
                "failed", "invalid", "missing"]
Trigger = Literal["enable", "disable", "hold", "start", "ready", "crash", "restart", "give_up", "stop", "stopped",
                  "invalidate", "vanish", "rediscover", "recover"]
# Why a stream ended.
# "tool_calls" (minor 2): the reply ended with the tool calls it carries.
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
# Error codes, stable: a Gateway acts on them. Never rename one (errors.py maps each to its class).
ErrorCode = Literal["unknown_model", "model_not_running", "overloaded", "bad_request", "worker_crashed",
                    "context_overflow", "unauthorized", "internal", "shutting_down", "cancelled",
                    "deadline_exceeded"]
ERROR_CODES: frozenset[str] = frozenset(typing.get_args(ErrorCode))

# ---------------------------------------------------------------------------------------------
# Worker pipe: supervisor → worker


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True, tag="settings"):
    """How the worker loads its model (sent as the first frame, so no secret sits in argv)."""

    model_path: str
    n_ctx: int = 2048
    n_threads: int = 1
    n_gpu_layers: int = 0
    n_batch: int = 512
    parallel: int = 1
    # How waiting prompts share decode steps (see docs/architecture.md, the worker's step d).
    prefill: Prefill = "auto"
    # Safe mode: the model is loaded without llama.cpp's extra buffer types (weight repacking,
    # AMX) and the context keeps llama.cpp's default threadpool; the node sets it after a worker
    # died of a fatal signal while loading (SAFE_MODES, docs/operations.md).
    safe_mode: bool = False
    # The operator's chat template: a name from CHAT_TEMPLATE_NAMES or Jinja text; "": the GGUF's
    # own tokenizer.chat_template, else "chatml" (llama-server's fallback).
    chat_template: str = ""
    # The KV cache's element type (K and V alike) and flash attention (constraints.KvCacheType,
    # FlashAttn). Placement: how layers are split over the GPUs the worker sees (the node pins
    # it to its GPUs with CUDA_VISIBLE_DEVICES, so indices here count from 0 among those), the
    # shares per GPU ([]: llama.cpp's default, by free memory) and the main GPU.
    kv_cache_type: str = "f16"
    flash_attn: str = "auto"
    split_mode: str = "layer"
    tensor_split: list[float] = []
    main_gpu: int = 0
    # The host-RAM prompt cache's cap in MiB (optimanode/worker/prompt_cache.py): 0 off, -1 auto
    # (the worker sizes it from the RAM available once its model has loaded).
    prompt_cache_mib: int = -1


class Generate(msgspec.Struct, frozen=True, kw_only=True, tag="generate"):
    id: str
    request: InferenceRequest


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel"):
    id: str


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping"):
    seq: int
    # The RAM the node needs left available on the machine (its memory_reserve_mb and what models
    # still loading will allocate): the worker's host prompt cache gives entries back, least
    # recently used first, while the machine has less, and stores none that would take it there.
    # 0: no floor.
    keep_free_bytes: int = 0


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, tag="shutdown"):
    pass


ToWorker = WorkerSettings | Generate | Cancel | Ping | Shutdown

# ---------------------------------------------------------------------------------------------
# Worker pipe: worker → supervisor


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    pid: int
    n_ctx: int
    load_s: float
    # What llama.cpp was built with, e.g. "cpu" or "cuda"; reported to operators.
    backend: str = "cpu"
    chat_template: bool = False
    # The warm-up that proved the kernels before Ready: the longest batch it decoded (tokens),
    # the tokens it generated, the most sequences in one step, and its seconds.
    warmup_batch: int = 0
    warmup_generated: int = 0
    warmup_seqs: int = 0
    warmup_s: float = 0.0
    safe_mode: bool = False
    # The chat template in force: "file" (the GGUF's own), "custom" (the operator's Jinja text) or
    # the name of a llama.cpp built-in template (set, or the "chatml" fallback).
    chat_template_in_force: str = ""


class PromptCacheReport(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's prompt cache since it started (optimanode/worker/prompt_cache.py; minor 2)."""

    # Prompt tokens served from cached K/V (the slot's own cells, another slot's, the host cache).
    tokens_served: int = 0
    # Prompts that copied a prefix from another slot's cells.
    slot_copies: int = 0
    # Host cache: prompts that restored an entry / were evaluated past what the cells held.
    hits: int = 0
    misses: int = 0
    # Entries stored, and dropped to stay under the cap.
    saves: int = 0
    evictions: int = 0
    # Entries dropped (or not stored) to leave the machine the RAM the node asked for (Ping; minor 3).
    pressure_evictions: int = 0
    # Bytes and entries held now, and the cap (prompt_cache_mib; 0: off).
    bytes: int = 0
    cap_bytes: int = 0
    entries: int = 0


class Pong(msgspec.Struct, frozen=True, kw_only=True, tag="pong"):
    """The heartbeat's answer, from the worker's reader thread, with the decode thread's progress."""

    seq: int
    # llama_decode steps done serving requests since the worker started.
    steps: int = 0
    # Requests the worker has taken and not yet answered.
    pending: int = 0
    # With requests pending: seconds since the last step ended, or since work arrived at an idle
    # worker if that is later. 0.0 with nothing pending. The supervisor's stall watch reads it.
    since_step_s: float = 0.0
    # The prompt cache's counters (None from a worker that predates them).
    prompt_cache: PromptCacheReport | None = None


# A field named ``bytes`` hides the builtin inside the class body, where annotations resolve.
_Bytes = bytes


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate token: its id, its text (UTF-8 of its bytes, U+FFFD where a character is
    split), its raw bytes, and its log-probability under the model's raw logits."""

    id: int
    text: str
    bytes: _Bytes
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """A generated token's log-probability and the ``logprobs`` likeliest tokens at its position
    (most likely first; the chosen one may be among them)."""

    id: int
    text: str
    bytes: _Bytes
    logprob: float
    top: list[TopLogprob] = []


class Chunk(msgspec.Struct, frozen=True, kw_only=True, tag="chunk"):
    id: str
    text: str
    # Tokens this chunk covers (text of a multi-byte character can span tokens).
    tokens: int = 1
    # One entry per token covered, when the request asked for logprobs; left out of the frame
    # otherwise (UNSET is never encoded).
    logprobs: list[TokenLogprob] | msgspec.UnsetType = msgspec.UNSET
    # Tool calls that completed with this chunk (a chat with tools): sent as each one parses.
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    # Every tool call of the reply (also streamed in chunks); present only when there were some.
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET
    # An EmbedRequest's vectors, one per input in order; present only for one.
    embeddings: list[list[float]] | msgspec.UnsetType = msgspec.UNSET


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    id: str
    code: ErrorCode
    message: str


FromWorker = Ready | Pong | Chunk | Done | Failed

# ---------------------------------------------------------------------------------------------
# Framing (length-prefixed MessagePack)

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
# The worker's black box (optimanode/worker.py, _BlackBox): a file of this size shared with the
# supervisor, holding what the worker is doing, read after it died.
BLACKBOX_SIZE = 4096

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def frame(msg: Any) -> bytes:
    body = _encoder.encode(msg)
    return FRAME_HEADER.pack(len(body)) + body


def _checked(decoder: Any, data: bytes) -> Any:
    """Decode; msgspec lets a string that is not UTF-8 escape as UnicodeDecodeError: make it a DecodeError,
    so every caller handles one family (found by the property-based test of the Gateway session)."""
    try:
        return decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"a string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def decode_to_worker(body: bytes) -> ToWorker:
    return _checked(_to_worker, body)


def decode_from_worker(body: bytes) -> FromWorker:
    return _checked(_from_worker, body)


# ---------------------------------------------------------------------------------------------
# Model settings and metadata (journaled; the Gateway link shows them)


class ModelSettings(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-model overrides of Settings.model_defaults; None means "use the default".

    Unknown keys are not forbidden here (a journal written by a newer node must still replay);
    the Gateway session refuses them in a Configure (gateway/session.py, ``_unknown_settings``)."""

    n_ctx: NCtx | None = None
    n_threads: NThreads | None = None
    n_gpu_layers: NGpuLayers | None = None
    n_batch: NBatch | None = None
    queue_size: QueueSize | None = None
    # An integer, or "auto": as many slots as memory allows, up to 4 (docs/configuration.md).
    parallel: ParallelSetting | None = None
    prefill: Prefill | None = None
    safe_mode: SafeMode | None = None
    # Read by the supervisor and admission, not the worker: a change restarts nothing.
    stall_timeout_s: StallTimeout | None = None
    deadline_s: ModelDeadline | None = None
    chat_template: ChatTemplate | None = None
    # GPUs and memory (docs/configuration.md, "GPUs and memory"; protocol minor 2 additions).
    kv_cache_type: KvCacheType | None = None
    flash_attn: FlashAttn | None = None
    gpus: Gpus | None = None
    split_mode: SplitMode | None = None
    tensor_split: TensorSplit | None = None
    main_gpu: MainGpu | None = None
    # Loaded always (while enabled) or on demand, unloaded after keep_alive_s idle; neither is a
    # worker setting (a change restarts nothing).
    enable: EnableMode | None = None
    keep_alive_s: KeepAlive | None = None
    # The worker's host-RAM prompt cache in MiB, or "auto" (docs/configuration.md, "Prompt cache").
    prompt_cache_mib: PromptCacheMib | None = None


# llama.cpp's enum llama_pooling_type (llama.h) → ModelInfo.pooling. NONE (0) gives a vector per
# token, not one per input: a model that declares it, or declares nothing (a decoder-only model),
# is pooled by mean, so every model answers an embed request with one vector per input.
POOLING_TYPES: dict[int, str] = {1: "mean", 2: "cls", 3: "last", 4: "rank"}


def pooling_in_force(declared: object) -> str:
    """ModelInfo.pooling for a GGUF's ``{arch}.pooling_type`` value (None when absent)."""
    return POOLING_TYPES.get(declared, "mean") if isinstance(declared, int) else "mean"


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the registry read from a GGUF header (never the weights)."""

    path: str
    # Every file of a split model, first to last; [path] for a single file.
    files: list[str]
    size_bytes: int
    mtime_ns: int
    architecture: str = ""
    name: str = ""
    size_label: str = ""
    parameter_count: int = 0
    file_type: str = ""
    context_length: int = 0
    chat_template: bool = False
    tensor_count: int = 0
    # For the memory estimate of the KV cache.
    block_count: int = 0
    embedding_length: int = 0
    head_count: int = 0
    head_count_kv: int = 0
    # Per-head K and V widths where the model states them (0: embedding_length / head_count).
    key_length: int = 0
    value_length: int = 0
    # Hex SHA-256 of the file contents (all parts in order), "" until computed.
    sha256: str = ""
    # How an embed request pools token vectors: the GGUF's ``{arch}.pooling_type`` (mean, cls,
    # last, rank) or, for a decoder-only model that declares none, "mean" (minor 2).
    pooling: str = ""
    # For the memory estimate (executors/memory.py): tensor bytes per repeating layer (blk.N), the
    # bytes of the other tensors (embedding, output head, norms), and the vocabulary size. Empty/0
    # in records journaled before they existed: the estimate then spreads size_bytes evenly.
    layer_bytes: list[int] = []
    other_bytes: int = 0
    n_vocab: int = 0
    # The output head's bytes (output.weight, or the tied token embedding): on the GPU when
    # n_gpu_layers offloads every layer and the output.
    output_bytes: int = 0
    output_tied: bool = False


# ---------------------------------------------------------------------------------------------
# Journal events. The journal row holds the type tag in ``type`` and this body as JSON in ``data``.


class Registered(msgspec.Struct, frozen=True, kw_only=True, tag="registered"):
    """The registry found a model file (or found it again with a different size or mtime)."""

    info: ModelInfo


class Transition(msgspec.Struct, frozen=True, kw_only=True, tag="transition"):
    trigger: Trigger
    src: State
    dst: State
    reason: str = ""
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    uptime_s: float | None = None
    stderr_tail: list[str] = []
    restart_in_s: float | None = None
    # What the worker was doing when it died (its black box; crash transitions only): the phase
    # ("loading", "warm-up", "prompt evaluation", "generation", "idle"), the tokens and sequences
    # of the llama_decode step in progress, and the ids of the requests in that step.
    phase: str = ""
    batch_tokens: int | None = None
    batch_seqs: int | None = None
    requests: list[str] = []
    # Set where safe mode changes or is confirmed: True on the crash that turns it on and on the
    # ready of a safe-mode worker, False on an enable (which clears it) and a normal ready.
    safe_mode: bool | None = None


class DesiredChanged(msgspec.Struct, frozen=True, kw_only=True, tag="desired"):
    """An operator (or the scan policy) changed what this executor should be."""

    enabled: bool
    settings: ModelSettings = msgspec.field(default_factory=ModelSettings)
    by: str = ""


class Hashed(msgspec.Struct, frozen=True, kw_only=True, tag="hashed"):
    sha256: str
    size_bytes: int
    mtime_ns: int


class RequestStarted(msgspec.Struct, frozen=True, kw_only=True, tag="request_started"):
    request_id: str
    kind: str
    by: str = ""


class RequestFinished(msgspec.Struct, frozen=True, kw_only=True, tag="request_finished"):
    request_id: str
    # A Done's finish_reason, a RequestError's code (also for a request that failed while queued),
    # "cancelled", or OUTCOME_NODE_DIED: written at the next start for a request the node's death cut.
    outcome: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None


OUTCOME_NODE_DIED = "node_died"


class NodeStarted(msgspec.Struct, frozen=True, kw_only=True, tag="node_started"):
    pid: int
    version: str


class NodeStopped(msgspec.Struct, frozen=True, kw_only=True, tag="node_stopped"):
    reason: str = ""


class TaskExited(msgspec.Struct, frozen=True, kw_only=True, tag="task_exited"):
    """A long-lived task ended when it should not have."""

    task: str
    error: str


class DrainStarted(msgspec.Struct, frozen=True, kw_only=True, tag="drain_started"):
    """A worker stopped taking requests and lets those it has finish (inference.py, ``drain_worker``)."""

    pid: int
    # Why: the stop's reason ("settings or file changed; ...", "desired disabled", ...).
    reason: str = ""
    # A new worker follows (configure, new file, new defaults): requests queue for it meanwhile.
    replacing: bool = False
    # Requests on the worker, and waiting in the model's queue (for the new worker), when the
    # drain began; and those that were queued and refused at the stop (no new worker follows).
    running: int = 0
    queued: int = 0
    refused: int = 0
    # How long the running requests may take (drain_timeout_s; 0 for a disable with now).
    timeout_s: float = 0.0


class DrainEnded(msgspec.Struct, frozen=True, kw_only=True, tag="drain_ended"):
    """The drain is over; the worker is stopped next."""

    pid: int
    # Requests that ended by themselves during the drain, and those cut when its time ran out.
    finished: int = 0
    cut: int = 0
    cut_requests: list[str] = []
    duration_s: float = 0.0


class ExecutorSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One executor in a checkpoint: its projected view, plus what the runtime restores from its
    transitions (the reason of the last transition into each state, and safe mode)."""

    id: str
    path: str
    state: State
    enabled: bool
    settings: ModelSettings = msgspec.field(default_factory=ModelSettings)
    info: ModelInfo
    last_seq: int
    reasons: dict[str, str] = {}
    safe_mode: bool | None = None
    safe_reason: str = ""


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, tag="checkpoint"):
    """The journal's fold at this event's position (stream ``node``): start-up replays from the
    newest one, and retention deletes older state events behind one (docs/journal.md)."""

    executors: list[ExecutorSnapshot] = []
    # Each stream's last version at this position (retention may delete the event that had it).
    versions: dict[str, int] = {}
    # Requests started and not finished at this position, as [stream, request_id] pairs.
    open_requests: list[tuple[str, str]] = []


EventBody = (
    Registered
    | Transition
    | DesiredChanged
    | Hashed
    | RequestStarted
    | RequestFinished
    | NodeStarted
    | NodeStopped
    | TaskExited
    | Checkpoint
    | DrainStarted
    | DrainEnded
)

_json_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(EventBody)


def encode_event(body: EventBody) -> bytes:
    return _json_encoder.encode(body)


def decode_event(data: bytes | str) -> EventBody:
    return _event_decoder.decode(data)


# ---------------------------------------------------------------------------------------------
# What the node reports about an executor (the in-process API and the Gateway link)


class ExecutorStatus(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    state: State
    enabled: bool
    # Why it is in this state, when there is a why (invalid, waiting, failed, crashed, missing).
    reason: str = ""
    info: ModelInfo
    settings: ModelSettings = msgspec.field(default_factory=ModelSettings)
    # The settings the worker runs (or would run) with: defaults merged with the overrides.
    effective: WorkerSettings | None = None
    pid: int | None = None
    restarts: int = 0
    recent_crashes: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    # Capacity a Gateway can spread load by.
    parallel: int = 1
    queue_size: int = 0
    requests_served: int = 0
    tokens_generated: int = 0
    backend: str = ""
    # The worker runs (or will start) in safe mode, and why (the crash that turned it on, or the
    # setting).
    safe_mode: bool = False
    safe_mode_reason: str = ""
    # The chat template the worker renders chats with (effective.chat_template_in_force): "file",
    # "custom" or a llama.cpp built-in name ("chatml" where the file has none and none is set).
    chat_template: str = ""
    # The memory estimate (executors/memory.py) for the effective settings: bytes in RAM, and per
    # GPU index the bytes on that GPU; the GPUs its worker is placed on (empty: CPU only).
    memory_estimate_bytes: int = 0
    vram_estimate_bytes: dict[int, int] = {}
    gpus: list[int] = []
    # On-demand loading: its worker is running; when a request last used it (Unix seconds, 0:
    # not since the node started); how often it was unloaded for another model's memory.
    loaded: bool = False
    last_used: float = 0.0
    evictions: int = 0
    # Its worker's prompt cache, from the last heartbeat (None: no worker, or none reported yet).
    prompt_cache: PromptCacheReport | None = None


# ---------------------------------------------------------------------------------------------
# Metrics: one report, produced by optimanode.metrics.Sampler, pushed to subscribed Gateways.


class CpuReport(msgspec.Struct, frozen=True, kw_only=True):
    percent: float
    per_core: list[float]
    cores_logical: int
    cores_physical: int
    load_1m: float
    load_5m: float
    load_15m: float


class MemoryReport(msgspec.Struct, frozen=True, kw_only=True):
    total_bytes: int
    available_bytes: int
    used_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int


class GpuReport(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    uuid: str = ""
    utilization_percent: float | None = None
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    # NVML's free memory (total less used, and less what the driver reserves), and the executors
    # whose workers are placed on this GPU (starting or running).
    memory_free_bytes: int | None = None
    models: list[str] = []


class ExecutorMetrics(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    state: State
    pid: int | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    # VRAM this worker holds, from NVML's per-process accounting where the driver gives it.
    vram_bytes: int | None = None
    queue_depth: int = 0
    in_flight: int = 0
    # Capacity a Gateway spreads load by: requests it could take now without queueing beyond parallel.
    parallel: int = 1
    queue_size: int = 0
    free_slots: int = 0
    tokens_per_s: float = 0.0
    requests_served: int = 0
    restarts: int = 0
    # The GPUs its worker is placed on, and the memory estimate (RAM; VRAM summed over its GPUs).
    gpus: list[int] = []
    memory_estimate_bytes: int = 0
    vram_estimate_bytes: int = 0
    loaded: bool = False
    last_used: float = 0.0
    evictions: int = 0
    # As ExecutorStatus.prompt_cache.
    prompt_cache: PromptCacheReport | None = None


class JournalReport(msgspec.Struct, frozen=True, kw_only=True):
    """The journal's size against its cap (optimanode/retention.py)."""

    bytes: int = 0  # the file and its WAL
    cap_bytes: int = 0
    # Past 90 % of the cap, or retention had to fold early in its last pass to stay under it.
    near_cap: bool = False
    # Since the node started: request events folded into hourly aggregates, state events deleted.
    requests_folded: int = 0
    events_deleted: int = 0
    # PRAGMA quick_check of the file: "" not yet (the background check after a clean start),
    # "ok", or what it found (a damaged journal: docs/reliability.md).
    integrity: str = ""


class MetricsReport(msgspec.Struct, frozen=True, kw_only=True):
    ts: float
    node_id: str = ""
    cpu: CpuReport
    memory: MemoryReport
    gpus: list[GpuReport] = []
    # Why there are no GPUs, e.g. "no NVIDIA driver" (empty when NVML answered).
    gpu_status: str = ""
    executors: list[ExecutorMetrics] = []
    # Seconds the sampler spent producing this report (its own cost, reported honestly).
    sample_cost_s: float = 0.0
    journal: JournalReport | None = None


# ---------------------------------------------------------------------------------------------
# Gateway link (docs/protocol.md): MessagePack in binary WebSocket frames over TLS.
#
# One tagged union per direction; the tag is the ``type`` field. Every request a Gateway sends
# carries an ``id`` of its own choosing, and every frame answering it carries the same id, so many
# requests run at once over one connection. Unknown fields are ignored (a newer peer may add
# optional ones; new fields always get defaults); an unknown ``type`` is refused with
# Error(code="bad_request"). Limits that a peer can break are declared on the fields, so a frame
# that breaks one fails to decode with the field's path in the message.

# Versions of this link the node speaks, oldest first. The handshake settles on one.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
# The minor version of the newest major, sent in Welcome: additions a Gateway may use when the
# node says it has them (docs/protocol.md, "Versions"); an older node's Welcome has none (0).
PROTOCOL_MINOR = 3
NONCE_BYTES = 32
MAC_BYTES = 32

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
PeerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
Mac = Annotated[bytes, msgspec.Meta(min_length=MAC_BYTES, max_length=MAC_BYTES)]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

# WebSocket close codes the node uses (1000-range codes are RFC 6455's; 4000-range are ours).
CLOSE_GOING_AWAY = 1001          # the node is shutting down
CLOSE_TOO_BIG = 1009             # a frame over the size limit (sent by the WebSocket layer itself)
CLOSE_UNAUTHORIZED = 4001        # wrong MAC, or anything but Hello before authentication
CLOSE_HANDSHAKE_TIMEOUT = 4002   # the whole handshake did not finish within the deadline
CLOSE_VERSION_UNSUPPORTED = 4003  # Hello chose a version the node did not offer
CLOSE_RATE_LIMITED = 4008        # too many failed handshakes from this address lately
CLOSE_TOO_SLOW = 4009            # the Gateway does not read its frames; its send buffer overflowed
CLOSE_BAD_FRAME = 4400           # a handshake frame that does not decode (text, malformed, wrong fields)

# -- handshake -------------------------------------------------------------------------------


class Challenge(msgspec.Struct, frozen=True, kw_only=True, tag="challenge"):
    """Node → Gateway, the first frame on every connection."""

    versions: list[int]
    node_id: str
    nonce_n: bytes


class Hello(msgspec.Struct, frozen=True, kw_only=True, tag="hello"):
    """Gateway → Node: the chosen version and the proof that the Gateway holds the access key."""

    version: int
    gateway_id: PeerId
    nonce_g: Nonce
    mac_g: Mac


class Welcome(msgspec.Struct, frozen=True, kw_only=True, tag="welcome"):
    """Node → Gateway: the node's own proof; after it, the session is open."""

    version: int
    node_id: str
    mac_n: bytes
    # The largest frame the node accepts; larger ones close the connection with 1009.
    max_frame_bytes: int = 1 << 20
    # What the node adds to ``version`` (docs/protocol.md, "Versions"); 0 from a node before minors.
    minor: int = 0


# -- Gateway → Node requests -------------------------------------------------------------------


class Infer(msgspec.Struct, frozen=True, kw_only=True, tag="infer"):
    id: RequestId
    model: ModelId
    request: InferenceRequest


class CancelInfer(msgspec.Struct, frozen=True, kw_only=True, tag="cancel"):
    """Cancel the Infer with this id. No reply of its own: the stream ends (see docs/protocol.md)."""

    id: RequestId


class ListModels(msgspec.Struct, frozen=True, kw_only=True, tag="list_models"):
    id: RequestId


class GetModel(msgspec.Struct, frozen=True, kw_only=True, tag="get_model"):
    id: RequestId
    model: ModelId


class Enable(msgspec.Struct, frozen=True, kw_only=True, tag="enable"):
    id: RequestId
    model: ModelId


class Disable(msgspec.Struct, frozen=True, kw_only=True, tag="disable"):
    id: RequestId
    model: ModelId
    # False: the worker drains (its running requests may finish for drain_timeout_s); True: they
    # are cut at once (Error cancelled, details.reason "disabled").
    now: bool = False


class Configure(msgspec.Struct, frozen=True, kw_only=True, tag="configure"):
    """Replace the model's overrides with ``settings`` (absent keys go back to the defaults)."""

    id: RequestId
    model: ModelId
    settings: ModelSettings


class Rescan(msgspec.Struct, frozen=True, kw_only=True, tag="rescan"):
    id: RequestId


class ReadEvents(msgspec.Struct, frozen=True, kw_only=True, tag="read_events"):
    """The newest ``limit`` journal events, oldest first; of one model, or of the whole node."""

    id: RequestId
    model: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class Subscribe(msgspec.Struct, frozen=True, kw_only=True, tag="subscribe"):
    """Push Metrics every ``interval_s``; replaces the session's previous subscription."""

    id: RequestId
    interval_s: Annotated[float, msgspec.Meta(ge=0.25, le=3600.0)] = 1.0


class Unsubscribe(msgspec.Struct, frozen=True, kw_only=True, tag="unsubscribe"):
    id: RequestId


GatewayToNode = (
    Hello | Infer | CancelInfer | ListModels | GetModel | Enable | Disable | Configure | Rescan
    | ReadEvents | Subscribe | Unsubscribe
)

# -- Node → Gateway replies --------------------------------------------------------------------


class TokenChunk(msgspec.Struct, frozen=True, kw_only=True, tag="chunk"):
    id: str
    text: str
    tokens: int = 1
    # As Chunk's: present only when the request asked for logprobs.
    logprobs: list[TokenLogprob] | msgspec.UnsetType = msgspec.UNSET
    # As Chunk's (minor 2): tool calls that completed with this chunk.
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class InferDone(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    # As Done's (minor 2): every tool call of the reply; an EmbedRequest's vectors.
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET
    embeddings: list[list[float]] | msgspec.UnsetType = msgspec.UNSET


class Error(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    # The id of the request that failed; "" when the frame had none (it did not decode).
    id: str = ""
    code: ErrorCode
    message: str = ""
    details: dict[str, str | int] = {}


class Models(msgspec.Struct, frozen=True, kw_only=True, tag="models"):
    id: str
    models: list[ExecutorStatus]


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True, tag="model_status"):
    id: str
    status: ExecutorStatus


class EventRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One journal event: ``data`` is the event body's fields (docs/journal.md), ``type`` its tag."""

    seq: int
    ts: float
    stream: str
    version: int
    type: str
    data: dict[str, Any]


class Events(msgspec.Struct, frozen=True, kw_only=True, tag="events"):
    id: str
    events: list[EventRecord]


class Metrics(msgspec.Struct, frozen=True, kw_only=True, tag="metrics"):
    # The id of the Subscribe that asked for it.
    id: str
    report: MetricsReport


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag="ack"):
    id: str


NodeToGateway = Challenge | Welcome | TokenChunk | InferDone | Error | Models | ModelStatus | Events | Metrics | Ack

_link_encoder = msgspec.msgpack.Encoder()
_from_gateway = msgspec.msgpack.Decoder(GatewayToNode)
_from_node = msgspec.msgpack.Decoder(NodeToGateway)


def encode_link(msg: GatewayToNode | NodeToGateway) -> bytes:
    """One Gateway-link message as the payload of one binary WebSocket frame."""
    return _link_encoder.encode(msg)


def decode_from_gateway(data: bytes) -> GatewayToNode:
    """Raises msgspec.DecodeError (not MessagePack) or msgspec.ValidationError (names the field)."""
    return _checked(_from_gateway, data)


def decode_from_node(data: bytes) -> NodeToGateway:
    return _checked(_from_node, data)


def peek_id_type(data: bytes | bytearray) -> tuple[str, str]:
    """The ``id`` and ``type`` of a frame that did not decode, read loosely, so either end can
    answer the request it names: each only when the frame is a map and it is a string (an id also
    1..128 characters, a type cut to 64); else ""."""
    try:
        raw = msgspec.msgpack.decode(data)
    except Exception:  # noqa: BLE001 - any garbage: there is no id
        return "", ""
    if not isinstance(raw, dict):
        return "", ""
    rid, kind = raw.get("id"), raw.get("type")
    return (rid if isinstance(rid, str) and 0 < len(rid) <= 128 else "",
            kind[:64] if isinstance(kind, str) else "")
