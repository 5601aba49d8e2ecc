"""Inference: a request's way from the in-process API to a model's worker, and back.

How it works: ``infer`` (an async iterator) and ``infer_to`` (chunks handed to a callback as the
worker's pipe delivers them: what a Gateway session calls) run one request as a ``_Flight``.
``_admitted`` checks the request (an in-process caller's Struct against its types' limits) and
that its model is ``running``, then takes a place in the model's ``Admission`` (``parallel``
requests run on the worker at once, ``queue_size`` more wait, past that ``overloaded`` before the
request costs anything); the request then runs on the worker (``WorkerProcess.generate`` or
``complete``, supervisor), which ends it with a Done or an error (``worker_crashed`` at once when
the worker dies). Its start and end are journaled in the background: their durability must not
hold up a token. Tokens are counted as the chunks stream (metrics' tokens/s).

Each model's admission bounds follow its effective settings; they are compared each time the
admission is looked at, so a ``configure`` or a reload applies to the next request (the admission
is resized; the requests running keep their slots). A request's deadline (its own
``deadline_s``, capped by its model's: ``effective.deadline``) counts from ``_admitted``'s start:
it bounds the wait in the queue (``Admission.slot``), then a timer ``abort``s the stream on the
worker; either way the request ends with ``deadline_exceeded``. ``drain`` (SIGTERM) refuses new
requests and the queued ones at once, lets the running ones finish until a deadline and cancels
the rest, which end with ``shutting_down`` (one whose own Done, stop or length, comes in that same
step ends with it: every token was streamed). A request id is taken from the check until the
request ends, queued or running: a second request with it is refused (``bad_request``). An id
freed here may still be the worker's for a moment (a deadline's abort ends the request before the
worker answers its cancel): the supervisor keeps it until then, and a reuse waits for it there.

A worker's drain (the runtime calls it before stopping a worker that serves: configure, a new
file, new model defaults, disable): the stop transition's own step calls ``changed``, which
closes the model's admission, so the old worker takes nothing new. While the model is
``replacing`` (a new worker follows), queued and new requests wait in the admission (bounded by
its queue) and get slots, in order, when the new worker runs; after a disable they are refused at
once (``model_not_running``). ``drain_worker`` lets the old worker's requests finish for
``drain_timeout_s`` (0 for a disable with ``now``), then aborts the rest with ``Error(cancelled)``
and ``details.reason`` "drain_timeout" (or "disabled"), and journals ``drain_started`` and
``drain_ended`` (how many finished, how many were cut).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from optimanode.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    JournalError,
    ModelNotRunning,
    Overloaded,
    RequestError,
    ShuttingDown,
    WorkerCrashed,
)
from optimanode.executors.effective import checked, deadline, effective_parallel, queue_size
from optimanode.executors.runtime import Background, Executor, Runtime
from optimanode.executors.supervisor import WorkerProcess
from optimanode.protocol import (
    Chunk,
    Done,
    DrainEnded,
    DrainStarted,
    EmbedRequest,
    EventBody,
    InferenceRequest,
    RequestFinished,
    RequestStarted,
)
from optimanode.stats import RequestStats

log = logging.getLogger(__name__)


class Admission:
    """Per-model bounded admission: ``parallel`` run at once, ``queue_size`` more wait, in order.

    Slots are handed to the waiters first come, first served, and only while the admission is
    ``open`` (the model has a worker that takes requests): a drain closes it (``close``), so a
    slot that frees on the draining worker goes to nobody, and the queue waits for the
    replacement, which opens it again (``reopen``); ``refuse_waiting`` ends every waiter with an
    error (a disable, SIGTERM). The bounds can change under running requests (``resize``): those
    keep their slots.
    """

    def __init__(self, parallel: int, queue_size: int) -> None:
        self.parallel, self.queue_size = parallel, queue_size
        self.running = 0
        self.open = True
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def resize(self, parallel: int, queue_size: int) -> None:
        self.parallel, self.queue_size = parallel, queue_size
        self._dispatch()

    def close(self) -> None:
        self.open = False

    def reopen(self) -> None:
        self.open = True
        self._dispatch()

    def refuse_waiting(self, error: Callable[[], RequestError]) -> int:
        """End every waiter with a fresh ``error()``; returns how many there were."""
        queue, self._queue = self._queue, collections.deque()
        n = 0
        for fut in queue:
            if not fut.done():
                fut.set_exception(error())
                n += 1
        return n

    def _dispatch(self) -> None:
        while self.open and self._queue and self.running < self.parallel:
            fut = self._queue.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)

    def _release(self) -> None:
        self.running -= 1
        self._dispatch()

    @contextlib.asynccontextmanager
    async def slot(self, executor_id: str, deadline_at: float | None = None,
                   hold: Callable[[], bool] | None = None) -> AsyncIterator[None]:
        """A place to run; waiting for it ends with DeadlineExceeded at ``deadline_at`` (loop time).

        ``hold``: a slot handed over while it is true is given back, and this waiter waits again,
        first in line. A slot handed to a waiter in the same loop step as a drain began (the
        waiter runs only after ``changed`` closed the admission for a replacement) would otherwise
        send it to the draining worker, or refuse it, instead of to the new worker."""
        if self.waiting + self.running >= self.parallel + self.queue_size:
            raise Overloaded(f"model {executor_id} has {self.running} running and {self.waiting} queued "
                             f"requests (limit {self.parallel} + {self.queue_size})",
                             executor=executor_id, queue_depth=self.waiting)
        again = False
        while True:
            await self._take(executor_id, deadline_at, first=again)
            # Only while closed: an open admission would hand the slot straight back (a busy loop).
            if hold is None or self.open or not hold():
                break
            self._release()
            again = True
        try:
            yield
        finally:
            self._release()

    async def _take(self, executor_id: str, deadline_at: float | None, *, first: bool) -> None:
        """Count this caller as running, waiting in the queue (at its head when ``first``) if need be."""
        if self.open and not self._queue and self.running < self.parallel:
            self.running += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if first:
                self._queue.appendleft(fut)
            else:
                self._queue.append(fut)
            try:
                async with asyncio.timeout_at(deadline_at):
                    await fut
            except BaseException as exc:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._release()  # the slot came just as the waiter gave up: pass it on
                else:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        self._queue.remove(fut)
                if isinstance(exc, TimeoutError):
                    raise DeadlineExceeded(f"the request's deadline passed while it waited for model {executor_id} "
                                           f"({self.running} running, {self.waiting} more queued)",
                                           executor=executor_id, queue_depth=self.waiting) from None
                raise


@dataclass(eq=False)
class Traffic:
    """One model's requests: its admission, and what it has served (ExecutorStatus reports both)."""

    admission: Admission
    requests_served: int = 0
    tokens_generated: int = 0


@dataclass(eq=False)
class _Queued:
    """A request waiting for admission: ``started`` once its start is journaled."""

    started: bool = False


@dataclass(eq=False)
class _Flight:
    """One admitted request, while it runs: what ``Inference._admitted`` journals when it ends."""

    rid: str
    ex: Executor
    worker: WorkerProcess
    traffic: Traffic
    outcome: str = "error"
    done: Done | None = None
    # When it got its slot (time.monotonic): the end of its queue wait, for RequestStats.
    admitted_at: float = field(default_factory=time.monotonic)


def _ttft(request: InferenceRequest, done: Done | None) -> float | None:
    """The time to the first token for the metrics and the journal; none for an embed request
    (it generates no token: its time is in total_s), so embeddings do not skew completions' TTFT."""
    return None if done is None or isinstance(request, EmbedRequest) else done.timings.ttft_s


def _serving(ex: Executor) -> bool:
    """The model has a worker that takes requests."""
    return ex.state == "running" and ex.worker is not None


@dataclass(eq=False)
class _Drain:
    """A worker's drain under way: ``hurry`` cuts it short."""

    hurry: asyncio.Event = field(default_factory=asyncio.Event)


class Inference:
    """Admission and the requests in flight, for every model of the node."""

    def __init__(self, runtime: Runtime, background: Background) -> None:
        self.runtime = runtime
        self._background = background
        self._traffic: dict[str, Traffic] = {}
        self._requests: dict[str, WorkerProcess] = {}
        # Every request id from its duplicate check to its end, queued or admitted: a second
        # request with an id taken is refused, whether the first is running or still queued.
        self._ids: set[str] = set()
        self._accepting = True
        # Requests cancelled because the drain deadline passed: they end with shutting_down.
        self._shut_out: set[str] = set()
        # Executor id → its worker's drain under way (drain_worker).
        self._drains: dict[str, _Drain] = {}
        # Executor id → queued requests refused by its stop (no worker follows), for drain_started.
        self._refused: dict[str, int] = {}
        # How requests ended and took (the metrics endpoint's counters and histograms).
        self.stats = RequestStats()

    def traffic(self, ex: Executor) -> Traffic:
        """``ex``'s traffic, its admission resized when the effective bounds changed."""
        defaults = self.runtime.settings.model_defaults
        parallel, queue = effective_parallel(ex.settings, defaults, ex.parallel_auto), queue_size(ex.settings, defaults)
        t = self._traffic.get(ex.id)
        if t is None:
            t = self._traffic[ex.id] = Traffic(Admission(parallel, queue))
            if not _serving(ex):
                t.admission.close()  # (``changed`` opens it when the model runs)
        elif (t.admission.parallel, t.admission.queue_size) != (parallel, queue):
            # Resized, not rebuilt: the requests running keep counting against the new bounds.
            t.admission.resize(parallel, queue)
        return t

    async def infer(self, executor_id: str, request: InferenceRequest, *, request_id: str | None = None,
                    by: str = "") -> AsyncIterator[Chunk | Done]:
        """Stream a completion: Chunk..., then Done. Raises RequestError with a stable code."""
        async with self._counted(executor_id, request, request_id, by) as flight, \
                contextlib.aclosing(flight.worker.generate(flight.rid, request)) as messages:
            # (aclosing: a consumer that stops early ends the worker's stream now, not when collected.)
            async for msg in messages:
                if isinstance(msg, Chunk):
                    # Counted as they stream, so the metrics' tokens/s is smooth, not a spike at the end.
                    flight.traffic.tokens_generated += msg.tokens
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
        async with self._counted(executor_id, request, request_id, by) as flight:
            traffic = flight.traffic

            def chunk(msg: Chunk) -> None:
                traffic.tokens_generated += msg.tokens
                on_chunk(msg)

            done = await flight.worker.complete(flight.rid, request, chunk, on_flush)
            self._finished(flight, done)
            return done

    @contextlib.asynccontextmanager
    async def _counted(self, executor_id: str, request: InferenceRequest, request_id: str | None,
                       by: str) -> AsyncIterator[_Flight]:
        """``_admitted``, with the request's end counted in ``stats`` (optimanode/stats.py) whatever it was.

        A request refused before it got a slot (overloaded, shutting_down, its deadline in the
        queue, its caller gone: "cancelled") counts with its error code, but only for a model the
        node has: an unknown id would be a new label value per typo.
        """
        arrived = time.monotonic()
        flight: _Flight | None = None
        try:
            async with self._admitted(executor_id, request, request_id, by) as flight:
                yield flight
        except (RequestError, asyncio.CancelledError) as exc:
            if flight is None and executor_id in self.runtime.executors:
                outcome = exc.code if isinstance(exc, RequestError) else "cancelled"
                self.stats.finished(executor_id, outcome, duration_s=time.monotonic() - arrived)
            raise
        finally:
            if flight is not None:
                done = flight.done
                self.stats.finished(executor_id, flight.outcome, duration_s=time.monotonic() - arrived,
                                    queued_s=flight.admitted_at - arrived,
                                    ttft_s=_ttft(request, done))

    @contextlib.asynccontextmanager
    async def _admitted(self, executor_id: str, request: InferenceRequest, request_id: str | None,
                        by: str) -> AsyncIterator[_Flight]:
        """Check the request and the model, wait for admission, journal the request's start and end."""
        if not self._accepting:
            raise ShuttingDown("the node is shutting down and takes no new requests")
        ex = self.runtime.get(executor_id)
        # A Gateway's frame was checked when it was decoded; an in-process caller's Struct is checked here.
        checked(request, "request")
        if not _serving(ex) and not ex.replacing:
            # An idle on-demand model is loaded for this request, which queues meanwhile.
            self.runtime.demand(ex)
        self.runtime.touch(ex)
        if not _serving(ex) and not ex.replacing:
            raise ModelNotRunning(f"model {ex.id} is {ex.state}" + (f": {ex.reason}" if ex.reason else ""),
                                  state=ex.state, executor=ex.id)
        rid = request_id or uuid.uuid4().hex
        if rid in self._ids:
            raise BadRequest(f"request id {rid!r} is already in flight", field="id")
        # Reserved from here (queued too) until this request ends.
        self._ids.add(rid)
        try:
            async with self._flight(ex, rid, request, by) as flight:
                yield flight
        finally:
            self._ids.discard(rid)

    @contextlib.asynccontextmanager
    async def _flight(self, ex: Executor, rid: str, request: InferenceRequest, by: str) -> AsyncIterator[_Flight]:
        """``_admitted``'s wait for a slot and the request's run, its id reserved."""
        loop = asyncio.get_running_loop()
        limit = deadline(request.params.deadline_s, ex.settings, self.runtime.settings.model_defaults)
        deadline_at = loop.time() + limit if limit is not None else None
        # None while its worker is being replaced: the request queues for the new one.
        queued_for = ex.worker if _serving(ex) else None
        traffic = self.traffic(ex)
        async with self._accounted(ex.id, rid, request, by) as queued, traffic.admission.slot(
                ex.id, deadline_at, hold=lambda: ex.replacing and not _serving(ex)):
            if not self._accepting:
                raise ShuttingDown("the node is shutting down; this request was still queued")
            if queued_for is not None and queued_for.exit.done() and ex.worker in (queued_for, None):
                # The worker died while this request waited for it (and none has replaced it
                # since): the same error as those on it.
                raise WorkerCrashed(f"{queued_for.exit.result().describe()} while this request was queued",
                                    executor=ex.id, exit_code=queued_for.exit.result().exit_code,
                                    signal=queued_for.exit.result().signal)
            worker = ex.worker
            if ex.state != "running" or worker is None:
                raise ModelNotRunning(f"model {ex.id} is {ex.state}", state=ex.state, executor=ex.id)
            self._requests[rid] = worker
            queued.started = True
            self._journal_later(ex.id, RequestStarted(request_id=rid, kind=type(request).__struct_config__.tag,  # type: ignore[attr-defined]
                                                      by=by))
            flight = _Flight(rid, ex, worker, traffic)
            # The stream is registered on the worker before this loop runs again (the caller
            # starts it without an await in between), so the timer always finds it.
            timer = None if deadline_at is None else loop.call_at(
                deadline_at, worker.abort, rid,
                DeadlineExceeded(f"request {rid} passed its deadline of {limit:g} s", executor=ex.id,
                                 deadline_ms=round((limit or 0) * 1000)))
            try:
                yield flight
            except RequestError as exc:
                flight.outcome = exc.code
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # A consumer that stops at the Done (GeneratorExit) ended a request that finished.
                if flight.done is None:
                    flight.outcome = "cancelled"
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                self.runtime.touch(ex)  # an on-demand model's idle time counts from here
                self._requests.pop(rid, None)
                self._shut_out.discard(rid)
                done = flight.done
                if done is not None:
                    traffic.requests_served += 1
                self._journal_later(ex.id, RequestFinished(
                    request_id=rid, outcome=flight.outcome,
                    prompt_tokens=done.usage.prompt_tokens if done else 0,
                    completion_tokens=done.usage.completion_tokens if done else 0,
                    ttft_s=_ttft(request, done), total_s=done.timings.total_s if done else None))

    @contextlib.asynccontextmanager
    async def _accounted(self, executor_id: str, rid: str, request: InferenceRequest,
                         by: str) -> AsyncIterator[_Queued]:
        """Journal a request that ends while still queued (its worker died, the node is shutting
        down, its deadline passed, its caller went away) as a start and an end at once, so the
        journal counts every request a Gateway saw. One refused at once (overloaded) never queued."""
        queued = _Queued()
        try:
            yield queued
        except (RequestError, asyncio.CancelledError) as exc:
            if not queued.started and not isinstance(exc, Overloaded):
                outcome = exc.code if isinstance(exc, RequestError) else "cancelled"
                kind = type(request).__struct_config__.tag  # type: ignore[attr-defined]
                self._background.spawn(self.runtime.journal.append_many([
                    (executor_id, RequestStarted(request_id=rid, kind=kind, by=by)),
                    (executor_id, RequestFinished(request_id=rid, outcome=outcome))]), "journal-queued-failure")
            raise

    def _finished(self, flight: _Flight, done: Done) -> None:
        # Only a request the drain's cancel ended: one that finished by itself in the same step
        # (every token streamed) ends with its own Done.
        if flight.rid in self._shut_out and done.finish_reason == "cancelled":
            raise ShuttingDown(f"the node is shutting down; request cancelled after the "
                               f"{self.runtime.settings.drain_deadline_s:g} s drain deadline")
        flight.done, flight.outcome = done, done.finish_reason

    def in_use(self, ex: Executor) -> int:
        """Requests running on or waiting for ``ex``."""
        t = self._traffic.get(ex.id)
        return t.admission.running + t.admission.waiting if t is not None else 0

    def busy(self) -> int:
        """Requests running or queued on any model."""
        # Read as they are, not refreshed: the admission in place holds the requests there are.
        return sum(t.admission.running + t.admission.waiting for t in self._traffic.values())

    async def drain(self, deadline_s: float) -> int:
        """Refuse new requests, let running ones finish for ``deadline_s``, then cancel the rest.

        Cancelled requests end with ``shutting_down``, and so, at once, does every request still
        queued (a Gateway can move those to another node while the running ones finish). Returns
        how many running requests had to be cancelled.
        """
        self._accepting = False
        for t in self._traffic.values():
            t.admission.close()
            t.admission.refuse_waiting(lambda: ShuttingDown(
                "the node is shutting down; this request was still queued and was not started"))
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

    # -- a worker's drain (configure, disable, a new file, new defaults) ----------------------

    def changed(self, ex: Executor) -> None:
        """``ex`` moved (or stopped being replaced): its admission follows, in the same step.

        Running with a worker: open (waiters get slots in order). Stopping, or being replaced:
        closed, so the draining worker takes nothing new; a stop with no replacement to follow
        (disable, file gone) refuses the waiters at once. Anywhere else with the admission closed
        (a replacement that ended without a running worker): the waiters are told so, and the
        admission reopens (new requests are refused by the state check before they queue).
        """
        adm = self.traffic(ex).admission
        if _serving(ex):
            self._refused.pop(ex.id, None)
            adm.reopen()
        elif ex.state == "stopping" or ex.replacing:
            adm.close()
            if not ex.replacing:
                self._refused[ex.id] = self._refused.get(ex.id, 0) + adm.refuse_waiting(lambda: ModelNotRunning(
                    f"model {ex.id} is stopping ({ex.reason or 'disabled'}); no worker will take this request",
                    state=ex.state, executor=ex.id))
        elif not adm.open:
            adm.refuse_waiting(lambda: ModelNotRunning(
                f"model {ex.id} is {ex.state}" + (f": {ex.reason}" if ex.reason else "")
                + "; the worker this request waited for did not come up", state=ex.state, executor=ex.id))
            adm.reopen()

    def hurry(self, ex: Executor) -> None:
        """Cut ``ex``'s drain in progress short (a disable with ``now``)."""
        drain = self._drains.get(ex.id)
        if drain is not None:
            drain.hurry.set()

    async def drain_worker(self, ex: Executor, worker: WorkerProcess, *, reason: str, timeout_s: float,
                           cut_reason: str) -> None:
        """Let ``worker``'s requests finish for ``timeout_s``, then cut the rest; journal start and end.

        Called by the runtime between the stop transition (which closed the admission: the worker
        takes nothing new) and the worker's stop. A request cut ends with ``Error(cancelled)``
        whose ``details.reason`` is ``cut_reason`` ("drain_timeout", or "disabled" for a disable
        with ``now``), never as if its Gateway had cancelled it.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        adm = self.traffic(ex).admission
        seen = {rid for rid, w in self._requests.items() if w is worker}
        drain = self._drains[ex.id] = _Drain()
        await self._journal_now(ex.id, DrainStarted(pid=worker.pid, reason=reason, replacing=ex.replacing,
                                                    running=len(seen), queued=adm.waiting,
                                                    refused=self._refused.pop(ex.id, 0), timeout_s=timeout_s))
        log.info("executor %s: draining worker %d (%d running, %d queued, up to %g s): %s", ex.id, worker.pid,
                 len(seen), adm.waiting, timeout_s, reason)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while not drain.hurry.is_set() and not worker.exit.done():
                        left = {rid for rid, w in self._requests.items() if w is worker}
                        seen |= left
                        if not left:
                            break
                        # Polled, like the node's drain: a few wake-ups a second for a bounded while.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.05):
                                await drain.hurry.wait()
            cut = sorted(rid for rid, w in self._requests.items() if w is worker)
            seen |= set(cut)
            if drain.hurry.is_set():
                cut_reason = "disabled"  # a disable with now came during the drain
            why = ("its model was disabled with now" if cut_reason == "disabled" else
                   f"its worker was {'replaced' if ex.replacing else 'stopped'} and the "
                   f"{timeout_s:g} s drain_timeout_s passed")
            for rid in cut:
                # Ended at once (the worker is told to stop decoding it): its slot frees now.
                worker.abort(rid, Cancelled(f"request {rid} was cut: {why}", reason=cut_reason, executor=ex.id))
        finally:
            self._drains.pop(ex.id, None)
        duration = round(loop.time() - began, 3)
        await self._journal_now(ex.id, DrainEnded(pid=worker.pid, finished=len(seen) - len(cut), cut=len(cut),
                                                  cut_requests=cut, duration_s=duration))
        (log.warning if cut else log.info)("executor %s: drained worker %d in %.2f s: %d finished, %d cut",
                                           ex.id, worker.pid, duration, len(seen) - len(cut), len(cut))

    async def _journal_now(self, stream: str, body: EventBody) -> None:
        # A drain goes on when its events cannot be journaled (a full disk): the worker must stop.
        try:
            await self.runtime.journal.append(stream, body)
        except JournalError as exc:
            log.error("could not journal %s: %s", type(body).__name__, exc)

    def cancel(self, request_id: str) -> bool:
        """Ask the worker to stop decoding ``request_id`` (it ends with finish_reason "cancelled")."""
        worker = self._requests.get(request_id)
        if worker is None:
            return False
        worker.cancel(request_id)
        return True

    def _journal_later(self, stream: str, body: EventBody) -> None:
        self._background.spawn(self.runtime.journal.append(stream, body), f"journal-{body.__struct_config__.tag}")  # type: ignore[attr-defined]
