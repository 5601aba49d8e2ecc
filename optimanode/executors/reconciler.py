"""The reconciler's decision: (desired, observed, now) → actions, as a pure function.

How it works: the node gathers one ``Facts`` per executor (its lifecycle state, whether the
operator wants it enabled, its recent crash times, when its backoff ends, its memory estimate,
whether its running worker is stale) and calls ``decide``. ``decide`` never touches a process,
a socket or a clock; the node applies the actions it returns (firing lifecycle triggers and
telling the supervisor), journals them, and calls ``decide`` again on the next tick or when
something changes. Applying the same decision twice is harmless, because each action names the
trigger it needs and the state table refuses one that no longer applies.

Restart policy (settings ``[restart]``): after the k-th crash within ``crash_window_s`` the
executor waits ``backoff_delay(k)`` = min(cap, base·2^(k-1))·(1 + jitter·u) before it restarts;
the ``crash_budget``-th crash in the window moves it to ``failed`` instead, where it stays until
an operator re-enables it or its file changes. A model that cannot load therefore costs a bounded
number of loads, spaced further and further apart, and never a busy loop.

Memory admission: a model starts only when its estimate (weights plus the KV cache for its
context) fits in what the machine has available, less ``memory_reserve_mb`` and less the
estimates of models that are still loading (they have not allocated yet). Otherwise it is held
in ``waiting`` with the reason, and started when memory frees up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optimanode.config import Restart
from optimanode.protocol import ModelInfo


@dataclass(frozen=True)
class Facts:
    state: str
    enabled: bool
    crash_times: tuple[float, ...] = ()
    restart_at: float | None = None
    estimate_bytes: int = 0
    # The running worker was started with other settings or an older file than the desired ones.
    stale: bool = False


@dataclass(frozen=True)
class Action:
    executor_id: str
    trigger: str
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    actions: list[Action] = field(default_factory=list)
    # Earliest time something becomes due (a backoff ending), so the loop can sleep until then.
    wake_at: float | None = None


LOADING = frozenset({"starting", "restarting"})
SERVING = frozenset({"starting", "running", "restarting"})


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
            elif f.stale:
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
