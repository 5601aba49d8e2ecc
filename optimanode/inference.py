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
admission is looked at, so a ``configure`` or a reload applies to the next request while the ones
already admitted finish under the bounds they came in with. ``drain`` refuses new requests, lets
the running ones finish until a deadline and cancels the rest, which end with ``shutting_down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from optimanode.errors import BadRequest, ModelNotRunning, Overloaded, RequestError, ShuttingDown, WorkerCrashed
from optimanode.executors.effective import checked, effective_parallel, queue_size
from optimanode.executors.runtime import Background, Executor, Runtime
from optimanode.executors.supervisor import WorkerProcess
from optimanode.protocol import Chunk, Done, EventBody, InferenceRequest, RequestFinished, RequestStarted


class Admission:
    """Per-model bounded admission: ``parallel`` run at once, ``queue_size`` more wait."""

    def __init__(self, parallel: int, queue_size: int) -> None:
        self.parallel, self.queue_size = parallel, queue_size
        self._slots = asyncio.Semaphore(parallel)
        self.waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self, executor_id: str) -> AsyncIterator[None]:
        if self.waiting + self.running >= self.parallel + self.queue_size:
            raise Overloaded(f"model {executor_id} has {self.running} running and {self.waiting} queued "
                             f"requests (limit {self.parallel} + {self.queue_size})",
                             executor=executor_id, queue_depth=self.waiting)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


@dataclass(eq=False)
class Traffic:
    """One model's requests: its admission, and what it has served (ExecutorStatus reports both)."""

    admission: Admission
    requests_served: int = 0
    tokens_generated: int = 0


@dataclass(eq=False)
class _Flight:
    """One admitted request, while it runs: what ``Inference._admitted`` journals when it ends."""

    rid: str
    ex: Executor
    worker: WorkerProcess
    traffic: Traffic
    outcome: str = "error"
    done: Done | None = None


class Inference:
    """Admission and the requests in flight, for every model of the node."""

    def __init__(self, runtime: Runtime, background: Background) -> None:
        self.runtime = runtime
        self._background = background
        self._traffic: dict[str, Traffic] = {}
        self._requests: dict[str, WorkerProcess] = {}
        self._accepting = True
        # Requests cancelled because the drain deadline passed: they end with shutting_down.
        self._shut_out: set[str] = set()

    def traffic(self, ex: Executor) -> Traffic:
        """``ex``'s traffic, its admission rebuilt when the effective bounds changed."""
        defaults = self.runtime.settings.model_defaults
        parallel, queue = effective_parallel(ex.settings, defaults), queue_size(ex.settings, defaults)
        t = self._traffic.get(ex.id)
        if t is None:
            t = self._traffic[ex.id] = Traffic(Admission(parallel, queue))
        elif (t.admission.parallel, t.admission.queue_size) != (parallel, queue):
            t.admission = Admission(parallel, queue)
        return t

    async def infer(self, executor_id: str, request: InferenceRequest, *, request_id: str | None = None,
                    by: str = "") -> AsyncIterator[Chunk | Done]:
        """Stream a completion: Chunk..., then Done. Raises RequestError with a stable code."""
        async with self._admitted(executor_id, request, request_id, by) as flight:
            async for msg in flight.worker.generate(flight.rid, request):
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
        async with self._admitted(executor_id, request, request_id, by) as flight:
            traffic = flight.traffic

            def chunk(msg: Chunk) -> None:
                traffic.tokens_generated += msg.tokens
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
        ex = self.runtime.get(executor_id)
        # A Gateway's frame was checked when it was decoded; an in-process caller's Struct is checked here.
        checked(request, "request")
        if ex.state != "running" or ex.worker is None:
            raise ModelNotRunning(f"model {ex.id} is {ex.state}" + (f": {ex.reason}" if ex.reason else ""),
                                  state=ex.state, executor=ex.id)
        rid = request_id or uuid.uuid4().hex
        if rid in self._requests:
            raise BadRequest(f"request id {rid!r} is already in flight", field="id")
        queued_for = ex.worker
        traffic = self.traffic(ex)
        async with traffic.admission.slot(ex.id):
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
            flight = _Flight(rid, ex, worker, traffic)
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
                    traffic.requests_served += 1
                self._journal_later(ex.id, RequestFinished(
                    request_id=rid, outcome=flight.outcome,
                    prompt_tokens=done.usage.prompt_tokens if done else 0,
                    completion_tokens=done.usage.completion_tokens if done else 0,
                    ttft_s=done.timings.ttft_s if done else None, total_s=done.timings.total_s if done else None))

    def _finished(self, flight: _Flight, done: Done) -> None:
        if flight.rid in self._shut_out:
            raise ShuttingDown(f"the node is shutting down; request cancelled after the "
                               f"{self.runtime.settings.drain_deadline_s:g} s drain deadline")
        flight.done, flight.outcome = done, done.finish_reason

    def busy(self) -> int:
        """Requests running or queued on any model."""
        # Read as they are, not refreshed: the admission in place holds the requests there are.
        return sum(t.admission.running + t.admission.waiting for t in self._traffic.values())

    async def drain(self, deadline_s: float) -> int:
        """Refuse new requests, let running ones finish for ``deadline_s``, then cancel the rest.

        Cancelled requests end with ``shutting_down``. Returns how many had to be cancelled.
        """
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
        self._background.spawn(self.runtime.journal.append(stream, body), f"journal-{body.__struct_config__.tag}")  # type: ignore[attr-defined]
