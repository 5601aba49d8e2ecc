"""The worker's pure parts in process, without a model: text streaming, the job queue, framing, slot choice, the black box."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from optimanode import protocol as p
from optimanode.executors.supervisor import read_blackbox
from optimanode.worker import blackbox
from optimanode.worker.blackbox import _BlackBox, _fault_injection
from optimanode.worker.framing import _StreamBroken, _Writer, read_frame
from optimanode.worker.jobs import _done, _Job, _Jobs
from optimanode.worker.slots import _common_prefix, _Run, _runs, _Slot, choose_slot, compaction_moves, plan_step
from optimanode.worker.text import TextStream


# ---------------------------------------------------------------------------------------------
# Text stream


def test_text_stream_sends_a_split_character_whole() -> None:
    out: list[tuple[str, int]] = []
    ts = TextStream([], lambda text, n: out.append((text, n)))
    for piece in (b"a", "é".encode()[:1], "é".encode()[1:], "😀".encode()[:2], "😀".encode()[2:]):
        ts.feed(piece)
    ts.finish()
    assert out == [("a", 1), ("é", 2), ("😀", 2)]


def test_text_stream_holds_back_a_possible_stop_and_releases_it() -> None:
    out: list[tuple[str, int]] = []
    ts = TextStream(["END"], lambda text, n: out.append((text, n)))
    assert not ts.feed(b"x E")
    assert not ts.feed(b"N")
    assert out == [("x ", 1)]
    assert not ts.feed(b"d")  # "ENd" is not the stop: released with both tokens
    assert not ts.feed(b" yEN")
    assert ts.feed(b"D tail")  # the stop and what follows are dropped; the token is still counted
    assert out == [("x ", 1), ("ENd", 2), (" y", 1), ("", 1)]


def test_text_stream_finish_flushes_an_unfinished_character() -> None:
    out: list[tuple[str, int]] = []
    ts = TextStream([], lambda text, n: out.append((text, n)))
    ts.feed("é".encode()[:1])
    ts.finish()
    assert out == [("\ufffd", 1)]


def test_text_stream_without_stops_sends_each_token_at_once_and_finish_sends_nothing_more() -> None:
    out: list[tuple[str, int]] = []
    ts = TextStream([], lambda text, n: out.append((text, n)))
    assert not ts.feed(b"Hello")
    assert not ts.feed(b" world")
    ts.finish()
    assert out == [("Hello", 1), (" world", 1)]


def test_text_stream_cuts_at_the_earliest_of_several_stops() -> None:
    out: list[tuple[str, int]] = []
    ts = TextStream(["\n\n", "###"], lambda text, n: out.append((text, n)))
    assert ts.feed(b"abc### x\n\ny")
    assert ts.stopped
    assert out == [("abc", 1)]
    assert "".join(t for t, _ in out) == "abc" and sum(n for _, n in out) == 1


# ---------------------------------------------------------------------------------------------
# The job queue


def _job(id: str, **kw: Any) -> _Job:
    return _Job(id=id, request=p.CompletionRequest(prompt="x"), **kw)


def test_jobs_add_refuses_a_running_id_until_it_is_finished() -> None:
    jobs = _Jobs()
    a = _job("a")
    assert jobs.add(a)
    assert not jobs.add(_job("a"))
    assert jobs.add(_job("b"))
    assert jobs.unanswered() == 2
    assert [j.id for j in jobs.take(block=False)] == ["a", "b"]  # type: ignore[union-attr]
    jobs.finished(a)
    assert jobs.unanswered() == 1
    assert jobs.add(_job("a"))  # the id is free again


def test_jobs_cancel_sets_the_flag_and_ignores_unknown_ids() -> None:
    jobs = _Jobs()
    a = _job("a")
    jobs.add(a)
    jobs.cancel("nobody")
    assert not a.cancelled.is_set()
    jobs.cancel("a")
    assert a.cancelled.is_set()
    jobs.finished(a)
    b = _job("a")
    jobs.add(b)
    assert not b.cancelled.is_set()  # a new request with the old id starts clean


def test_jobs_close_cancels_everything_queues_none_and_refuses_more() -> None:
    jobs = _Jobs()
    a, b = _job("a"), _job("b")
    jobs.add(a)
    jobs.add(b)
    jobs.finished(b)
    jobs.close()
    assert jobs.closed and a.cancelled.is_set() and not b.cancelled.is_set()
    assert not jobs.add(_job("c"))
    assert jobs.take(block=False) == [a, b, None]


def test_jobs_take_blocks_for_one_and_then_takes_the_rest() -> None:
    jobs = _Jobs()
    t0 = time.monotonic()
    assert jobs.take(block=True, timeout=0.05) == []
    assert time.monotonic() - t0 >= 0.04
    assert jobs.take(block=False) == []
    a, b = _job("a"), _job("b")
    timer = threading.Timer(0.05, lambda: (jobs.add(a), jobs.add(b)))
    timer.start()
    got = jobs.take(block=True, timeout=10)
    timer.join()
    got += jobs.take(block=False)
    assert got == [a, b]


def test_done_counts_ttft_from_the_frame_and_speed_after_the_first_token() -> None:
    t0 = time.monotonic() - 10.0
    job = _job("r", received=t0)
    d = _done(job, "length", 7, 5, t0 + 1.0, t0 + 3.0)
    assert (d.id, d.finish_reason, d.usage) == ("r", "length", p.Usage(prompt_tokens=7, completion_tokens=5))
    assert d.timings.ttft_s == pytest.approx(1.0)
    assert d.timings.tokens_per_s == pytest.approx(2.0)  # 4 tokens after the first, in 2 s
    assert 10.0 <= d.timings.total_s < 20.0
    none = _done(job, "cancelled", 0, 0, None, None)
    assert none.timings.ttft_s == none.timings.total_s and none.timings.tokens_per_s == 0.0
    one = _done(job, "stop", 3, 1, t0 + 1.0, t0 + 1.0)
    assert one.timings.tokens_per_s == 0.0


# ---------------------------------------------------------------------------------------------
# Framing


def _pipe_with(data: bytes) -> int:
    """The read end of a pipe holding ``data``, its write end closed (EOF after the data)."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def test_read_frame_reads_frames_then_none_at_eof() -> None:
    fd = _pipe_with(p.frame(p.Ping(seq=7)) + p.FRAME_HEADER.pack(0) + p.frame(p.Shutdown()))
    try:
        assert p.decode_to_worker(read_frame(fd)) == p.Ping(seq=7)  # type: ignore[arg-type]
        assert read_frame(fd) == b""  # an empty body is a frame, not EOF
        assert p.decode_to_worker(read_frame(fd)) == p.Shutdown()  # type: ignore[arg-type]
        assert read_frame(fd) is None
    finally:
        os.close(fd)


def test_read_frame_at_eof_inside_a_frame_is_none() -> None:
    for data in (b"\0\0", p.FRAME_HEADER.pack(10) + b"short"):
        fd = _pipe_with(data)
        try:
            assert read_frame(fd) is None
        finally:
            os.close(fd)


def test_read_frame_reassembles_a_body_written_in_pieces() -> None:
    body = p.frame(p.Cancel(id="x" * 5000))
    r, w = os.pipe()

    def write() -> None:
        for i in range(0, len(body), 7):
            os.write(w, body[i:i + 7])
        os.close(w)

    t = threading.Thread(target=write)
    t.start()
    try:
        assert p.decode_to_worker(read_frame(r)) == p.Cancel(id="x" * 5000)  # type: ignore[arg-type]
    finally:
        t.join()
        os.close(r)


def test_a_frame_length_over_the_limit_breaks_the_stream() -> None:
    fd = _pipe_with(struct.pack(">I", p.MAX_FRAME + 1) + b"body")
    try:
        with pytest.raises(_StreamBroken, match="over the limit"):
            read_frame(fd)
    finally:
        os.close(fd)


def test_the_writer_sends_a_step_in_one_write_that_reads_back_frame_by_frame() -> None:
    r, w = os.pipe()
    writes: list[int] = []

    class Out:
        def write(self, view: memoryview) -> int:
            writes.append(len(view))
            return os.write(w, view)

    writer = _Writer(Out())
    msgs = [p.Chunk(id="a", text="hi", tokens=1), p.Chunk(id="b", text="yo", tokens=2), p.Pong(seq=3)]
    writer.send_many(msgs)
    writer.send(p.Pong(seq=4))
    os.close(w)
    try:
        got = []
        while (body := read_frame(r)) is not None:
            got.append(p.decode_from_worker(body))
        assert got == [*msgs, p.Pong(seq=4)]
        assert len(writes) == 2
    finally:
        os.close(r)


# ---------------------------------------------------------------------------------------------
# Slots


def test_runs_and_common_prefix() -> None:
    assert [_runs(s) for s in ([], [3], [0, 1, 2], [2, 0, 1], [0, 2], [0, 1, 2, 5], [1, 3, 5])] == [0, 1, 1, 1, 2, 2, 3]
    assert _common_prefix([], [1, 2]) == 0
    assert _common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert _common_prefix([1, 2, 3, 4], [1, 2]) == 2
    assert _common_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert _common_prefix([9], [1]) == 0


def _slots(n: int, cached: dict[int, list[int]] | None = None) -> list[_Slot]:
    return [_Slot(seq=i, cached=list((cached or {}).get(i, []))) for i in range(n)]


def test_choose_slot_takes_the_longest_shared_prefix_first() -> None:
    slots = _slots(4, {1: [1, 2, 9], 2: [1, 2, 3, 4, 5], 3: [1, 2, 3]})
    slot, n = choose_slot(slots, [], [1, 2, 3, 4, 7, 8])
    assert (slot.seq, n) == (2, 4)


def test_choose_slot_always_leaves_the_last_prompt_token_to_evaluate() -> None:
    slots = _slots(2, {1: [5, 6, 7, 8]})
    slot, n = choose_slot(slots, [], [5, 6, 7])  # all cached: the last one is evaluated again
    assert (slot.seq, n) == (1, 2)
    slot, n = choose_slot(slots, [], [5, 6, 7, 8])
    assert (slot.seq, n) == (1, 3)


def test_choose_slot_among_equals_drops_the_fewest_cached_tokens_of_another_conversation() -> None:
    """An unrelated prompt took slot 0, the one holding a conversation, while 1-3 were empty: the
    conversation's next turn then evaluated everything again (its 30 tokens, under the host
    cache's 32, were not even saved)."""
    slots = _slots(4, {0: list(range(100, 130)), 2: [7, 8, 9]})
    assert choose_slot(slots, [], [1, 2, 3]) == (slots[1], 0)
    # Nothing empty: the slot with the least to lose.
    for s in slots:
        s.cached = s.cached or [50, 51, 52, 53, 54]
    assert choose_slot(slots, [], [1, 2, 3]) == (slots[2], 0)
    # A shared prefix still comes first, and what a slot keeps does not count as lost.
    slots[0].cached = [1, 2] + list(range(100, 130))
    assert choose_slot(slots, [], [1, 2, 3]) == (slots[0], 2)


def test_choose_slot_among_equals_keeps_the_running_ids_consecutive_then_takes_the_lowest() -> None:
    slots = _slots(6)
    free = [s for s in slots if s.seq not in (0, 2, 3)]
    # Slot 1 is a hole between 0 and 2-3: it leaves one run where 4 or 5 would leave two or three.
    assert choose_slot(free, [0, 2, 3], [1, 2])[0].seq == 1
    # Running 1-2: slots 0 and 3 both extend the block; the lower wins.
    free = [s for s in slots if s.seq not in (1, 2)]
    assert choose_slot(free, [1, 2], [1, 2])[0].seq == 0
    # Nothing running: the lowest.
    assert choose_slot(slots[3:], [], [1])[0].seq == 3
    # A shared prefix beats adjacency.
    slots[5].cached = [1, 2, 3]
    assert choose_slot(free, [1, 2], [1, 2, 3, 4]) == (slots[5], 3)


def _run(order: int, prompt_len: int, pos: int = 0, pending: int = -1) -> _Run:
    return _Run(job=_job(f"r{order}"), prompt=list(range(100, 100 + prompt_len)), max_tokens=16, sampler=None,
                stream=TextStream([], lambda text, n: None), order=order, reused=0, pos=pos, pending=pending)


def _with_runs(n: int, running: dict[int, _Run]) -> list[_Slot]:
    slots = _slots(n)
    for seq, run in running.items():
        slots[seq].run = run
    return slots


def test_compaction_moves_nothing_when_the_running_ids_are_consecutive() -> None:
    assert compaction_moves(_with_runs(4, {})) == []
    assert compaction_moves(_with_runs(4, {3: _run(1, 4)})) == []
    assert compaction_moves(_with_runs(4, {1: _run(1, 4), 2: _run(2, 4)})) == []


def test_compaction_moves_the_outliers_into_the_holes_of_the_fullest_window() -> None:
    slots = _with_runs(4, {0: _run(1, 4), 2: _run(2, 4)})
    assert [(a.seq, b.seq) for a, b in compaction_moves(slots)] == [(2, 1)]
    slots = _with_runs(5, {0: _run(1, 4), 1: _run(2, 4), 3: _run(3, 4)})
    assert [(a.seq, b.seq) for a, b in compaction_moves(slots)] == [(3, 2)]
    slots = _with_runs(6, {1: _run(1, 4), 2: _run(2, 4), 3: _run(3, 4), 5: _run(4, 4)})
    # Every window of four holds three: the lowest one wins, so 5 goes to 0, not next door to 4.
    assert [(a.seq, b.seq) for a, b in compaction_moves(slots)] == [(5, 0)]
    slots = _with_runs(6, {0: _run(1, 4), 2: _run(2, 4), 5: _run(3, 4)})
    assert [(a.seq, b.seq) for a, b in compaction_moves(slots)] == [(5, 1)]
    assert all(s.run is not None for s in slots if s.seq in (0, 2, 5))  # nothing is moved here


def test_plan_step_gives_generating_runs_a_token_then_prompts_oldest_first() -> None:
    gen, young, old = _run(1, 3, pos=3, pending=7), _run(3, 10), _run(2, 6, pos=2)
    slots = _with_runs(4, {0: gen, 1: young, 2: old})
    plan = plan_step(slots, n_batch=8, one_prompt_per_step=False)
    assert [s.seq for s in plan] == [0, 1, 2]
    assert (gen.chunk, old.chunk, young.chunk) == (0, 4, 3)  # 1 + 4 + 3 = 8

    plan = plan_step(slots, n_batch=8, one_prompt_per_step=True)
    assert [s.seq for s in plan] == [0, 2]
    assert (gen.chunk, old.chunk) == (0, 4)


def test_plan_step_shortest_first_takes_the_prompt_with_the_fewest_tokens_left() -> None:
    cold, turn, gen = _run(1, 2000, pos=512), _run(2, 50), _run(0, 3, pos=3, pending=7)
    slots = _with_runs(3, {0: cold, 1: turn, 2: gen})
    plan = plan_step(slots, n_batch=512, one_prompt_per_step=True, shortest_first=True)
    assert [s.seq for s in plan] == [1, 2] and turn.chunk == 50 and cold.passed == 1
    # Oldest first (the default order) would have given the whole step to the cold prompt.
    plan = plan_step(slots, n_batch=512, one_prompt_per_step=True)
    assert [s.seq for s in plan] == [0, 2] and cold.chunk == 511


def test_plan_step_shortest_first_never_starves_a_long_prompt() -> None:
    from optimanode.worker.slots import PASS_LIMIT

    long_run = _run(1, 4000)
    slots = _with_runs(2, {0: long_run})
    order = 2
    for step in range(PASS_LIMIT + 1):
        short = _run(order := order + 1, 20)  # a new short prompt every step
        slots[1].run = short
        plan = plan_step(slots, n_batch=256, one_prompt_per_step=True, shortest_first=True)
        if step < PASS_LIMIT:
            assert [s.seq for s in plan] == [1] and long_run.passed == step + 1
        else:
            assert [s.seq for s in plan] == [0] and long_run.chunk == 256  # its turn, at last
    # A younger prompt that waits behind an older one is not "passed over".
    a, b = _run(1, 30), _run(2, 40)
    plan_step(_with_runs(2, {0: a, 1: b}), n_batch=64, one_prompt_per_step=True, shortest_first=True)
    assert (a.passed, b.passed) == (0, 0)


def test_plan_step_within_a_small_batch() -> None:
    a, b, c = _run(1, 3, pos=3, pending=7), _run(2, 3, pos=3, pending=8), _run(3, 5)
    slots = _with_runs(3, {0: a, 1: b, 2: c})
    assert [s.seq for s in plan_step(slots, n_batch=1, one_prompt_per_step=False)] == [0]
    assert [s.seq for s in plan_step(slots, n_batch=2, one_prompt_per_step=False)] == [0, 1]
    plan = plan_step(slots, n_batch=4, one_prompt_per_step=False)
    assert [s.seq for s in plan] == [0, 1, 2] and c.chunk == 2
    assert plan_step(_slots(3), n_batch=4, one_prompt_per_step=False) == []


# ---------------------------------------------------------------------------------------------
# The black box and the fault injection


def test_the_black_box_records_read_back_as_the_supervisor_reads_them(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"\0" * p.BLACKBOX_SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        monkeypatch.setenv("OPTIMANODE_WORKER_BLACKBOX_FD", str(fd))
        box = _BlackBox()
        box.open_from_env()
        box.enter("prompt evaluation", 31, 2, iter(["req-1", "req-2"]))
        assert read_blackbox(fd) == dict(in_decode=True, phase="prompt evaluation", batch_tokens=31,
                                         batch_seqs=2, requests=("req-1", "req-2"))
        box.leave()
        assert read_blackbox(fd)["in_decode"] is False
        box.enter("loading", 0, 0, ())
        assert read_blackbox(fd) == dict(in_decode=True, phase="loading", batch_tokens=None, batch_seqs=None,
                                         requests=())
        # A record longer than the page is cut, and still ends with its NUL.
        box.enter("generation", 1, 1, ["x" * p.BLACKBOX_SIZE])
        raw = os.pread(fd, p.BLACKBOX_SIZE, 0)
        assert raw.endswith(b"\0") and raw.startswith(b"D\tgeneration\t1\t1\txxx")
        box._map.close()
    finally:
        os.close(fd)


def test_the_black_box_without_a_descriptor_records_nothing(monkeypatch: Any) -> None:
    monkeypatch.delenv("OPTIMANODE_WORKER_BLACKBOX_FD", raising=False)
    box = _BlackBox()
    box.open_from_env()
    box.enter("generation", 1, 1, ["r"])  # no map: nothing to write, no error
    box.leave()
    monkeypatch.setenv("OPTIMANODE_WORKER_BLACKBOX_FD", "not-a-number")
    box.open_from_env()
    assert box._map is None


def test_fault_injection_is_off_unless_asked_and_spares_safe_mode(monkeypatch: Any) -> None:
    # The two ways it dies, recorded instead of done (the real signals are tests/system/test_every_cpu.py's).
    fired: list[object] = []
    monkeypatch.setattr(blackbox.ctypes, "string_at", lambda addr: fired.append(("read", addr)))
    monkeypatch.setattr(blackbox.os, "kill", lambda pid, sig: fired.append(sig))

    def fires(fault: str | None, safe_mode: bool) -> list[object]:
        if fault is None:
            monkeypatch.delenv("OPTIMANODE_TEST_FAULT", raising=False)
        else:
            monkeypatch.setenv("OPTIMANODE_TEST_FAULT", fault)
        fired.clear()
        _fault_injection(safe_mode)
        return list(fired)

    assert fires(None, False) == []
    assert fires("something-else", False) == []
    assert fires("warmup-segv", False) == [("read", 0)]
    assert fires("warmup-segv", True) == []  # safe mode avoids it, as it avoids the AMX fault
    assert fires("warmup-sigill", False) == [signal.SIGILL]
    assert fires("warmup-sigbus-always", True) == [signal.SIGBUS]
