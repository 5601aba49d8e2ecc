"""The reconciler's decisions: (desired, observed, now) → actions, and what a worker's exit means.

How it works: the runtime (``runtime.py``) gathers one ``Facts`` per executor (its lifecycle
state, whether the operator wants it enabled, its recent crash times, when its backoff ends, its
memory estimate, whether its running worker is stale, its safe-mode setting) and calls
``decide``. Nothing here touches a process, a socket, the journal or a clock; the runtime applies
the actions ``decide`` returns (firing lifecycle triggers, which journals them, and telling the
supervisor), and calls ``decide`` again on the next tick or when something changes. Applying the
same decision twice is harmless, because each action names the trigger it needs and the state
table refuses one that no longer applies.

The whole restart policy lives here. When a worker dies, the runtime asks ``on_exit`` (or
``on_spawn_failed`` when none could be started) what that means: the crash's reason, the crash
history and backoff deadline that follow, whether safe mode turns on, or whether the model goes
straight to ``failed``; ``decide`` then restarts it once the deadline passes, or gives up.

Restart policy (settings ``[restart]``): after the k-th crash within ``crash_window_s`` the
executor waits ``backoff_delay(k)`` = min(cap, base·2^(k-1))·(1 + jitter·u) before it restarts;
the ``crash_budget``-th crash in the window moves it to ``failed`` instead, where it stays until
an operator re-enables it or its file changes. A model that cannot load therefore costs a bounded
number of loads, spaced further and further apart, and never a busy loop.

Safe mode (``safe_mode = "auto"``, docs/operations.md): a worker that died of SIGSEGV, SIGBUS or
SIGILL before Ready is restarted at once and outside the crash budget, in safe mode (the crash is
a diagnosis, not part of a crash loop); a safe-mode worker that dies that way too goes straight to
``failed``, with a reason an operator can act on (safe mode cannot help a build or a model that
faults on this machine).

Replacement: a stale worker (its settings or file changed) is stopped and started again with the
new ones, one model at a time: no stale stop while another model's replacement (``replacing``:
from the old worker's stop to the new one running) is under way. The old worker drains first
(the runtime's ``stop_worker``).

Memory admission: a model starts only when its estimate (weights plus the KV cache for its
context) fits in what the machine has available, less ``memory_reserve_mb`` and less the
estimates of models that are still loading (they have not allocated yet). Otherwise it is held
in ``waiting`` with the reason, and started when memory frees up.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optimanode.config import Restart
from optimanode.constraints import SafeMode
from optimanode.executors.effective import SAFE_MODE_OFF
from optimanode.executors.lifecycle import LOADING, SERVING
from optimanode.executors.supervisor import ExitInfo
from optimanode.protocol import ModelInfo, State, Trigger


@dataclass(frozen=True)
class Facts:
    state: State
    enabled: bool
    crash_times: tuple[float, ...] = ()
    restart_at: float | None = None
    estimate_bytes: int = 0
    # The running worker was started with other settings or an older file than the desired ones.
    stale: bool = False
    # The model's safe-mode setting (its own, else the default): what a fatal signal while loading means.
    safe_mode: SafeMode = "auto"
    # Its running worker is being replaced: drained, stopped, the new one not running yet.
    replacing: bool = False


@dataclass(frozen=True)
class Action:
    executor_id: str
    trigger: Trigger
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    actions: list[Action] = field(default_factory=list)
    # Earliest time something becomes due (a backoff ending), so the loop can sleep until then.
    wake_at: float | None = None


@dataclass(frozen=True)
class ExitDecision:
    """What one worker's end means (``on_exit``, ``on_spawn_failed``): the crash and what follows it."""

    # The crash transition's reason.
    reason: str
    # The executor's crash history from this crash on (what ``decide`` counts against the budget).
    crash_times: tuple[float, ...]
    # When ``decide`` may restart it.
    restart_at: float | None
    # Journaled on the crash: the backoff, or None when no restart by backoff follows.
    restart_in_s: float | None = None
    # True: this crash turns safe mode on, and the next worker runs in it.
    safe_mode: bool | None = None
    # Not "": straight on to failed (``give_up``), with this reason.
    give_up: str = ""


def backoff_delay(crashes: int, policy: Restart, u: float) -> float:
    """Delay before restart after the ``crashes``-th crash in the window; ``u`` in [0, 1) is the jitter draw."""
    base = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** max(0, crashes - 1))
    return base * (1.0 + policy.jitter * u)


def crashes_in_window(crash_times: Sequence[float], now: float, policy: Restart) -> int:
    return sum(1 for t in crash_times if now - t <= policy.crash_window_s)


def decide(facts: Mapping[str, Facts], now: float, available_bytes: int, policy: Restart,
           reserve_bytes: int = 0) -> Decision:
    actions: list[Action] = []
    wake_at: float | None = None
    # Models still loading have not allocated their memory yet: count it as spoken for.
    budget = available_bytes - reserve_bytes - sum(f.estimate_bytes for f in facts.values() if f.state in LOADING)
    # Stale workers are replaced one at a time (new model defaults can make several stale at
    # once): each replacement drains a worker and leaves its model without one until the new
    # worker loads, so the node never has more than one model out of service for it.
    replacing = any(f.replacing for f in facts.values())
    for eid in sorted(facts):
        f = facts[eid]
        if f.state == "discovered" and f.enabled:
            actions.append(Action(eid, "enable", "desired enabled"))
        elif f.state in ("enabled", "waiting"):
            if not f.enabled:
                actions.append(Action(eid, "disable", "desired disabled"))
            elif f.estimate_bytes <= budget:
                budget -= f.estimate_bytes
                actions.append(Action(eid, "start"))
            elif f.state == "enabled":
                actions.append(Action(eid, "hold", _memory_reason(f.estimate_bytes, budget)))
        elif f.state in SERVING:
            if not f.enabled:
                actions.append(Action(eid, "stop", "desired disabled"))
            elif f.stale and not replacing:
                replacing = True
                actions.append(Action(eid, "stop", "settings or file changed; restarting with the new ones"))
        elif f.state == "crashed":
            if not f.enabled:
                actions.append(Action(eid, "disable", "desired disabled"))
                continue
            n = crashes_in_window(f.crash_times, now, policy)
            if n >= policy.crash_budget:
                actions.append(Action(eid, "give_up",
                                      f"{n} crashes within {policy.crash_window_s:g} s (crash budget {policy.crash_budget})"))
            elif f.restart_at is None or now >= f.restart_at:
                actions.append(Action(eid, "restart", f"restart after crash {n} of budget {policy.crash_budget}"))
            else:
                wake_at = f.restart_at if wake_at is None else min(wake_at, f.restart_at)
    return Decision(actions, wake_at)


def on_exit(f: Facts, info: ExitInfo, now: float, policy: Restart, u: float) -> ExitDecision:
    """What a worker that ended on its own (``f.state`` in SERVING) means; ``u`` in [0, 1) is the jitter draw."""
    crash_times = tuple(t for t in f.crash_times if now - t <= policy.crash_window_s) + (now,)
    n = len(crash_times)
    delay = backoff_delay(n, policy, u)
    reason = crash_reason(info)
    if info.fatal_signal and not info.was_ready and info.safe_mode:
        # Safe mode did not help: what is left is the build or the model on this machine.
        return ExitDecision(reason, crash_times, now + delay, give_up=_safe_mode_failed(info))
    if info.fatal_signal and not info.was_ready and f.safe_mode == "auto":
        # Once, at once, and outside the crash budget: the next worker runs in safe mode.
        return ExitDecision(f"{reason}; safe mode turns off {SAFE_MODE_OFF}", f.crash_times, now,
                            restart_in_s=0.0, safe_mode=True)
    return ExitDecision(reason, crash_times, now + delay,
                        restart_in_s=round(delay, 3) if n < policy.crash_budget else None)


def on_spawn_failed(f: Facts, error: str, now: float, policy: Restart, u: float) -> ExitDecision:
    """No worker could be started (an OSError from the spawn): a crash like any other, without a process."""
    crash_times = f.crash_times + (now,)
    return ExitDecision(f"could not spawn the worker: {error}", crash_times,
                        now + backoff_delay(len(crash_times), policy, u))


def crash_reason(info: ExitInfo) -> str:
    """How the worker ended, and while loading the last thing it said (its own explanation)."""
    what = info.describe() + ("" if info.was_ready else " while loading the model")
    last = next((line for line in reversed(info.stderr_tail) if line.strip()), "")
    # After a fatal signal the tail ends in faulthandler's report, not in an explanation.
    return what + (f": {last}" if last and not info.was_ready and not info.fatal_signal else "")


def _safe_mode_failed(info: ExitInfo) -> str:
    if info.signal == signal.SIGILL:
        return "this llama.cpp build uses instructions this CPU lacks: rebuild on this machine (tools/build-llama-cpp)"
    return (f"its worker died of {info.signal_name()} while loading even in safe mode: a fault in "
            "llama.cpp with this model on this machine (the crash event's stderr tail holds every "
            "thread's stack); try another build or quantization, then re-enable it")


def _memory_reason(need: int, budget: int) -> str:
    mib = 1024 * 1024
    return (f"not enough memory: needs about {need // mib} MiB (weights + KV cache), "
            f"{max(budget, 0) // mib} MiB available after the reserve and models still loading")


def estimate_bytes(info: ModelInfo, n_ctx: int) -> int:
    """Weights (the file size) plus an f16 KV cache for ``n_ctx`` tokens, plus a fixed compute margin."""
    ctx = n_ctx or info.context_length or 2048
    head_count = info.head_count or 1
    kv_heads = info.head_count_kv or head_count
    k = info.key_length or info.embedding_length // head_count
    v = info.value_length or info.embedding_length // head_count
    per_token = info.block_count * kv_heads * (k + v) * 2  # K and V rows per layer, f16
    return info.size_bytes + ctx * per_token + 64 * 1024 * 1024
