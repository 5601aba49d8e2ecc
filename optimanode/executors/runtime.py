"""The executor runtime: each model's working record, its transitions, its worker, and the reconcile loop.

How it works:

* ``Runtime.restore`` rebuilds one ``Executor`` per model from the replayed journal (its lifecycle
  state, desired state, settings, recent crashes, safe mode) and ``recover``\\s the live states a
  previous process left behind (no worker survives its node).
* Every change goes through ``fire``: the trigger is checked against the state table, the
  Transition event is appended (durable), and only then the in-memory machine moves; the loop and
  whoever waits in ``wait_for_state`` are woken. Desired-state changes (``desire``, ``enable``,
  ``disable``) are journaled before they return. Each such change is one unit (``_change``):
  under the executor's lock it reads the current values, appends, and applies what it appended,
  and once appended it is applied even when its caller is cancelled (a Gateway that disconnects
  mid-call), since the journal commits what was queued either way. So two changes at once each
  change only their own field, and the running node always holds what the journal says.
* The loop (``run``) ticks every second, at the next backoff deadline, or when woken: it gathers
  one ``Facts`` per executor (with its memory estimates, ``memory.estimate``), reads the free
  RAM (psutil) and each GPU's free memory (``gpu_probe``: NVML through ``metrics.GpuProbe``),
  calls the pure ``reconciler.decide`` and applies its actions: firing the trigger, then for
  ``start``/``restart`` spawning a worker (``supervisor``) pinned to its placement's GPUs with
  ``CUDA_VISIBLE_DEVICES`` (by UUID; "" for a CPU-only model on a GPU machine), for ``stop``
  stopping one.
* A worker that serves is drained before it is stopped (``stop_worker``, for the reconciler's
  stops and ``retire``): the ``Drainer`` (inference, set by the node) is told of every transition
  in the step that makes it (``changed``: the stop closes the model's admission), then lets the
  worker's requests finish for ``drain_timeout_s`` and cuts the rest (0 after a disable with
  ``now``). A stale worker's stop marks the executor ``replacing`` until a new worker runs or
  the replacement leaves ``REPLACE_PATH``: meanwhile requests queue for the new worker.
* A worker's end comes back from the supervisor once, to ``_on_worker_exit``. A stop is journaled
  as ``stopped`` (then a pending invalidate/vanish, ``retire``). A crash is handed to the pure
  ``reconciler.on_exit``, which says what it means (the crash history and backoff, safe mode on,
  or failed at once); the decision is journaled as ``crash`` with the exit details (exit code,
  signal, uptime, stderr tail, what the worker was doing) and only then applied. The next
  ``decide`` restarts the model when its backoff is over, or gives up. An end that cannot be
  journaled (a full disk) is kept and retried every tick.

The runtime decides nothing itself: what to start, stop, restart or give up on is the
reconciler's; how a worker runs is the supervisor's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from optimanode.config import Settings
from optimanode.errors import IllegalTransition, JournalError, RequestError, UnknownModel
from optimanode.constraints import PARALLEL_AUTO_MAX
from optimanode.executors.effective import (
    SAFE_MODE_OFF,
    effective,
    effective_parallel,
    gpu_wish,
    keep_alive,
    on_demand,
    parallel_is_auto,
    safe_mode_reason,
    safe_mode_setting,
    stall_timeout,
)
from optimanode.executors.lifecycle import LIVE, LOADING, SERVING, Lifecycle, allowed
from optimanode.executors.memory import Estimate, GpuMemory, Placement, estimate
from optimanode.executors.reconciler import (
    Action,
    ExitDecision,
    Facts,
    decide,
    estimate_bytes,
    on_exit,
    on_spawn_failed,
)
from optimanode.executors.supervisor import ExitInfo, WorkerProcess
from optimanode.journal import ExecutorView, Journal
from optimanode.protocol import (
    DesiredChanged,
    EventBody,
    GpuReport,
    ModelInfo,
    ModelSettings,
    State,
    Transition,
    Trigger,
    WorkerSettings,
)

log = logging.getLogger(__name__)

RECONCILE_TICK_S = 1.0


@dataclass
class Executor:
    """One model's runtime record. The journal holds its truth; this is the working copy."""

    id: str
    life: Lifecycle
    info: ModelInfo
    enabled: bool = False
    settings: ModelSettings = field(default_factory=ModelSettings)
    reason: str = ""
    crash_times: list[float] = field(default_factory=list)
    # Crashes since the node started, by cause (supervisor.CRASH_CAUSES): the metrics endpoint's counters.
    crashes: collections.Counter[str] = field(default_factory=collections.Counter)
    restart_at: float | None = None
    worker: WorkerProcess | None = None
    # What the live worker was started from; differs from `effective()` when settings or file changed.
    worker_key: tuple[WorkerSettings, int, int] | None = None
    # A worker exit whose crash/stopped transition could not be journaled (a full disk): the
    # reconciler retries it each tick, so the model comes back once the journal takes writes again.
    unjournaled_exit: ExitInfo | None = None
    # After the worker stops: ("invalidate" | "vanish", reason).
    after_stop: tuple[Trigger, str] | None = None
    # Held across read → append → apply by every change to its state or its desired state
    # (``Runtime.fire``, ``Runtime.desire``): changes to one executor are journaled and applied
    # one at a time, in the order they were asked for.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    restarts: int = 0
    backend: str = ""
    # Safe mode as "auto" decides it: on after a worker died of a fatal signal before Ready, and
    # then as the last worker that loaded ran (the journal's last Transition.safe_mode), and why.
    safe: bool = False
    safe_reason: str = ""
    # Its running worker is being replaced (configure, a new file, new model defaults): from the
    # stop of the old worker until the new one is running, requests queue for the new one
    # instead of being refused. Cleared when it runs again or leaves REPLACE_PATH (``fire``).
    replacing: bool = False
    # The next stop of its worker cuts the running requests at once (a disable with ``now``).
    stop_now: bool = False
    # What admission chose at its last start: the slot count for parallel = "auto", the GPUs
    # (and bytes on each), the estimate it was admitted with.
    parallel_auto: int = PARALLEL_AUTO_MAX
    placement: Placement = field(default_factory=Placement)
    estimate: Estimate | None = None
    # On-demand loading: a request waits for this model to load; when a request last started or
    # ended on it, and when its worker became ready (clock time); times evicted for another model.
    demanded: bool = False
    last_used: float = 0.0
    ready_at: float = 0.0
    evictions: int = 0

    @property
    def state(self) -> State:
        return self.life.state


# The states a replacement passes through, old worker stopping to new worker loading: a
# replacement that leaves them (a crash while loading, held for memory, disabled) has ended.
REPLACE_PATH: frozenset[State] = frozenset({"stopping", "discovered", "enabled", "starting"})


class Drainer(Protocol):
    """What the runtime asks of the side that holds the requests (inference.py) around a stop."""

    def changed(self, ex: Executor) -> None:
        """``ex``'s state or ``replacing`` changed: open, close or empty its admission accordingly."""

    async def drain_worker(self, ex: Executor, worker: WorkerProcess, *, reason: str, timeout_s: float,
                           cut_reason: str) -> None:
        """Let ``worker``'s requests finish for ``timeout_s``, then cut the rest (``cut_reason``); journaled."""

    def hurry(self, ex: Executor) -> None:
        """Cut ``ex``'s drain in progress short: its running requests are cut now (disable with now)."""

    def in_use(self, ex: Executor) -> int:
        """Requests running on or waiting for ``ex`` (an on-demand model with none is idle)."""


def _serves(worker: WorkerProcess) -> bool:
    """The worker said Ready and is still alive: it may hold requests worth draining."""
    ready = worker.ready
    return ready.done() and not ready.cancelled() and ready.exception() is None and not worker.exit.done()


class Background:
    """Short tasks tied to the node (a worker's stop, a wait for Ready, a request's journal entry).

    Each is kept referenced until it ends (asyncio holds tasks only weakly) and its failure is
    logged; ``settle`` gives those still running a bounded time when the node stops.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[object]] = set()

    def spawn(self, coro: Awaitable[object], name: str) -> None:
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Future[object]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s failed: %s", name, t.exception())

        task.add_done_callback(done)

    def track(self, task: asyncio.Future[Any]) -> None:
        """Keep ``task`` (its owner reads its outcome) referenced until it ends, and let ``settle`` wait for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout_s: float = 2.0) -> None:
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(timeout_s):
                    await t


class Runtime:
    """Every executor of the node, and the loop that keeps each where the reconciler wants it."""

    def __init__(self, settings: Settings, journal: Journal, background: Background, *,
                 clock: Callable[[], float], gpu_probe: Callable[[], list[GpuReport]] | None = None) -> None:
        # Replaced as a whole on a reload (Node.apply_settings); read where it is used.
        self.settings = settings
        self.journal = journal
        self.clock = clock
        self.executors: dict[str, Executor] = {}
        self._background = background
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        # Set by the node to its inference part: admission follows each change, and a stop drains.
        self.drainer: Drainer | None = None
        # Each GPU's free memory (metrics.GpuProbe); the last answer, read by facts between probes.
        self.gpu_probe = gpu_probe
        self.gpus: list[GpuMemory] = []

    def get(self, executor_id: str) -> Executor:
        ex = self.executors.get(executor_id)
        if ex is None:
            raise UnknownModel(f"no model with executor id {executor_id!r}", executor=executor_id)
        return ex

    def wake(self) -> None:
        """Reconcile now rather than at the next tick."""
        self._wake.set()

    async def restore(self, views: dict[str, ExecutorView]) -> None:
        """Rebuild executors from the replayed journal; states a dead process left behind are recovered."""
        now = self.clock()
        window = self.settings.restart.crash_window_s
        recent = await self.journal.read(types=["transition"], since_ts=now - window)
        for view in views.values():
            ex = Executor(id=view.id, life=Lifecycle(view.id, view.state), info=view.info,
                          enabled=view.enabled, settings=view.settings)
            # (The crash that turned safe mode on is a diagnosis, not part of a crash loop.)
            ex.crash_times = [e.ts for e in recent if e.stream == view.id and getattr(e.body, "trigger", "") == "crash"
                              and not getattr(e.body, "safe_mode", None)]
            self.executors[view.id] = ex
        for ex in self.executors.values():
            if ex.state in LIVE:
                await self.fire(ex, "recover", reason="node restarted; no worker survived it")
            elif ex.state == "crashed":
                ex.restart_at = now  # its backoff was spent while the node was down
        # Reasons for states that carry one (invalid, failed, waiting, missing) come from the last
        # transition into that state; "auto" safe mode from the last transition that set it. The
        # journal keeps that fold (its notes: the newest checkpoint's, then the transitions since),
        # so a start reads no transition older than the checkpoint.
        for eid, notes in self.journal.notes().items():
            ex = self.executors.get(eid)
            if ex is None:
                continue
            if ex.state in notes.reasons:
                ex.reason = notes.reasons[ex.state]
            if notes.safe_mode is not None:
                ex.safe = notes.safe_mode
                ex.safe_reason = notes.safe_reason

    # -- transitions -----------------------------------------------------------------------

    async def fire(self, ex: Executor, trigger: Trigger, **details: object) -> None:
        """Check, journal (durably), then move the machine; illegal → IllegalTransition, nothing changed.

        One unit (``_change``): a caller cancelled once the append is queued still leaves the
        transition both journaled and applied, never journaled only.
        """
        def plan() -> tuple[list[tuple[str, EventBody]], Callable[[], None]]:
            t = self._transition(ex, trigger, details)
            return [(ex.id, t)], lambda: self._move(ex, t)

        await self._change(ex, plan)
        await self._moved()

    @staticmethod
    def _transition(ex: Executor, trigger: Trigger, details: dict[str, object]) -> Transition:
        """The Transition ``trigger`` makes from ``ex``'s state now; IllegalTransition if none (under ``ex.lock``)."""
        src = ex.state
        dst = allowed(src, trigger)
        if dst is None:
            raise IllegalTransition(ex.id, trigger, src)
        return Transition(trigger=trigger, src=src, dst=dst, **details)  # type: ignore[arg-type]

    def _move(self, ex: Executor, t: Transition) -> None:
        """Apply the journaled ``t`` in memory (under ``ex.lock``, right after its append)."""
        ex.life.fire(t.trigger)
        ex.reason = t.reason
        if ex.replacing and (t.dst == "running" or t.dst not in REPLACE_PATH):
            ex.replacing = False
            # The load a request asked for is done, or failed (its requests are told why).
            ex.demanded = False
        if t.dst == "running":
            ex.ready_at = self.clock()
        # In the same step as the move: no request can slip between the state and its admission.
        if self.drainer is not None:
            self.drainer.changed(ex)
        log.info("executor %s: %s → %s (%s)%s", ex.id, t.src, t.dst, t.trigger,
                 f": {ex.reason}" if ex.reason else "")

    async def _moved(self) -> None:
        """After a move: wake the loop and whoever waits in ``wait_for_state``."""
        self._wake.set()
        async with self._changed:
            self._changed.notify_all()

    async def _change(self, ex: Executor,
                      plan: Callable[[], tuple[list[tuple[str, EventBody]], Callable[[], None]]]) -> None:
        """One change to ``ex`` as one unit: under ``ex.lock``, ``plan`` reads the current values
        and returns the events to journal and how to apply them; they are appended (one commit),
        then applied.

        The journal commits an append once it is queued, whether or not its caller still waits
        (a Gateway that disconnects mid-call cancels its control task). So a caller cancelled
        after that still sees CancelledError, but the change is applied when the commit lands,
        and ``ex.lock`` is held until then: the next change to ``ex`` reads what was committed.
        A caller cancelled while it waits for the lock changes nothing.
        """
        await ex.lock.acquire()
        try:
            events, apply = plan()
            append = asyncio.ensure_future(self.journal.append_many(events))
        except BaseException:
            ex.lock.release()
            raise
        self._background.track(append)
        try:
            await asyncio.shield(append)
        except asyncio.CancelledError:
            if append.done():
                self._finish_orphan(ex, apply, append)
            else:
                append.add_done_callback(functools.partial(self._finish_orphan, ex, apply))
            raise
        except BaseException:
            ex.lock.release()
            raise
        try:
            apply()
        finally:
            ex.lock.release()

    def _finish_orphan(self, ex: Executor, apply: Callable[[], None], append: asyncio.Future[Any]) -> None:
        """The end of a change whose caller was cancelled (``_change``): applied if it was committed."""
        try:
            if append.cancelled():
                log.warning("executor %s: a change whose caller was cancelled was not journaled", ex.id)
            elif append.exception() is not None:
                log.warning("executor %s: a change whose caller was cancelled could not be journaled: %s",
                            ex.id, append.exception())
            else:
                apply()
                self._background.spawn(self._moved(), f"changed-{ex.id}")
        finally:
            ex.lock.release()

    async def wait_for_state(self, executor_id: str, states: Iterable[str], timeout: float) -> str:
        """Wait until the executor is in one of ``states``; return it, or raise TimeoutError."""
        want = set(states)
        ex = self.get(executor_id)
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: ex.state in want)
        return ex.state

    # -- desired state ---------------------------------------------------------------------

    async def desire(self, ex: Executor, enabled: bool | None, settings: ModelSettings | None, by: str) -> None:
        """Journal what the operator wants for ``ex``, then hold it; the loop acts on it.

        ``None`` keeps that half as it is when the change is made (read under ``ex.lock``, not
        by the caller): a configure (``enabled=None``) and a disable (``settings=None``) at once
        each change only their own half, in the order they were asked for.
        """
        await self._desire(ex, enabled, settings, by)

    async def disable(self, ex: Executor, by: str, now: bool = False) -> None:
        """Want ``ex`` stopped; its worker drains first unless ``now`` (then its requests are cut at once)."""
        if now:
            ex.stop_now = True
            if self.drainer is not None:
                self.drainer.hurry(ex)  # a drain already under way (an earlier disable) ends now
        await self._desire(ex, False, None, by)

    async def enable(self, ex: Executor, by: str) -> None:
        """Want ``ex`` running. From ``failed`` this is how an operator says "try again": the
        ``enable`` transition is journaled with the desire, in one commit."""
        await self._desire(ex, True, None, by, retry=True)

    async def _desire(self, ex: Executor, enabled: bool | None, settings: ModelSettings | None, by: str, *,
                      retry: bool = False) -> None:
        def plan() -> tuple[list[tuple[str, EventBody]], Callable[[], None]]:
            want = DesiredChanged(enabled=ex.enabled if enabled is None else enabled,
                                  settings=ex.settings if settings is None else settings, by=by)
            events: list[tuple[str, EventBody]] = [(ex.id, want)]
            t: Transition | None = None
            if retry and ex.state == "failed":
                # Re-enabling is how an operator says "try again": the crash budget starts afresh, and
                # an automatic safe mode is dropped (the next worker proves whether it is still needed).
                t = self._transition(ex, "enable", dict(reason=f"re-enabled by {by or 'operator'}",
                                                        safe_mode=False if ex.safe else None))
                events.append((ex.id, t))

            def apply() -> None:
                ex.enabled, ex.settings = want.enabled, want.settings
                if want.enabled:
                    ex.stop_now = False
                elif ex.replacing:
                    ex.replacing = False  # no new worker follows: whoever waits for one is told so now
                    if self.drainer is not None:
                        self.drainer.changed(ex)
                if t is not None:
                    ex.crash_times.clear()
                    self._move(ex, t)
                    ex.safe, ex.safe_reason = False, ""

            return events, apply

        await self._change(ex, plan)
        await self._moved()  # the loop, and whoever waits in wait_for_state (a retry moves the state)

    def effective(self, ex: Executor, auto_parallel: int | None = None) -> WorkerSettings:
        """The settings ``ex``'s worker runs (or would run) with."""
        return effective(ex.info, ex.settings, self.settings.model_defaults, self.safe_mode_reason(ex),
                         auto_parallel=auto_parallel or ex.parallel_auto)

    def demand(self, ex: Executor) -> bool:
        """A request wants ``ex``, an enabled on-demand model that is not serving: have it loaded, and
        let requests queue for it meanwhile (as for a replacement). False when that does not apply."""
        if not (ex.enabled and on_demand(ex.settings, self.settings.model_defaults)
                and ex.state in ("enabled", "waiting", "stopping", "discovered")):
            return False
        if ex.state == "waiting":
            # Known not to fit: this request is refused with the reason at once; the model is
            # loaded (evicting idle ones if that makes room) for the requests that follow.
            ex.demanded = True
            self._wake.set()
            return False
        ex.demanded = ex.replacing = True
        ex.last_used = self.clock()
        if self.drainer is not None:
            self.drainer.changed(ex)
        self._wake.set()
        return True

    def touch(self, ex: Executor) -> None:
        """A request started or ended on ``ex`` (least-recently-used order, keep_alive_s)."""
        ex.last_used = self.clock()

    def options(self, ex: Executor) -> tuple[tuple[int, Estimate], ...]:
        """(parallel, estimate) admission may start ``ex`` with, most slots first."""
        d = self.settings.model_defaults
        counts = (range(PARALLEL_AUTO_MAX, 0, -1) if parallel_is_auto(ex.settings, d)
                  else (effective_parallel(ex.settings, d),))
        return tuple((n, estimate(ex.info, self.effective(ex, n), gpus_available=bool(self.gpus))) for n in counts)

    def memory(self, ex: Executor) -> tuple[Estimate, Placement]:
        """``ex``'s estimate and placement: as admitted while it is live, else for its settings now."""
        if ex.state in LIVE and ex.estimate is not None:
            return ex.estimate, ex.placement
        return estimate(ex.info, self.effective(ex), gpus_available=bool(self.gpus)), Placement()

    def probe_gpus(self) -> list[GpuMemory]:
        if self.gpu_probe is not None:
            self.gpus = [GpuMemory(index=g.index, name=g.name, total_bytes=g.memory_total_bytes,
                                   free_bytes=g.memory_free_bytes or 0, uuid=g.uuid) for g in self.gpu_probe()]
        return self.gpus

    def safe_mode_reason(self, ex: Executor) -> str:
        """Why the next worker of ``ex`` runs in safe mode, or "" when it does not."""
        return safe_mode_reason(safe_mode_setting(ex.settings, self.settings.model_defaults), ex.safe, ex.safe_reason)

    # -- reconciling -----------------------------------------------------------------------

    def fact(self, ex: Executor) -> Facts:
        wanted = self.effective(ex)
        stale = (ex.worker_key is not None and ex.state in LIVE
                 and ex.worker_key != (wanted, ex.info.size_bytes, ex.info.mtime_ns))
        # Estimates matter where admission decides (enabled, waiting), and for a live model (loading:
        # not allocated yet; running: what evicting it frees) what it was admitted with.
        admitting = ex.state in ("enabled", "waiting")
        live = ex.state in LIVE and ex.estimate is not None
        options = self.options(ex) if admitting else ()
        need = (ex.estimate.ram_bytes if live and ex.estimate is not None
                else options[-1][1].ram_bytes if options else estimate_bytes(ex.info, wanted.n_ctx))
        d = self.settings.model_defaults
        busy = self.drainer.in_use(ex) if self.drainer is not None else 0
        return Facts(state=ex.state, enabled=ex.enabled, crash_times=tuple(ex.crash_times),
                     restart_at=ex.restart_at, estimate_bytes=need,
                     stale=stale, safe_mode=safe_mode_setting(ex.settings, self.settings.model_defaults),
                     replacing=ex.replacing, options=options,
                     wish=gpu_wish(ex.settings, self.settings.model_defaults),
                     placed=dict(ex.placement.vram) if live else {},
                     on_demand=on_demand(ex.settings, d), demanded=ex.demanded, last_used=ex.last_used,
                     idle_s=None if busy or ex.state != "running" else self.clock() - max(ex.last_used, ex.ready_at),
                     keep_alive_s=keep_alive(ex.settings, d),
                     cache_bytes=self.cache_bytes(ex))

    @staticmethod
    def cache_bytes(ex: Executor) -> int:
        """What ``ex``'s running worker holds in its host prompt cache (its last heartbeat): RAM it
        gives back when the node asks (``keep_free_bytes``)."""
        progress = ex.worker.progress if ex.worker is not None and ex.state in SERVING else None
        return progress.prompt_cache.bytes if progress is not None and progress.prompt_cache is not None else 0

    def keep_free_bytes(self) -> int:
        """The RAM the node needs left available, sent to every worker with each heartbeat: the
        reserve, and what the models still loading will allocate (admission counted them as spoken
        for). Host prompt caches give back what would take the machine below it."""
        loading = sum(ex.estimate.ram_bytes for ex in self.executors.values()
                      if ex.state in LOADING and ex.estimate is not None)
        return self.settings.memory_reserve_mb * 1024 * 1024 + loading

    def facts(self) -> dict[str, Facts]:
        return {eid: self.fact(ex) for eid, ex in self.executors.items()}

    async def reconcile_once(self) -> float | None:
        """One decision and its actions; returns when something next becomes due."""
        await self._retry_unjournaled_exits()
        gpus = self.probe_gpus()
        decision = decide(self.facts(), self.clock(), psutil.virtual_memory().available, self.settings.restart,
                          reserve_bytes=self.settings.memory_reserve_mb * 1024 * 1024, gpus=gpus,
                          vram_reserve_bytes=self.settings.vram_reserve_mb * 1024 * 1024,
                          memory_budget_bytes=self.settings.memory_budget_mb * 1024 * 1024)
        for action in decision.actions:
            try:
                await self._apply(action)
            except IllegalTransition as exc:
                log.debug("skipped %s: %s", action, exc)  # the state moved on since the decision
        return decision.wake_at

    async def run(self) -> None:
        """The reconcile loop: decide, act, sleep until the next tick, backoff deadline or wake-up."""
        while True:
            self._wake.clear()
            wake_at = await self.reconcile_once()
            timeout = RECONCILE_TICK_S if wake_at is None else max(0.0, min(RECONCILE_TICK_S, wake_at - self.clock()))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # races with the event, and this loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _apply(self, action: Action) -> None:
        ex = self.executors[action.executor_id]
        if action.trigger in ("start", "restart"):
            if action.trigger == "restart":
                ex.restarts += 1
            else:
                # Admission's choice: a restart keeps the last one (its memory was freed by the crash).
                ex.parallel_auto = action.parallel or ex.parallel_auto
                ex.placement, ex.estimate = action.placement, action.estimate
            await self.fire(ex, action.trigger, reason=action.reason)
            await self._launch(ex)
        elif action.trigger == "stop":
            unload = action.reason.startswith(("evicted", "idle for"))
            if action.reason.startswith("evicted"):
                ex.evictions += 1
            if ex.enabled and ex.state == "running" and not unload:
                # (An on-demand model being replaced is loaded again for the requests that wait.)
                ex.demanded = on_demand(ex.settings, self.settings.model_defaults)
                # Stale: a new worker follows. Set before the stop transition, whose step closes
                # the admission, so from then on new requests queue for the new worker.
                ex.replacing = True
            await self.fire(ex, "stop", reason=action.reason)
            self._background.spawn(self.stop_worker(ex, reason=action.reason, drain=True), f"stop-{ex.id}")
        elif action.trigger == "hold" and ex.state == "waiting" and ex.reason == action.reason:
            return
        else:
            await self.fire(ex, action.trigger, reason=action.reason)

    # -- workers ---------------------------------------------------------------------------

    async def _launch(self, ex: Executor) -> None:
        wanted = self.effective(ex)
        rs = self.settings.restart
        try:
            worker = await WorkerProcess.spawn(ex.id, wanted, self._on_worker_exit, env=self.pin(ex),
                                               heartbeat_interval_s=rs.heartbeat_interval_s,
                                               heartbeat_timeout_s=rs.heartbeat_timeout_s,
                                               # Read at each beat: a configure or reload applies at once.
                                               stall_timeout_s=lambda: stall_timeout(ex.settings,
                                                                                     self.settings.model_defaults),
                                               keep_free_bytes=self.keep_free_bytes)
        except OSError as exc:
            await self._crashed(ex, on_spawn_failed(self.fact(ex), str(exc), self.clock(), rs, random.random()),
                                cause="spawn_failed")
            return
        ex.worker, ex.worker_key = worker, (wanted, ex.info.size_bytes, ex.info.mtime_ns)
        self._background.spawn(self._await_ready(ex, worker), f"ready-{ex.id}")
        # Admission may have counted the other workers' host caches as room (``decide``): they
        # give it back now, before this model allocates, not at their next heartbeat.
        for other in self.executors.values():
            if other is not ex and other.worker is not None:
                other.worker.nudge()

    def pin(self, ex: Executor) -> dict[str, str]:
        """The environment that pins ``ex``'s worker to its GPUs ({} on a machine without NVIDIA GPUs)."""
        if not self.gpus:
            return {}
        by_index = {g.index: g for g in self.gpus}
        # By UUID where NVML gave one: CUDA's own device order need not be NVML's (PCI bus) order.
        ids = [by_index[i].uuid if i in by_index and by_index[i].uuid else str(i) for i in ex.placement.gpus]
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(ids)}

    async def _await_ready(self, ex: Executor, worker: WorkerProcess) -> None:
        try:
            async with asyncio.timeout(self.settings.restart.load_timeout_s):
                ready = await asyncio.shield(worker.ready)
        except TimeoutError:
            worker.kill_now(f"not ready after {self.settings.restart.load_timeout_s:g} s")
            return
        except RequestError:
            return  # it died while loading: _on_worker_exit journals the crash
        if ex.worker is worker and ex.state in LOADING:
            ex.backend = ready.backend
            warm = (f"warm-up {ready.warmup_s:.2f} s: a {ready.warmup_batch}-token batch, "
                    f"{ready.warmup_generated} tokens generated, {ready.warmup_seqs} sequence(s) in one step")
            reason = f"loaded in {ready.load_s:.2f} s ({warm})" + ("; in safe mode" if ready.safe_mode else "")
            if ready.safe_mode:
                log.warning("executor %s: running in SAFE MODE (%s): turned off: %s", ex.id,
                            self.safe_mode_reason(ex) or "safe_mode = on", SAFE_MODE_OFF)
            await self.fire(ex, "ready", pid=ready.pid, reason=reason, safe_mode=ready.safe_mode)
            ex.safe = ready.safe_mode

    async def stop_worker(self, ex: Executor, reason: str, *, drain: bool = False) -> None:
        """Stop ``ex``'s worker; with ``drain``, a worker that serves lets its requests finish first.

        The drain (``Drainer.drain_worker``) is bounded by ``drain_timeout_s`` (0 after a disable
        with ``now``); what runs past it is cut. A node that stops does not drain here: the
        service drained before (SIGTERM, ``drain_deadline_s``).
        """
        worker = ex.worker
        if worker is None:
            return
        try:
            if ex.state in SERVING:
                with contextlib.suppress(IllegalTransition):
                    await self.fire(ex, "stop", reason=reason)
            if drain and self.drainer is not None and _serves(worker):
                now, ex.stop_now = ex.stop_now, False
                await self.drainer.drain_worker(ex, worker, reason=reason,
                                                timeout_s=0.0 if now else self.settings.drain_timeout_s,
                                                cut_reason="disabled" if now else "drain_timeout")
        finally:
            # Even when the stop cannot be journaled (a full disk): no worker outlives its node.
            await worker.stop(self.settings.restart.stop_grace_s)

    async def stop_all(self) -> None:
        """Stop every worker, journaling each stop where the journal still takes it."""
        stops = [self.stop_worker(ex, reason="node stopping")
                 for ex in self.executors.values() if ex.worker is not None]
        await asyncio.gather(*stops, return_exceptions=True)

    async def retire(self, ex: Executor, trigger: Trigger, reason: str) -> None:
        """Invalidate or vanish now, or once its worker has stopped."""
        if ex.state in LIVE:
            ex.after_stop = (trigger, reason)
            if ex.state != "stopping":
                await self.fire(ex, "stop", reason=reason)
                self._background.spawn(self.stop_worker(ex, reason=reason, drain=True), f"stop-{ex.id}")
        elif allowed(ex.state, trigger) is not None:
            await self.fire(ex, trigger, reason=reason)

    # -- a worker's end --------------------------------------------------------------------

    async def _on_worker_exit(self, worker: WorkerProcess, info: ExitInfo) -> None:
        ex = self.executors.get(worker.executor_id)
        if ex is None or ex.worker is not worker:
            return
        try:
            await self._after_exit(ex, info)
        except JournalError as exc:
            self._exit_unjournaled(ex, info, exc)
        finally:
            # Cleared only now: until the crash is journaled a request still finds this (dead)
            # worker and gets worker_crashed, rather than a "running" model with no worker.
            if ex.worker is worker:
                ex.worker, ex.worker_key = None, None
            self._wake.set()

    def _exit_unjournaled(self, ex: Executor, info: ExitInfo, exc: JournalError) -> None:
        ex.unjournaled_exit = info
        ex.reason = f"its worker ended ({info.describe()}) and that could not be journaled yet: {exc}"
        log.error("executor %s: %s; retrying every tick", ex.id, ex.reason)

    async def _retry_unjournaled_exits(self) -> None:
        for ex in self.executors.values():
            info = ex.unjournaled_exit
            if info is None or ex.worker is not None:
                continue
            try:
                await self._after_exit(ex, info)
            except JournalError:
                continue  # still full: next tick
            ex.unjournaled_exit = None
            log.info("executor %s: the worker's end is journaled now", ex.id)

    async def _after_exit(self, ex: Executor, info: ExitInfo) -> None:
        details: dict[str, object] = dict(pid=info.pid, exit_code=info.exit_code, signal=info.signal,
                                          uptime_s=info.uptime_s, stderr_tail=info.stderr_tail)
        if ex.state == "stopping":
            await self.fire(ex, "stopped", reason=info.describe(), **details)
            if ex.after_stop is not None:
                trigger, reason = ex.after_stop
                ex.after_stop = None
                await self.fire(ex, trigger, reason=reason)
            return
        if ex.state not in SERVING:
            return
        decision = on_exit(self.fact(ex), info, self.clock(), self.settings.restart, random.random())
        if decision.safe_mode:
            log.warning("executor %s: %s; restarting it in SAFE MODE", ex.id, decision.reason)
        try:
            await self._crashed(ex, decision, cause=info.cause, phase=info.phase, batch_tokens=info.batch_tokens,
                                batch_seqs=info.batch_seqs, requests=list(info.requests), **details)
        except IllegalTransition:
            if ex.state != "stopping":
                raise
            # A stop was fired while this crash waited for the executor's lock: the worker is gone,
            # so that stop is complete; journal it as such rather than drop the exit.
            await self._after_exit(ex, info)
            return
        if decision.give_up:
            log.error("executor %s: failed: %s", ex.id, decision.give_up)

    async def _crashed(self, ex: Executor, d: ExitDecision, *, cause: str, **details: object) -> None:
        """Journal the crash as the reconciler decided it, and apply the decision.

        A crash that cannot be journaled changes nothing: it is counted once, when the retry
        journals it.
        """
        before = ex.crash_times, ex.restart_at, ex.safe, ex.safe_reason
        ex.crash_times, ex.restart_at = list(d.crash_times), d.restart_at
        if d.safe_mode:
            ex.safe, ex.safe_reason = True, d.reason
        try:
            await self.fire(ex, "crash", reason=d.reason, restart_in_s=d.restart_in_s, safe_mode=d.safe_mode,
                            **details)
            ex.crashes[cause] += 1
            if d.give_up:
                await self.fire(ex, "give_up", reason=d.give_up)
        except (JournalError, IllegalTransition):
            ex.crash_times, ex.restart_at, ex.safe, ex.safe_reason = before
            raise
