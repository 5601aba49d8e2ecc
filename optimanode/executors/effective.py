"""What a model's worker runs with: its own settings over the node's defaults, and safe mode.

How it works: an executor's desired ``ModelSettings`` hold per-model overrides (None: "use the
default"). ``effective`` merges them over ``Settings.model_defaults`` into the ``WorkerSettings``
a worker is started with; 0 for ``n_ctx`` / ``n_threads`` means the model's own training context /
every core this process may use (the model's own is clamped to ``N_CTX_MAX``, NCtx's limit: a
header may declare up to 2**64-1). The runtime starts workers from it and calls a live worker
*stale* when it differs from what that worker was started with; ``status`` shows it. Safe mode is
the one input that is not a plain setting: with "auto", ``reconciler.on_exit`` turns it on after
a worker died of a fatal signal while loading, and ``safe_mode_reason`` says why the next worker
runs in it ("" when it does not). ``stall_timeout`` and ``deadline`` are the two settings read
by the supervisor and admission rather than the worker (a change restarts nothing).
``parallel = "auto"`` is resolved by admission (the most slots, up to 4, whose estimate fits):
``effective`` takes the resolved count as ``auto_parallel`` and gives each slot the whole n_ctx
window (the worker's n_ctx is slots × n_ctx). ``gpu_wish`` is a model's placement settings;
``conflict`` names a combination llama.cpp refuses (a quantized V cache without flash attention). ``checked`` applies the types' limits to a Struct built in
Python (the in-process API), where msgspec did not decode it. Pure: no journal, no process.
"""

from __future__ import annotations

import os
import typing
from typing import Any

import msgspec

from optimanode.config import ModelDefaults
from optimanode.constraints import CHAT_TEMPLATE_NAMES, PARALLEL_AUTO_MAX, NCtx, SafeMode, explain, validated
from optimanode.executors.memory import GpuWish
from optimanode.errors import BadRequest
from optimanode.protocol import ModelInfo, ModelSettings, WorkerSettings

# What a safe-mode worker runs without (said in the log, the journal and ExecutorStatus).
SAFE_MODE_OFF = "llama.cpp's extra buffer types (weight repacking, AMX) and the persistent threadpool"
# The largest n_ctx a setting may hold (NCtx's own limit, 1048576): the cap on a model's own
# context length where n_ctx is 0. A header may declare anything up to 2**64-1, which no worker
# can allocate and msgspec cannot encode (the model list would fail to serialise).
N_CTX_MAX: int = typing.get_args(NCtx)[1].le


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), which is what a worker should use by default."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def safe_mode_setting(model: ModelSettings, defaults: ModelDefaults) -> SafeMode:
    return model.safe_mode if model.safe_mode is not None else defaults.safe_mode


def safe_mode_reason(setting: SafeMode, engaged: bool, engaged_reason: str) -> str:
    """Why the next worker runs in safe mode, or "" when it does not.

    ``engaged``: "auto" turned it on (a worker died of a fatal signal while loading, or the last
    worker that loaded ran in it), with ``engaged_reason`` from that crash.
    """
    if setting == "on":
        return "safe_mode = on"
    if setting == "auto" and engaged:
        return engaged_reason or "safe mode since an earlier worker died while loading"
    return ""


def effective(info: ModelInfo, model: ModelSettings, defaults: ModelDefaults, safe_reason: str,
              auto_parallel: int = PARALLEL_AUTO_MAX) -> WorkerSettings:
    d, s = defaults, model
    n_ctx = s.n_ctx if s.n_ctx is not None else d.n_ctx
    n_threads = s.n_threads if s.n_threads is not None else d.n_threads
    parallel = effective_parallel(s, d, auto_parallel)
    # 0: the model's own context length, clamped to what a setting may hold (WorkerSettings has no
    # notes field to say so); a header without one (or with a nonsense negative) gets 2048.
    own = min(info.context_length, N_CTX_MAX) if info.context_length > 0 else 0
    n_ctx = n_ctx or own or 2048
    return WorkerSettings(
        model_path=info.path,
        # "auto" slots each get the whole window; a set parallel shares n_ctx among its slots.
        n_ctx=n_ctx * parallel if parallel_is_auto(s, d) else n_ctx,
        n_threads=n_threads or usable_cores(),
        n_gpu_layers=s.n_gpu_layers if s.n_gpu_layers is not None else d.n_gpu_layers,
        n_batch=s.n_batch if s.n_batch is not None else d.n_batch,
        parallel=parallel,
        prefill=s.prefill if s.prefill is not None else d.prefill,
        safe_mode=safe_reason != "",
        chat_template=chat_template_setting(s, d),
        kv_cache_type=s.kv_cache_type if s.kv_cache_type is not None else d.kv_cache_type,
        flash_attn=s.flash_attn if s.flash_attn is not None else d.flash_attn,
        split_mode=s.split_mode if s.split_mode is not None else d.split_mode,
        tensor_split=list(s.tensor_split if s.tensor_split is not None else d.tensor_split),
        main_gpu=s.main_gpu if s.main_gpu is not None else d.main_gpu,
        prompt_cache_mib=prompt_cache_mib(s, d),
    )


def prompt_cache_mib(model: ModelSettings, defaults: ModelDefaults) -> int:
    """WorkerSettings.prompt_cache_mib: the MiB set, or -1 for "auto" (the worker sizes it)."""
    value = model.prompt_cache_mib if model.prompt_cache_mib is not None else defaults.prompt_cache_mib
    return -1 if value == "auto" else value


def gpu_wish(model: ModelSettings, defaults: ModelDefaults) -> GpuWish:
    """A model's placement settings, its own over the defaults."""
    gpus = model.gpus if model.gpus is not None else defaults.gpus
    return GpuWish(gpus="auto" if gpus == "auto" else tuple(gpus),
                   split_mode=model.split_mode if model.split_mode is not None else defaults.split_mode,
                   tensor_split=tuple(model.tensor_split if model.tensor_split is not None else defaults.tensor_split),
                   main_gpu=model.main_gpu if model.main_gpu is not None else defaults.main_gpu)


def conflict(model: ModelSettings, defaults: ModelDefaults) -> tuple[str, str] | None:
    """(field, what is wrong) for settings llama.cpp would refuse to load with, else None."""
    kv = model.kv_cache_type if model.kv_cache_type is not None else defaults.kv_cache_type
    fa = model.flash_attn if model.flash_attn is not None else defaults.flash_attn
    if kv != "f16" and fa == "off":
        return "kv_cache_type", f"f16 when flash_attn is off (llama.cpp quantizes the V cache only with flash attention; got {kv})"
    wish = gpu_wish(model, defaults)
    if wish.gpus != "auto" and len(set(wish.gpus)) != len(wish.gpus):
        return "gpus", "a list of distinct GPU indices"
    if wish.tensor_split and wish.gpus != "auto" and len(wish.tensor_split) != len(wish.gpus):
        return "tensor_split", f"one share per GPU in gpus ({len(wish.gpus)})"
    if wish.gpus != "auto" and wish.main_gpu >= len(wish.gpus):
        return "main_gpu", f"an index into gpus, 0 to {len(wish.gpus) - 1}"
    return None


# What a worker renders chats with where the GGUF has no template and none is set (llama-server
# falls back to the same one).
FALLBACK_CHAT_TEMPLATE = "chatml"


def chat_template_setting(model: ModelSettings, defaults: ModelDefaults) -> str:
    """The operator's chat template for a model (its own, else the default), or "" for none."""
    value = model.chat_template if model.chat_template is not None else defaults.chat_template
    return value or ""


def chat_template_in_force(info: ModelInfo, model: ModelSettings, defaults: ModelDefaults) -> str:
    """Which chat template a model's worker renders with: a built-in name, "custom" (Jinja text
    the operator set), "file" (the GGUF's tokenizer.chat_template) or FALLBACK_CHAT_TEMPLATE."""
    setting = chat_template_setting(model, defaults)
    if setting:
        return setting if setting in CHAT_TEMPLATE_NAMES else "custom"
    return "file" if info.chat_template else FALLBACK_CHAT_TEMPLATE


def effective_parallel(model: ModelSettings, defaults: ModelDefaults, auto: int = PARALLEL_AUTO_MAX) -> int:
    """How many requests a model's worker runs at once (``effective(...).parallel``, without the rest);
    ``auto``: what admission resolved "auto" to."""
    value = model.parallel if model.parallel is not None else defaults.parallel
    return auto if value == "auto" else value


def on_demand(model: ModelSettings, defaults: ModelDefaults) -> bool:
    """The model is loaded by requests and unloaded when idle (``enable = "on_demand"``)."""
    return (model.enable if model.enable is not None else defaults.enable) == "on_demand"


def keep_alive(model: ModelSettings, defaults: ModelDefaults) -> float:
    """Seconds an on-demand model stays loaded without a request."""
    return model.keep_alive_s if model.keep_alive_s is not None else defaults.keep_alive_s


def parallel_is_auto(model: ModelSettings, defaults: ModelDefaults) -> bool:
    return (model.parallel if model.parallel is not None else defaults.parallel) == "auto"


def queue_size(model: ModelSettings, defaults: ModelDefaults) -> int:
    """How many requests may wait for a model's worker beyond the ``parallel`` it runs."""
    return model.queue_size if model.queue_size is not None else defaults.queue_size


def stall_timeout(model: ModelSettings, defaults: ModelDefaults) -> float:
    """Seconds without a decode step, with requests pending, after which a model's worker is hung."""
    return model.stall_timeout_s if model.stall_timeout_s is not None else defaults.stall_timeout_s


def deadline(requested: float | None, model: ModelSettings, defaults: ModelDefaults) -> float | None:
    """A request's wall-time bound in seconds, or None for none.

    The model's ``deadline_s`` (its own, else the default; 0 is none) is the operator's cap; a
    request's own ``deadline_s`` may ask for less, never for more.
    """
    cap = model.deadline_s if model.deadline_s is not None else defaults.deadline_s
    bounds = [b for b in (requested, cap) if b]
    return min(bounds) if bounds else None


def checked(value: Any, name: str) -> None:
    """Raise BadRequest naming the field (``request.params.top_p``) when ``value`` breaks its type's limits."""
    try:
        validated(value)
    except msgspec.ValidationError as exc:
        path, expected = explain(exc, type(value))
        field = f"{name}.{path}" if path else name
        raise BadRequest(f"{field}: expected {expected}", field=field) from None
