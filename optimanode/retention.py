"""Retention: keeps a journal that runs for years bounded in rows, bytes and start-up time.

How it works (docs/journal.md "Retention"; settings in ``[journal]``, docs/configuration.md):

* ``Retention.run`` makes one pass every ``retention_interval_s``. A pass first writes a checkpoint
  when ``checkpoint_events`` events or ``checkpoint_interval_s`` have passed since the last one
  (``Journal.checkpoint``), then works on the rows behind the newest checkpoint only: everything
  the next start needs is in that checkpoint, so nothing it deletes is ever replayed.
* Request events older than ``request_retention_days`` are folded into ``request_hours``, one row
  per model per hour (requests, outcomes by kind, prompt and completion tokens, and log-bucket
  histograms of TTFT and total time, from which percentiles are read), and deleted in the same
  transaction: a row of ``request_hours`` is always exactly the sum of the events deleted into it,
  even when the node dies half-way. Histograms, not stored percentiles, because the fold runs in
  small pieces and histograms add up exactly where percentiles do not.
* State events older than ``state_retention_days`` are deleted behind a checkpoint of that age,
  which becomes the base (``journal_meta.base_seq``: where a full replay starts). The last
  ``crashes_kept`` crash transitions of each model stay whatever their age, stderr tails and all.
  Checkpoints between the base and the newest are thinned to the first of each UTC day.
* A cap: when the file passes 90 % of ``max_bytes`` the pass folds the oldest requests whatever
  their age (and, if that is not enough, moves the base up to the newest checkpoint) until the
  live data is under 80 %; ``near_cap`` says so in metrics and doctor.
* Every change is a short transaction (``FOLD_ROWS``/``DELETE_ROWS`` rows) on a connection of
  its own, run on a thread while holding ``Journal.write_lock``, which every group commit takes: an
  append waits for at most one such transaction, and the rows to fold are read and decoded before
  the lock is taken. ``PRAGMA incremental_vacuum`` (auto_vacuum=INCREMENTAL, migration 0004) then
  returns the freed pages to the file system in steps of ``VACUUM_PAGES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from optimanode.config import JournalSettings
from optimanode.errors import JournalError
from optimanode.journal import REQUEST_TYPES, WAL_SIZE_LIMIT, Journal, base_seq
from optimanode.protocol import JournalReport, RequestFinished, RequestStarted

log = logging.getLogger(__name__)

DAY_S = 86400.0
# Rows (pages) per transaction: docs/benchmarks.md "One-year journal" measures how long each holds
# the write lock (a few milliseconds on the development machine).
FOLD_ROWS = 250
DELETE_ROWS = 250
VACUUM_PAGES = 16
PACE = 3.0
# The cap: past HIGH_WATER of max_bytes a pass folds early, down to LOW_WATER.
HIGH_WATER = 0.9
LOW_WATER = 0.8
# Histogram buckets: bucket i holds values in (GAMMA**(i-1), GAMMA**i]; its representative value
# 2*GAMMA**i/(GAMMA+1) is within (GAMMA-1)/(GAMMA+1) = 4.3 % of every value in it.
GAMMA = 2 ** (1 / 8)
MIN_VALUE_S = 1e-4
ZERO_BUCKET = math.ceil(math.log(MIN_VALUE_S, GAMMA))

_request_decoder = msgspec.json.Decoder(RequestStarted | RequestFinished)


def bucket(value: float) -> int:
    return ZERO_BUCKET if value <= MIN_VALUE_S else math.ceil(math.log(value, GAMMA))


def bucket_value(index: int) -> float:
    return 2 * GAMMA ** index / (GAMMA + 1)


def percentile(hist: dict[str, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, within 4.3 %; None when it is empty."""
    items = sorted((int(k), n) for k, n in hist.items() if n)
    total = sum(n for _, n in items)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, n in items:
        seen += n
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(items[-1][0])  # pragma: no cover - rank <= total


@dataclass
class HourFold:
    """One model's hour of request events, as folded (a row of ``request_hours``)."""

    stream: str
    hour: int
    started: int = 0
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_count: int = 0
    ttft_sum_s: float = 0.0
    ttft_hist: dict[str, int] = field(default_factory=dict)
    total_count: int = 0
    total_sum_s: float = 0.0
    total_hist: dict[str, int] = field(default_factory=dict)
    first_seq: int = 0
    last_seq: int = 0

    COLUMNS = ("stream", "hour", "started", "requests", "outcomes", "prompt_tokens", "completion_tokens",
               "ttft_count", "ttft_sum_s", "ttft_hist", "total_count", "total_sum_s", "total_hist",
               "first_seq", "last_seq")
    JSON = frozenset({"outcomes", "ttft_hist", "total_hist"})

    def add(self, seq: int, body: RequestStarted | RequestFinished | None) -> None:
        self.first_seq = seq if not self.first_seq else min(self.first_seq, seq)
        self.last_seq = max(self.last_seq, seq)
        if isinstance(body, RequestStarted):
            self.started += 1
            return
        self.requests += 1
        if body is None:  # a row that does not decode: counted, so the totals still add up
            self.outcomes["unreadable"] = self.outcomes.get("unreadable", 0) + 1
            return
        self.outcomes[body.outcome] = self.outcomes.get(body.outcome, 0) + 1
        self.prompt_tokens += body.prompt_tokens
        self.completion_tokens += body.completion_tokens
        if body.ttft_s is not None:
            self.ttft_count += 1
            self.ttft_sum_s += body.ttft_s
            k = str(bucket(body.ttft_s))
            self.ttft_hist[k] = self.ttft_hist.get(k, 0) + 1
        if body.total_s is not None:
            self.total_count += 1
            self.total_sum_s += body.total_s
            k = str(bucket(body.total_s))
            self.total_hist[k] = self.total_hist.get(k, 0) + 1

    def merge(self, other: HourFold) -> None:
        for name in ("started", "requests", "prompt_tokens", "completion_tokens", "ttft_count", "ttft_sum_s",
                     "total_count", "total_sum_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in self.JSON:
            mine = getattr(self, name)
            for k, n in getattr(other, name).items():
                mine[k] = mine.get(k, 0) + n
        if other.first_seq:
            self.first_seq = other.first_seq if not self.first_seq else min(self.first_seq, other.first_seq)
        self.last_seq = max(self.last_seq, other.last_seq)

    def row(self) -> tuple[Any, ...]:
        return tuple(json.dumps(getattr(self, c), sort_keys=True) if c in self.JSON else getattr(self, c)
                     for c in self.COLUMNS)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> HourFold:
        values = dict(zip(cls.COLUMNS, row))
        for c in cls.JSON:
            values[c] = json.loads(values[c])
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """What inspect-journal shows: counts, tokens and percentiles (within 4.3 %)."""
        return {
            "stream": self.stream, "hour": self.hour, "started": self.started, "requests": self.requests,
            "outcomes": dict(sorted(self.outcomes.items(), key=lambda kv: (-kv[1], kv[0]))),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": {f"p{int(q * 100)}": percentile(self.ttft_hist, q) for q in (0.5, 0.9, 0.99)},
            "total_s": {f"p{int(q * 100)}": percentile(self.total_hist, q) for q in (0.5, 0.9, 0.99)},
            "ttft_mean_s": self.ttft_sum_s / self.ttft_count if self.ttft_count else None,
            "total_mean_s": self.total_sum_s / self.total_count if self.total_count else None,
            "first_seq": self.first_seq, "last_seq": self.last_seq,
        }


HOURS_SELECT = f"SELECT {', '.join(HourFold.COLUMNS)} FROM request_hours"


def read_hours(db: sqlite3.Connection, *, stream: str | None = None, since: float | None = None,
               until: float | None = None) -> list[HourFold]:
    """The aggregates, oldest hour first (shared with tools/inspect-journal)."""
    where, args = [], []
    if stream is not None:
        where.append("stream = ?")
        args.append(stream)
    if since is not None:
        where.append("hour + 3600 > ?")
        args.append(since)
    if until is not None:
        where.append("hour <= ?")
        args.append(until)
    sql = HOURS_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY hour, stream"
    try:
        return [HourFold.from_row(r) for r in db.execute(sql, args)]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a journal from before migration 0003
            return []
        raise


# -- the pieces a pass is made of (synchronous; each runs on a thread) ---------------------------


@dataclass
class Folded:
    """Request events read and folded, not yet written: ``seqs`` are deleted into ``hours``."""

    seqs: list[int]
    hours: dict[tuple[str, int], HourFold]


def read_fold(db: sqlite3.Connection, *, before_ts: float, before_seq: int, limit: int = FOLD_ROWS) -> Folded:
    """The oldest ``limit`` request events before both bounds, folded per model per hour. Only
    retention deletes rows, so what this reads is still there when ``write_fold`` deletes it."""
    rows = db.execute(
        "SELECT seq, ts, stream, type, data FROM events INDEXED BY events_ts"
        " WHERE ts < ? AND seq < ? AND type IN ('request_started', 'request_finished') ORDER BY ts LIMIT ?",
        (before_ts, before_seq, limit)).fetchall()
    hours: dict[tuple[str, int], HourFold] = {}
    for seq, ts, stream, type_, data in rows:
        hour = int(ts // 3600) * 3600
        fold = hours.get((stream, hour))
        if fold is None:
            fold = hours[(stream, hour)] = HourFold(stream=stream, hour=hour)
        try:
            body: RequestStarted | RequestFinished | None = _request_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            body = None if type_ == "request_finished" else RequestStarted(request_id="", kind="")
        fold.add(seq, body)
    return Folded([r[0] for r in rows], hours)


def write_fold(db: sqlite3.Connection, folded: Folded) -> None:
    """Add the folds to their hours and delete their events: one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for (stream, hour), fold in folded.hours.items():
            row = db.execute(HOURS_SELECT + " WHERE stream = ? AND hour = ?", (stream, hour)).fetchone()
            if row is not None:
                merged = HourFold.from_row(row)
                merged.merge(fold)
                fold = merged
            db.execute(f"INSERT OR REPLACE INTO request_hours ({', '.join(HourFold.COLUMNS)})"
                       f" VALUES ({', '.join('?' * len(HourFold.COLUMNS))})", fold.row())
        _delete(db, folded.seqs)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


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


def write_state_chunk(db: sqlite3.Connection, seqs: Sequence[int], *, cleaned: int | None) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        _delete(db, seqs)
        if cleaned is not None:
            db.execute("INSERT OR REPLACE INTO journal_meta (key, value) VALUES ('cleaned_seq', ?)", (str(cleaned),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


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

    @classmethod
    async def open(cls, journal: Journal, settings: JournalSettings, *,
                   clock: Callable[[], float] = time.time) -> Retention:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(journal.path, isolation_level=None, check_same_thread=False)
            # NORMAL: a retention commit lost to a power cut is redone by the next pass; the fold and
            # its delete are one transaction either way.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # No checkpoint inside a retention commit (it would copy the WAL into the file while
            # holding the write lock); _locked runs a PASSIVE one after each transaction instead,
            # outside the lock, so the appends' commits seldom find a full WAL to checkpoint either.
            db.execute("PRAGMA wal_autocheckpoint=0")
            return db

        try:
            db = await asyncio.to_thread(connect)
        except sqlite3.Error as exc:
            raise JournalError(f"journal retention: cannot open {journal.path}: {exc}") from exc
        return cls(journal, settings, db, clock=clock)

    async def close(self) -> None:
        await asyncio.to_thread(self._run, lambda db: db.close())

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._using:
            return fn(self._db, *args, **kwargs)

    async def run(self) -> None:
        """A pass every ``retention_interval_s`` (the first one interval after the start)."""
        while True:
            await asyncio.sleep(self.settings.retention_interval_s)
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
                             requests_folded=self.requests_folded, events_deleted=self.events_deleted)

    async def _locked(self, report: PassReport, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the retention connection holding the journal's write lock, then pause."""
        async with self.journal.write_lock:
            start = time.perf_counter()
            work = asyncio.ensure_future(asyncio.to_thread(self._run, fn, *args, **kwargs))
            try:
                result = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The node is stopping: the transaction runs to its end on its thread; the lock is
                # held until then, so the writer never meets it half-way (a few milliseconds).
                while not work.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([work])
                raise
            finally:
                held = time.perf_counter() - start
                report.holds_s.append(held)
                report.holds_by.setdefault(fn.__name__.strip("_"), []).append(held)
        await self._read(_wal_checkpoint)
        # Paced: after each transaction retention sleeps PACE times what the transaction and the
        # reading around it took (_read adds that up), so it takes at most 1 / (1 + PACE) of the
        # time: the appends and the event loop (its reads and decoding run on threads that share
        # the GIL) keep theirs.
        await asyncio.sleep((held + self._read_s) * PACE)
        self._read_s = 0.0
        return result

    async def _read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(self._run, fn, *args, **kwargs)
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
        # 1. Requests past their age.
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
        for i in range(0, len(drop), DELETE_ROWS):
            await self._locked(report, write_state_chunk, drop[i:i + DELETE_ROWS], cleaned=None)
            report.checkpoints_deleted += len(drop[i:i + DELETE_ROWS])
        # 5. Give the freed pages back.
        while (returned := await self._locked(report, _vacuum, VACUUM_PAGES)) > 0:
            report.pages_vacuumed += returned
        # The file shrinks when the WAL is copied back into it.
        await self._read(_wal_checkpoint)
        report.bytes_after = file_bytes(self.journal.path)
        report.seconds = time.perf_counter() - start
        self.last = report
        return report

    async def _fold(self, report: PassReport, *, before_ts: float, until_bytes: int | None = None) -> None:
        chunks = 0
        while True:
            folded: Folded = await self._read(read_fold, before_ts=before_ts, before_seq=self.journal.checkpoint_seq)
            if not folded.seqs:
                return
            await self._locked(report, write_fold, folded)
            n = len(folded.seqs)
            report.requests_folded += n
            self.requests_folded += n
            chunks += 1
            if n < FOLD_ROWS:
                return
            # Freed pages are not live: the live size falls as the fold goes (checked now and then).
            if until_bytes is not None and chunks % 20 == 0 and await self._read(live_bytes) <= until_bytes:
                return

    async def _delete_state(self, report: PassReport, new_base: int) -> None:
        """Move the base up to ``new_base`` (a checkpoint: a full replay may start there at once),
        then delete what lies below it in chunks; ``cleaned_seq`` records how far that got, so a
        pass cut short is finished by the next one."""
        if new_base > await self._read(base_seq):
            await self._locked(report, _set_meta, "base_seq", new_base)
        base = await self._read(base_seq)
        cleaned = await self._read(_meta, "cleaned_seq")
        if cleaned >= base:
            return
        keep = await self._read(kept_crashes, self.settings.crashes_kept)
        keep.add(base)
        after = cleaned
        while True:
            seqs, end = await self._read(read_state_chunk, after_seq=after, below_seq=base, keep=keep)
            done = end >= base
            if seqs or done:
                await self._locked(report, write_state_chunk, seqs, cleaned=base if done else None)
            report.events_deleted += len(seqs)
            self.events_deleted += len(seqs)
            if done:
                return
            after = end


def _wal_checkpoint(db: sqlite3.Connection) -> None:
    # PASSIVE: copies what no reader still needs and never waits; the writer appends meanwhile.
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _vacuum(db: sqlite3.Connection, pages: int) -> int:
    """Return up to ``pages`` free pages to the file system; how many it returned."""
    (before,) = db.execute("PRAGMA freelist_count").fetchone()
    # executescript steps the statement to its end: execute() would free one page per step taken.
    db.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
    (after,) = db.execute("PRAGMA freelist_count").fetchone()
    return int(before - after)


def fold_all(path: str | os.PathLike[str], *, before_ts: float, before_seq: int) -> int:
    """Fold every request event before both bounds, synchronously (benchmarks and tests)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        n = 0
        while (folded := read_fold(db, before_ts=before_ts, before_seq=before_seq)).seqs:
            write_fold(db, folded)
            n += len(folded.seqs)
        return n
    finally:
        db.close()
