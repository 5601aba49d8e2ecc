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

Memory admission: a model starts only when its estimate (``memory.estimate``: weights, KV cache
and compute buffers, split between the CPU and the GPUs by ``n_gpu_layers``) fits: its RAM part
in what the machine has available, less ``memory_reserve_mb`` and less the RAM of models still
loading (they have not allocated yet), plus what running workers hold in their host prompt caches
(each cache gives back what would leave the machine less than the reserve and the loading models'
RAM: the runtime sends that floor to every worker when a model starts and with each heartbeat);
its GPU part on the GPUs ``memory.place`` picks (or the operator listed), each GPU's NVML free
memory less ``vram_reserve_mb`` and less what models still loading will take there. A model with
``parallel = "auto"`` brings one estimate per slot count, most first; the first that fits is
started with that count. Otherwise it is held in ``waiting`` with the reason naming the device
and the shortfall, and started when memory frees up.
``memory_budget_bytes`` (when set) caps the RAM estimates of all live models together.

On-demand models (``enable = "on_demand"``): enabled, one is started only while a request wants
it (``demanded``), and a running one idle for ``keep_alive_s`` is stopped. When a demanded model
does not fit, idle running on-demand models are evicted (stopped), least recently used first,
as many as it takes to make room; the demanded model starts once their memory is back. Models
with ``enable = "always"`` and models with requests are never evicted, and while an evicted
worker is still stopping no further model is evicted.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optimanode.config import Restart
from optimanode.constraints import SafeMode
from optimanode.executors.effective import SAFE_MODE_OFF
from optimanode.executors.lifecycle import LIVE, LOADING, SERVING
from optimanode.executors.memory import Estimate, GpuMemory, GpuWish, Placement, Shortfall, place
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
    # (parallel, estimate) to try, in order of preference (``parallel = "auto"``: 4 slots first);
    # empty: ``estimate_bytes`` alone, all in RAM.
    options: tuple[tuple[int, Estimate], ...] = ()
    # Its placement settings, and while it loads, the bytes it will take on each GPU.
    wish: GpuWish = GpuWish()
    placed: Mapping[int, int] = field(default_factory=dict)
    # On-demand loading: loaded only on demand; a request waits for it to load; seconds since its
    # last request ended while nothing runs or waits on it (None: busy or not running); when it
    # was last used (for least-recently-used eviction); keep_alive_s.
    on_demand: bool = False
    demanded: bool = False
    idle_s: float | None = None
    last_used: float = 0.0
    keep_alive_s: float = 300.0
    # Bytes its running worker holds in its host prompt cache: RAM the cache gives back when the
    # node asks for it (``Ping.keep_free_bytes``), so admission counts it as room.
    cache_bytes: int = 0


@dataclass(frozen=True)
class Action:
    executor_id: str
    trigger: Trigger
    reason: str = ""
    # For a start: the slot count chosen (0: as set), the GPUs and the bytes on each, the estimate.
    parallel: int = 0
    placement: Placement = Placement()
    estimate: Estimate | None = None


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
           reserve_bytes: int = 0, gpus: Sequence[GpuMemory] = (), vram_reserve_bytes: int = 0,
           memory_budget_bytes: int = 0) -> Decision:
    actions: list[Action] = []
    wake_at: float | None = None
    # Models still loading have not allocated their memory yet: count it as spoken for.
    # Host prompt caches give their bytes back once a model is admitted (the runtime sends them the
    # new floor, reserve and loading models together): count them as room.
    budget = (available_bytes - reserve_bytes - sum(f.estimate_bytes for f in facts.values() if f.state in LOADING)
              + sum(f.cache_bytes for f in facts.values() if f.state in SERVING))
    if memory_budget_bytes:
        budget = min(budget, memory_budget_bytes - sum(f.estimate_bytes for f in facts.values() if f.state in LIVE))
    evicted: set[str] = set()
    gpu_free = {g.index: g.free_bytes - vram_reserve_bytes for g in gpus}
    for f in facts.values():
        if f.state in LOADING:
            for i, b in f.placed.items():
                if i in gpu_free:
                    gpu_free[i] -= b
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
            elif f.on_demand and not f.demanded:
                continue  # loaded by its first request
            else:
                admitted = admit(f, budget, gpus, gpu_free)
                if not isinstance(admitted, Action) and f.on_demand:
                    victims = _evict_for(eid, f, facts, budget, gpus, gpu_free, evicted)
                    if victims is not None:
                        for v in victims:
                            evicted.add(v)
                            actions.append(Action(v, "stop", f"evicted: the least recently used idle on-demand "
                                                             f"model, for {eid}, which needs its memory"))
                        continue  # started once their memory is back
                if isinstance(admitted, Action):
                    budget -= admitted.estimate.ram_bytes if admitted.estimate else f.estimate_bytes
                    for i, b in admitted.placement.vram.items():
                        gpu_free[i] -= b
                    actions.append(Action(eid, "start", parallel=admitted.parallel, placement=admitted.placement,
                                          estimate=admitted.estimate))
                elif f.state == "enabled":
                    actions.append(Action(eid, "hold", admitted))
        elif f.state in SERVING:
            if eid in evicted:
                continue
            if not f.enabled:
                actions.append(Action(eid, "stop", "desired disabled"))
            elif f.on_demand and f.state == "running" and f.idle_s is not None and f.idle_s >= f.keep_alive_s:
                actions.append(Action(eid, "stop", f"idle for {f.idle_s:.0f} s (keep_alive_s {f.keep_alive_s:g})"))
            elif f.on_demand and f.state == "running" and f.idle_s is not None:
                due = now + f.keep_alive_s - f.idle_s
                wake_at = due if wake_at is None else min(wake_at, due)
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
    """No worker could be started (an OSError from the spawn): a crash like any other, without a process.

    As ``on_exit``: crashes older than the window are dropped (a node whose spawns fail now and
    then over months must not carry, or count, all of them) and the journaled crash says the backoff."""
    crash_times = tuple(t for t in f.crash_times if now - t <= policy.crash_window_s) + (now,)
    n = len(crash_times)
    delay = backoff_delay(n, policy, u)
    return ExitDecision(f"could not spawn the worker: {error}", crash_times, now + delay,
                        restart_in_s=round(delay, 3) if n < policy.crash_budget else None)


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


def _evict_for(eid: str, f: Facts, facts: Mapping[str, Facts], budget: int, gpus: Sequence[GpuMemory],
               gpu_free: Mapping[int, int], already: set[str]) -> list[str] | None:
    """The idle on-demand models to stop, least recently used first, so that ``f`` fits; [] while an
    on-demand model's worker is still stopping (its memory is on its way back: wait for it); None
    when no set of idle models would make room."""
    if any(g.state == "stopping" and g.on_demand for g in facts.values()):
        return []
    idle = sorted((g.last_used, v) for v, g in facts.items()
                  if v != eid and v not in already and g.on_demand and g.state == "running"
                  and g.idle_s is not None and not g.demanded)
    victims: list[str] = []
    free = dict(gpu_free)
    for _, v in idle:
        victims.append(v)
        budget += facts[v].estimate_bytes
        for i, b in facts[v].placed.items():
            if i in free:
                free[i] += b
        if isinstance(admit(f, budget, gpus, free), Action):
            return victims
    return None


def admit(f: Facts, budget: int, gpus: Sequence[GpuMemory], gpu_free: Mapping[int, int]) -> Action | str:
    """The first of ``f``'s options that fits (as a start Action, placed), or why none does."""
    if not f.options:
        if f.estimate_bytes <= budget:
            return Action("", "start")
        return Shortfall("RAM", f.estimate_bytes, budget, "weights + KV cache").reason
    why = ""
    for parallel, est in f.options:
        if est.ram_bytes > budget:
            why = Shortfall("RAM", est.ram_bytes, budget, est.describe_ram()).reason
            continue
        placed = place(est, gpus, f.wish, gpu_free)
        if isinstance(placed, Shortfall):
            why = placed.reason
            continue
        return Action("", "start", parallel=parallel, placement=placed, estimate=est)
    if len(f.options) > 1:
        why += f" (with parallel {f.options[-1][0]}, the fewest slots \"auto\" tries)"
    return why


def estimate_bytes(info: ModelInfo, n_ctx: int) -> int:
    """Weights (the file size) plus an f16 KV cache for ``n_ctx`` tokens, plus a fixed compute margin."""
    ctx = n_ctx or info.context_length or 2048
    head_count = info.head_count or 1
    kv_heads = info.head_count_kv or head_count
    k = info.key_length or info.embedding_length // head_count
    v = info.value_length or info.embedding_length // head_count
    per_token = info.block_count * kv_heads * (k + v) * 2  # K and V rows per layer, f16
    return info.size_bytes + ctx * per_token + 64 * 1024 * 1024
