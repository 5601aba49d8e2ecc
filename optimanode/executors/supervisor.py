"""The supervisor: one worker process per running model, and the requests routed to it.

How it works:

* ``WorkerProcess.spawn`` starts ``python -m optimanode.worker`` with pipes on stdin, stdout and
  stderr and sends ``WorkerSettings`` as the first frame. Frames from stdout are cut and decoded
  in the callback that receives the bytes (``_FrameReader``, a pipe protocol: no task to wake per
  token) and routed by request id to per-request queues; a heartbeat task pings and kills a
  worker that stops answering (a stopped or wedged process counts as a crash); a stderr task
  keeps the last lines for the crash event. Each worker inherits a small unlinked file (a memfd
  on Linux), its black box, where it notes what it is doing before every ``llama_decode``; after
  the process ended, ``read_blackbox`` gives the phase, batch and request ids to ``ExitInfo``.
* The stall watch: each ``Pong`` carries the worker's decode progress (``optimanode/worker/
  progress.py``), since its reader thread answers even while the decode thread is stuck inside
  llama.cpp. With requests pending and no step for the model's ``stall_timeout_s``
  (``stall_reason``), the heartbeat task kills the worker as ``stalled``: its streams get
  ``worker_crashed`` (``cause`` "stalled") at once, without waiting for the process to be reaped,
  and the crash event names the step it was stuck in (the black box).
* Each ``Ping`` also carries the RAM the node needs left available (``keep_free_bytes``, the
  runtime's figure), which the worker's host prompt cache keeps to; ``nudge`` sends it at once.
* ``abort`` ends one request's stream with a given error and cancels it at the worker (a
  request's deadline, ``optimanode/inference.py``).
* An id is the worker's until it answers it: a request that ended for its caller before the
  worker's Done or Failed (aborted, its receiver raised, its caller gone) leaves a tombstone
  (``_tombs``) that swallows the id's frames until that answer comes (or the worker exits). A
  ``generate`` reusing the id waits behind it before sending its Generate, so the worker never
  refuses the reuse as "already running" and the new request never sees the old one's frames.
* When the process ends, for whatever reason, every request still in flight on it gets a
  ``WorkerCrashed`` error at once (exit code or signal in its details): nothing waits on a dead
  worker. Then ``on_exit`` tells the runtime (``runtime.py``), which journals the crash or the
  stop; nothing comes back here about it.
* Stop is Shutdown → grace → SIGTERM → SIGKILL, shielded from cancellation so a stop that began
  always ends with the process reaped.

Nothing here decides *whether* to start or stop (the reconciler's job), nor whether a request may
run (admission is inference's, ``optimanode/inference.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from optimanode.errors import NodeFault, RequestError, WorkerCrashed, error_for
from optimanode.protocol import (
    BLACKBOX_SIZE,
    FRAME_HEADER,
    MAX_FRAME,
    Cancel,
    Chunk,
    Done,
    Failed,
    Generate,
    InferenceRequest,
    Ping,
    Pong,
    Ready,
    Shutdown,
    WorkerSettings,
    decode_from_worker,
    frame,
)

log = logging.getLogger(__name__)

# Room for the worker's faulthandler report (every thread's stack) after a fatal signal.
STDERR_TAIL_LINES = 40
# How a stall kill's reason starts (ExitInfo.killed_for, the crash reason, WorkerCrashed's cause).
STALLED = "stalled"
# Why a worker ended, in one word (ExitInfo.cause; "spawn_failed": it never started). "killed" is a
# signal nobody here sent (the kernel's OOM killer, an operator); "exited": it exited by itself.
CRASH_CAUSES = ("fatal_signal", "killed", "exited", "heartbeat_timeout", "stalled", "load_timeout",
                "protocol_error", "spawn_failed")
# The stall watch's timeout when the runtime gives none (config.ModelDefaults.stall_timeout_s).
DEFAULT_STALL_TIMEOUT_S = 120.0


def stall_reason(progress: Pong | None, timeout_s: float) -> str:
    """Why a worker whose last heartbeat said ``progress`` is hung, or "" while it is not."""
    if progress is None or progress.pending <= 0 or progress.since_step_s < timeout_s:
        return ""
    n = progress.pending
    return (f"{STALLED}: no decode step for {progress.since_step_s:.1f} s with {n} request{'s' if n > 1 else ''} "
            f"pending (stall_timeout_s {timeout_s:g}; {progress.steps} steps before)")


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    exit_code: int | None
    signal: int | None
    uptime_s: float
    stderr_tail: list[str]
    # Why the supervisor ended it, if it did ("heartbeat timeout", "stop", "load timeout").
    killed_for: str = ""
    # The worker had said Ready before it ended.
    was_ready: bool = False
    # Its black box (optimanode/worker.py, _BlackBox): the phase it was in, whether it was inside
    # llama_decode, that step's tokens and sequences, and the requests in it.
    phase: str = ""
    in_decode: bool = False
    batch_tokens: int | None = None
    batch_seqs: int | None = None
    requests: tuple[str, ...] = ()
    # The worker ran in safe mode (WorkerSettings.safe_mode).
    safe_mode: bool = False

    @property
    def stalled(self) -> bool:
        """Killed by the stall watch: its decode made no progress with requests pending."""
        return self.killed_for.startswith(STALLED)

    @property
    def fatal_signal(self) -> bool:
        """Died of a fault in native code (a kernel, a bad instruction), not of a kill or an exit."""
        return self.signal in FATAL_SIGNALS and not self.killed_for

    @property
    def cause(self) -> str:
        """Why it ended, as one of CRASH_CAUSES (the label of the crash counters, optimanode/openmetrics.py)."""
        k = self.killed_for
        if self.stalled:
            return "stalled"
        if k.startswith("no heartbeat"):
            return "heartbeat_timeout"
        if k.startswith("not ready after"):
            return "load_timeout"
        if k == "protocol error":
            return "protocol_error"
        if self.fatal_signal:
            return "fatal_signal"
        return "killed" if self.signal is not None else "exited"

    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signal or 0).name
        except ValueError:
            return f"signal {self.signal}"

    def describe(self) -> str:
        what = f"killed by {self.signal_name()}" if self.signal is not None else f"exited with code {self.exit_code}"
        text = f"worker {self.pid} {what}" + self.doing()
        if self.stalled:  # the cause first: "stalled: ...; worker N killed by SIGKILL in llama_decode ..."
            return f"{self.killed_for}; {text}"
        return text + (f" ({self.killed_for})" if self.killed_for else "")

    def doing(self) -> str:
        """" in llama_decode during prompt evaluation of a 31-token batch (request X)", or ""."""
        if not self.phase or self.phase == "idle" or not self.signal:
            return ""
        if self.batch_tokens:
            where = "in llama_decode" if self.in_decode else "after llama_decode"
            seqs = f" of {self.batch_seqs} sequences" if (self.batch_seqs or 0) > 1 else ""
            text = f" {where} during {self.phase} of a {self.batch_tokens}-token batch{seqs}"
        else:
            text = f" during {self.phase}"
        if self.requests:
            text += f" (request{'s' if len(self.requests) > 1 else ''} {', '.join(self.requests)})"
        return text


# The signals of a fault in native code: what safe mode may avoid (docs/operations.md).
FATAL_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL})


def read_blackbox(fd: int) -> dict[str, object]:
    """The last record a worker wrote into its black box (empty when it wrote none)."""
    try:
        raw = os.pread(fd, BLACKBOX_SIZE, 0)
    except OSError:
        return {}
    fields = raw.split(b"\0", 1)[0].decode("utf-8", "replace").split("\t")
    if len(fields) != 5 or fields[0] not in ("D", "A"):
        return {}
    state, phase, tokens, seqs, requests = fields
    return dict(in_decode=state == "D", phase=phase,
                batch_tokens=int(tokens) if tokens.isdigit() and tokens != "0" else None,
                batch_seqs=int(seqs) if seqs.isdigit() and seqs != "0" else None,
                requests=tuple(r for r in requests.split(",") if r))


def _blackbox_file() -> int | None:
    """An unlinked, zero-filled file of BLACKBOX_SIZE bytes for a worker's black box (None: no room)."""
    if sys.platform == "win32":  # no pass_fds there; the crash event goes without it
        return None
    try:
        fd = os.memfd_create("optimanode-blackbox") if hasattr(os, "memfd_create") else _tmpfile_fd()
        os.ftruncate(fd, BLACKBOX_SIZE)
        return fd
    except OSError as exc:
        log.warning("no black box for a worker: %s", exc)
        return None


def _tmpfile_fd() -> int:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="optimanode-blackbox-")
    os.unlink(path)
    return fd


class WorkerProcess:
    """One running worker. Create with ``await WorkerProcess.spawn(...)``."""

    def __init__(self, executor_id: str, settings: WorkerSettings, proc: asyncio.subprocess.Process,
                 on_exit: Callable[[WorkerProcess, ExitInfo], Awaitable[None]],
                 heartbeat_interval_s: float, heartbeat_timeout_s: float,
                 stall_timeout_s: float | Callable[[], float] = DEFAULT_STALL_TIMEOUT_S,
                 keep_free_bytes: Callable[[], int] | None = None) -> None:
        self.executor_id = executor_id
        self.settings = settings
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.monotonic()
        self.ready: asyncio.Future[Ready] = asyncio.get_running_loop().create_future()
        self.exit: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._streams: dict[str, _Stream] = {}
        # Ids the worker still holds for requests over for their callers: resolved (and removed)
        # when the worker's Done or Failed for it arrives, or when the worker exits.
        self._tombs: dict[str, asyncio.Future[None]] = {}
        self._on_exit = on_exit
        self._hb_interval, self._hb_timeout = heartbeat_interval_s, heartbeat_timeout_s
        self._last_pong = time.monotonic()
        # Read at each beat, so a configure changes it without a restart.
        self._stall_timeout = stall_timeout_s if callable(stall_timeout_s) else (lambda: stall_timeout_s)
        # The RAM the node needs left available, sent with each Ping (the worker's host prompt cache
        # keeps to it): read at each beat and at each ``nudge``.
        self._keep_free = keep_free_bytes if keep_free_bytes is not None else (lambda: 0)
        self._ping_seq = 0
        # The last heartbeat answer: the worker's decode progress.
        self.progress: Pong | None = None
        self._killed_for = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._waiter: asyncio.Task[None]
        self._frames: _FrameReader
        self._flushes: set[Callable[[], None]] = set()
        self.tokens_out = 0
        self._blackbox: int | None = None

    @classmethod
    async def spawn(cls, executor_id: str, settings: WorkerSettings,
                    on_exit: Callable[[WorkerProcess, ExitInfo], Awaitable[None]], *,
                    heartbeat_interval_s: float = 1.0, heartbeat_timeout_s: float = 10.0,
                    stall_timeout_s: float | Callable[[], float] = DEFAULT_STALL_TIMEOUT_S,
                    keep_free_bytes: Callable[[], int] | None = None,
                    python: str = sys.executable, env: Mapping[str, str] | None = None) -> WorkerProcess:
        # ``env``: added to the node's (CUDA_VISIBLE_DEVICES: the GPUs admission placed it on).
        env = {**os.environ, **(env or {})}
        # The worker must import this very package, wherever the node was started from.
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        loop = asyncio.get_running_loop()
        # stdout is a plain pipe read by a protocol (_FrameReader), not a StreamReader: frames are
        # cut and routed in the callback that receives the bytes, with no reader task to wake per
        # token (that hop was a fifth of the node's CPU per streamed token).
        out_r, out_w = os.pipe()
        box = _blackbox_file()
        pass_fds: tuple[int, ...] = ()
        if box is not None:
            env["OPTIMANODE_WORKER_BLACKBOX_FD"] = str(box)
            pass_fds = (box,)
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-m", "optimanode.worker",
                stdin=asyncio.subprocess.PIPE, stdout=out_w, stderr=asyncio.subprocess.PIPE,
                env=env, start_new_session=False, pass_fds=pass_fds,
            )
        except BaseException:
            os.close(out_r)
            if box is not None:
                os.close(box)
            raise
        finally:
            os.close(out_w)
        worker = cls(executor_id, settings, proc, on_exit, heartbeat_interval_s, heartbeat_timeout_s, stall_timeout_s,
                     keep_free_bytes)
        worker._blackbox = box
        try:
            _, worker._frames = await loop.connect_read_pipe(lambda: _FrameReader(worker),
                                                             os.fdopen(out_r, "rb", buffering=0))
        except BaseException:
            proc.kill()
            raise
        worker._send(settings)
        worker._tasks = [
            loop.create_task(worker._read_stderr(), name=f"worker-{executor_id}-stderr"),
            loop.create_task(worker._heartbeat(), name=f"worker-{executor_id}-heartbeat"),
        ]
        worker._waiter = loop.create_task(worker._wait_exit(), name=f"worker-{executor_id}-wait")
        return worker

    # -- pipes -------------------------------------------------------------------------------

    def _send(self, msg: object) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            raise WorkerCrashed(f"worker {self.pid} is gone", executor=self.executor_id)
        stdin.write(frame(msg))

    def _on_frame(self, msg: object) -> None:
        self._last_pong = time.monotonic()  # any frame proves the worker is alive
        if isinstance(msg, Chunk | Done | Failed):
            tomb = self._tombs.get(msg.id)
            if tomb is not None:
                # The old request's late frames (a reuse of the id waits for its answer, so they
                # come before any of the new one's): they go nowhere; its answer frees the id.
                if isinstance(msg, Chunk):
                    self.tokens_out += msg.tokens
                else:
                    del self._tombs[msg.id]
                    if not tomb.done():
                        tomb.set_result(None)
                return
            stream = self._streams.get(msg.id)
            if stream is None:
                return  # a request that was cancelled or abandoned: its late frames go nowhere
            if not isinstance(msg, Chunk):
                stream.answered = True  # the worker has let go of the id
            else:
                self.tokens_out += msg.tokens
                if stream.over:
                    return  # ended for its caller (aborted): no chunk after the error
                if stream.sink is not None:
                    if stream.flush is not None:
                        self._flushes.add(stream.flush)
                    try:
                        stream.sink(msg)
                    except Exception as exc:  # noqa: BLE001 - that request's bug, not the worker's
                        log.exception("the receiver of request %s failed", msg.id)
                        stream.sink = None
                        stream.over = True
                        stream.queue.put_nowait(NodeFault(f"{type(exc).__name__}: {exc}", code="internal"))
                        self.cancel(msg.id)  # the request is over for its caller: free the slot
                    return
            stream.queue.put_nowait(msg)
        elif isinstance(msg, Pong):
            self.progress = msg
        elif isinstance(msg, Ready):
            if not self.ready.done():
                self.ready.set_result(msg)

    def _end_of_read(self) -> None:
        """Every frame of one pipe read has been handed over: let the receivers write them out."""
        flushes, self._flushes = self._flushes, set()
        for flush in flushes:
            try:
                flush()
            except Exception:  # noqa: BLE001 - a receiver's bug, not the worker's
                log.exception("flushing a request's receiver failed")

    def _on_bad_stream(self, why: str) -> None:
        """A worker that speaks garbage is broken: end it."""
        self.stderr_tail.append(f"[supervisor] bad frame from worker: {why}")
        self._kill("protocol error")

    async def _read_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        while True:
            try:
                line = await stderr.readline()
            except ValueError:  # a line longer than the limit: keep what fits
                line = b"[line too long]\n"
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.stderr_tail.append(text)

    def _ping(self) -> None:
        self._ping_seq += 1
        self._send(Ping(seq=self._ping_seq, keep_free_bytes=max(0, int(self._keep_free()))))

    def nudge(self) -> None:
        """Send the RAM floor now, not at the next beat (the node has just admitted a model that
        will allocate soon). A worker still loading or gone is left alone."""
        if self.ready.done() and not self.exit.done():
            with contextlib.suppress(RequestError):
                self._ping()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._hb_interval)
            if not self.ready.done():
                continue  # loading; the load timeout covers this phase
            try:
                self._ping()
            except RequestError:
                return
            if time.monotonic() - self._last_pong > self._hb_timeout:
                self._kill(f"no heartbeat for {self._hb_timeout:g} s")
                return
            stalled = stall_reason(self.progress, self._stall_timeout())
            if stalled:
                log.error("worker %s of %s: %s; killing it", self.pid, self.executor_id, stalled)
                self._kill(stalled)
                # Its streams end now: a process stuck in a driver call may take long to reap.
                self._fail_streams(WorkerCrashed(f"{stalled}; worker {self.pid} killed",
                                                 executor=self.executor_id, cause=STALLED))
                return

    async def _wait_exit(self) -> None:
        rc = await self.proc.wait()
        # Let the reader drain what the worker wrote before it died (a final Done, say).
        # (asyncio.timeout rather than wait_for: 3.11's wait_for can swallow a cancel.)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(0.2):
                await asyncio.shield(self._frames.eof)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(0.2):
                await asyncio.shield(self._tasks[0])
        self._frames.close()
        for t in self._tasks:
            t.cancel()
        box: dict[str, object] = {}
        if self._blackbox is not None:
            box = read_blackbox(self._blackbox)
            os.close(self._blackbox)
            self._blackbox = None
        info = ExitInfo(
            pid=self.pid, exit_code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None,
            uptime_s=round(time.monotonic() - self.started_at, 3), stderr_tail=list(self.stderr_tail),
            killed_for=self._killed_for, was_ready=self.ready.done() and not self.ready.cancelled(),
            safe_mode=self.settings.safe_mode, **box,  # type: ignore[arg-type]
        )
        err = WorkerCrashed(info.describe(), executor=self.executor_id, exit_code=info.exit_code,
                            signal=info.signal, cause=STALLED if info.stalled else None)
        self._fail_streams(err)
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()  # mark retrieved: nobody may be waiting
        self.exit.set_result(info)
        try:
            await self._on_exit(self, info)
        except Exception:
            log.exception("on_exit handler failed for %s", self.executor_id)

    def _fail_streams(self, err: RequestError) -> None:
        """End every request in flight with ``err`` (a stream already ended ignores a second one).

        The worker will answer nothing more: the tombstones go too."""
        for stream in self._streams.values():
            stream.sink = None
            stream.over = True
            stream.queue.put_nowait(err)
        self._release_tombs()

    def _release_tombs(self) -> None:
        tombs, self._tombs = self._tombs, {}
        for tomb in tombs.values():
            if not tomb.done():
                tomb.set_result(None)

    def _kill(self, why: str) -> None:
        if self.proc.returncode is None:
            self._killed_for = self._killed_for or why
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    # -- requests ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request_id: str, request: InferenceRequest, *,
                       on_chunk: Callable[[Chunk], None] | None = None,
                       on_flush: Callable[[], None] | None = None) -> AsyncIterator[Chunk | Done]:
        """Stream the worker's answer; raises WorkerCrashed, or RequestError for the worker's Failed.

        With ``on_chunk``, chunks are not yielded but handed to it from the pipe's read callback,
        before any task wakes (what ``complete`` does for the Gateway session). An id the worker
        still holds for an earlier request (a tombstone) is waited for before the Generate goes.
        """
        if request_id in self._streams:
            raise NodeFault(f"request id {request_id!r} is already in flight", code="bad_request")
        stream = self._streams[request_id] = _Stream(on_chunk, on_flush)
        finished = False
        try:
            self._check_alive()
            tomb = self._tombs.get(request_id)
            if tomb is not None:
                # The worker still holds the id for an earlier request that ended here before
                # the worker answered it: wait for that answer (it comes within a decode step of
                # the Cancel sent, or the worker exits). ``abort`` may end this one meanwhile.
                error = await self._behind(tomb, stream)
                if error is not None:
                    finished = True
                    raise error
                self._check_alive()
            self._send(Generate(id=request_id, request=request))
            stream.sent = True
            if stream.cancel_asked:  # cancelled while it waited: the worker ends it with Done(cancelled)
                self.cancel(request_id)
            while True:
                msg = await stream.queue.get()
                if isinstance(msg, RequestError):
                    finished = True
                    raise msg
                if isinstance(msg, Failed):
                    finished = True
                    raise error_for(msg.code, msg.message)
                yield msg
                if isinstance(msg, Done):
                    finished = True
                    return
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if stream.sent and not stream.answered and not self.exit.done():
                # Over for its caller (aborted, its receiver raised, or it went away: cancelled,
                # disconnected) before the worker answered: stop decoding for it, and keep the id
                # until the worker lets go of it.
                if not stream.cancelled:
                    stream.cancelled = True
                    with contextlib.suppress(RequestError):
                        self._send(Cancel(id=request_id))
                self._tombs[request_id] = asyncio.get_running_loop().create_future()

    def _check_alive(self) -> None:
        """Raise WorkerCrashed if nothing more may be sent to this worker."""
        if self.exit.done():
            raise WorkerCrashed(self.exit.result().describe(), executor=self.executor_id)
        if self._killed_for.startswith(STALLED):  # killed, maybe not reaped yet: nothing more goes to it
            raise WorkerCrashed(f"worker {self.pid} is being killed ({self._killed_for})",
                                executor=self.executor_id, cause=STALLED)

    async def _behind(self, tomb: asyncio.Future[None], stream: _Stream) -> RequestError | None:
        """Wait for ``tomb`` (or the worker's exit); the error that ended ``stream`` meanwhile, if any."""
        getter = asyncio.ensure_future(stream.queue.get())
        try:
            # (asyncio.wait cancels none of them: the tombstone and the exit stay as they are.)
            await asyncio.wait((getter, tomb, self.exit), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            msg = getter.result()
            assert isinstance(msg, RequestError)  # nothing else comes before the Generate is sent
            return msg
        return None

    async def complete(self, request_id: str, request: InferenceRequest, on_chunk: Callable[[Chunk], None],
                       on_flush: Callable[[], None] | None = None) -> Done:
        """Run one request, handing each Chunk to ``on_chunk`` as it arrives; returns its Done.

        ``on_chunk`` is called from the pipe's read callback, before any task wakes: the token
        streaming path with the fewest hops (the Gateway session sends from it). It must not
        block; if it raises, the request fails with ``internal`` and the worker goes on.
        ``on_flush`` is called once after all the frames of that read were handed over (one
        decode step of a batch brings one chunk per stream): a receiver may hold its writes
        until then and send them together. Callbacks equal to each other are called once.
        Raises as ``generate`` does; cancelling the caller cancels the request at the worker.
        """
        async with contextlib.aclosing(self.generate(request_id, request, on_chunk=on_chunk,
                                                     on_flush=on_flush)) as messages:
            async for msg in messages:
                assert isinstance(msg, Done)  # chunks went to on_chunk
                return msg
        raise AssertionError("generate ended without a Done")  # it returns only after one

    def cancel(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or self.exit.done() or stream.cancelled:
            return
        if not stream.sent:  # waiting behind a tombstone: the Cancel follows its Generate
            stream.cancel_asked = True
            return
        stream.cancelled = True
        with contextlib.suppress(RequestError):
            self._send(Cancel(id=request_id))

    def abort(self, request_id: str, error: RequestError) -> None:
        """End ``request_id``'s stream now with ``error`` (its caller gets it next) and stop its decoding.

        The worker still ends the request (``Done`` cancelled); that late answer goes nowhere, and
        until it comes the id stays taken (a tombstone: a reuse waits for it). One still waiting
        behind a tombstone ends without having been sent.
        """
        stream = self._streams.get(request_id)
        if stream is None or stream.over:
            return
        if stream.sent:
            self.cancel(request_id)
        stream.sink = None  # no chunk after the error
        stream.over = True
        stream.queue.put_nowait(error)

    # -- stopping ----------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> ExitInfo:
        """Shutdown → grace → SIGTERM → SIGKILL; always returns with the process reaped."""
        return await asyncio.shield(self._stop(grace_s))

    async def _stop(self, grace_s: float) -> ExitInfo:
        if not self.exit.done():
            self._killed_for = self._killed_for or "stop"
            with contextlib.suppress(RequestError, ConnectionError):
                self._send(Shutdown())
            for sig, wait in ((None, grace_s / 2), (signal.SIGTERM, grace_s / 2), (signal.SIGKILL, None)):
                if sig is not None and self.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(sig)
                try:
                    async with asyncio.timeout(wait):
                        await asyncio.shield(self.exit)
                    break
                except TimeoutError:
                    continue
        info = await self.exit
        # Also wait for on_exit, so that whoever stopped the worker sees its stop journaled.
        await self._waiter
        return info

    def kill_now(self, why: str) -> None:
        self._kill(why)


class _Stream:
    """One request in flight on a worker: its Done/Failed/errors queue, and where its chunks go."""

    __slots__ = ("answered", "cancel_asked", "cancelled", "flush", "over", "queue", "sent", "sink")

    def __init__(self, sink: Callable[[Chunk], None] | None, flush: Callable[[], None] | None) -> None:
        # Chunks too, when there is no sink (generate).
        self.queue: asyncio.Queue[Chunk | Done | Failed | RequestError] = asyncio.Queue()
        self.sink = sink
        self.flush = flush
        # Its Generate went to the worker; the worker's Done or Failed for it came (the id is free there).
        self.sent = False
        self.answered = False
        # Ended here with an error (abort, a failing receiver, the worker's end): nothing more for its caller.
        self.over = False
        # A Cancel went to the worker; one was asked for before the Generate went (sent after it).
        self.cancelled = False
        self.cancel_asked = False


class _FrameReader(asyncio.Protocol):
    """The worker's stdout: cuts frames as bytes arrive and hands each to the worker at once."""

    def __init__(self, worker: WorkerProcess) -> None:
        self._worker = worker
        self._buf = bytearray()
        self._transport: asyncio.ReadTransport | None = None
        self.eof: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
        pos, end = 0, len(data)
        try:
            while end - pos >= FRAME_HEADER.size:
                (n,) = FRAME_HEADER.unpack_from(data, pos)
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes exceeds the limit")
                start = pos + FRAME_HEADER.size
                if end - start < n:
                    break
                pos = start + n
                self._worker._on_frame(decode_from_worker(data[start:pos]))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the stream can no longer be trusted
            self._buf = bytearray()
            self.close()
            self._worker._end_of_read()
            self._worker._on_bad_stream(str(exc))
            return
        self._worker._end_of_read()
        # Usually a read holds whole frames and nothing is kept; a partial frame waits for the rest.
        self._buf = bytearray(data[pos:]) if pos < end else bytearray()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
