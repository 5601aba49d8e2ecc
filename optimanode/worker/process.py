"""The worker process: start-up, the reader thread, and the exit code (``python -m optimanode.worker``).

``main`` duplicates fd 1 into a private frame writer and copies fd 2 over fd 1 (whatever a library
prints to "stdout" lands on stderr and cannot corrupt the frame stream), makes a private copy of
stderr for ``log._log``, asks for SIGKILL when the parent dies (``PR_SET_PDEATHSIG``, Linux),
ignores SIGINT, routes llama.cpp's log, enables ``faulthandler`` and opens the black box. It reads
the ``WorkerSettings`` frame, starts the reader thread (pings answered and EOF noticed while the
model loads; each ``Pong`` carries the serving loop's ``Progress``, so a decode stuck in llama.cpp
shows as work pending with no step, while this thread still answers), builds the ``Engine`` (load
and warm-up), sends ``Ready`` and serves until ``Shutdown``. It returns the exit code
(``log.EXIT_*``); ``__main__`` ends the process with ``os._exit``, since the reader thread may
sit in a blocking read.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback

import msgspec

from optimanode import protocol as p
from optimanode.constraints import explain
from optimanode.worker import log
from optimanode.worker.blackbox import _blackbox, _decode_hang
from optimanode.worker.engine import Engine, _backend, _llama_errors, route_llama_log
from optimanode.worker.framing import _StreamBroken, _Writer, read_frame
from optimanode.worker.jobs import _Job, _Jobs
from optimanode.worker.log import EXIT_CRASH, EXIT_LOAD, EXIT_OK, EXIT_PROTOCOL, _log
from optimanode.worker.progress import Progress


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(EXIT_OK)


def _reader(fd: int, writer: _Writer, jobs: _Jobs, progress: Progress) -> None:
    try:
        while True:
            try:
                body = read_frame(fd)
            except _StreamBroken as exc:
                _log(f"protocol error: {exc}; exiting")
                os._exit(EXIT_PROTOCOL)
            if body is None:
                _log("stdin closed: the node is gone; exiting")
                os._exit(EXIT_OK)
            try:
                msg = p.decode_to_worker(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                _log(f"ignored a frame that does not decode ({len(body)} bytes): {exc}")
                rid = _generate_id(body)
                if rid:  # a request whose values break their limits: answered, never left waiting
                    path, expected = explain(exc, p.ToWorker) if isinstance(exc, msgspec.ValidationError) else ("", "")
                    writer.send(p.Failed(id=rid, code="bad_request",
                                         message=f"{path}: expected {expected}" if path else str(exc)))
                continue
            if isinstance(msg, p.Ping):
                progress.keep_free(msg.keep_free_bytes)
                writer.send(progress.pong(msg.seq, *jobs.pending()))
            elif isinstance(msg, p.Cancel):
                jobs.cancel(msg.id)
            elif isinstance(msg, p.Generate):
                if not jobs.add(_Job(id=msg.id, request=msg.request)):
                    code, why = (("shutting_down", "the worker is shutting down") if jobs.closed
                                 else ("bad_request", "a request with this id is already running"))
                    writer.send(p.Failed(id=msg.id, code=code, message=why))
            elif isinstance(msg, p.Shutdown):
                jobs.close()
            else:
                _log(f"ignored a {type(msg).__name__} frame: settings are only read at start")
    except BaseException:
        _log(f"reader thread crashed:\n{traceback.format_exc().rstrip()}")
        os._exit(EXIT_CRASH)


def main() -> int:
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    # Through the module: every _log call reads log._err_fd.
    log._err_fd = os.dup(2)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    route_llama_log()
    # A fatal signal (SIGSEGV in a kernel, say) prints every thread's Python stack into the
    # stderr tail the crash event keeps, before the process dies of that same signal.
    faulthandler.enable(file=log._err_fd, all_threads=True)
    _blackbox.open_from_env()
    _decode_hang.arm_from_env()
    writer = _Writer(out)

    try:
        body = read_frame(0)
    except _StreamBroken as exc:
        _log(f"protocol error: {exc}")
        return EXIT_PROTOCOL
    if body is None:
        _log("stdin closed before the settings frame; exiting")
        return EXIT_OK
    try:
        settings = msgspec.msgpack.decode(body, type=p.WorkerSettings)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _log(f"protocol error: the first frame must be WorkerSettings: {exc}")
        return EXIT_PROTOCOL

    jobs = _Jobs()
    progress = Progress()
    threading.Thread(target=_reader, args=(0, writer, jobs, progress), name="reader", daemon=True).start()

    t0 = time.monotonic()
    _blackbox.enter("loading", 0, 0, ())
    if not os.path.isfile(settings.model_path):
        _log(f"cannot load model {settings.model_path}: no such file")
        return EXIT_LOAD
    try:
        engine = Engine(settings, writer.send_many, progress)
    except Exception as exc:
        # llama.cpp logs the root cause first, then "failed to load model" lines around it.
        reason = _llama_errors[0] if _llama_errors else f"{type(exc).__name__}: {exc}"
        _log(f"cannot load model {settings.model_path}: {reason}")
        return EXIT_LOAD
    warm_batch, warm_generated, warm_seqs = engine.warmup
    if settings.safe_mode:
        _log("safe mode: loaded without extra buffer types (weight repacking, AMX) and with "
             "llama.cpp's default threadpool")
    _blackbox.enter("idle", 0, 0, ())
    writer.send(p.Ready(pid=os.getpid(), n_ctx=engine.n_ctx, load_s=time.monotonic() - t0,
                        backend=_backend(), chat_template=engine.chat is not None,
                        chat_template_in_force=engine.chat_template_in_force,
                        warmup_batch=warm_batch, warmup_generated=warm_generated, warmup_seqs=warm_seqs,
                        warmup_s=engine.warmup_s, safe_mode=settings.safe_mode))
    engine.serve(jobs)
    # Shutdown: every request taken has been answered (cancelled ones with Done).
    engine.close()
    return EXIT_OK


def _generate_id(body: bytes) -> str:
    """The id of a Generate frame that failed to decode, or "" (not a Generate, or no string id)."""
    try:
        raw = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return ""
    if isinstance(raw, dict) and raw.get("type") == "generate" and isinstance(raw.get("id"), str):
        return raw["id"]
    return ""
