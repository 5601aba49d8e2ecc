"""The supervisor without a process (executors/supervisor.py): exit causes, the black box, frame routing.

The routing tests build a ``WorkerProcess`` on a stand-in for the asyncio process (its pid, its
stdin as a list of written frames, ``kill``) and feed its ``_FrameReader`` the bytes a worker
would write, cut where a pipe read might cut them. The process side (spawn, heartbeat, signals)
is in tests/system.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from optimanode import protocol as p
from optimanode.errors import ContextOverflow, NodeFault, RequestError, WorkerCrashed
from optimanode.executors.supervisor import (
    CRASH_CAUSES,
    ExitInfo,
    WorkerProcess,
    _blackbox_file,
    _FrameReader,
    read_blackbox,
)
from optimanode.protocol import CompletionRequest, SamplingParams

REQUEST = CompletionRequest(prompt="The capital of France is", params=SamplingParams(max_tokens=4))
USAGE = p.Usage(prompt_tokens=5, completion_tokens=2)
TIMINGS = p.Timings(ttft_s=0.1, tokens_per_s=10.0, total_s=0.2)


# -- exit descriptions -------------------------------------------------------------------------


def info(**kw) -> ExitInfo:
    base = dict(pid=42, exit_code=None, signal=None, uptime_s=3.0, stderr_tail=[])
    base.update(kw)
    return ExitInfo(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "cause"), [
    (dict(signal=signal.SIGSEGV), "fatal_signal"),
    (dict(signal=signal.SIGILL), "fatal_signal"),
    (dict(signal=signal.SIGBUS), "fatal_signal"),
    (dict(signal=signal.SIGKILL), "killed"),
    (dict(exit_code=1), "exited"),
    (dict(exit_code=0), "exited"),
    (dict(signal=signal.SIGKILL, killed_for="no heartbeat for 10 s"), "heartbeat_timeout"),
    (dict(signal=signal.SIGKILL, killed_for="not ready after 120 s"), "load_timeout"),
    (dict(signal=signal.SIGKILL, killed_for="protocol error"), "protocol_error"),
    (dict(signal=signal.SIGKILL, killed_for="stalled: no decode step for 12.0 s"), "stalled"),
    # A fatal signal the supervisor delivered itself is its kill, not a fault in native code.
    (dict(signal=signal.SIGSEGV, killed_for="stop"), "killed"),
])
def test_the_cause_of_an_exit_is_one_of_the_crash_causes(kw, cause) -> None:
    i = info(**kw)
    assert i.cause == cause and cause in CRASH_CAUSES
    assert i.fatal_signal is (cause == "fatal_signal")
    assert i.stalled is (cause == "stalled")


def test_describe_says_how_it_ended_what_it_was_doing_and_why_it_was_killed() -> None:
    assert info(exit_code=3).describe() == "worker 42 exited with code 3"
    assert info(signal=signal.SIGKILL, killed_for="stop").describe() == "worker 42 killed by SIGKILL (stop)"
    crash = info(signal=signal.SIGSEGV, phase="prompt evaluation", in_decode=True, batch_tokens=31, batch_seqs=2,
                 requests=("a", "b"))
    assert crash.describe() == ("worker 42 killed by SIGSEGV in llama_decode during prompt evaluation of a "
                                "31-token batch of 2 sequences (requests a, b)")
    after = info(signal=signal.SIGABRT, phase="generation", in_decode=False, batch_tokens=1, requests=("r",))
    assert after.describe() == "worker 42 killed by SIGABRT after llama_decode during generation of a 1-token batch " \
                               "(request r)"
    assert info(signal=signal.SIGSEGV, phase="loading").describe() == "worker 42 killed by SIGSEGV during loading"


def test_the_black_box_is_left_out_when_idle_or_when_the_worker_exited() -> None:
    assert info(signal=signal.SIGKILL, phase="idle", batch_tokens=3).doing() == ""
    assert info(exit_code=1, phase="generation", batch_tokens=3).doing() == ""  # no signal: it exited itself


def test_a_stall_kill_is_described_cause_first() -> None:
    why = "stalled: no decode step for 12.0 s with 1 request pending"
    text = info(signal=signal.SIGKILL, killed_for=why, phase="generation", in_decode=True, batch_tokens=1,
                requests=("r",)).describe()
    assert text == f"{why}; worker 42 killed by SIGKILL in llama_decode during generation of a 1-token batch " \
                   "(request r)"


def test_a_signal_number_without_a_name_is_still_named() -> None:
    assert info(signal=99).signal_name() == "signal 99"
    assert info(signal=signal.SIGTERM).signal_name() == "SIGTERM"


# -- the black box -------------------------------------------------------------------------------


def test_a_black_box_without_a_record_reads_as_empty(tmp_path: Path) -> None:
    f = tmp_path / "box"
    f.write_bytes(b"\0" * p.BLACKBOX_SIZE)
    with open(f, "rb") as fh:
        assert read_blackbox(fh.fileno()) == {}
    f.write_bytes(b"D\tprompt evaluation\t31\t1\tX\0" + b"\0" * 100)
    with open(f, "rb") as fh:
        assert read_blackbox(fh.fileno()) == dict(in_decode=True, phase="prompt evaluation", batch_tokens=31,
                                                  batch_seqs=1, requests=("X",))


@pytest.mark.parametrize(("record", "expected"), [
    (b"A\tgeneration\t1\t3\tr1,r2,r3", dict(in_decode=False, phase="generation", batch_tokens=1, batch_seqs=3,
                                           requests=("r1", "r2", "r3"))),
    (b"D\tloading\t0\t0\t", dict(in_decode=True, phase="loading", batch_tokens=None, batch_seqs=None, requests=())),
    (b"X\tgeneration\t1\t1\tr", {}),  # not a record this supervisor knows
    (b"D\tgeneration\t1\t1", {}),  # a field short (a torn write)
    (b"D\tgeneration\tmany\t1\tr", dict(in_decode=True, phase="generation", batch_tokens=None, batch_seqs=1,
                                       requests=("r",))),
])
def test_black_box_records_read_as_the_worker_meant_them_or_not_at_all(record: bytes, expected: dict) -> None:
    fd = _blackbox_file()
    assert fd is not None
    try:
        assert os.fstat(fd).st_size == p.BLACKBOX_SIZE and read_blackbox(fd) == {}
        os.pwrite(fd, record + b"\0", 0)
        assert read_blackbox(fd) == expected
    finally:
        os.close(fd)
    assert read_blackbox(fd) == {}  # a closed descriptor: nothing to read, no error


# -- routing frames from the worker's stdout ------------------------------------------------------


class Stdin:
    """The process's stdin as the supervisor uses it: frames written, decoded here as the worker would."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def frames(self) -> list[object]:
        out, pos = [], 0
        while pos < len(self.data):
            (n,) = p.FRAME_HEADER.unpack_from(self.data, pos)
            out.append(p.decode_to_worker(bytes(self.data[pos + 4:pos + 4 + n])))
            pos += 4 + n
        return out


class Proc:
    """What WorkerProcess reads of an asyncio process: its pid, returncode, stdin and kill."""

    def __init__(self) -> None:
        self.pid = 4242
        self.returncode: int | None = None
        self.stdin = Stdin()
        self.kills = 0

    def kill(self) -> None:
        self.kills += 1


async def _no_exit(worker: WorkerProcess, info: ExitInfo) -> None:
    raise AssertionError("no exit expected")


@pytest.fixture
async def worker() -> tuple[WorkerProcess, _FrameReader, Proc]:
    proc = Proc()
    w = WorkerProcess("m", p.WorkerSettings(model_path="/m/a.gguf"), proc, _no_exit,  # type: ignore[arg-type]
                      heartbeat_interval_s=1.0, heartbeat_timeout_s=10.0)
    reader = _FrameReader(w)
    w._frames = reader
    return w, reader, proc


def feed(reader: _FrameReader, *msgs: object, cut: int | None = None) -> None:
    """The frames of ``msgs`` as one pipe read, or as two split at byte ``cut``."""
    data = b"".join(p.frame(m) for m in msgs)
    if cut is None:
        reader.data_received(data)
    else:
        reader.data_received(data[:cut])
        reader.data_received(data[cut:])


async def _until_sent(proc: Proc, n: int) -> None:
    async with asyncio.timeout(5):
        while len(proc.stdin.frames()) < n:
            await asyncio.sleep(0)


async def test_a_request_is_sent_as_generate_and_its_chunks_and_done_come_back_in_order(worker) -> None:
    w, reader, proc = worker
    got: list[object] = []

    async def consume() -> None:
        async for msg in w.generate("r1", REQUEST):
            got.append(msg)

    task = asyncio.create_task(consume())
    await _until_sent(proc, 1)
    assert proc.stdin.frames() == [p.Generate(id="r1", request=REQUEST)] and w.in_flight == 1
    done = p.Done(id="r1", finish_reason="length", usage=USAGE, timings=TIMINGS)
    # One read that ends inside the second frame's header, then the rest.
    feed(reader, p.Chunk(id="r1", text=" Par"), p.Chunk(id="r1", text="is", tokens=2), done, cut=len(p.frame(
        p.Chunk(id="r1", text=" Par"))) + 2)
    await asyncio.wait_for(task, 5)
    assert got == [p.Chunk(id="r1", text=" Par"), p.Chunk(id="r1", text="is", tokens=2), done]
    assert w.tokens_out == 3 and w.in_flight == 0
    assert proc.stdin.frames() == [p.Generate(id="r1", request=REQUEST)]  # ended normally: no Cancel


async def test_complete_hands_chunks_over_in_the_read_and_flushes_once_per_read(worker) -> None:
    w, reader, proc = worker
    chunks: list[str] = []
    flushes: list[int] = []
    flush = lambda: flushes.append(len(chunks))  # noqa: E731 - the same callable for both requests
    t1 = asyncio.create_task(w.complete("a", REQUEST, lambda c: chunks.append("a" + c.text), flush))
    t2 = asyncio.create_task(w.complete("b", REQUEST, lambda c: chunks.append("b" + c.text), flush))
    await _until_sent(proc, 2)
    # One decode step of a batch: one chunk per stream in one read, then one flush for both.
    feed(reader, p.Chunk(id="a", text="1"), p.Chunk(id="b", text="1"))
    assert chunks == ["a1", "b1"] and flushes == [2]
    feed(reader, p.Chunk(id="a", text="2"), p.Done(id="a", finish_reason="stop", usage=USAGE, timings=TIMINGS))
    assert flushes == [2, 3]
    assert (await asyncio.wait_for(t1, 5)).finish_reason == "stop"
    feed(reader, p.Done(id="b", finish_reason="length", usage=USAGE, timings=TIMINGS))
    assert (await asyncio.wait_for(t2, 5)).finish_reason == "length"
    assert flushes == [2, 3]  # a read without chunks flushes nothing


async def test_a_failing_receiver_fails_only_its_request_and_cancels_it_at_the_worker(worker) -> None:
    w, reader, proc = worker

    def broken(chunk: p.Chunk) -> None:
        raise ValueError("receiver bug")

    task = asyncio.create_task(w.complete("r", REQUEST, broken))
    await _until_sent(proc, 1)
    feed(reader, p.Chunk(id="r", text="x"))
    with pytest.raises(NodeFault, match="ValueError: receiver bug") as exc:
        await asyncio.wait_for(task, 5)
    assert exc.value.code == "internal"
    assert p.Cancel(id="r") in proc.stdin.frames() and proc.kills == 0


async def test_a_failed_request_raises_the_error_class_of_its_code(worker) -> None:
    w, reader, proc = worker
    task = asyncio.create_task(w.complete("r", REQUEST, lambda c: None))
    await _until_sent(proc, 1)
    feed(reader, p.Failed(id="r", code="context_overflow", message="prompt of 600 tokens > n_ctx 512"))
    with pytest.raises(ContextOverflow, match="600 tokens"):
        await asyncio.wait_for(task, 5)


async def test_frames_for_unknown_or_finished_requests_go_nowhere(worker) -> None:
    w, reader, proc = worker
    feed(reader, p.Chunk(id="ghost", text="x"), p.Done(id="ghost", finish_reason="stop", usage=USAGE,
                                                       timings=TIMINGS), p.Pong(seq=1, steps=5))
    assert w.tokens_out == 0 and w.progress == p.Pong(seq=1, steps=5) and proc.kills == 0


async def test_ready_resolves_once(worker) -> None:
    w, reader, _ = worker
    ready = p.Ready(pid=4242, n_ctx=512, load_s=0.5)
    feed(reader, ready, p.Ready(pid=4242, n_ctx=1, load_s=9.0))
    assert w.ready.result() == ready


async def test_a_caller_that_goes_away_cancels_its_request_at_the_worker(worker) -> None:
    w, reader, proc = worker
    stream = w.generate("r", REQUEST)
    task = asyncio.create_task(anext(stream))
    await _until_sent(proc, 1)
    feed(reader, p.Chunk(id="r", text="x"))
    assert await asyncio.wait_for(task, 5) == p.Chunk(id="r", text="x")
    await stream.aclose()
    assert proc.stdin.frames()[-1] == p.Cancel(id="r") and w.in_flight == 0


async def test_a_second_request_with_an_id_in_flight_is_refused(worker) -> None:
    w, _, proc = worker
    first = asyncio.create_task(anext(w.generate("r", REQUEST)))
    await _until_sent(proc, 1)
    with pytest.raises(NodeFault, match="already in flight") as exc:
        await anext(w.generate("r", REQUEST))
    assert exc.value.code == "bad_request"
    first.cancel()


async def test_abort_ends_the_stream_with_the_error_and_cancels_at_the_worker(worker) -> None:
    w, reader, proc = worker
    task = asyncio.create_task(w.complete("r", REQUEST, lambda c: None))
    await _until_sent(proc, 1)
    w.abort("r", RequestError("too late", code="deadline_exceeded"))
    with pytest.raises(RequestError) as exc:
        await asyncio.wait_for(task, 5)
    assert exc.value.code == "deadline_exceeded"
    assert proc.stdin.frames()[1:] == [p.Cancel(id="r")]
    w.abort("r", RequestError("twice"))  # finished: nothing to abort


async def test_a_worker_that_writes_garbage_is_killed_as_a_protocol_error_and_its_streams_end(worker) -> None:
    w, reader, proc = worker
    task = asyncio.create_task(w.complete("r", REQUEST, lambda c: None))
    await _until_sent(proc, 1)
    reader.data_received(p.FRAME_HEADER.pack(3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid MessagePack
    assert proc.kills == 1 and w._killed_for == "protocol error"
    assert "[supervisor] bad frame from worker" in w.stderr_tail[-1]
    w._fail_streams(WorkerCrashed("worker 4242 killed by SIGKILL"))  # what the exit then does
    with pytest.raises(WorkerCrashed):
        await asyncio.wait_for(task, 5)


async def test_a_frame_length_over_the_limit_is_a_protocol_error(worker) -> None:
    w, reader, proc = worker
    reader.data_received(p.FRAME_HEADER.pack(p.MAX_FRAME + 1))
    assert proc.kills == 1 and "exceeds the limit" in w.stderr_tail[-1]


async def test_a_request_to_a_worker_whose_stdin_is_gone_fails_as_crashed(worker) -> None:
    w, _, proc = worker
    proc.stdin.closed = True
    with pytest.raises(WorkerCrashed, match="worker 4242 is gone"):
        await w.complete("r", REQUEST, lambda c: None)
    assert w.in_flight == 0
