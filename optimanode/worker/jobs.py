"""Requests between the reader thread and the serving loop, and how each one ends.

The reader thread ``add``s a ``_Job`` per ``Generate`` (refused once closed or while the same id
is unanswered) and ``cancel``s by id (setting the job's flag: the loop notices it within one
step); ``Shutdown`` ``close``s, which cancels everything taken and queues None. The main thread
``take``s what is queued, blocking only when it has nothing to decode, and marks each job
``finished`` when its final message is queued, which frees the id; ``pending`` says how many are
taken and unanswered and since when there has been work (the heartbeat's progress report). ``_Reject`` is a request that
cannot be served as sent (it becomes ``Failed``); ``_done`` builds a request's ``Done`` with its
usage (``cached_tokens``: prompt tokens
served from cached K/V) and timings (``ttft_s`` from the reader taking the frame to the first sampled token).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from optimanode import protocol as p


@dataclass(eq=False)
class _Job:
    id: str
    request: p.InferenceRequest
    # When the reader thread took the Generate frame (ttft counts from here).
    received: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Reject(Exception):
    """A request that cannot be served as sent; becomes ``Failed(code, message)``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Jobs:
    """Requests taken but not finished, and the queue the main thread takes them from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, _Job] = {}
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.closed = False
        # When the worker last went from no request to some (None while it has none).
        self._busy_since: float | None = None

    def add(self, job: _Job) -> bool:
        with self._lock:
            if self.closed or job.id in self._active:
                return False
            if not self._active:
                self._busy_since = job.received
            self._active[job.id] = job
        self._queue.put(job)
        return True

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._active.get(job_id)
        if job is not None:  # an unknown id has finished already: nothing to do
            job.cancelled.set()

    def close(self) -> None:
        """Cancel everything taken so far and end the serving loop once they are answered."""
        with self._lock:
            self.closed = True
            jobs = list(self._active.values())
        for job in jobs:
            job.cancelled.set()
        self._queue.put(None)

    def take(self, block: bool, timeout: float | None = None) -> list[_Job | None]:
        """Everything queued so far (None marks Shutdown); with ``block``, wait for at least one."""
        out: list[_Job | None] = []
        if block:
            try:
                out.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def finished(self, job: _Job) -> None:
        with self._lock:
            self._active.pop(job.id, None)
            if not self._active:
                self._busy_since = None

    def pending(self) -> tuple[int, float | None]:
        """(requests taken and not yet answered, when the worker last went from none to some)."""
        with self._lock:
            return len(self._active), self._busy_since

    def unanswered(self) -> int:
        with self._lock:
            return len(self._active)


def _done(job: _Job, finish: str, n_prompt: int, n_out: int, t_first: float | None,
          t_last: float | None, cached: int = 0) -> p.Done:
    now = time.monotonic()
    total = now - job.received
    span = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
    return p.Done(
        id=job.id, finish_reason=finish,
        usage=p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, cached_tokens=cached),
        timings=p.Timings(ttft_s=(t_first - job.received) if t_first is not None else total,
                          tokens_per_s=(n_out - 1) / span if n_out > 1 and span > 0 else 0.0,
                          total_s=total),
    )
