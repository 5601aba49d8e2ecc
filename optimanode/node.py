"""The node: wires journal, registry, lifecycle, reconciler and supervisor, and is the in-process API.

How it works:

* ``Node.start`` opens the journal, replays it into one ``Executor`` per model (its lifecycle state,
  desired state, settings, recent crashes), marks live states left by a previous process as
  ``recover``\\ed (no worker survives the node), scans the models directory, then runs its loops in
  one TaskGroup: the reconciler, the periodic rescan and the content hasher. A loop that ends
  unexpectedly is logged, journaled (``task_exited``) and started again.
* Every change goes through ``_fire``: the trigger is checked against the state table, the
  Transition event is appended (durable), and only then the in-memory machine moves. Desired-state
  changes (``enable``, ``disable``, ``configure``) are journaled before they return.
* The reconciler tick gathers ``Facts``, calls the pure ``decide``, and applies its actions:
  starting and stopping workers through the supervisor. Worker exits come back through
  ``_on_worker_exit``, which journals ``crash`` (with exit code, signal, uptime, stderr tail,
  what the worker was doing and the backoff) or ``stopped``.
* Safe mode (``model_defaults.safe_mode``, per model): a worker that dies of SIGSEGV, SIGBUS or
  SIGILL before Ready is restarted at once, outside the crash budget, in safe mode (journaled on
  that crash, ``safe_mode=True``); a safe-mode worker that dies the same way ends the model
  ``failed`` with a reason an operator can act on. The last transition that sets ``safe_mode``
  is what a restarted node restores.
* ``infer`` (an async iterator) and ``infer_to`` (chunks handed to a callback as the worker's pipe
  delivers them: what a Gateway session calls) check the request, the model's state and the
  admission queue, then stream the worker's chunks. Request start and end are journaled in the
  background (their durability does not hold up a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import msgspec
import psutil

from optimanode import __version__
from optimanode.config import Settings
from optimanode.errors import (
    BadRequest,
    IllegalTransition,
    JournalError,
    ModelNotRunning,
    RequestError,
    ShuttingDown,
    UnknownModel,
    WorkerCrashed,
)
from optimanode.executors.lifecycle import LIVE, Lifecycle, allowed
from optimanode.executors.reconciler import Action, Facts, backoff_delay, crashes_in_window, decide, estimate_bytes
from optimanode.executors.registry import Registry, ScanResult, sha256_of
from optimanode.executors.supervisor import Admission, ExitInfo, WorkerProcess
from optimanode.journal import NODE_STREAM, Event, ExecutorView, Journal
from optimanode.protocol import (
    PREFILL_POLICIES,
    SAFE_MODES,
    Chunk,
    DesiredChanged,
    Done,
    EventBody,
    ExecutorStatus,
    Hashed,
    InferenceRequest,
    ModelInfo,
    ModelSettings,
    NodeStarted,
    NodeStopped,
    Registered,
    RequestFinished,
    RequestStarted,
    TaskExited,
    Transition,
    WorkerSettings,
)

log = logging.getLogger(__name__)

RECONCILE_TICK_S = 1.0
# What a safe-mode worker runs without (said in the log, the journal and ExecutorStatus).
SAFE_MODE_OFF = "llama.cpp's extra buffer types (weight repacking, AMX) and the persistent threadpool"


@dataclass(eq=False)
class _Flight:
    """One admitted request, while it runs: what ``Node._admitted`` journals when it ends."""

    rid: str
    ex: Executor
    worker: WorkerProcess
    outcome: str = "error"
    done: Done | None = None


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
    restart_at: float | None = None
    worker: WorkerProcess | None = None
    # What the live worker was started from; differs from `wanted()` when settings or file changed.
    worker_key: tuple[WorkerSettings, int, int] | None = None
    # A worker exit whose crash/stopped transition could not be journaled (a full disk): the
    # reconciler retries it each tick, so the model comes back once the journal takes writes again.
    unjournaled_exit: ExitInfo | None = None
    # After the worker stops: ("invalidate" | "vanish", reason).
    after_stop: tuple[str, str] | None = None
    admission: Admission | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    restarts: int = 0
    requests_served: int = 0
    tokens_generated: int = 0
    backend: str = ""
    # Safe mode as "auto" decides it: on after a worker died of a fatal signal before Ready, and
    # then as the last worker that loaded ran (the journal's last Transition.safe_mode), and why.
    safe: bool = False
    safe_reason: str = ""

    @property
    def state(self) -> str:
        return self.life.state


class Node:
    """The node. ``async with Node(settings) as node:`` starts it and stops it cleanly."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.journal: Journal | None = None
        self.executors: dict[str, Executor] = {}
        self.registry = Registry(settings.models_path)
        self._wake = asyncio.Event()
        self._scan_wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._main: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._started = asyncio.Event()
        self._stopping = False
        self._scan_lock = asyncio.Lock()
        self._requests: dict[str, WorkerProcess] = {}
        self._accepting = True
        # Requests cancelled because the drain deadline passed: they end with shutting_down.
        self._shut_out: set[str] = set()
        self._background: set[asyncio.Task[object]] = set()

    # -- lifecycle of the node itself ------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.settings.models_path.mkdir(parents=True, exist_ok=True)
        self.journal = await Journal.open(self.settings.journal_path)
        try:
            # Replayed before anything is written: a journal that does not replay is left as it was.
            views = await self.journal.replay()
            await self.journal.append(NODE_STREAM, NodeStarted(pid=os.getpid(), version=__version__))
            await self._restore(views)
            await self.rescan()
        except BaseException:
            # Closed here, or its connection thread keeps the process alive after the error.
            await self.journal.close()
            raise
        self._main = asyncio.get_running_loop().create_task(self._run(), name="node-main")
        await self._started.wait()

    async def _restore(self, views: dict[str, ExecutorView]) -> None:
        """Rebuild executors from the replayed journal; states a dead process left behind are recovered."""
        assert self.journal is not None
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
            self._refresh_admission(ex)
        for ex in self.executors.values():
            if ex.state in LIVE:
                await self._fire(ex, "recover", reason="node restarted; no worker survived it")
            elif ex.state == "crashed":
                ex.restart_at = now  # its backoff was spent while the node was down
        # Reasons for states that carry one (invalid, failed, waiting, missing) come from the last
        # transition; "auto" safe mode from the last transition that set it.
        for ev in await self.journal.read(types=["transition"]):
            ex = self.executors.get(ev.stream)
            if ex is None or not isinstance(ev.body, Transition):
                continue
            if ev.body.dst == ex.state:
                ex.reason = ev.body.reason
            if ev.body.safe_mode is not None:
                ex.safe = ev.body.safe_mode
                if ev.body.trigger == "crash":
                    ex.safe_reason = ev.body.reason

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._guard("reconciler", self._reconcile_loop), name="reconciler")
                tg.create_task(self._guard("scanner", self._scan_loop), name="scanner")
                if self.settings.scan.hash_models:
                    tg.create_task(self._guard("hasher", self._hash_loop), name="hasher")
                self._started.set()
        finally:
            self._tg = None
            self._started.set()

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived loop; an unexpected exit is logged, journaled and the loop restarted."""
        while True:
            try:
                await loop()
                error = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to catch anything
                log.exception("task %s failed", name)
                error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(JournalError):
                assert self.journal is not None
                await self.journal.append(NODE_STREAM, TaskExited(task=name, error=error))
            await asyncio.sleep(1.0)

    async def stop(self, reason: str = "stop requested") -> None:
        """Stop every worker (journaling it), end the loops, close the journal."""
        if self._stopping:
            return
        self._stopping = True
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        stops = []
        for ex in self.executors.values():
            if ex.worker is not None:
                stops.append(self._stop_worker(ex, reason="node stopping"))
        await asyncio.gather(*stops, return_exceptions=True)
        for t in list(self._background):
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(2.0):
                    await t
        if self.journal is not None:
            with contextlib.suppress(JournalError):
                await self.journal.append(NODE_STREAM, NodeStopped(reason=reason))
            await self.journal.close()

    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        """A short task tied to the node: kept referenced, and its failure logged."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)

        def done(t: asyncio.Task[object]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s failed: %s", name, t.exception())

        task.add_done_callback(done)

    # -- transitions -----------------------------------------------------------------------

    async def _fire(self, ex: Executor, trigger: str, **details: object) -> None:
        """Check, journal (durably), then move the machine; illegal → IllegalTransition, nothing changed."""
        async with ex.lock:
            src = ex.state
            dst = allowed(src, trigger)
            if dst is None:
                raise IllegalTransition(ex.id, trigger, src)
            assert self.journal is not None
            await self.journal.append(ex.id, Transition(trigger=trigger, src=src, dst=dst, **details))  # type: ignore[arg-type]
            ex.life.fire(trigger)
            ex.reason = str(details.get("reason", ""))
        log.info("executor %s: %s → %s (%s)%s", ex.id, src, dst, trigger,
                 f": {ex.reason}" if ex.reason else "")
        self._wake.set()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_state(self, executor_id: str, states: Iterable[str], timeout: float) -> str:
        """Wait until the executor is in one of ``states``; return it, or raise TimeoutError."""
        want = set(states)
        ex = self._get(executor_id)
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: ex.state in want)
        return ex.state

    # -- desired state (the operator's API) ------------------------------------------------

    def _get(self, executor_id: str) -> Executor:
        ex = self.executors.get(executor_id)
        if ex is None:
            raise UnknownModel(f"no model with executor id {executor_id!r}", executor=executor_id)
        return ex

    async def _desire(self, ex: Executor, enabled: bool, settings: ModelSettings, by: str) -> None:
        assert self.journal is not None
        await self.journal.append(ex.id, DesiredChanged(enabled=enabled, settings=settings, by=by))
        ex.enabled, ex.settings = enabled, settings
        self._refresh_admission(ex)
        self._wake.set()

    async def enable(self, executor_id: str, by: str = "") -> ExecutorStatus:
        ex = self._get(executor_id)
        await self._desire(ex, True, ex.settings, by)
        if ex.state == "failed":
            # Re-enabling is how an operator says "try again": the crash budget starts afresh, and
            # an automatic safe mode is dropped (the next worker proves whether it is still needed).
            ex.crash_times.clear()
            await self._fire(ex, "enable", reason=f"re-enabled by {by or 'operator'}",
                             safe_mode=False if ex.safe else None)
            ex.safe, ex.safe_reason = False, ""
        return self.status(executor_id)

    async def disable(self, executor_id: str, by: str = "") -> ExecutorStatus:
        ex = self._get(executor_id)
        await self._desire(ex, False, ex.settings, by)
        return self.status(executor_id)

    async def configure(self, executor_id: str, settings: ModelSettings, by: str = "") -> ExecutorStatus:
        ex = self._get(executor_id)
        check_model_settings(settings)
        await self._desire(ex, ex.enabled, settings, by)
        return self.status(executor_id)

    def apply_settings(self, settings: Settings) -> None:
        """New settings on the running node (SIGHUP); keys that need a restart were kept by service.merge_live."""
        self.settings = settings
        for ex in self.executors.values():
            self._refresh_admission(ex)
        self._wake.set()
        self._scan_wake.set()

    # -- what the node reports -------------------------------------------------------------

    def effective(self, ex: Executor) -> WorkerSettings:
        d, s = self.settings.model_defaults, ex.settings
        n_ctx = s.n_ctx if s.n_ctx is not None else d.n_ctx
        n_threads = s.n_threads if s.n_threads is not None else d.n_threads
        return WorkerSettings(
            model_path=ex.info.path,
            n_ctx=n_ctx or ex.info.context_length or 2048,
            n_threads=n_threads or usable_cores(),
            n_gpu_layers=s.n_gpu_layers if s.n_gpu_layers is not None else d.n_gpu_layers,
            n_batch=s.n_batch if s.n_batch is not None else d.n_batch,
            parallel=s.parallel if s.parallel is not None else d.parallel,
            prefill=s.prefill if s.prefill is not None else d.prefill,
            safe_mode=self._safe_mode(ex) != "",
        )

    def _safe_mode(self, ex: Executor) -> str:
        """Why the next worker runs in safe mode, or "" when it does not."""
        mode = ex.settings.safe_mode if ex.settings.safe_mode is not None else self.settings.model_defaults.safe_mode
        if mode == "on":
            return "safe_mode = on"
        if mode == "auto" and ex.safe:
            return ex.safe_reason or "safe mode since an earlier worker died while loading"
        return ""

    def _queue_size(self, ex: Executor) -> int:
        q = ex.settings.queue_size
        return q if q is not None else self.settings.model_defaults.queue_size

    def _refresh_admission(self, ex: Executor) -> None:
        parallel, queue = self.effective(ex).parallel, self._queue_size(ex)
        if ex.admission is None or (ex.admission.parallel, ex.admission.queue_size) != (parallel, queue):
            ex.admission = Admission(parallel, queue)

    def status(self, executor_id: str) -> ExecutorStatus:
        ex = self._get(executor_id)
        adm = ex.admission
        return ExecutorStatus(
            id=ex.id, state=ex.state, enabled=ex.enabled, reason=ex.reason, info=ex.info, settings=ex.settings,
            effective=self.effective(ex), pid=ex.worker.pid if ex.worker else None, restarts=ex.restarts,
            recent_crashes=crashes_in_window(ex.crash_times, self.clock(), self.settings.restart),
            queue_depth=adm.waiting if adm else 0, in_flight=adm.running if adm else 0,
            parallel=adm.parallel if adm else 1, queue_size=adm.queue_size if adm else 0,
            requests_served=ex.requests_served, tokens_generated=ex.tokens_generated, backend=ex.backend,
            safe_mode=bool(why := self._safe_mode(ex)), safe_mode_reason=why,
        )

    def list(self) -> list[ExecutorStatus]:
        return [self.status(eid) for eid in sorted(self.executors)]

    async def events(self, executor_id: str | None = None, limit: int = 100) -> list[Event]:
        assert self.journal is not None
        if executor_id is not None:
            self._get(executor_id)
        return list(reversed(await self.journal.read(stream=executor_id, limit=limit, newest_first=True)))

    # -- inference -------------------------------------------------------------------------

    async def infer(self, executor_id: str, request: InferenceRequest, *, request_id: str | None = None,
                    by: str = "") -> AsyncIterator[Chunk | Done]:
        """Stream a completion: Chunk..., then Done. Raises RequestError with a stable code."""
        async with self._admitted(executor_id, request, request_id, by) as flight:
            async for msg in flight.worker.generate(flight.rid, request):
                if isinstance(msg, Chunk):
                    # Counted as they stream, so the metrics' tokens/s is smooth, not a spike at the end.
                    flight.ex.tokens_generated += msg.tokens
                else:
                    self._finished(flight, msg)
                yield msg

    async def infer_to(self, executor_id: str, request: InferenceRequest, on_chunk: Callable[[Chunk], None],
                       on_flush: Callable[[], None] | None = None, *, request_id: str | None = None,
                       by: str = "") -> Done:
        """``infer`` with each Chunk handed to ``on_chunk`` as the worker's pipe delivers it.

        The Gateway session's path: no task wakes per token (``WorkerProcess.complete``, which
        also says when ``on_flush`` is called). ``on_chunk`` must not block. Returns the Done;
        raises as ``infer`` does.
        """
        async with self._admitted(executor_id, request, request_id, by) as flight:
            ex = flight.ex

            def chunk(msg: Chunk) -> None:
                ex.tokens_generated += msg.tokens
                on_chunk(msg)

            done = await flight.worker.complete(flight.rid, request, chunk, on_flush)
            self._finished(flight, done)
            return done

    @contextlib.asynccontextmanager
    async def _admitted(self, executor_id: str, request: InferenceRequest, request_id: str | None,
                        by: str) -> AsyncIterator[_Flight]:
        """Check the request and the model, wait for admission, journal the request's start and end."""
        if not self._accepting:
            raise ShuttingDown("the node is shutting down and takes no new requests")
        ex = self._get(executor_id)
        try:
            request.params.check()
        except ValueError as exc:
            raise BadRequest(str(exc), field=str(exc).split(":", 1)[0]) from None
        if ex.state != "running" or ex.worker is None or ex.admission is None:
            raise ModelNotRunning(f"model {ex.id} is {ex.state}" + (f": {ex.reason}" if ex.reason else ""),
                                  state=ex.state, executor=ex.id)
        rid = request_id or uuid.uuid4().hex
        if rid in self._requests:
            raise BadRequest(f"request id {rid!r} is already in flight", field="id")
        queued_for = ex.worker
        async with ex.admission.slot(ex.id):
            if not self._accepting:
                raise ShuttingDown("the node is shutting down; this request was still queued")
            if queued_for.exit.done():
                # The worker died while this request waited for it: the same error as those on it.
                raise WorkerCrashed(f"{queued_for.exit.result().describe()} while this request was queued",
                                    executor=ex.id, exit_code=queued_for.exit.result().exit_code,
                                    signal=queued_for.exit.result().signal)
            worker = ex.worker
            if ex.state != "running" or worker is None:
                raise ModelNotRunning(f"model {ex.id} is {ex.state}", state=ex.state, executor=ex.id)
            self._requests[rid] = worker
            self._journal_later(ex.id, RequestStarted(request_id=rid, kind=type(request).__struct_config__.tag,  # type: ignore[attr-defined]
                                                      by=by))
            flight = _Flight(rid, ex, worker)
            try:
                yield flight
            except RequestError as exc:
                flight.outcome = exc.code
                raise
            except (asyncio.CancelledError, GeneratorExit):
                flight.outcome = "cancelled"
                raise
            finally:
                self._requests.pop(rid, None)
                self._shut_out.discard(rid)
                done = flight.done
                if done is not None:
                    ex.requests_served += 1
                self._journal_later(ex.id, RequestFinished(
                    request_id=rid, outcome=flight.outcome,
                    prompt_tokens=done.usage.prompt_tokens if done else 0,
                    completion_tokens=done.usage.completion_tokens if done else 0,
                    ttft_s=done.timings.ttft_s if done else None, total_s=done.timings.total_s if done else None))

    def _finished(self, flight: _Flight, done: Done) -> None:
        if flight.rid in self._shut_out:
            raise ShuttingDown(f"the node is shutting down; request cancelled after the "
                               f"{self.settings.drain_deadline_s:g} s drain deadline")
        flight.done, flight.outcome = done, done.finish_reason

    def busy(self) -> int:
        """Requests running or queued on any model."""
        return sum((ex.admission.running + ex.admission.waiting) if ex.admission else 0
                   for ex in self.executors.values())

    async def drain(self, deadline_s: float | None = None) -> int:
        """Refuse new requests, let running ones finish for ``deadline_s``, then cancel the rest.

        Cancelled requests end with ``shutting_down``. Returns how many had to be cancelled.
        """
        deadline_s = self.settings.drain_deadline_s if deadline_s is None else deadline_s
        self._accepting = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_s):
                while self.busy():
                    await asyncio.sleep(0.05)
        cut = list(self._requests.items())
        for rid, worker in cut:
            self._shut_out.add(rid)
            worker.cancel(rid)
        # A cancel lands within one token; give them a moment to end before workers are stopped.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while self.busy():
                    await asyncio.sleep(0.02)
        return len(cut)

    def cancel(self, request_id: str) -> bool:
        """Ask the worker to stop decoding ``request_id`` (it ends with finish_reason "cancelled")."""
        worker = self._requests.get(request_id)
        if worker is None:
            return False
        worker.cancel(request_id)
        return True

    def _journal_later(self, stream: str, body: EventBody) -> None:
        assert self.journal is not None
        self._spawn(self.journal.append(stream, body), f"journal-{body.__struct_config__.tag}")  # type: ignore[attr-defined]

    # -- scanning --------------------------------------------------------------------------

    async def rescan(self) -> ScanResult:
        """Scan the models directory now and apply what changed; returns the raw result."""
        async with self._scan_lock:
            known = {eid: ex.info for eid, ex in self.executors.items()}
            result = await asyncio.to_thread(self.registry.scan, known)
            await self._apply_scan(result)
        return result

    async def _apply_scan(self, result: ScanResult) -> None:
        assert self.journal is not None
        pending = set(result.pending)
        for eid, info in result.models.items():
            await self._seen(eid, info, None)
        for eid, (info, reason) in result.invalid.items():
            await self._seen(eid, info, reason)
        seen = set(result.models) | set(result.invalid)
        for eid, ex in self.executors.items():
            if eid in seen or ex.state == "missing" or ex.info.path in pending:
                continue
            if result.errors and any(ex.info.path.startswith(d.rstrip("/") + "/") for d in _error_dirs(result)):
                continue  # its directory could not be read this time; that is not a removal
            await self._retire(ex, "vanish", "model file removed")

    async def _seen(self, eid: str, info: ModelInfo, invalid_reason: str | None) -> None:
        assert self.journal is not None
        ex = self.executors.get(eid)
        if ex is None:
            ex = Executor(id=eid, life=Lifecycle(eid), info=info)
            batch: list[tuple[str, EventBody]] = [(eid, Registered(info=info))]
            if invalid_reason is None and self.settings.scan.enable_new:
                batch.append((eid, DesiredChanged(enabled=True, by="scan.enable_new")))
                ex.enabled = True
            await self.journal.append_many(batch)
            self.executors[eid] = ex
            self._refresh_admission(ex)
            log.info("registered %s (%s)", eid, info.path)
        elif (info.size_bytes, info.mtime_ns, info.path) != (ex.info.size_bytes, ex.info.mtime_ns, ex.info.path):
            await self.journal.append(eid, Registered(info=info))
            ex.info = info
            log.info("model file of %s changed; re-read", eid)
            if ex.state in ("failed", "invalid", "missing") and invalid_reason is None:
                ex.crash_times.clear()
                await self._fire(ex, "rediscover", reason="model file changed")
        elif ex.state == "missing" and invalid_reason is None:
            await self._fire(ex, "rediscover", reason="model file is back")
        if invalid_reason is not None and ex.state != "invalid":
            await self._retire(ex, "invalidate", invalid_reason)
        self._wake.set()

    async def _retire(self, ex: Executor, trigger: str, reason: str) -> None:
        """Invalidate or vanish now, or once its worker has stopped."""
        if ex.state in LIVE:
            ex.after_stop = (trigger, reason)
            if ex.state != "stopping":
                await self._fire(ex, "stop", reason=reason)
                self._spawn(self._stop_worker(ex, reason=reason), f"stop-{ex.id}")
        elif allowed(ex.state, trigger) is not None:
            await self._fire(ex, trigger, reason=reason)

    async def _scan_loop(self) -> None:
        pending = False
        while True:
            # A file still being copied is looked at again soon, not a whole interval later.
            interval = self.settings.scan.interval_s
            self._scan_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval, self.registry.settle_s + 0.5) if pending else interval):
                    await self._scan_wake.wait()  # apply_settings wakes it so a new interval applies now
            pending = bool((await self.rescan()).pending)

    async def _hash_loop(self) -> None:
        """Compute each model's content identity once, in a thread; the journal caches it."""
        while True:
            for ex in list(self.executors.values()):
                info = ex.info
                if info.sha256 or ex.state in ("invalid", "missing"):
                    continue
                digest = await asyncio.to_thread(sha256_of, info.files)
                if (ex.info.size_bytes, ex.info.mtime_ns) != (info.size_bytes, info.mtime_ns):
                    continue  # changed while hashing; the next pass takes the new one
                assert self.journal is not None
                await self.journal.append(ex.id, Hashed(sha256=digest, size_bytes=info.size_bytes,
                                                        mtime_ns=info.mtime_ns))
                ex.info = msgspec.structs.replace(ex.info, sha256=digest)
            await asyncio.sleep(5.0)

    # -- reconciling -----------------------------------------------------------------------

    def facts(self) -> dict[str, Facts]:
        out = {}
        for eid, ex in self.executors.items():
            wanted = self.effective(ex)
            stale = (ex.worker_key is not None and ex.state in LIVE
                     and ex.worker_key != (wanted, ex.info.size_bytes, ex.info.mtime_ns))
            out[eid] = Facts(state=ex.state, enabled=ex.enabled, crash_times=tuple(ex.crash_times),
                             restart_at=ex.restart_at, estimate_bytes=estimate_bytes(ex.info, wanted.n_ctx),
                             stale=stale)
        return out

    async def reconcile_once(self) -> float | None:
        """One decision and its actions; returns when something next becomes due."""
        await self._retry_unjournaled_exits()
        decision = decide(self.facts(), self.clock(), psutil.virtual_memory().available, self.settings.restart,
                          reserve_bytes=self.settings.memory_reserve_mb * 1024 * 1024)
        for action in decision.actions:
            try:
                await self._apply(action)
            except IllegalTransition as exc:
                log.debug("skipped %s: %s", action, exc)  # the state moved on since the decision
        return decision.wake_at

    async def _reconcile_loop(self) -> None:
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
            await self._fire(ex, action.trigger, reason=action.reason)
            await self._launch(ex)
        elif action.trigger == "stop":
            await self._fire(ex, "stop", reason=action.reason)
            self._spawn(self._stop_worker(ex, reason=action.reason), f"stop-{ex.id}")
        elif action.trigger == "hold" and ex.state == "waiting" and ex.reason == action.reason:
            return
        else:
            await self._fire(ex, action.trigger, reason=action.reason)

    async def _launch(self, ex: Executor) -> None:
        wanted = self.effective(ex)
        rs = self.settings.restart
        try:
            worker = await WorkerProcess.spawn(ex.id, wanted, self._on_worker_exit,
                                               heartbeat_interval_s=rs.heartbeat_interval_s,
                                               heartbeat_timeout_s=rs.heartbeat_timeout_s)
        except OSError as exc:
            ex.crash_times.append(self.clock())
            ex.restart_at = self.clock() + backoff_delay(len(ex.crash_times), rs, random.random())
            await self._fire(ex, "crash", reason=f"could not spawn the worker: {exc}")
            return
        ex.worker, ex.worker_key = worker, (wanted, ex.info.size_bytes, ex.info.mtime_ns)
        self._spawn(self._await_ready(ex, worker), f"ready-{ex.id}")

    async def _await_ready(self, ex: Executor, worker: WorkerProcess) -> None:
        try:
            async with asyncio.timeout(self.settings.restart.load_timeout_s):
                ready = await asyncio.shield(worker.ready)
        except TimeoutError:
            worker.kill_now(f"not ready after {self.settings.restart.load_timeout_s:g} s")
            return
        except RequestError:
            return  # it died while loading: _on_worker_exit journals the crash
        if ex.worker is worker and ex.state in ("starting", "restarting"):
            ex.backend = ready.backend
            warm = (f"warm-up {ready.warmup_s:.2f} s: a {ready.warmup_batch}-token batch, "
                    f"{ready.warmup_generated} tokens generated, {ready.warmup_seqs} sequence(s) in one step")
            reason = f"loaded in {ready.load_s:.2f} s ({warm})" + ("; in safe mode" if ready.safe_mode else "")
            if ready.safe_mode:
                log.warning("executor %s: running in SAFE MODE (%s): turned off: %s", ex.id,
                            self._safe_mode(ex) or "safe_mode = on", SAFE_MODE_OFF)
            await self._fire(ex, "ready", pid=ready.pid, reason=reason, safe_mode=ready.safe_mode)
            ex.safe = ready.safe_mode

    async def _stop_worker(self, ex: Executor, reason: str) -> None:
        worker = ex.worker
        if worker is None:
            return
        try:
            if ex.state in ("starting", "running", "restarting"):
                with contextlib.suppress(IllegalTransition):
                    await self._fire(ex, "stop", reason=reason)
        finally:
            # Even when the stop cannot be journaled (a full disk): no worker outlives its node.
            await worker.stop(self.settings.restart.stop_grace_s)

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
        details = dict(pid=info.pid, exit_code=info.exit_code, signal=info.signal, uptime_s=info.uptime_s,
                       stderr_tail=info.stderr_tail)
        if ex.state == "stopping":
            await self._fire(ex, "stopped", reason=info.describe(), **details)
            if ex.after_stop is not None:
                trigger, reason = ex.after_stop
                ex.after_stop = None
                await self._fire(ex, trigger, reason=reason)
            return
        if ex.state not in ("starting", "running", "restarting"):
            return
        now = self.clock()
        before = ex.crash_times, ex.restart_at
        ex.crash_times = [t for t in ex.crash_times if now - t <= self.settings.restart.crash_window_s] + [now]
        n = len(ex.crash_times)
        delay = backoff_delay(n, self.settings.restart, random.random())
        ex.restart_at = now + delay
        what = info.describe() + ("" if info.was_ready else " while loading the model")
        last = next((line for line in reversed(info.stderr_tail) if line.strip()), "")
        # After a fatal signal the tail ends in faulthandler's report, not in an explanation.
        reason = what + (f": {last}" if last and not info.was_ready and not info.fatal_signal else "")
        details.update(phase=info.phase, batch_tokens=info.batch_tokens, batch_seqs=info.batch_seqs,
                       requests=list(info.requests))
        mode = ex.settings.safe_mode if ex.settings.safe_mode is not None else self.settings.model_defaults.safe_mode
        if info.fatal_signal and not info.was_ready and info.safe_mode:
            # Safe mode did not help: what is left is the build or the model on this machine.
            if info.signal == signal.SIGILL:
                why = "this llama.cpp build uses instructions this CPU lacks: rebuild on this machine (tools/build-llama-cpp)"
            else:
                why = (f"its worker died of {info.signal_name()} while loading even in safe mode: a fault in "
                       "llama.cpp with this model on this machine (the crash event's stderr tail holds every "
                       "thread's stack); try another build or quantization, then re-enable it")
            try:
                await self._fire(ex, "crash", reason=reason, **details)
                await self._fire(ex, "give_up", reason=why)
            except JournalError:
                ex.crash_times, ex.restart_at = before
                raise
            log.error("executor %s: failed: %s", ex.id, why)
            return
        if info.fatal_signal and not info.was_ready and mode == "auto":
            # Once, at once, and outside the crash budget: the next worker runs in safe mode.
            ex.crash_times, ex.restart_at = before[0], now
            ex.safe, ex.safe_reason = True, f"{reason}; safe mode turns off {SAFE_MODE_OFF}"
            log.warning("executor %s: %s; restarting it in SAFE MODE: turning off %s", ex.id, reason, SAFE_MODE_OFF)
            try:
                await self._fire(ex, "crash", reason=ex.safe_reason, restart_in_s=0.0, safe_mode=True, **details)
            except JournalError:
                ex.safe, ex.safe_reason = False, ""
                ex.crash_times, ex.restart_at = before
                raise
            return
        budget_left = n < self.settings.restart.crash_budget
        try:
            await self._fire(ex, "crash", reason=reason, restart_in_s=round(delay, 3) if budget_left else None,
                             **details)
        except JournalError:
            ex.crash_times, ex.restart_at = before  # counted once, when the retry journals it
            raise


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), which is what a worker should use by default."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_model_settings(s: ModelSettings) -> None:
    """Raise BadRequest naming the field when a per-model setting is out of range."""
    rules = {
        "n_ctx": (lambda v: 0 <= v <= 1 << 20, "0..1048576 (0: the model's own)"),
        "n_threads": (lambda v: 0 <= v <= 1024, "0..1024 (0: all cores)"),
        "n_gpu_layers": (lambda v: -1 <= v <= 10_000, "-1 (all) or a layer count"),
        "n_batch": (lambda v: 1 <= v <= 65536, "1..65536"),
        "queue_size": (lambda v: 0 <= v <= 100_000, "0..100000"),
        "parallel": (lambda v: 1 <= v <= 256, "1..256"),
        "prefill": (lambda v: v in PREFILL_POLICIES, "one of " + ", ".join(PREFILL_POLICIES)),
        "safe_mode": (lambda v: v in SAFE_MODES, "one of " + ", ".join(SAFE_MODES)),
    }
    for name, (ok, expected) in rules.items():
        v = getattr(s, name)
        if v is not None and not ok(v):
            raise BadRequest(f"{name}: expected {expected}, got {v}", field=name)


def _error_dirs(result: ScanResult) -> list[str]:
    return list(result.errors)
