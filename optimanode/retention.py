"""Retention: keeps a journal that runs for years bounded in rows, bytes and start-up time.

How it works (docs/journal.md "Retention"; settings in ``[journal]``, docs/configuration.md):

* ``Retention.run`` makes one pass every ``retention_interval_s``. A pass first writes a checkpoint
  when ``checkpoint_events`` events or ``checkpoint_interval_s`` have passed since the last one
  (``Journal.checkpoint``), then works on the rows behind the newest checkpoint only: everything
  the next start needs is in that checkpoint, so nothing it deletes is ever replayed.
* Request events older than ``request_retention_days`` are deleted. What they said is kept in
  ``request_hours``, one row per model per hour (requests, outcomes by kind, prompt and completion
  tokens, log-bucket histograms of TTFT and total time), which the journal writes as requests come
  (optimanode/request_hours.py): a pass first has the journal write the hours it holds
  (``Journal.write_hours``), then deletes only events the table already counts (up to the mark
  ``hours_through_seq``). Events a journal wrote before it kept hours that way (below
  ``hours_from_seq``, migration 0005) are folded into their hours in the transaction that deletes
  them, as before: a row is then always exactly the sum of the events it counts.
* State events older than ``state_retention_days`` are deleted behind a checkpoint of that age,
  which becomes the base (``journal_meta.base_seq``: where a full replay starts). The last
  ``crashes_kept`` crash transitions of each model stay whatever their age, stderr tails and all.
  Checkpoints between the base and the newest are thinned to the first of each UTC day.
* A cap: when the file passes 90 % of ``max_bytes`` the pass folds the oldest requests whatever
  their age (and, if that is not enough, moves the base up to the newest checkpoint) until the
  live data is under 80 %; ``near_cap`` says so in metrics and doctor.
* A step (``fold_step``) takes the request events in a range of seq from the oldest one
  (``FOLD_WHERE``, a primary-key range) and deletes them, one transaction under the write lock; for
  events from before migration 0005 SQLite first sums them per model and hour (GROUP BY, JSON read
  by SQLite: ``fold_sql``) and adds those sums to ``request_hours`` in the same transaction (the
  count must match). State deletes likewise (``state_step``).
* Every change is a short transaction on a connection of its own (``synchronous=NORMAL``: no fsync
  in the commit; ``_flush_wal`` fdatasyncs the WAL after it, outside the lock; a step lost to a
  power cut is redone, and its fold and delete are one transaction either way), on a writer thread
  while holding ``Journal.write_lock``, which every group commit takes. A step is sized by time
  (``next_size``): the rows (pages) that would hold the lock about ``STEP_TARGET_S`` at the rate of
  the last step, within ``FOLD_ROWS_MIN``..``FOLD_ROWS`` (``VACUUM_PAGES``). Steps yield to appends:
  an append that finds the lock held calls ``_interrupt`` (``Journal.on_append_waiting``), which
  stops the step's statement (sqlite3_interrupt) or the step at its next statement; it rolls back,
  the append goes first, and the step is retried at half the size (after ``FORCE_AFTER_YIELDS``
  yields in a row one step runs to its end, so retention progresses under any load).
* Paced by the backlog: a pass counts what it has to fold (``backlog_events``) and, while appends
  come, folds it at the rate that ends it in ``SPREAD`` of the interval between passes: a node in
  its steady state folds what aged since the last pass at a little more than the rate it came,
  not at the catch-up rate, so its steps seldom meet an append.
* A duty cycle (``Pacer``): while appends come (one in the last ``IDLE_S``) retention works at most
  ``BUSY_SHARE`` (5 %) of the wall time, counting its steps and everything around them (the reads,
  the WAL flush, the checkpoints); on a quiet node ``IDLE_SHARE`` (a catch-up at nearly full
  speed). Measured (docs/benchmarks.md "One-year journal", ``tools/bench-journal-year --trace``):
  what retention added to the appends' p99 was mostly in their COMMIT (the fsync) and came with the
  time retention was busy beside them, its reads most of all; the lock, which an append interrupts,
  cost little. 5 % of the time still folds two to three times the 200 request events/s that
  100 requests/s make.
* ``PRAGMA incremental_vacuum`` (auto_vacuum=INCREMENTAL, migration 0004) returns the freed pages
  to the file system in such steps, every ``VACUUM_EVERY`` delete steps (a short free list keeps
  each vacuum step cheap), but for ``FREE_KEEP_BYTES`` that the appends reuse (none near the cap),
  and a PASSIVE WAL checkpoint every ``CHECKPOINT_STEPS`` steps (or ``CHECKPOINT_EVERY_S``) copies
  the WAL back outside the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimanode.config import JournalSettings
from optimanode.errors import JournalError
from optimanode.journal import REQUEST_TYPES, WAL_SIZE_LIMIT, Journal, base_seq
from optimanode.protocol import JournalReport
from optimanode.request_hours import (
    FOLD_WHERE,
    HourFold,
    fold_sql,
    hours_marks,
    merge_hours,
)

log = logging.getLogger(__name__)

DAY_S = 86400.0
# Rows (pages) per transaction, at most and at least. Within those bounds each step is sized by
# time (``next_size``): about STEP_TARGET_S (VACUUM_TARGET_S) under the lock at the rate the last
# step went, growing by a quarter at most; a step an append interrupted is retried at half the size
# (docs/benchmarks.md "One-year journal").
FOLD_ROWS = 1000
FOLD_ROWS_MIN = 32
DELETE_ROWS = 250
VACUUM_PAGES = 64
VACUUM_PAGES_MIN = 4
STEP_TARGET_S = 0.004
VACUUM_TARGET_S = 0.004
# After this many interrupted steps in a row the next one runs to its end (an append may wait for
# one step of the smallest size): retention progresses under any load.
FORCE_AFTER_YIELDS = 8
# Pacing (``Pacer``): while appends come (one in the last IDLE_S) retention works at most
# BUSY_SHARE of the wall time (its steps, the reads around them, its WAL flushes and checkpoints),
# IDLE_SHARE while none do. The appends' p99 grew with the time retention was busy beside them
# (mostly in their COMMIT), not with the lock (docs/benchmarks.md); 5 % still folds two to three
# times the 200 request events/s that 100 requests/s make.
BUSY_SHARE = 0.05
IDLE_SHARE = 0.9
IDLE_S = 1.0
# Pacing by the backlog: while appends come, a pass folds what has aged past the retention age at
# the rate that finishes it in SPREAD of the interval between passes (a node in its steady state
# folds what aged since the last pass: at 100 requests/s, about 220 events/s for the 200 it appends,
# a small share of BUSY_SHARE), never slower than FOLD_RATE_MIN. A catch-up
# (a backlog of days) asks more than BUSY_SHARE gives: the duty cycle bounds it as before.
SPREAD = 0.9
FOLD_RATE_MIN = 50.0
# Free pages kept for the appends to reuse instead of returned to the file system: a node in its
# steady state frees about as many pages a pass as its appends fill, and returning them only for
# the appends to grow the file again is I/O beside the appends for nothing. At most FREE_KEEP_BYTES
# and FREE_KEEP_SHARE of max_bytes; none while the journal is near its cap.
FREE_KEEP_BYTES = 16 << 20
FREE_KEEP_SHARE = 0.02
# A PASSIVE WAL checkpoint after this many steps (each writes a few dozen pages): often enough that
# the WAL stays under the appends' autocheckpoint (1000 pages), seldom enough to fsync little.
CHECKPOINT_STEPS = 8
# ... or after a step CHECKPOINT_EVERY_S after the last one: a pass paced by its backlog takes a step
# or two a second, and eight steps' wait let the appends' WAL reach the 1000 frames at which their
# own commit checkpoints it, retention's pages too, inside an append's latency (tools/bench-journal-year
# --trace: 19 % of the slowest 1 % of appends beside a steady pass, none beside a held one).
CHECKPOINT_EVERY_S = 1.0
# The free pages go back to the file system after every this many delete steps, so the free list
# stays short (Retention._deleted says why).
VACUUM_EVERY = 8
# The cap: past HIGH_WATER of max_bytes a pass folds early, down to LOW_WATER.
HIGH_WATER = 0.9
LOW_WATER = 0.8
def next_size(size: int, took_s: float, *, target_s: float, lo: int, hi: int) -> int:
    """The size (rows, pages) of the next step after one of ``size`` took ``took_s`` under the lock:
    what would take ``target_s`` at that rate, growing by a quarter at most, within ``lo``..``hi``."""
    grown = size * 5 // 4 + 1
    want = grown if took_s <= 0 else int(size * target_s / took_s)
    return max(lo, min(hi, grown, want))


@dataclass
class Pacer:
    """How long retention pauses after a piece of work (pure: the caller gives the times).

    While appends come it keeps to ``busy_share`` of the wall time, on a quiet node to
    ``idle_share``: after ``work_s`` of work it pauses ``work_s * (1 - share) / share``."""

    busy_share: float = BUSY_SHARE
    idle_share: float = IDLE_SHARE
    idle_s: float = IDLE_S

    def busy(self, since_append_s: float) -> bool:
        return since_append_s < self.idle_s

    def pause_s(self, work_s: float, since_append_s: float, *, events: int = 0, rate: float = 0.0) -> float:
        """The pause after ``work_s`` of work that folded ``events``; with a ``rate`` (events/s,
        ``Retention._fold``) and appends coming, long enough that the fold keeps to that rate too."""
        busy = self.busy(since_append_s)
        share = self.busy_share if busy else self.idle_share
        pause = max(0.0, work_s) * (1.0 - share) / share
        if busy and rate > 0 and events > 0:
            pause = max(pause, events / rate - max(0.0, work_s))
        return pause


# -- the pieces a pass is made of (synchronous; each runs on a thread) ---------------------------


@dataclass
class Folded:
    """Request events read and folded, not yet written: the ``rows`` request events with seq in
    ``lo..hi`` and ts before ``before_ts`` (``FOLD_WHERE``) are deleted into ``hours``."""

    lo: int
    hi: int
    before_ts: float
    rows: int
    hours: dict[tuple[str, int], HourFold]


def oldest_request(db: sqlite3.Connection) -> int | None:
    """The seq of the oldest request event (two lookups in events_type)."""
    seqs = [db.execute("SELECT min(seq) FROM events WHERE type = ?", (t,)).fetchone()[0] for t in REQUEST_TYPES]
    return min((s for s in seqs if s is not None), default=None)


def backlog_events(db: sqlite3.Connection, *, before_ts: float, before_seq: int) -> int:
    """About how many events a fold up to both bounds has ahead of it: the seq range from the
    oldest request event to the newest event before ``before_ts`` (index lookups; state events in
    the range are counted too, an estimate for pacing only)."""
    lo = oldest_request(db)
    if lo is None:
        return 0
    row = db.execute("SELECT seq FROM events WHERE ts < ? ORDER BY ts DESC LIMIT 1",
                     (min(before_ts, 1e300),)).fetchone()
    return 0 if row is None else max(0, min(row[0], before_seq - 1) - lo + 1)


def read_fold(db: sqlite3.Connection, *, before_ts: float, before_seq: int, limit: int = FOLD_ROWS) -> Folded:
    """The oldest request events (at most ``limit``: the seq range from the oldest one, ``limit``
    long) before both bounds, folded per model per hour by SQLite itself (``fold_sql``). Only
    retention deletes rows, and appends only add seqs past ``before_seq``, so what this reads is
    still there when ``_write_fold`` deletes it. For the events a journal wrote before it kept
    ``request_hours`` at append time (below ``hours_from_seq``: ``fold_step``)."""
    lo = oldest_request(db)
    if lo is None or lo >= before_seq:
        return Folded(0, 0, before_ts, 0, {})
    hi = min(lo + limit - 1, before_seq - 1)
    rows, hours = fold_sql(db, lo, hi, before_ts)
    return Folded(lo, hi, min(before_ts, 1e300), rows, hours)


class Yielded(Exception):
    """Retention's transaction was interrupted because an append was waiting; it rolled back."""


YIELDED = object()  # what Retention._locked returns for a step that yielded


def _go_on(yielding: threading.Event | None) -> None:
    """Between statements: sqlite3_interrupt stops only a statement that is running."""
    if yielding is not None and yielding.is_set():
        raise Yielded


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back whole on any exception (Yielded included)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def fold_step(db: sqlite3.Connection, *, before_ts: float, before_seq: int, limit: int,
              yielding: threading.Event | None = None) -> Folded:
    """The oldest request events before both bounds (at most ``limit``: a seq range from the oldest
    one) deleted, as one transaction under the write lock. The journal wrote them into
    ``request_hours`` as they came (optimanode/request_hours.py), so the step only deletes, and
    only what the journal has written there (up to ``hours_through_seq``). Events from before the
    journal did that (below ``hours_from_seq``) are folded in the same transaction first
    (``read_fold``: the sums read while no append runs; an append that comes interrupts the read as
    it does the write)."""
    with _transaction(db):
        hours_from, through = hours_marks(db)
        lo = oldest_request(db)
        if lo is not None and lo < hours_from:
            folded = read_fold(db, before_ts=before_ts, before_seq=min(before_seq, hours_from), limit=limit)
            _go_on(yielding)
            if folded.rows:
                _write_fold(db, folded, yielding)
            return folded
        ts = min(before_ts, 1e300)
        if lo is None or (hi := min(lo + limit - 1, before_seq - 1, through)) < lo:
            return Folded(0, 0, ts, 0, {})
        deleted = db.execute(f"DELETE FROM events WHERE {FOLD_WHERE}", (lo, hi, ts)).rowcount
        _go_on(yielding)
        return Folded(lo, hi, ts, deleted, {})


def _write_fold(db: sqlite3.Connection, folded: Folded, yielding: threading.Event | None) -> None:
    merge_hours(db, folded.hours)
    _go_on(yielding)
    deleted = db.execute(f"DELETE FROM events WHERE {FOLD_WHERE}",
                         (folded.lo, folded.hi, folded.before_ts)).rowcount
    if deleted != folded.rows:  # pragma: no cover - only retention deletes, one pass at a time
        raise JournalError(f"journal retention: folded {folded.rows} request events but the same range"
                           f" now holds {deleted}; nothing was changed")
    _go_on(yielding)


def _delete(db: sqlite3.Connection, seqs: Sequence[int]) -> None:
    if seqs:
        db.execute(f"DELETE FROM events WHERE seq IN ({', '.join('?' * len(seqs))})", list(seqs))


def kept_crashes(db: sqlite3.Connection, per_stream: int) -> set[int]:
    """The seq of the last ``per_stream`` crash transitions of each stream."""
    kept: dict[str, list[int]] = {}
    for seq, stream in db.execute(
            "SELECT seq, stream FROM events WHERE type = 'transition'"
            " AND json_extract(data, '$.trigger') = 'crash' ORDER BY seq DESC"):
        mine = kept.setdefault(stream, [])
        if len(mine) < per_stream:
            mine.append(seq)
    return {s for seqs in kept.values() for s in seqs}


def read_state_chunk(db: sqlite3.Connection, *, after_seq: int, below_seq: int, keep: set[int],
                     limit: int = DELETE_ROWS) -> tuple[list[int], int]:
    """Up to ``limit`` non-request events between the bounds that are not kept; and where the scan ended."""
    rows = db.execute("SELECT seq, type FROM events WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                      (after_seq, below_seq, limit * 4)).fetchall()
    seqs = [s for s, t in rows if t not in REQUEST_TYPES and s not in keep][:limit]
    end = seqs[-1] if len(seqs) == limit else (rows[-1][0] if len(rows) == limit * 4 else below_seq)
    return seqs, end


def state_step(db: sqlite3.Connection, *, after_seq: int, below_seq: int, keep: set[int], limit: int,
               yielding: threading.Event | None = None) -> tuple[list[int], int]:
    """``read_state_chunk`` and its delete as one transaction under the write lock (as ``fold_step``);
    the scan that reaches ``below_seq`` also records ``cleaned_seq``."""
    with _transaction(db):
        seqs, end = read_state_chunk(db, after_seq=after_seq, below_seq=below_seq, keep=keep, limit=limit)
        _go_on(yielding)
        _delete(db, seqs)
        if end >= below_seq:
            db.execute("INSERT OR REPLACE INTO journal_meta (key, value) VALUES ('cleaned_seq', ?)", (str(below_seq),))
        _go_on(yielding)
    return seqs, end


def write_state_chunk(db: sqlite3.Connection, seqs: Sequence[int], *, cleaned: int | None,
                      yielding: threading.Event | None = None) -> None:
    with _transaction(db):
        _delete(db, seqs)
        if cleaned is not None:
            db.execute("INSERT OR REPLACE INTO journal_meta (key, value) VALUES ('cleaned_seq', ?)", (str(cleaned),))
        _go_on(yielding)


def _meta(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT value FROM journal_meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _set_meta(db: sqlite3.Connection, key: str, value: int) -> None:
    db.execute("INSERT OR REPLACE INTO journal_meta (key, value) VALUES (?, ?)", (key, str(value)))


def checkpoints(db: sqlite3.Connection) -> list[tuple[int, float]]:
    return db.execute("SELECT seq, ts FROM events WHERE type = 'checkpoint' ORDER BY seq").fetchall()


def thin_checkpoints(cps: Sequence[tuple[int, float]], base: int) -> list[int]:
    """Checkpoints to delete: all but the base, the newest and the first of each UTC day after the base."""
    if len(cps) < 3:
        return []
    newest = cps[-1][0]
    days: set[int] = set()
    drop = []
    for seq, ts in cps:
        if seq < base:
            continue  # deleted with the state events before the base
        day = int(ts // DAY_S)
        if seq in (base, newest) or day not in days:
            days.add(day)
            continue
        drop.append(seq)
    return drop


def live_bytes(db: sqlite3.Connection) -> int:
    """Bytes the journal's data takes: the file's pages less the free ones."""
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


def file_bytes(path: Path) -> int:
    """The journal's size on disk: the file and its WAL."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


# -- the task -------------------------------------------------------------------------------------


@dataclass
class PassReport:
    """What one pass did, and the longest it held the write lock."""

    checkpoint: bool = False
    requests_folded: int = 0
    events_deleted: int = 0
    checkpoints_deleted: int = 0
    pages_vacuumed: int = 0
    early: bool = False  # the cap made it fold or delete before the rows' age did
    bytes_before: int = 0
    bytes_after: int = 0
    holds_s: list[float] = field(default_factory=list)
    # Steps an append interrupted (rolled back and retried smaller).
    yields: int = 0
    # The same durations by what held the lock: fold, delete, vacuum.
    holds_by: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def max_hold_s(self) -> float:
        return max(self.holds_s, default=0.0)


class Retention:
    """``await Retention.open(journal, settings)``; ``run`` forever, or ``pass_once``; then ``close``."""

    def __init__(self, journal: Journal, settings: JournalSettings, db: sqlite3.Connection, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.settings = settings
        self._db = db
        self._clock = clock
        self.last: PassReport | None = None
        self.requests_folded = 0
        self.events_deleted = 0
        # A cancelled pass leaves its thread running; close waits for it rather than pull the
        # connection from under it.
        self._using = threading.Lock()
        self._read_s = 0.0
        # Reads (the fold's GROUP BY, the scans for what to delete) on a thread at a low CPU priority
        # (nice 10: about a tenth of a core that nice-0 work wants too, so a catch-up still moves while
        # workers decode): they hold no lock. Steps under the lock on a thread at the normal priority,
        # so an interrupted step rolls back at once.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="retention-read", initializer=_low_priority)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="retention-write")
        # Set (with sqlite3_interrupt) when an append waits for the lock a step holds.
        self._yield = threading.Event()
        self._yields_in_row = 0
        self._steps = 0
        self._fold_rows = FOLD_ROWS
        self._vacuum_pages = VACUUM_PAGES
        self._delete_rows = DELETE_ROWS
        self._deletes = 0
        self.pacer = Pacer()
        # The fold rate the pacer keeps to while appends come (events/s; 0: the duty cycle alone).
        self._rate = 0.0
        self._wal_checkpointed = time.monotonic()
        self._page_size: int | None = None
        # The pacer's pause (tools/bench-journal-year --steady-rps counts it in the time retention is
        # let run).
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        # How long the last step held the lock (its next one is sized by it: next_size).
        self._held_s = 0.0

    @classmethod
    async def open(cls, journal: Journal, settings: JournalSettings, *,
                   clock: Callable[[], float] = time.time) -> Retention:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(journal.path, isolation_level=None, check_same_thread=False)
            # NORMAL: a retention commit lost to a power cut is redone by the next pass; the fold and
            # its delete are one transaction either way.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            # 16 MiB of page cache (SQLite's default is 2 MiB): a vacuum step that moves a page
            # rewrites its parent and pointer-map pages, mostly the same ones from step to step.
            db.execute("PRAGMA cache_size=-16384")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # No checkpoint inside a retention commit (it would copy the WAL into the file while
            # holding the write lock); _locked runs a PASSIVE one every CHECKPOINT_STEPS steps
            # instead, outside the lock, so the appends' commits seldom find a full WAL to checkpoint.
            db.execute("PRAGMA wal_autocheckpoint=0")
            return db

        try:
            db = await asyncio.to_thread(connect)
        except sqlite3.Error as exc:
            raise JournalError(f"journal retention: cannot open {journal.path}: {exc}") from exc
        return cls(journal, settings, db, clock=clock)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._run, lambda db: db.close())
        self._reader.shutdown(wait=False)
        self._writer.shutdown(wait=False)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._using:
            return fn(self._db, *args, **kwargs)

    async def run(self) -> None:
        """A pass every ``retention_interval_s``, start to start (the first one interval after the
        start): a pass paced by its backlog takes most of the interval (SPREAD), and waiting a whole
        interval after it would double the backlog each pass finds, and its rate."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            start += self.settings.retention_interval_s
            await asyncio.sleep(max(0.0, start - loop.time()))
            start = max(start, loop.time())  # a pass longer than the interval: the next one at once
            try:
                report = await self.pass_once()
            except (JournalError, sqlite3.Error) as exc:
                # A full disk or a damaged row: the node keeps serving; the next pass tries again.
                log.warning("journal retention pass failed: %s", exc)
                continue
            if report.requests_folded or report.events_deleted or report.early:
                log.info("journal retention: folded %d request events, deleted %d events, returned %d pages;"
                         " %d -> %d bytes%s", report.requests_folded, report.events_deleted, report.pages_vacuumed,
                         report.bytes_before, report.bytes_after,
                         " (early: the journal is near its cap)" if report.early else "")

    def report(self) -> JournalReport:
        size = file_bytes(self.journal.path)
        cap = self.settings.max_bytes
        early = self.last is not None and self.last.early
        return JournalReport(bytes=size, cap_bytes=cap, near_cap=early or size >= HIGH_WATER * cap,
                             requests_folded=self.requests_folded, events_deleted=self.events_deleted,
                             integrity=self.journal.integrity)

    def _interrupt(self) -> None:
        """An append waits for the lock (Journal.on_append_waiting), or the node stops: the step's
        transaction ends at its next statement boundary, or SQLite interrupts the one running."""
        self._yield.set()
        self._db.interrupt()

    def _step(self, db: sqlite3.Connection, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(db, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            if self._yield.is_set():  # "interrupted": SQLite rolled the transaction back
                raise Yielded from exc
            raise

    async def _locked(self, report: PassReport, fn: Callable[..., Any], *args: Any, interruptible: bool = True,
                      **kwargs: Any) -> Any:
        """Run ``fn`` on the retention connection holding the journal's write lock, then pause.

        Interruptible (unless told otherwise, or after FORCE_AFTER_YIELDS interrupted steps in a
        row): an append that comes meanwhile interrupts it, it rolls back and this returns YIELDED
        (the caller retries, smaller). ``fn`` gets ``yielding`` to look at between statements.
        """
        force = not interruptible or self._yields_in_row >= FORCE_AFTER_YIELDS
        if interruptible:
            kwargs["yielding"] = self._yield
        result: Any = YIELDED
        async with self.journal.write_lock:
            self._yield.clear()
            if not force:
                self.journal.on_append_waiting = self._interrupt
            start = time.perf_counter()
            work = asyncio.get_running_loop().run_in_executor(
                self._writer, functools.partial(self._run, self._step, fn, *args, **kwargs))
            try:
                result = await asyncio.shield(work)
            except Yielded:
                pass
            except asyncio.CancelledError:
                # The node is stopping: the transaction is interrupted and rolls back on its thread;
                # the lock is held until then, so the writer never meets it half-way.
                self._interrupt()
                while not work.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([work])
                raise
            finally:
                self.journal.on_append_waiting = None
                held = time.perf_counter() - start
                report.holds_s.append(held)
                report.holds_by.setdefault(fn.__name__.strip("_"), []).append(held)
        if result is YIELDED:
            report.yields += 1
            self._yields_in_row += 1
        else:
            self._yields_in_row = 0
            self._steps += 1
            if self._steps % CHECKPOINT_STEPS == 0 or time.monotonic() - self._wal_checkpointed >= CHECKPOINT_EVERY_S:
                self._wal_checkpointed = time.monotonic()
                await self._read(_wal_checkpoint)
            else:
                await self._read(_flush_wal)
        # Paced (Pacer): what the step and the reading, flushing and checkpointing around it took
        # (_read adds that up), then a pause that keeps retention to its share of the time.
        self._held_s = held
        events = result.rows if isinstance(result, Folded) else 0
        await self._sleep(self.pacer.pause_s(held + self._read_s, time.monotonic() - self.journal.last_append,
                                             events=events, rate=self._rate))
        self._read_s = 0.0
        return result

    async def _read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._reader, functools.partial(self._run, fn, *args, **kwargs))
        finally:
            self._read_s += time.perf_counter() - start

    async def pass_once(self) -> PassReport:
        start = time.perf_counter()
        s, now, report = self.settings, self._clock(), PassReport()
        report.bytes_before = file_bytes(self.journal.path)
        j = self.journal
        if j.events_since_checkpoint and (j.events_since_checkpoint >= s.checkpoint_events
                                          or now - j.checkpoint_ts >= s.checkpoint_interval_s):
            await j.checkpoint()
            report.checkpoint = True
        # 1. Requests past their age. The journal writes the hours it holds first: a step deletes
        #    only what request_hours already counts.
        await j.write_hours()
        await self._fold(report, before_ts=now - s.request_retention_days * DAY_S)
        # 2. The cap: the oldest requests whatever their age, down to LOW_WATER.
        if await self._read(live_bytes) > HIGH_WATER * s.max_bytes:
            report.early = True
            if j.events_since_checkpoint:
                await j.checkpoint()
            await self._fold(report, before_ts=math.inf, until_bytes=int(LOW_WATER * s.max_bytes))
        # 3. State events past their age, behind a checkpoint of that age (or, still over the cap,
        #    behind the newest checkpoint).
        cps = await self._read(checkpoints)
        old = [c for c in cps if c[1] < now - s.state_retention_days * DAY_S]
        if report.early and cps and await self._read(live_bytes) > LOW_WATER * s.max_bytes:
            old = cps
        await self._delete_state(report, old[-1][0] if old else 0)
        base = await self._read(base_seq)
        # 4. Checkpoints: the base, the newest and one a day.
        drop = thin_checkpoints(await self._read(checkpoints), base)
        i = 0
        while i < len(drop):
            if await self._locked(report, write_state_chunk, drop[i:i + DELETE_ROWS], cleaned=None) is YIELDED:
                continue
            report.checkpoints_deleted += len(drop[i:i + DELETE_ROWS])
            i += DELETE_ROWS
        # 5. Give the freed pages back (the rest: most went back while the deletes went on).
        await self._vacuum_all(report)
        # The file shrinks when the WAL is copied back into it.
        await self._read(_wal_checkpoint)
        report.bytes_after = file_bytes(self.journal.path)
        report.seconds = time.perf_counter() - start
        self.last = report
        return report

    async def _vacuum_all(self, report: PassReport) -> None:
        """Return the free pages to the file system, in steps, but for those kept for the appends
        (FREE_KEEP_BYTES; none near the cap)."""
        keep = 0
        if not report.early:
            if self._page_size is None:  # fixed for the file's life: read once
                self._page_size = await self._read(_page_size)
            keep = int(min(FREE_KEEP_BYTES, FREE_KEEP_SHARE * self.settings.max_bytes)) // self._page_size
        while True:
            returned = await self._locked(report, _vacuum, self._vacuum_pages, keep=keep)
            if returned is YIELDED:
                self._vacuum_pages = max(VACUUM_PAGES_MIN, self._vacuum_pages // 2)
                continue
            if returned <= 0:
                return
            self._vacuum_pages = next_size(self._vacuum_pages, self._held_s, target_s=VACUUM_TARGET_S,
                                           lo=VACUUM_PAGES_MIN, hi=VACUUM_PAGES)
            report.pages_vacuumed += returned

    async def _deleted(self, report: PassReport) -> None:
        """After each delete step: every VACUUM_EVERY of them, the free pages go back at once.
        SQLite's incremental_vacuum takes a free page off the free list by walking the list's trunk
        pages, so its cost per page grows with the list: a catch-up that freed gigabytes first and
        vacuumed after read ~1,000 trunk pages per page returned (docs/benchmarks.md)."""
        self._deletes += 1
        if self._deletes % VACUUM_EVERY == 0:
            await self._vacuum_all(report)

    async def _fold(self, report: PassReport, *, before_ts: float, until_bytes: int | None = None) -> None:
        # Paced by the backlog (SPREAD), unless the cap makes it fold early: then as fast as the duty
        # cycle lets it.
        if until_bytes is None:
            backlog = await self._read(backlog_events, before_ts=before_ts, before_seq=self.journal.checkpoint_seq)
            self._rate = max(FOLD_RATE_MIN, backlog / (self.settings.retention_interval_s * SPREAD))
        try:
            await self._fold_steps(report, before_ts=before_ts, until_bytes=until_bytes)
        finally:
            self._rate = 0.0

    async def _fold_steps(self, report: PassReport, *, before_ts: float, until_bytes: int | None) -> None:
        chunks = 0
        while True:
            folded = await self._locked(report, fold_step, before_ts=before_ts,
                                        before_seq=self.journal.checkpoint_seq, limit=self._fold_rows)
            if folded is YIELDED:
                self._fold_rows = max(FOLD_ROWS_MIN, self._fold_rows // 2)
                continue
            if not folded.rows:
                return
            self._fold_rows = next_size(self._fold_rows, self._held_s, target_s=STEP_TARGET_S, lo=FOLD_ROWS_MIN,
                                        hi=FOLD_ROWS)
            report.requests_folded += folded.rows
            self.requests_folded += folded.rows
            chunks += 1
            await self._deleted(report)
            # Freed pages are not live: the live size falls as the fold goes (checked now and then).
            if until_bytes is not None and chunks % 20 == 0 and await self._read(live_bytes) <= until_bytes:
                return

    async def _delete_state(self, report: PassReport, new_base: int) -> None:
        """Move the base up to ``new_base`` (a checkpoint: a full replay may start there at once),
        then delete what lies below it in chunks; ``cleaned_seq`` records how far that got, so a
        pass cut short is finished by the next one."""
        if new_base > await self._read(base_seq):
            await self._locked(report, _set_meta, "base_seq", new_base, interruptible=False)
        base = await self._read(base_seq)
        cleaned = await self._read(_meta, "cleaned_seq")
        if cleaned >= base:
            return
        keep = await self._read(kept_crashes, self.settings.crashes_kept)
        keep.add(base)
        after = cleaned
        while True:
            got = await self._locked(report, state_step, after_seq=after, below_seq=base, keep=keep,
                                     limit=self._delete_rows)
            if got is YIELDED:
                self._delete_rows = max(FOLD_ROWS_MIN, self._delete_rows // 2)
                continue
            self._delete_rows = next_size(self._delete_rows, self._held_s, target_s=STEP_TARGET_S,
                                          lo=FOLD_ROWS_MIN, hi=DELETE_ROWS)
            seqs, end = got
            report.events_deleted += len(seqs)
            self.events_deleted += len(seqs)
            await self._deleted(report)
            if end >= base:
                return
            after = end


READ_NICE = 10


def _low_priority() -> None:
    """READ_NICE for the calling thread only (on Linux the nice value is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READ_NICE)


def _flush_wal(db: sqlite3.Connection) -> None:
    """fdatasync the WAL after a step, outside the lock: the step commits without an fsync
    (synchronous=NORMAL), and its pages would otherwise be flushed by the next append's commit,
    inside that append's latency."""
    (name,) = db.execute("PRAGMA database_list").fetchone()[2:3]
    with contextlib.suppress(OSError):
        fd = os.open(f"{name}-wal", os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def _wal_checkpoint(db: sqlite3.Connection) -> None:
    # PASSIVE: copies what no reader still needs and never waits; the writer appends meanwhile.
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _page_size(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA page_size").fetchone()[0])


def _vacuum(db: sqlite3.Connection, pages: int, yielding: threading.Event | None = None, *, keep: int = 0) -> int:
    """Return up to ``pages`` free pages to the file system, leaving ``keep`` on the free list;
    how many it returned."""
    (before,) = db.execute("PRAGMA freelist_count").fetchone()
    pages = min(pages, before - keep)
    if pages <= 0:
        return 0
    _go_on(yielding)
    # executescript steps the statement to its end: execute() would free one page per step taken.
    db.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
    (after,) = db.execute("PRAGMA freelist_count").fetchone()
    return int(before - after)


def fold_all(path: str | os.PathLike[str], *, before_ts: float, before_seq: int) -> int:
    """Delete (fold, where the journal predates request_hours at append time) every request event
    before both bounds, synchronously (benchmarks and tests)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        n = 0
        while (folded := fold_step(db, before_ts=before_ts, before_seq=before_seq, limit=FOLD_ROWS)).rows:
            n += folded.rows
        return n
    finally:
        db.close()
