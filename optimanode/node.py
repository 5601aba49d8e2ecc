"""The node: the in-process API a Gateway session calls, and the wiring of its parts.

How it works:

* ``Node.start`` first takes the state directory's lock (``_StateLock``: one running node per
  state directory; a second one on the same directory is refused before it reads or writes
  anything, since it would journal the first one's requests as dead and break its appends), then
  opens the journal (or takes the one given: ``Node(settings,
  journal=...)``, ``await Node.open(settings)``), replays it, and only then builds the parts on
  it: the executor runtime (``executors/runtime.py``: each model's record, its transitions and
  worker, the reconcile loop, a worker's end), the scanner (``executors/scanner.py``: the models
  directory and content hashes) and inference (``inference.py``: admission and the requests in
  flight). The runtime restores every executor from the replay (recovering the live states a dead
  process left), the scanner scans once, then the loops run in one TaskGroup: the reconciler, the
  periodic rescan and the content hasher. A loop that ends unexpectedly is logged, journaled
  (``task_exited``) and started again.
* Each call of the API goes to the one part that owns it and does not come back through here:
  ``infer``/``infer_to``/``cancel``/``drain``/``busy`` to inference, ``enable``/``disable``/
  ``configure``/``wait_for_state``/``reconcile_once``/``facts`` to the runtime (desired-state
  changes are journaled before they return), ``rescan`` to the scanner. ``status`` reads the
  runtime's record and inference's traffic; ``events`` reads the journal.
* ``apply_settings`` (a reload) swaps the settings object the parts read where they use it, and
  wakes the reconciler and the scanner so new values apply at once.
* Before anything else is written, the requests the previous run started and never finished (it
  was killed) are journaled as finished with the outcome ``node_died``. The journal's retention
  (``retention.py``: checkpoints, old events folded or deleted, the byte cap) runs as one more
  guarded loop; ``journal_report`` is its size against the cap, for metrics.
* ``stop`` ends the loops, stops every worker (journaled where the journal still takes it), lets
  the short background tasks end, journals ``node_stopped``, closes the journal and lets the lock go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from optimanode import __version__
from optimanode.config import Settings
from optimanode.errors import BadRequest, ConfigError, JournalError
from optimanode.executors.effective import chat_template_in_force, checked, conflict
from optimanode.executors.reconciler import Facts, crashes_in_window
from optimanode.executors.registry import Registry, ScanResult
from optimanode.executors.runtime import Background, Executor, Runtime
from optimanode.executors.scanner import Scanner
from optimanode.inference import Inference
from optimanode.journal import NODE_STREAM, Event, Journal
from optimanode.metrics import GpuProbe
from optimanode.protocol import (
    OUTCOME_NODE_DIED,
    Chunk,
    Done,
    ExecutorStatus,
    InferenceRequest,
    JournalReport,
    ModelSettings,
    NodeStarted,
    NodeStopped,
    RequestFinished,
    TaskExited,
    WorkerSettings,
)
from optimanode.retention import Retention
from optimanode.stats import RequestStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Parts:
    """What the node is made of once its journal is open."""

    runtime: Runtime
    scanner: Scanner
    inference: Inference


_I64_MAX = (1 << 63) - 1


class _StateLock:
    """One running node per state directory: an exclusive ``flock`` on ``state_dir/node.lock``,
    held from start to stop. The kernel lets it go when the process ends, however it ends, and
    workers do not hold it (the descriptor is not inherited). Where there is no ``flock``
    (Windows), there is no lock."""

    NAME = "node.lock"

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> _StateLock:
        try:
            import fcntl
        except ImportError:
            return cls(None)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / cls.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = cls.holder(fd)
            os.close(fd)
            raise ConfigError("state_dir", str(state_dir), "a state directory no other running node uses (a node, "
                              f"pid {holder}, holds {path}: stop it, or give this node a state_dir of its own)")
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    @staticmethod
    def holder(fd: int) -> str:
        """The pid the holding node wrote into the lock file ("?" if none yet)."""
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor lets the flock go
            self._fd = None


def running_node(state_dir: Path) -> str | None:
    """The pid (as written) of the node running on ``state_dir``, or None when none holds its lock.

    Reads only: the lock file is not created, and a shared lock taken to look is let go at once.
    """
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(state_dir / _StateLock.NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _StateLock.holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # also lets go of the shared lock, if it was taken
    return None


class Node:
    """The node. ``async with Node(settings) as node:`` starts it and stops it cleanly."""

    def __init__(self, settings: Settings, *, journal: Journal | None = None,
                 clock: Callable[[], float] = time.time, nvml: Any = None) -> None:
        self.settings = settings
        self.clock = clock
        # Each GPU's free memory for admission (NVML; ``nvml=`` injects a stand-in, e.g. FakeNvml).
        self.gpu_probe = GpuProbe(nvml)
        self._journal = journal
        self._parts: _Parts | None = None
        self._retention: Retention | None = None
        self._background = Background()
        self._main: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._stopping = False
        self._lock: _StateLock | None = None

    @classmethod
    async def open(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> Node:
        """Open the journal, then build and start the node on it."""
        lock = _StateLock.acquire(settings.state_path)
        try:
            journal = await Journal.open(settings.journal_path)
        except BaseException:
            lock.release()
            raise
        node = cls(settings, journal=journal, clock=clock)
        node._lock = lock
        await node.start()  # closes the journal and lets the lock go if it fails
        return node

    @property
    def _p(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError("the node is not started")
        return self._parts

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("the node's journal is not open: start the node first")
        return self._journal

    @property
    def executors(self) -> dict[str, Executor]:
        return self._p.runtime.executors

    @property
    def request_stats(self) -> RequestStats:
        """How requests ended and how long they took, by model (the metrics endpoint serves them)."""
        return self._p.inference.stats

    # -- lifecycle of the node itself ------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._lock is None:
            self._lock = _StateLock.acquire(self.settings.state_path)
        try:
            if not self.settings.models_path.exists():
                # Created (a first start, a quickstart), but said: a misspelt models_dir would
                # otherwise run an empty node without a word.
                log.warning("models directory %s does not exist: creating it, empty", self.settings.models_path)
            self.settings.models_path.mkdir(parents=True, exist_ok=True)
            if self._journal is None:
                self._journal = await Journal.open(self.settings.journal_path)
        except BaseException:
            self._lock.release()
            raise
        journal = self._journal
        try:
            # Replayed before anything is written: a journal that does not replay is left as it was.
            views = await journal.replay()
            # Requests the previous run started and never finished died with it: said so, so that
            # every request a Gateway saw has its end in the journal (and in retention's aggregates).
            if cut := journal.open_requests():
                await journal.append_many([(stream, RequestFinished(request_id=rid, outcome=OUTCOME_NODE_DIED))
                                           for stream, rid in cut])
            await journal.append(NODE_STREAM, NodeStarted(pid=os.getpid(), version=__version__))
            self._retention = await Retention.open(journal, self.settings.journal, clock=self.clock)
            runtime = Runtime(self.settings, journal, self._background, clock=self.clock, gpu_probe=self.gpu_probe)
            parts = self._parts = _Parts(runtime, Scanner(runtime, Registry(self.settings.models_path)),
                                         Inference(runtime, self._background))
            # Admission follows each transition, and a worker that is stopped drains first.
            runtime.drainer = parts.inference
            await runtime.restore(views)
            await parts.scanner.rescan()
        except BaseException:
            # Closed here, or its connection thread keeps the process alive after the error.
            await journal.close()
            self._lock.release()
            raise
        self._main = asyncio.get_running_loop().create_task(self._run(parts), name="node-main")
        await self._started.wait()

    async def _run(self, parts: _Parts) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._guard("reconciler", parts.runtime.run), name="reconciler")
                tg.create_task(self._guard("scanner", parts.scanner.run), name="scanner")
                if self._retention is not None:
                    tg.create_task(self._guard("retention", self._retention.run), name="retention")
                if self.settings.scan.hash_models:
                    tg.create_task(self._guard("hasher", parts.scanner.hash_loop), name="hasher")
                self._started.set()
        finally:
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
        if self._parts is not None:
            await self._parts.runtime.stop_all()
        await self._background.settle()
        if self._retention is not None:
            await self._retention.close()
        if self._journal is not None:
            with contextlib.suppress(JournalError):
                await self._journal.append(NODE_STREAM, NodeStopped(reason=reason))
            await self._journal.close()
        self.gpu_probe.close()
        if self._lock is not None:
            self._lock.release()

    # -- desired state (the operator's API) ------------------------------------------------

    async def enable(self, executor_id: str, by: str = "") -> ExecutorStatus:
        runtime = self._p.runtime
        await runtime.enable(runtime.get(executor_id), by)
        return self.status(executor_id)

    async def disable(self, executor_id: str, by: str = "", *, now: bool = False) -> ExecutorStatus:
        """Want the model stopped: its worker drains (``drain_timeout_s``), or with ``now`` cuts its requests."""
        runtime = self._p.runtime
        await runtime.disable(runtime.get(executor_id), by, now=now)
        return self.status(executor_id)

    async def configure(self, executor_id: str, settings: ModelSettings, by: str = "") -> ExecutorStatus:
        runtime = self._p.runtime
        ex = runtime.get(executor_id)
        checked(settings, "settings")
        refused = conflict(settings, self.settings.model_defaults)
        if refused is not None:
            raise BadRequest(f"settings.{refused[0]}: expected {refused[1]}", field=f"settings.{refused[0]}")
        # enabled=None: kept as it is when the change is made, not as read here (Runtime.desire).
        await runtime.desire(ex, None, settings, by)
        return self.status(executor_id)

    def apply_settings(self, settings: Settings) -> None:
        """New settings on the running node (SIGHUP); keys that need a restart were kept by service.merge_live."""
        self.settings = settings
        if self._parts is not None:
            # The parts read the settings where they use them (admission bounds on the next request).
            self._parts.runtime.settings = settings
            self._parts.runtime.wake()
            self._parts.scanner.wake()

    async def wait_for_state(self, executor_id: str, states: Iterable[str], timeout: float) -> str:
        """Wait until the executor is in one of ``states``; return it, or raise TimeoutError."""
        return await self._p.runtime.wait_for_state(executor_id, states, timeout)

    async def rescan(self) -> ScanResult:
        """Scan the models directory now and apply what changed; returns the raw result."""
        return await self._p.scanner.rescan()

    def facts(self) -> dict[str, Facts]:
        return self._p.runtime.facts()

    async def reconcile_once(self) -> float | None:
        """One decision and its actions; returns when something next becomes due."""
        return await self._p.runtime.reconcile_once()

    # -- what the node reports -------------------------------------------------------------

    def effective(self, ex: Executor) -> WorkerSettings:
        """The settings ``ex``'s worker runs (or would run) with."""
        return self._p.runtime.effective(ex)

    def status(self, executor_id: str) -> ExecutorStatus:
        runtime, inference = self._p.runtime, self._p.inference
        ex = runtime.get(executor_id)
        traffic = inference.traffic(ex)
        adm = traffic.admission
        why = runtime.safe_mode_reason(ex)
        est, placed = runtime.memory(ex)
        return ExecutorStatus(
            id=ex.id, state=ex.state, enabled=ex.enabled, reason=ex.reason, info=ex.info, settings=ex.settings,
            effective=runtime.effective(ex), pid=ex.worker.pid if ex.worker else None, restarts=ex.restarts,
            recent_crashes=crashes_in_window(ex.crash_times, self.clock(), self.settings.restart),
            queue_depth=adm.waiting, in_flight=adm.running, parallel=adm.parallel, queue_size=adm.queue_size,
            requests_served=traffic.requests_served, tokens_generated=traffic.tokens_generated,
            backend=ex.backend, safe_mode=bool(why), safe_mode_reason=why,
            chat_template=chat_template_in_force(ex.info, ex.settings, self.settings.model_defaults),
            # Saturated: a model registered from an absurd header (before gguf.py's caps) must not
            # make the whole model list fail to encode.
            memory_estimate_bytes=min(est.ram_bytes, _I64_MAX),
            vram_estimate_bytes={g: min(b, _I64_MAX) for g, b in placed.vram.items()},
            gpus=list(placed.gpus), loaded=ex.state == "running", evictions=ex.evictions,
            last_used=ex.last_used,
            # The worker's last heartbeat (a test's stand-in worker may have none).
            prompt_cache=getattr(getattr(ex.worker, "progress", None), "prompt_cache", None),
        )

    def list(self) -> list[ExecutorStatus]:
        return [self.status(eid) for eid in sorted(self.executors)]

    def journal_report(self) -> JournalReport | None:
        """The journal's size against its cap (metrics, doctor); None before the node started."""
        return self._retention.report() if self._retention is not None else None

    async def events(self, executor_id: str | None = None, limit: int = 100) -> list[Event]:
        if executor_id is not None:
            self._p.runtime.get(executor_id)
        return list(reversed(await self.journal.read(stream=executor_id, limit=limit, newest_first=True)))

    # -- inference -------------------------------------------------------------------------

    def infer(self, executor_id: str, request: InferenceRequest, *, request_id: str | None = None,
              by: str = "") -> AsyncIterator[Chunk | Done]:
        """Stream a completion: Chunk..., then Done. Raises RequestError with a stable code."""
        return self._p.inference.infer(executor_id, request, request_id=request_id, by=by)

    async def infer_to(self, executor_id: str, request: InferenceRequest, on_chunk: Callable[[Chunk], None],
                       on_flush: Callable[[], None] | None = None, *, request_id: str | None = None,
                       by: str = "") -> Done:
        """``infer`` with each Chunk handed to ``on_chunk`` as the worker's pipe delivers it (the Gateway's path)."""
        return await self._p.inference.infer_to(executor_id, request, on_chunk, on_flush, request_id=request_id,
                                                by=by)

    def cancel(self, request_id: str) -> bool:
        """Ask the worker to stop decoding ``request_id`` (it ends with finish_reason "cancelled")."""
        return self._p.inference.cancel(request_id)

    def busy(self) -> int:
        """Requests running or queued on any model."""
        return self._p.inference.busy()

    async def drain(self, deadline_s: float | None = None) -> int:
        """Refuse new requests, let running ones finish for ``deadline_s``, then cancel the rest.

        Cancelled requests end with ``shutting_down``. Returns how many had to be cancelled.
        """
        return await self._p.inference.drain(self.settings.drain_deadline_s if deadline_s is None else deadline_s)
