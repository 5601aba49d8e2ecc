"""What a model's worker will allocate, on the CPU and on each GPU, and where it fits.

How it works: ``estimate(info, ws)`` reads the GGUF header's figures (``ModelInfo``: tensor bytes
per layer and for the rest, the output head, vocabulary, layers, KV heads and K/V widths) and
the worker's effective settings (``WorkerSettings``: n_ctx, parallel, KV cache type, flash
attention, n_gpu_layers, n_batch) and adds up the buffers llama.cpp allocates when the worker
loads (its log names them: "model buffer size", "KV buffer size", "compute buffer size", "output
buffer size"):

* **weights**: the tensor bytes. ``n_gpu_layers`` offloads the last N repeating layers; -1, or
  more than the model has, offloads them all and the output head too (llama.cpp's rule). The
  token embedding always stays on the CPU.
* **KV cache**: per layer ``n_head_kv · (key + value width) · cells`` elements of the cache type
  (f16 2 bytes, q8_0 34/32, q4_0 18/32), on the device of its layer. Cells: the worker gives each
  of ``parallel`` sequences ``n_ctx / parallel`` cells rounded up to 256 (llama.cpp's padding).
  The worker keeps llama.cpp's default full-size cache for sliding-window layers (swa_full), so
  every layer counts the same.
* **compute**: what llama.cpp reserves for the worst micro-batch (n_batch tokens). Its allocator
  reuses memory along the graph, so the buffer is the larger of two peaks, not their sum: a
  layer's (the activations, ``n_batch · n_ff`` floats twice with n_ff taken as 4·n_embd, the
  attention mask, ``n_batch · cells`` f16, and without flash attention the attention scores,
  ``n_head · n_batch · cells`` floats) on every device that runs layers, and the output head's
  (the logits, ``n_vocab · n_batch`` floats, and its input) on the device holding the head. The
  **output** buffer (``n_vocab · parallel`` floats) is in RAM.

Measured against what llama.cpp reports on the CPU (tests/model/test_memory_estimate.py) the
total is within 10 % for SmolLM2 and Gemma 3.

``place`` then decides which NVIDIA GPUs a model's offloaded part goes to, given each GPU's free
memory (NVML, through ``metrics.GpuProbe``) less the reserve and less what models still loading
will take there: a list of indices is checked as it is; "auto" takes the GPU with the most free
memory, or, when the model needs more than one holds and split_mode is not "none", the fewest
GPUs with the most free memory between them. The offloaded part is shared over the GPUs by
``tensor_split`` or, as llama.cpp does by default, by free memory. What does not fit comes back
as a ``Shortfall`` naming the device and how many MiB it lacks; the reconciler holds the model in
``waiting`` with that reason. Pure: no NVML, no process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optimanode.protocol import ModelInfo, WorkerSettings

MIB = 1024 * 1024
# Bytes per KV cache element: ggml's block sizes (q8_0: 32 values in 34 bytes, q4_0: in 18).
KV_BYTES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp pads each sequence's cells to this.
KV_PAD = 256


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as admission sees it (NVML's index order)."""

    index: int
    name: str = ""
    total_bytes: int = 0
    free_bytes: int = 0
    uuid: str = ""


@dataclass(frozen=True)
class Estimate:
    """A worker's memory: the CPU part, and the part that goes to GPUs (shared among them by ``place``)."""

    cpu_weights: int = 0
    cpu_kv: int = 0
    cpu_compute: int = 0
    output: int = 0
    gpu_weights: int = 0
    gpu_kv: int = 0
    # Compute buffer on each GPU that runs layers, plus the logits on the one holding the output.
    gpu_compute: int = 0
    gpu_logits: int = 0
    gpu_layers: int = 0

    @property
    def ram_bytes(self) -> int:
        return self.cpu_weights + self.cpu_kv + self.cpu_compute + self.output

    @property
    def offloads(self) -> bool:
        return self.gpu_layers > 0

    @property
    def total_bytes(self) -> int:
        return self.ram_bytes + self.gpu_weights + self.gpu_kv + self.gpu_compute + self.gpu_logits

    def describe_ram(self) -> str:
        return (f"weights {self.cpu_weights // MIB} + KV cache {self.cpu_kv // MIB} + compute "
                f"{(self.cpu_compute + self.output) // MIB} MiB")


def kv_cells(ws: WorkerSettings) -> int:
    """KV cells the worker's context has: per sequence n_ctx / parallel, padded to 256."""
    parallel = max(1, ws.parallel)
    per_seq = -(-max(1, ws.n_ctx) // parallel)
    return -(-per_seq // KV_PAD) * KV_PAD * parallel


def _layer_weights(info: ModelInfo) -> tuple[list[int], int, int]:
    """(bytes per layer, bytes of the other tensors, output head bytes)."""
    n = info.block_count or len(info.layer_bytes)
    if info.layer_bytes:
        layers = list(info.layer_bytes) + [0] * max(0, n - len(info.layer_bytes))
        return layers, info.other_bytes, info.output_bytes
    # A record journaled before the header's per-layer figures: the file size, spread evenly.
    per = info.size_bytes // max(1, n)
    return [per] * n, info.size_bytes - per * n, 0


def estimate(info: ModelInfo, ws: WorkerSettings, *, gpus_available: bool = True) -> Estimate:
    """The memory ``ws``'s worker will allocate for ``info``; see the module docstring.

    ``gpus_available`` False (no NVIDIA GPU, or a CPU build): n_gpu_layers is ignored, as llama.cpp
    ignores it, and everything is in RAM.
    """
    layers, rest, output_head = _layer_weights(info)
    n_layer = len(layers)
    ngl = ws.n_gpu_layers if gpus_available else 0
    offload_all = ngl < 0 or ngl > n_layer
    on_gpu = n_layer if ngl < 0 else min(max(ngl, 0), n_layer)
    gpu_layer_ids = range(n_layer - on_gpu, n_layer)
    head_count = info.head_count or 1
    kv_heads = info.head_count_kv or head_count
    k = info.key_length or info.embedding_length // head_count
    v = info.value_length or info.embedding_length // head_count
    cells = kv_cells(ws)
    kv_per_layer = int(kv_heads * (k + v) * cells * KV_BYTES.get(ws.kv_cache_type, 2.0))
    n_batch = max(ws.parallel, min(ws.n_batch, ws.n_ctx) if ws.n_ctx else ws.n_batch)
    n_ctx_seq = cells // max(1, ws.parallel)
    head_compute = info.n_vocab * n_batch * 4 + n_batch * info.embedding_length * 4 * 2
    activations = n_batch * 4 * info.embedding_length * 4 * 2  # the FFN's width, taken as 4·n_embd
    mask = n_batch * n_ctx_seq * 2
    scores = 0 if ws.flash_attn != "off" else head_count * n_batch * n_ctx_seq * 4
    layer_compute = activations + mask + scores
    peak = max(layer_compute, head_compute)
    gpu_weights = sum(layers[i] for i in gpu_layer_ids) + (output_head if offload_all else 0)
    cpu_weights = sum(layers) - sum(layers[i] for i in gpu_layer_ids) + rest
    if offload_all and not info.output_tied:
        # The head moves to the GPU; a tied one is duplicated there and the CPU keeps the embedding.
        cpu_weights -= output_head
    return Estimate(
        cpu_weights=cpu_weights,
        cpu_kv=kv_per_layer * (n_layer - on_gpu),
        # With every layer offloaded the CPU keeps only the input embeddings' staging buffer.
        cpu_compute=n_batch * info.embedding_length * 4 if offload_all else peak,
        output=info.n_vocab * max(1, ws.parallel) * 4,
        gpu_weights=gpu_weights,
        gpu_kv=kv_per_layer * on_gpu,
        gpu_compute=layer_compute if on_gpu else 0,
        # On the GPU holding the head its peak, beyond what every GPU reserves for a layer.
        gpu_logits=peak - layer_compute if offload_all else 0,
        gpu_layers=on_gpu,
    )


# -- placement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a model's worker goes: GPU indices (NVML's), and the bytes it takes on each."""

    gpus: tuple[int, ...] = ()
    vram: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Shortfall:
    """Why a model does not fit: the device, what it needs there and what it has."""

    device: str
    need: int
    have: int
    detail: str = ""

    @property
    def reason(self) -> str:
        if self.need == 0:
            return f"no {self.device}: {self.detail}"
        short = self.need - max(self.have, 0)
        where = "in RAM" if self.device == "RAM" else f"on {self.device}"
        return (f"not enough memory {where}: needs about {self.need // MIB} MiB"
                + (f" ({self.detail})" if self.detail else "")
                + f", {max(self.have, 0) // MIB} MiB available after the reserve and models still loading: "
                f"{-(-short // MIB)} MiB short")


@dataclass(frozen=True)
class GpuWish:
    """The placement settings of one model (its own over the defaults)."""

    gpus: str | tuple[int, ...] = "auto"
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] = ()
    main_gpu: int = 0


def gpu_device(g: GpuMemory) -> str:
    return f"GPU {g.index}" + (f" ({g.name})" if g.name else "")


def shares(est: Estimate, chosen: Sequence[GpuMemory], free: Mapping[int, int], wish: GpuWish) -> dict[int, int]:
    """Bytes on each chosen GPU: the offloaded part split by tensor_split or by free memory."""
    if wish.split_mode == "none" or len(chosen) == 1:
        main = chosen[min(wish.main_gpu, len(chosen) - 1)]
        return {main.index: est.gpu_weights + est.gpu_kv + est.gpu_compute + est.gpu_logits}
    weights = list(wish.tensor_split) if len(wish.tensor_split) == len(chosen) and sum(wish.tensor_split) > 0 \
        else [max(free.get(g.index, 0), 0) for g in chosen]
    total = sum(weights) or len(chosen)
    weights = weights if sum(weights) else [1.0] * len(chosen)
    out = {}
    for i, (g, w) in enumerate(zip(chosen, weights, strict=True)):
        part = int((est.gpu_weights + est.gpu_kv) * w / total)
        # Every GPU that runs layers reserves a compute buffer; the last holds the output head's logits.
        out[g.index] = part + (est.gpu_compute if w else 0) + (est.gpu_logits if i == len(chosen) - 1 else 0)
    return out


def place(est: Estimate, gpus: Sequence[GpuMemory], wish: GpuWish, free: Mapping[int, int]) -> Placement | Shortfall:
    """Which GPUs a model's offloaded part goes to; ``free``: bytes usable per GPU index (after the
    reserve and models still loading). A model that offloads nothing, or a machine without NVIDIA
    GPUs, is placed nowhere (CPU only)."""
    if not est.offloads or not gpus:
        return Placement()
    by_index = {g.index: g for g in gpus}
    if wish.gpus != "auto":
        missing = [i for i in wish.gpus if i not in by_index]
        if missing:
            return Shortfall(f"GPU {missing[0]}", 0, 0,
                             f"this machine has {len(gpus)} usable NVIDIA GPU(s): "
                             f"{', '.join(str(g.index) for g in sorted(gpus, key=lambda g: g.index))}")
        return _check(est, [by_index[i] for i in wish.gpus], wish, free)
    ranked = sorted(gpus, key=lambda g: (-free.get(g.index, 0), g.index))
    first: Placement | Shortfall | None = None
    for k in range(1, (1 if wish.split_mode == "none" else len(ranked)) + 1):
        result = _check(est, ranked[:k], wish, free)
        if isinstance(result, Placement):
            return result
        first = first or result
    assert first is not None
    return first


def _check(est: Estimate, chosen: Sequence[GpuMemory], wish: GpuWish, free: Mapping[int, int]) -> Placement | Shortfall:
    need = shares(est, chosen, free, wish)
    for g in chosen:
        if need.get(g.index, 0) > free.get(g.index, 0):
            detail = (f"weights and KV cache of {est.gpu_layers} offloaded layers"
                      + (f" shared over {len(chosen)} GPUs" if len(chosen) > 1 and wish.split_mode != "none" else "")
                      + " + compute buffer")
            return Shortfall(gpu_device(g), need[g.index], free.get(g.index, 0), detail)
    return Placement(tuple(g.index for g in chosen), need)
