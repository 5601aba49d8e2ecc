"""What a model's worker runs with: its own settings over the node's defaults, and safe mode.

How it works: an executor's desired ``ModelSettings`` hold per-model overrides (None: "use the
default"). ``effective`` merges them over ``Settings.model_defaults`` into the ``WorkerSettings``
a worker is started with; 0 for ``n_ctx`` / ``n_threads`` means the model's own training context /
every core this process may use. The runtime starts workers from it and calls a live worker
*stale* when it differs from what that worker was started with; ``status`` shows it. Safe mode is
the one input that is not a plain setting: with "auto", ``reconciler.on_exit`` turns it on after
a worker died of a fatal signal while loading, and ``safe_mode_reason`` says why the next worker
runs in it ("" when it does not). ``stall_timeout`` and ``deadline`` are the two settings read
by the supervisor and admission rather than the worker (a change restarts nothing). ``checked`` applies the types' limits to a Struct built in
Python (the in-process API), where msgspec did not decode it. Pure: no journal, no process.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from optimanode.config import ModelDefaults
from optimanode.constraints import CHAT_TEMPLATE_NAMES, SafeMode, explain, validated
from optimanode.errors import BadRequest
from optimanode.protocol import ModelInfo, ModelSettings, WorkerSettings

# What a safe-mode worker runs without (said in the log, the journal and ExecutorStatus).
SAFE_MODE_OFF = "llama.cpp's extra buffer types (weight repacking, AMX) and the persistent threadpool"


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


def effective(info: ModelInfo, model: ModelSettings, defaults: ModelDefaults, safe_reason: str) -> WorkerSettings:
    d, s = defaults, model
    n_ctx = s.n_ctx if s.n_ctx is not None else d.n_ctx
    n_threads = s.n_threads if s.n_threads is not None else d.n_threads
    return WorkerSettings(
        model_path=info.path,
        n_ctx=n_ctx or info.context_length or 2048,
        n_threads=n_threads or usable_cores(),
        n_gpu_layers=s.n_gpu_layers if s.n_gpu_layers is not None else d.n_gpu_layers,
        n_batch=s.n_batch if s.n_batch is not None else d.n_batch,
        parallel=effective_parallel(s, d),
        prefill=s.prefill if s.prefill is not None else d.prefill,
        safe_mode=safe_reason != "",
        chat_template=chat_template_setting(s, d),
    )


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


def effective_parallel(model: ModelSettings, defaults: ModelDefaults) -> int:
    """How many requests a model's worker runs at once (``effective(...).parallel``, without the rest)."""
    return model.parallel if model.parallel is not None else defaults.parallel


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
