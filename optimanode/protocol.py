"""Every message and event type, as frozen msgspec Structs in tagged unions, and their codecs.

Three families live here, because they are the node's contracts with what outlives one process:

* **Requests** (``CompletionRequest``, ``ChatRequest``, ``SamplingParams``): what a Gateway asks
  for; the Gateway link (docs/protocol.md) and the worker pipe both carry them unchanged.
* **Worker pipe messages** (supervisor ↔ ``python -m optimanode.worker``): length-prefixed
  MessagePack frames (4-byte big-endian length, then the body). Every request-scoped message
  carries the request id, so one worker can serve several requests at once.
* **Journal events** (``EventBody``): the ``data`` column of the journal, JSON-encoded so that
  ``sqlite3`` and ``tools/inspect-journal`` can read it without this package.

Schema rules (journals outlive versions): Structs are frozen and keyword-only, new fields always
get defaults, a field's type never changes, a tag is never reused.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import msgspec

# ---------------------------------------------------------------------------------------------
# Requests


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    # None: a fresh random seed per request; an int makes sampling repeatable.
    seed: int | None = None
    stop: list[str] = []

    def check(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if not 1 <= self.max_tokens <= 1_000_000:
            raise ValueError("max_tokens: expected 1..1000000")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature: expected 0..100")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p: expected a number in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k: expected >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p: expected 0..1")
        if not 0.0 < self.repeat_penalty <= 10.0:
            raise ValueError("repeat_penalty: expected a number in (0, 10]")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop: expected at most 16 non-empty strings of at most 256 characters")


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True, tag="completion"):
    prompt: str
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, tag="chat"):
    messages: list[ChatMessage]
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)


InferenceRequest = CompletionRequest | ChatRequest


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    # Seconds from the worker taking the request to its first token.
    ttft_s: float
    # Completion tokens per second after the first token.
    tokens_per_s: float
    total_s: float


FinishReason = Literal["stop", "length", "cancelled"]

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


class Generate(msgspec.Struct, frozen=True, kw_only=True, tag="generate"):
    id: str
    request: InferenceRequest


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel"):
    id: str


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping"):
    seq: int


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


class Pong(msgspec.Struct, frozen=True, kw_only=True, tag="pong"):
    seq: int


class Chunk(msgspec.Struct, frozen=True, kw_only=True, tag="chunk"):
    id: str
    text: str
    # Tokens this chunk covers (text of a multi-byte character can span tokens).
    tokens: int = 1


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    id: str
    finish_reason: str
    usage: Usage
    timings: Timings


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    id: str
    code: str
    message: str


FromWorker = Ready | Pong | Chunk | Done | Failed

# ---------------------------------------------------------------------------------------------
# Framing (length-prefixed MessagePack)

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def frame(msg: Any) -> bytes:
    body = _encoder.encode(msg)
    return FRAME_HEADER.pack(len(body)) + body


def decode_to_worker(body: bytes) -> ToWorker:
    return _to_worker.decode(body)


def decode_from_worker(body: bytes) -> FromWorker:
    return _from_worker.decode(body)


# ---------------------------------------------------------------------------------------------
# Model settings and metadata (journaled; the Gateway link shows them)


class ModelSettings(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-model overrides of Settings.model_defaults; None means "use the default"."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    n_batch: int | None = None
    queue_size: int | None = None
    parallel: int | None = None


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


# ---------------------------------------------------------------------------------------------
# Journal events. The journal row holds the type tag in ``type`` and this body as JSON in ``data``.


class Registered(msgspec.Struct, frozen=True, kw_only=True, tag="registered"):
    """The registry found a model file (or found it again with a different size or mtime)."""

    info: ModelInfo


class Transition(msgspec.Struct, frozen=True, kw_only=True, tag="transition"):
    trigger: str
    src: str
    dst: str
    reason: str = ""
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    uptime_s: float | None = None
    stderr_tail: list[str] = []
    restart_in_s: float | None = None


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
    outcome: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None


class NodeStarted(msgspec.Struct, frozen=True, kw_only=True, tag="node_started"):
    pid: int
    version: str


class NodeStopped(msgspec.Struct, frozen=True, kw_only=True, tag="node_stopped"):
    reason: str = ""


class TaskExited(msgspec.Struct, frozen=True, kw_only=True, tag="task_exited"):
    """A long-lived task ended when it should not have."""

    task: str
    error: str


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
)

EVENT_TYPES: dict[str, type] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (Registered, Transition, DesiredChanged, Hashed, RequestStarted, RequestFinished,
                NodeStarted, NodeStopped, TaskExited)
}

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
    state: str
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


class ExecutorMetrics(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    state: str
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
