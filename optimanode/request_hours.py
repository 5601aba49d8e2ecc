"""Requests per model per hour: the ``request_hours`` table, written as requests finish.

How it works (docs/journal.md "request_hours"):

* A row of ``request_hours`` (``HourFold``) holds one model's hour of request events: how many
  started and finished, outcomes by kind, prompt and completion tokens, and log-bucket histograms of
  TTFT and total time, from which percentiles are read (within 4.3 %). Histograms, not stored
  percentiles, because rows are summed in pieces and histograms add up exactly.
* The journal writes them (optimanode/journal.py): each committed request event is added to an hour
  held in memory (``HourFold.add``), and about every ``FLUSH_S`` the hours go into the table
  (``merge_hours``) inside a group commit, with the journal_meta key ``hours_through_seq``: every
  request event up to that seq (from ``hours_from_seq`` on) is in ``request_hours``. At open the
  journal folds what follows the mark with SQLite's own sums (``fold_sql``), so a kill loses
  nothing. Retention then only deletes request events past their age (optimanode/retention.py).
* A journal from before migration 0005 keeps its older request events outside the table
  (``hours_from_seq`` is where the journal started writing hours): retention folds those with
  ``fold_sql`` in the transaction that deletes them, as it did before.
* ``fold_sql`` and ``HourFold.add`` must agree to the bucket: the same hour (``CAST(ts / 3600)``),
  the same bucket expression (ln(v) / ln(GAMMA), C's log on both sides), the same rules for a body
  SQLite cannot parse (counted, outcome ``unreadable``, nothing else).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optimanode.protocol import RequestFinished, RequestStarted

# How often the journal writes the hours it holds in memory (seconds of appends). A kill loses none
# of them (the next open folds the events after ``hours_through_seq`` again); this bounds that
# work, and one group commit in several hundred carries the write.
FLUSH_S = 5.0
HOURS_FROM = "hours_from_seq"
HOURS_THROUGH = "hours_through_seq"
# hours_marks' first seq for a journal without the marks (no migration 0005): none of its request
# events is in request_hours.
NO_MARKS = 1 << 62


def hour_of(ts: float) -> int:
    """The start of ``ts``'s hour, as SQLite's ``CAST(ts / 3600 AS INTEGER) * 3600`` gives it."""
    return int(ts / 3600) * 3600


# Histogram buckets: bucket i holds values in (GAMMA**(i-1), GAMMA**i]; its representative value
# 2*GAMMA**i/(GAMMA+1) is within (GAMMA-1)/(GAMMA+1) = 4.3 % of every value in it.
GAMMA = 2 ** (1 / 8)
MIN_VALUE_S = 1e-4
ZERO_BUCKET = math.ceil(math.log(MIN_VALUE_S, GAMMA))

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

    def add(self, seq: int, body: RequestStarted | RequestFinished) -> None:
        """One request event, as ``fold_sql`` counts it."""
        self.first_seq = seq if not self.first_seq else min(self.first_seq, seq)
        self.last_seq = max(self.last_seq, seq)
        if isinstance(body, RequestStarted):
            self.started += 1
            return
        self.requests += 1
        self.outcomes[body.outcome] = self.outcomes.get(body.outcome, 0) + 1
        self.prompt_tokens += body.prompt_tokens
        self.completion_tokens += body.completion_tokens
        if body.ttft_s is not None:
            self.ttft_count += 1
            self.ttft_sum_s += body.ttft_s
            b = str(bucket(body.ttft_s))
            self.ttft_hist[b] = self.ttft_hist.get(b, 0) + 1
        if body.total_s is not None:
            self.total_count += 1
            self.total_sum_s += body.total_s
            b = str(bucket(body.total_s))
            self.total_hist[b] = self.total_hist.get(b, 0) + 1

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


# The rows one fold step takes: a range of seq (the primary key: a range scan, whatever the journal's
# size) and, in it, the request events old enough. Retention deletes with the same WHERE.
FOLD_WHERE = ("seq BETWEEN ? AND ? AND type IN ('request_started', 'request_finished') AND ts < ?")
_HOUR = "CAST(ts / 3600 AS INTEGER) * 3600"
# A body SQLite's JSON cannot parse is counted (started, or a request with outcome "unreadable") and
# contributes nothing else, so the totals still add up.
_FIN = "type = 'request_finished' AND json_valid(data)"
_FOLD_TOTALS = (
    f"SELECT stream, {_HOUR} AS hour, sum(type = 'request_started'), sum(type = 'request_finished'),"
    f" coalesce(sum(CASE WHEN {_FIN} THEN json_extract(data, '$.prompt_tokens') END), 0),"
    f" coalesce(sum(CASE WHEN {_FIN} THEN json_extract(data, '$.completion_tokens') END), 0),"
    f" count(CASE WHEN {_FIN} THEN json_extract(data, '$.ttft_s') END),"
    f" total(CASE WHEN {_FIN} THEN json_extract(data, '$.ttft_s') END),"
    f" count(CASE WHEN {_FIN} THEN json_extract(data, '$.total_s') END),"
    f" total(CASE WHEN {_FIN} THEN json_extract(data, '$.total_s') END),"
    f" min(seq), max(seq) FROM events WHERE {FOLD_WHERE} GROUP BY stream, hour")
_FOLD_OUTCOMES = (
    f"SELECT stream, {_HOUR} AS hour,"
    " coalesce(CASE WHEN json_valid(data) THEN json_extract(data, '$.outcome') END, 'unreadable') AS o, count(*)"
    f" FROM events WHERE {FOLD_WHERE} AND type = 'request_finished' GROUP BY stream, hour, o")
# bucket() in SQL: the same expression (ln(v) / ln(GAMMA), C's log on both sides), so the same bucket.
_FOLD_HIST = (
    "SELECT stream, hour, CASE WHEN v <= ? THEN ? ELSE CAST(ceil(ln(v) / ln(?)) AS INTEGER) END AS b, count(*)"
    f" FROM (SELECT stream, {_HOUR} AS hour, CASE WHEN json_valid(data) THEN json_extract(data, '$.{{field}}') END"
    f" AS v FROM events WHERE {FOLD_WHERE} AND type = 'request_finished') WHERE v IS NOT NULL GROUP BY stream, hour, b")




def fold_sql(db: sqlite3.Connection, lo: int, hi: int, before_ts: float) -> tuple[int, dict[tuple[str, int], HourFold]]:
    """The request events with seq in ``lo..hi`` and ts before ``before_ts`` (``FOLD_WHERE``), summed
    per model per hour by SQLite itself (GROUP BY over the range, JSON read by SQLite; nothing per
    row in Python): how many there are, and their hours."""
    args = (lo, hi, min(before_ts, 1e300))  # SQLite has no infinity literal for a bound parameter
    hours: dict[tuple[str, int], HourFold] = {}
    rows = 0
    for (stream, hour, started, requests, prompt, completion, ttft_n, ttft_sum, total_n, total_sum, first,
         last) in db.execute(_FOLD_TOTALS, args):
        hours[(stream, hour)] = HourFold(
            stream=stream, hour=hour, started=started, requests=requests, prompt_tokens=prompt,
            completion_tokens=completion, ttft_count=ttft_n, ttft_sum_s=ttft_sum, total_count=total_n,
            total_sum_s=total_sum, first_seq=first, last_seq=last)
        rows += started + requests
    if not rows:
        return 0, {}
    for stream, hour, outcome, n in db.execute(_FOLD_OUTCOMES, args):
        hours[(stream, hour)].outcomes[str(outcome)] = n
    for field_, attr in (("ttft_s", "ttft_hist"), ("total_s", "total_hist")):
        for stream, hour, b, n in db.execute(_FOLD_HIST.format(field=field_),
                                             (MIN_VALUE_S, ZERO_BUCKET, GAMMA, *args)):
            getattr(hours[(stream, hour)], attr)[str(b)] = n
    return rows, hours


HOURS_SELECT_ONE = HOURS_SELECT + " WHERE stream = ? AND hour = ?"
HOURS_UPSERT = (f"INSERT OR REPLACE INTO request_hours ({', '.join(HourFold.COLUMNS)})"
                f" VALUES ({', '.join('?' * len(HourFold.COLUMNS))})")


def merged(row: Sequence[Any] | None, fold: HourFold) -> HourFold:
    """``fold`` added to the hour's row as read (None: no row yet)."""
    if row is None:
        return fold
    out = HourFold.from_row(row)
    out.merge(fold)
    return out


def merge_hours(db: sqlite3.Connection, hours: dict[tuple[str, int], HourFold]) -> None:
    """Add ``hours`` to their rows of ``request_hours`` (inside the caller's transaction)."""
    for (stream, hour), fold in hours.items():
        row = db.execute(HOURS_SELECT_ONE, (stream, hour)).fetchone()
        db.execute(HOURS_UPSERT, merged(row, fold).row())


def hours_marks(db: sqlite3.Connection) -> tuple[int, int]:
    """(``hours_from_seq``, ``hours_through_seq``): request events from the first through the second
    are in ``request_hours``. A journal without the marks (no migration 0005) has none there."""
    marks = dict(db.execute("SELECT key, value FROM journal_meta WHERE key IN (?, ?)", (HOURS_FROM, HOURS_THROUGH)))
    if HOURS_FROM not in marks:
        return NO_MARKS, 0
    return int(marks[HOURS_FROM]), int(marks.get(HOURS_THROUGH, 0))


def build_hours(db: sqlite3.Connection) -> int:
    """Write ``request_hours`` for every request event of a journal built row by row with plain
    sqlite3 (benchmarks, tests) and mark them all as there, as the journal would have; one
    transaction. How many events it folded."""
    (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
    hours_from, through = hours_marks(db)
    lo = max(through + 1, min(hours_from, last + 1))
    db.execute("BEGIN IMMEDIATE")
    try:
        rows, hours = fold_sql(db, lo, last, math.inf)
        merge_hours(db, hours)
        db.executemany("INSERT OR REPLACE INTO journal_meta (key, value) VALUES (?, ?)",
                       [(HOURS_FROM, str(min(hours_from, lo))), (HOURS_THROUGH, str(last))])
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return rows
