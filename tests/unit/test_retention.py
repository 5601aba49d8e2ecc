"""Retention: request events folded into hourly aggregates that equal the sums of what was deleted, old state events deleted behind a checkpoint with the last crashes kept, the byte cap, incremental vacuum, and requests a dead node left open closed at the next start."""

import asyncio
import random
import sqlite3
import threading
import time

import pytest

from optimanode.config import JournalSettings, Settings
from optimanode.journal import Journal
from optimanode.node import Node
from optimanode.protocol import (
    OUTCOME_NODE_DIED,
    ModelInfo,
    Registered,
    RequestFinished,
    RequestStarted,
    Transition,
)
from optimanode.request_hours import HourFold, bucket, bucket_value, percentile, read_hours
from optimanode.retention import (
    DAY_S,
    FOLD_RATE_MIN,
    FOLD_ROWS,
    SPREAD,
    Pacer,
    PassReport,
    Retention,
)

INFO = ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=10, mtime_ns=5, architecture="llama")
OUTCOMES = ["stop", "length", "cancelled", "worker_crashed", "deadline_exceeded"]


async def requests(j: Journal, rng: random.Random, n: int, streams=("a", "b")) -> None:
    for i in range(n):
        s = rng.choice(streams)
        fin = RequestFinished(request_id=f"r{i}", outcome=rng.choice(OUTCOMES),
                              prompt_tokens=rng.randint(1, 500), completion_tokens=rng.randint(0, 300),
                              ttft_s=rng.choice([None, rng.uniform(0.0, 3.0)]),
                              total_s=rng.choice([None, rng.uniform(0.05, 60.0)]))
        await j.append_many([(s, RequestStarted(request_id=f"r{i}", kind="chat")), (s, fin)])


def request_rows(path):
    db = sqlite3.connect(path)
    rows = db.execute("SELECT seq, ts, stream, type, data FROM events"
                      " WHERE type IN ('request_started', 'request_finished')").fetchall()
    db.close()
    return rows


def expected_hours(rows) -> dict:
    """The aggregates computed directly from the events, independently of the fold's code path."""
    import json

    out: dict = {}
    for seq, ts, stream, type_, data in rows:
        d = json.loads(data)
        key = (stream, int(ts // 3600) * 3600)
        e = out.setdefault(key, {"started": 0, "requests": 0, "outcomes": {}, "prompt": 0, "completion": 0,
                                 "ttft": [], "total": [], "seqs": []})
        e["seqs"].append(seq)
        if type_ == "request_started":
            e["started"] += 1
            continue
        e["requests"] += 1
        e["outcomes"][d["outcome"]] = e["outcomes"].get(d["outcome"], 0) + 1
        e["prompt"] += d["prompt_tokens"]
        e["completion"] += d["completion_tokens"]
        if d["ttft_s"] is not None:
            e["ttft"].append(d["ttft_s"])
        if d["total_s"] is not None:
            e["total"].append(d["total_s"])
    return out


def hist(values) -> dict:
    h: dict = {}
    for v in values:
        h[str(bucket(v))] = h.get(str(bucket(v)), 0) + 1
    return h


def assert_hours_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, e in want.items():
        h = got[key]
        assert (h.started, h.requests, h.outcomes, h.prompt_tokens, h.completion_tokens) == (
            e["started"], e["requests"], e["outcomes"], e["prompt"], e["completion"])
        assert (h.ttft_count, h.total_count) == (len(e["ttft"]), len(e["total"]))
        assert abs(h.ttft_sum_s - sum(e["ttft"])) < 1e-6 and abs(h.total_sum_s - sum(e["total"])) < 1e-6
        assert h.ttft_hist == hist(e["ttft"]) and h.total_hist == hist(e["total"])
        assert (h.first_seq, h.last_seq) == (min(e["seqs"]), max(e["seqs"]))


def hours_of(path) -> dict:
    db = sqlite3.connect(path)
    try:
        return {(h.stream, h.hour): h for h in read_hours(db)}
    finally:
        db.close()


async def test_the_aggregates_equal_the_sums_of_the_request_events_and_retention_deletes_only_what_they_count(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await j.append("a", Registered(info=INFO))
    await requests(j, random.Random(1), 1300)  # several delete transactions (FOLD_ROWS each)
    await j.checkpoint()
    await j.append_many([("a", RequestStarted(request_id="after", kind="chat"))])  # after the checkpoint: kept
    every = request_rows(path)
    want = expected_hours(every)
    later = time.time() + 8 * DAY_S  # everything is older than the 7-day retention
    # (No new checkpoint in this pass: the request after the one above stays.)
    ret = await Retention.open(j, JournalSettings(checkpoint_interval_s=1e12, checkpoint_events=10**9),
                               clock=lambda: later)
    report = await ret.pass_once()  # the journal writes the hours it holds, then retention deletes
    assert report.requests_folded == len(every) - 1 == 2600
    assert len(report.holds_s) >= 2600 // FOLD_ROWS
    left = request_rows(path)
    assert [r[0] for r in left] == [j.last_seq]  # only the request after the checkpoint
    got = hours_of(path)
    assert_hours_equal(got, want)  # every event counted once, deleted or not
    # A second pass has nothing left to delete and changes nothing.
    assert (await ret.pass_once()).requests_folded == 0
    assert hours_of(path) == got
    # The projection and replays are untouched by deleting request events.
    assert await j.replay() == await j.replay(full=True) == j.views()
    await ret.close()
    await j.close()
    assert hours_of(path) == got  # closing writes nothing twice


async def test_hours_are_written_with_a_group_commit_every_flush_interval_with_the_mark(tmp_path, monkeypatch):
    import optimanode.journal as journal_module

    path = tmp_path / "j.sqlite3"
    monkeypatch.setattr(journal_module, "FLUSH_S", 1e9)
    j = await Journal.open(path)
    await requests(j, random.Random(7), 20)
    assert hours_of(path) == {}  # held in memory: the interval has not passed
    monkeypatch.setattr(journal_module, "FLUSH_S", 0.0)
    await requests(j, random.Random(8), 20)  # each commit writes what the commits before it held
    db = sqlite3.connect(path)
    (through,) = db.execute("SELECT value FROM journal_meta WHERE key = 'hours_through_seq'").fetchone()
    db.close()
    rows = request_rows(path)
    assert int(through) == j.last_seq - 2  # the last commit's two events are still held
    assert_hours_equal(hours_of(path), expected_hours([r for r in rows if r[0] <= int(through)]))
    await j.close()
    assert_hours_equal(hours_of(path), expected_hours(rows))


async def test_hours_a_killed_node_never_wrote_are_summed_again_at_the_next_open(tmp_path, monkeypatch):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(9), 30)
    await j.close()  # written at close
    j = await Journal.open(path)
    await requests(j, random.Random(10), 40, streams=("a", "c"))

    async def killed() -> None:  # a kill: what the run held in memory is never written
        return None

    monkeypatch.setattr(j, "write_hours", killed)
    await j.close()
    rows = request_rows(path)
    assert sum(h.started for h in hours_of(path).values()) == 30
    j = await Journal.open(path)  # sums the 80 events after the mark with SQLite's own GROUP BY
    assert sum(h.started for h in hours_of(path).values()) == 30  # an open writes nothing
    await j.write_hours()  # as retention's next pass (or the run's first flush) writes them
    await j.close()
    assert_hours_equal(hours_of(path), expected_hours(rows))


async def test_request_events_from_before_hours_at_append_time_are_folded_as_they_are_deleted(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(11), 300)
    await j.close()
    # As migration 0005 leaves a journal of an older node: its request events so far outside the
    # table, the journal's hours starting after them.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM request_hours")
    (last,) = db.execute("SELECT max(seq) FROM events").fetchone()
    db.execute("UPDATE journal_meta SET value = ? WHERE key = 'hours_from_seq'", (str(last + 1),))
    db.execute("UPDATE journal_meta SET value = ? WHERE key = 'hours_through_seq'", (str(last),))
    db.close()
    j = await Journal.open(path)
    await requests(j, random.Random(12), 300)
    await j.checkpoint()
    rows = request_rows(path)
    later = time.time() + 8 * DAY_S
    ret = await Retention.open(j, JournalSettings(checkpoint_interval_s=1e12), clock=lambda: later)
    report = await ret.pass_once()
    assert report.requests_folded == len(rows) == 1200 and request_rows(path) == []
    assert_hours_equal(hours_of(path), expected_hours(rows))  # the older half folded, the newer half counted
    await ret.close()
    await j.close()


async def test_request_events_younger_than_the_retention_are_kept(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(2), 50)
    await j.checkpoint()
    ret = await Retention.open(j, JournalSettings())
    report = await ret.pass_once()
    assert report.requests_folded == 0 and len(request_rows(path)) == 100
    await ret.close()
    await j.close()


def test_percentiles_from_a_histogram_are_within_the_bucket_error():
    rng = random.Random(5)
    values = sorted(rng.lognormvariate(-1, 1) for _ in range(5000))
    h = HourFold(stream="a", hour=0, ttft_hist=hist(values))
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert abs(percentile(h.ttft_hist, q) - exact) / exact < 0.05
    assert percentile({}, 0.5) is None
    assert bucket_value(bucket(0.0)) < 1e-3  # a zero TTFT lands in the smallest bucket


async def test_old_state_events_are_deleted_behind_a_checkpoint_but_the_last_crashes_survive(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await j.append("a", Registered(info=INFO))
    await j.append("b", Registered(info=INFO))
    for i in range(8):
        await j.append("a", Transition(trigger="crash", src="running", dst="crashed", reason=f"crash {i}",
                                       exit_code=1, stderr_tail=[f"a died {i}", "second line"]))
        await j.append("a", Transition(trigger="restart", src="crashed", dst="restarting"))
        await j.append("a", Transition(trigger="ready", src="restarting", dst="running"))
    await j.append("b", Transition(trigger="crash", src="running", dst="crashed", reason="b crash",
                                   stderr_tail=["b died"]))
    views = j.views()
    cp = await j.checkpoint()
    await j.append("a", Transition(trigger="crash", src="running", dst="crashed", reason="after the checkpoint"))
    later = time.time() + 91 * DAY_S
    ret = await Retention.open(j, JournalSettings(crashes_kept=3, checkpoint_interval_s=1e12), clock=lambda: later)
    report = await ret.pass_once()
    db = sqlite3.connect(path)
    rows = db.execute("SELECT seq, stream, type, json_extract(data, '$.reason'), data FROM events ORDER BY seq").fetchall()
    before = [r for r in rows if r[0] < cp.seq]
    # Below the checkpoint only a's last crashes (3 with the one after the checkpoint) and b's
    # one remain, with their stderr tails.
    assert [(r[1], r[3]) for r in before] == [("a", "crash 6"), ("a", "crash 7"), ("b", "b crash")]
    assert all('"stderr_tail":["' in r[4] and "died" in r[4] for r in before)
    assert report.events_deleted == 2 + 8 * 3 + 1 - 3
    assert db.execute("SELECT value FROM journal_meta WHERE key = 'base_seq'").fetchone() == (str(cp.seq),)
    # The full replay now starts from that checkpoint, and still equals the projection.
    assert await j.replay(full=True) == await j.replay() == j.views()
    assert j.views()["b"] == views["b"]
    await ret.close()
    await j.close()
    # The runtime's notes survive too: the reopened journal reads them from the checkpoint.
    j = await Journal.open(path)
    assert j.notes()["b"].reasons["crashed"] == "b crash"
    await j.close()


async def test_the_cap_makes_retention_fold_early_and_says_the_journal_is_near_it(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(3), 2500)  # about 1.5 MiB of young request events
    cap = 1 << 20
    settings = JournalSettings(max_bytes=cap)
    ret = await Retention.open(j, settings)
    assert ret.report().near_cap  # over 90 % before the pass
    report = await ret.pass_once()
    assert report.early and report.checkpoint and report.requests_folded > 0
    assert report.pages_vacuumed > 0
    assert report.bytes_after < report.bytes_before
    db = sqlite3.connect(path)
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    assert pages * size <= 0.8 * cap + 64 * size
    assert sum(h.requests for h in read_hours(db)) == 2500  # every request counted, deleted or not
    assert ret.report().near_cap  # it had to act early
    await ret.close()
    await j.close()


async def test_checkpoints_are_thinned_to_one_a_day(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await j.append("a", Registered(info=INFO))
    for i in range(6):
        await j.append("a", RequestStarted(request_id=f"r{i}", kind="chat"))
        await j.checkpoint()
    ret = await Retention.open(j, JournalSettings())
    report = await ret.pass_once()
    db = sqlite3.connect(path)
    kept = [r[0] for r in db.execute("SELECT seq FROM events WHERE type = 'checkpoint' ORDER BY seq")]
    assert len(kept) == 2 and kept[-1] == j.checkpoint_seq  # the day's first and the newest
    assert report.checkpoints_deleted == 4
    assert await j.replay(full=True) == await j.replay() == j.views()
    await ret.close()
    await j.close()


async def test_a_start_closes_the_requests_the_previous_run_left_open(tmp_path):
    settings = Settings(models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"))
    j = await Journal.open(settings.journal_path)
    await j.append_many([("a", RequestStarted(request_id="cut-1", kind="chat")),
                         ("a", RequestStarted(request_id="done", kind="chat")),
                         ("b", RequestStarted(request_id="cut-2", kind="completion"))])
    await j.append("a", RequestFinished(request_id="done", outcome="stop"))
    await j.close()  # as a killed node leaves it: two requests never finished
    async with Node(settings) as node:
        finished = [e for e in await node.journal.read(types=["request_finished"])]
        assert [(e.stream, e.body.request_id, e.body.outcome) for e in finished] == [
            ("a", "done", "stop"), ("a", "cut-1", OUTCOME_NODE_DIED), ("b", "cut-2", OUTCOME_NODE_DIED)]
        assert node.journal.open_requests() == []
        assert node.journal_report() is not None
    async with Node(settings) as node:  # and only once
        assert len(await node.journal.read(types=["request_finished"])) == 3


def test_metrics_and_doctor_say_when_the_journal_is_near_its_cap(tmp_path):
    from optimanode.doctor import check_state
    from optimanode.metrics import Sampler
    from optimanode.protocol import JournalReport

    report = JournalReport(bytes=950_000, cap_bytes=1 << 20, near_cap=True)
    sampler = Sampler(lambda: [], journal=lambda: report)
    try:
        assert sampler.sample().journal == report
    finally:
        sampler.close()
    state = tmp_path / "state"
    state.mkdir()
    settings = Settings(state_dir=str(state), journal=JournalSettings(max_bytes=1 << 20))
    (state / "journal.sqlite3").write_bytes(b"\0" * 500_000)
    assert check_state(settings).status == "ok"
    (state / "journal.sqlite3-wal").write_bytes(b"\0" * 500_000)  # the WAL counts too
    check = check_state(settings)
    assert check.status == "warn" and "near the cap" in check.detail and "journal.max_bytes" in check.fix


async def test_an_append_interrupts_a_retention_step_which_rolls_back_and_goes_after_it(tmp_path):
    """A step holding the write lock is interrupted by an append that waits for it: the step rolls
    back (nothing of it stays) and the append is committed; without the interrupt this step would
    run for minutes (the test's timeout)."""
    from optimanode.retention import YIELDED, PassReport

    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    ret = await Retention.open(j, JournalSettings())
    started = threading.Event()

    def slow_step(db, yielding=None):
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO journal_meta (key, value) VALUES ('probe', '1')")
            started.set()
            db.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000000)"
                       " SELECT count(*) FROM c").fetchone()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    report = PassReport()
    step = asyncio.create_task(ret._locked(report, slow_step))
    for _ in range(1000):  # bounded: the step starts within milliseconds
        if started.is_set():
            break
        await asyncio.sleep(0.005)
    assert started.is_set() and j.write_lock.locked()
    event = await j.append("a", RequestStarted(request_id="r", kind="chat"))
    assert await step is YIELDED and report.yields == 1
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM journal_meta WHERE key = 'probe'").fetchone() is None
    assert db.execute("SELECT seq FROM events WHERE type = 'request_started'").fetchall() == [(event.seq,)]
    db.close()
    await ret.close()
    await j.close()


async def test_folds_that_yield_to_appends_still_equal_the_sums_of_what_was_deleted(tmp_path):
    """A pass with appends coming all along (steps interrupted, retried smaller): the same aggregates."""
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(3), 1500)
    await j.checkpoint()
    rows = [r for r in request_rows(path) if r[0] < j.checkpoint_seq]
    want = expected_hours(rows)
    later = time.time() + 8 * DAY_S
    ret = await Retention.open(j, JournalSettings(checkpoint_interval_s=1e12, checkpoint_events=10**9),
                               clock=lambda: later)
    done = asyncio.Event()

    async def appender(k: int) -> None:
        for i in range(100_000):  # bounded; stops when the pass ends
            if done.is_set():
                return
            await j.append("c", RequestStarted(request_id=f"live-{k}-{i}", kind="chat"))

    ret.pacer = Pacer(busy_share=0.5)  # the yields are what this tests, not the duty cycle: a shorter pass
    tasks = [asyncio.create_task(appender(k)) for k in range(3)]
    report = await ret.pass_once()
    done.set()
    await asyncio.gather(*tasks)
    assert report.requests_folded == len(rows) == 3000
    db = sqlite3.connect(path)
    got = {(h.stream, h.hour): h for h in read_hours(db) if h.stream != "c"}  # c: the live appends
    db.close()
    assert got.keys() == want.keys()
    for key, e in want.items():
        h = got[key]
        assert (h.started, h.requests, h.outcomes, h.prompt_tokens, h.completion_tokens) == (
            e["started"], e["requests"], e["outcomes"], e["prompt"], e["completion"])
        assert h.ttft_hist == hist(e["ttft"]) and h.total_hist == hist(e["total"])
    await ret.close()
    await j.close()


def test_a_step_is_sized_by_the_time_the_last_one_held_the_lock():
    """next_size: the rows that would take the target at the last step's rate, growing by a quarter
    at most, within the bounds (a slow step shrinks the next at once; a fast one grows it slowly)."""
    from optimanode.retention import next_size

    assert next_size(1000, 0.020, target_s=0.004, lo=32, hi=1000) == 200  # 5x too slow: a fifth
    assert next_size(200, 0.001, target_s=0.004, lo=32, hi=1000) == 251  # fast: +25 % + 1, not 4x
    assert next_size(900, 0.001, target_s=0.004, lo=32, hi=1000) == 1000  # never above hi
    assert next_size(64, 1.5, target_s=0.004, lo=32, hi=1000) == 32  # a 1.5 s step: the floor
    assert next_size(100, 0.0, target_s=0.004, lo=32, hi=1000) == 126  # no time measured: grow
    assert next_size(100, 0.004, target_s=0.004, lo=32, hi=1000) == 100  # on target: stays
    # A run of steps at a constant cost per row settles where a step takes the target.
    size = 1000
    for _ in range(50):
        size = next_size(size, size * 20e-6, target_s=0.004, lo=32, hi=1000)
    assert size == 200


def test_the_pacer_keeps_retention_to_its_share_of_the_time_while_appends_come():
    """Pacer: after work_s of work the pause makes work / (work + pause) the share: BUSY_SHARE while
    an append came within idle_s, IDLE_SHARE after."""
    from optimanode.retention import BUSY_SHARE, IDLE_S, IDLE_SHARE

    p = Pacer()
    assert (p.busy_share, p.idle_share, p.idle_s) == (BUSY_SHARE, IDLE_SHARE, IDLE_S)
    busy = p.pause_s(0.004, since_append_s=0.01)
    assert abs(0.004 / (0.004 + busy) - BUSY_SHARE) < 1e-12
    quiet = p.pause_s(0.004, since_append_s=IDLE_S + 0.5)
    assert abs(0.004 / (0.004 + quiet) - IDLE_SHARE) < 1e-12
    assert busy > 10 * quiet
    assert p.busy(IDLE_S - 1e-3) and not p.busy(IDLE_S)
    assert p.pause_s(-1.0, since_append_s=0.0) == 0.0  # a clock step backwards never sleeps negative
    assert Pacer(busy_share=1.0).pause_s(0.5, since_append_s=0.0) == 0.0  # share 1: no pause


def test_the_pacer_keeps_a_fold_to_its_rate_while_appends_come_and_never_above_its_share():
    """With a rate (events/s), a step that folded n events in work_s is followed by a pause that
    makes n / (work + pause) that rate, or the duty cycle's pause where that is longer; a quiet node
    ignores the rate (a catch-up at nearly full speed)."""
    from optimanode.retention import BUSY_SHARE, IDLE_S

    p = Pacer()
    # 100 events in 4 ms at 200 events/s: 0.5 s of work and pause, far longer than the share's 76 ms.
    paced = p.pause_s(0.004, since_append_s=0.01, events=100, rate=200.0)
    assert abs(100 / (0.004 + paced) - 200.0) < 1e-9
    # At 100,000 events/s the rate asks less than the duty cycle: the share bounds it.
    fast = p.pause_s(0.004, since_append_s=0.01, events=100, rate=100_000.0)
    assert abs(0.004 / (0.004 + fast) - BUSY_SHARE) < 1e-12
    # Quiet node: the idle share alone, whatever the rate.
    assert p.pause_s(0.004, since_append_s=IDLE_S + 1, events=100, rate=200.0) == p.pause_s(
        0.004, since_append_s=IDLE_S + 1)
    # No events (a vacuum or a delete step) or no rate: the duty cycle alone.
    assert p.pause_s(0.004, since_append_s=0.01, events=0, rate=200.0) == p.pause_s(0.004, since_append_s=0.01)
    assert p.pause_s(0.004, since_append_s=0.01, events=100, rate=0.0) == p.pause_s(0.004, since_append_s=0.01)


async def test_a_pass_while_appends_come_keeps_to_the_busy_share(tmp_path):
    """The pass asks the pacer after every step with how long it worked and how long ago the last
    append committed; with an append just before every step the pauses are the busy ones (a fake
    sleep records them: nothing timed here)."""
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(4), 400)
    await j.checkpoint()
    later = time.time() + 8 * DAY_S
    ret = await Retention.open(j, JournalSettings(checkpoint_interval_s=1e12, checkpoint_events=10**9),
                               clock=lambda: later)
    asked: list[tuple[float, float, float]] = []

    class Recording(Pacer):
        def pause_s(self, work_s: float, since_append_s: float, *, events: int = 0, rate: float = 0.0) -> float:
            pause = super().pause_s(work_s, since_append_s, events=events, rate=rate)
            asked.append((work_s, since_append_s, pause, events, rate))
            return 0.0  # no real sleep: the test checks what was asked

    ret.pacer = Recording()
    j.last_append = time.monotonic() + 3600  # "an append just now", before every step of this pass
    report = await ret.pass_once()
    assert report.requests_folded == 800
    assert len(asked) == len(report.holds_s) >= 1
    # The fold steps were paced by the backlog: 800 events to fold, in SPREAD of the 60 s interval,
    # is under FOLD_RATE_MIN, so that rate; every other step had the duty cycle alone.
    folds = [a for a in asked if a[3]]
    assert sum(a[3] for a in folds) == 800
    for work_s, since, pause, events, rate in asked:
        assert since < 0 and work_s > 0
        duty = work_s * (1 - ret.pacer.busy_share) / ret.pacer.busy_share
        if events:
            assert rate == FOLD_RATE_MIN and 800 / (60 * SPREAD) < FOLD_RATE_MIN
            assert abs(pause - max(duty, events / rate - work_s)) < 1e-9
        else:
            assert abs(pause - duty) < 1e-9
    assert ret._rate == 0.0  # only while the fold runs
    await ret.close()
    await j.close()


async def test_a_fold_step_deletes_in_one_transaction_that_an_append_can_stop(tmp_path):
    """fold_step: told to yield (as an append waiting for the lock tells it) it rolls back whole:
    every event and every aggregate as they were. Let run, it deletes a range the hours already
    count; on events from before hours at append time it sums them into their hours and deletes
    exactly those, one transaction."""
    from optimanode.retention import Yielded, fold_step

    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(6), 40)
    await j.checkpoint()
    before = request_rows(path)
    await j.close()  # the hours are written at close
    db = sqlite3.connect(path, isolation_level=None)
    hours = read_hours(db)
    assert sum(h.started + h.requests for h in hours) == 80

    def stopped() -> None:
        stop = threading.Event()
        stop.set()
        try:
            fold_step(db, before_ts=time.time() + DAY_S, before_seq=10**9, limit=1000, yielding=stop)
        except Yielded:
            pass
        else:  # pragma: no cover - the assertion below says what went wrong
            raise AssertionError("fold_step went on although told to yield")

    stopped()
    assert not db.in_transaction and request_rows(path) == before and read_hours(db) == hours
    folded = fold_step(db, before_ts=time.time() + DAY_S, before_seq=10**9, limit=30)
    assert folded.rows == 30 and len(request_rows(path)) == len(before) - 30
    assert read_hours(db) == hours  # counted already: only deleted
    # The same on a journal from before hours at append time (as migration 0005 leaves one).
    db.execute("DELETE FROM request_hours")
    db.execute("UPDATE journal_meta SET value = '1000000' WHERE key = 'hours_from_seq'")
    left = request_rows(path)
    stopped()
    assert not db.in_transaction and request_rows(path) == left and read_hours(db) == []
    folded = fold_step(db, before_ts=time.time() + DAY_S, before_seq=10**9, limit=30)
    assert folded.rows == 30 and len(request_rows(path)) == len(left) - 30
    assert sum(h.started + h.requests for h in read_hours(db)) == 30
    db.close()


async def test_a_state_step_deletes_a_chunk_and_marks_the_scan_done_at_its_end(tmp_path):
    from optimanode.retention import state_step

    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await j.append("a", Registered(info=INFO))
    for i in range(10):
        await j.append("a", Transition(trigger="start", src="enabled", dst="starting", reason=f"t{i}"))
    cp = await j.checkpoint()
    await j.close()
    db = sqlite3.connect(path, isolation_level=None)
    seqs, end = state_step(db, after_seq=0, below_seq=cp.seq, keep={2}, limit=4)
    assert len(seqs) == 4 and 2 not in seqs and end == seqs[-1] < cp.seq
    assert db.execute("SELECT value FROM journal_meta WHERE key = 'cleaned_seq'").fetchone() is None
    seqs, end = state_step(db, after_seq=end, below_seq=cp.seq, keep={2}, limit=100)
    assert end == cp.seq
    assert db.execute("SELECT value FROM journal_meta WHERE key = 'cleaned_seq'").fetchone() == (str(cp.seq),)
    left = [r[0] for r in db.execute("SELECT seq FROM events WHERE seq < ? ORDER BY seq", (cp.seq,))]
    assert left == [2]
    db.close()


async def test_a_pass_keeps_some_free_pages_for_the_appends_and_returns_the_rest(tmp_path):
    """Away from the cap a pass leaves FREE_KEEP_SHARE of max_bytes (at most FREE_KEEP_BYTES) on
    the free list, where the next appends take their pages from, and returns the rest; the cap test
    above shows that a pass near the cap keeps none. The backlog it paced itself by is the 2 x 2500
    request events it then folded."""
    from optimanode.retention import FREE_KEEP_SHARE, backlog_events

    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await requests(j, random.Random(8), 2500)
    await j.checkpoint()
    later = time.time() + 8 * DAY_S
    settings = JournalSettings(max_bytes=50 << 20, checkpoint_interval_s=1e12, checkpoint_events=10**9)
    ret = await Retention.open(j, settings, clock=lambda: later)
    db = sqlite3.connect(path)
    assert backlog_events(db, before_ts=later - 7 * DAY_S, before_seq=j.checkpoint_seq) == 5000
    assert backlog_events(db, before_ts=0.0, before_seq=j.checkpoint_seq) == 0  # nothing that old
    assert backlog_events(db, before_ts=later, before_seq=1) == 0  # nothing behind the checkpoint bound
    report = await ret.pass_once()
    assert report.requests_folded == 5000 and not report.early
    (page,) = db.execute("PRAGMA page_size").fetchone()
    keep = int(FREE_KEEP_SHARE * settings.max_bytes) // page
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    assert report.pages_vacuumed > 0 and free == keep
    # The appends that follow take the kept pages before they grow the file.
    (pages_before,) = db.execute("PRAGMA page_count").fetchone()
    await requests(j, random.Random(9), 300)
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    (free_after,) = db.execute("PRAGMA freelist_count").fetchone()
    (pages_after,) = db.execute("PRAGMA page_count").fetchone()
    assert free_after < free and pages_after == pages_before
    db.close()
    await ret.close()
    await j.close()


async def test_passes_start_an_interval_apart_whatever_each_one_took(tmp_path, monkeypatch):
    """Retention.run: a pass paced by its backlog takes most of the interval, so the next one starts
    an interval after the last one started, not an interval after it ended (that would double the
    backlog each pass finds, and its rate). The pass here takes 0.3 s of a 0.5 s interval: the wait
    before the next is what is left of the interval, never the whole of it."""
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    ret = await Retention.open(j, JournalSettings(retention_interval_s=0.5))
    waits: list[float] = []
    passes: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(seconds)

    async def slow_pass() -> PassReport:
        passes.append(time.monotonic())
        await real_sleep(0.3)
        if len(passes) == 3:
            raise asyncio.CancelledError
        return PassReport()

    monkeypatch.setattr("optimanode.retention.asyncio.sleep", recording_sleep)
    monkeypatch.setattr(ret, "pass_once", slow_pass)
    with pytest.raises(asyncio.CancelledError):
        await ret.run()
    assert len(passes) == 3 and len(waits) == 3
    assert waits[0] == pytest.approx(0.5, abs=0.05)  # the first: one interval after the start
    assert all(w < 0.25 for w in waits[1:])  # then what the 0.3 s pass left of the interval
    await ret.close()
    await j.close()
