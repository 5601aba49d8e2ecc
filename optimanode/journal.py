"""The event journal: an append-only SQLite table that is the node's truth.

How it works:

* One SQLite file in WAL mode, opened through aiosqlite, ``synchronous=FULL``: a commit is on disk
  before ``append`` returns, so nothing is acknowledged to anyone before it is durable.
* Schema from numbered ``migrations/NNNN_name.sql`` files, each applied once inside a transaction
  and recorded in ``schema_migrations``. The wheel ships them as the package data
  ``optimanode.migrations``, read through importlib.resources.
* Appends go through one writer task that commits whatever is waiting as one transaction
  (group commit): one fsync serves many concurrent appends, and the order of ``seq`` is the order
  of the queue.
* Each event belongs to a stream (an executor id, or ``node``) with a per-stream version; the
  UNIQUE (stream, version) constraint makes a second writer's conflicting append fail loudly.
* The ``executors`` table is a projection updated in the same transaction by ``project`` (a pure
  fold); ``replay`` recomputes it from the events alone, and the two must agree.
* ``checkpoint`` appends a ``checkpoint`` event (stream ``node``) holding the fold as of its own
  position: every executor's view with the notes the runtime restores (the reason of the last
  transition into each state, safe mode), each stream's last version, and the requests started and
  not finished. Opening reads the newest checkpoint and only the events after it; ``replay``
  starts there too (``replay(full=True)`` from the base: the oldest history retention kept). So
  start-up costs what happened since the last checkpoint, not the journal's age.
* Retention (optimanode/retention.py) deletes old rows on a connection of its own, one short
  transaction at a time under ``write_lock``, the lock every group commit takes, so the two writers
  never meet SQLite's busy handler. An append that finds the lock held calls ``on_append_waiting``
  (set by retention while it holds the lock): retention's transaction is interrupted and rolled
  back, so the append waits for the rollback, not for retention's work.
* Integrity at open: ``PRAGMA quick_check`` reads the whole file (about 1 s per GiB). It runs at
  open, refusing a damaged journal, when the previous run did not close the journal (the
  ``journal_meta`` key ``open`` is still 1: a kill, a crash, a power cut) or when the file is at
  most ``full_check_below`` bytes. Otherwise (a clean stop, a large file) the same check runs in the
  background after a short delay, on a read-only connection of its own; ``integrity`` says what it
  found, a damaged journal is logged as an error and reported in metrics (docs/reliability.md).

Every sqlite3 error, and every row that does not decode (a damaged page SQLite cannot see, or an
event type written by a newer node), is re-raised as JournalError naming the file; a failed batch
rolls back whole and its callers see the error (a full disk loses nothing that was acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import importlib.resources
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar

import aiosqlite
import msgspec

from optimanode.errors import JournalError
from optimanode.request_hours import (
    FLUSH_S,
    HOURS_SELECT_ONE,
    HOURS_THROUGH,
    HOURS_UPSERT,
    NO_MARKS,
    HourFold,
    fold_sql,
    hour_of,
    hours_marks,
    merged,
)
from optimanode.protocol import (
    Checkpoint,
    DesiredChanged,
    EventBody,
    ExecutorSnapshot,
    Hashed,
    ModelInfo,
    ModelSettings,
    Registered,
    RequestFinished,
    RequestStarted,
    State,
    Transition,
    decode_event,
    encode_event,
)

_T = TypeVar("_T")
log = logging.getLogger(__name__)
NODE_STREAM = "node"
MIGRATIONS_PACKAGE = "optimanode.migrations"
MIGRATION_FILES = "[0-9][0-9][0-9][0-9]_*.sql"
NO_TRANSACTION = "-- optimanode: no-transaction"


def _default_migrations() -> Traversable:
    """The journal's SQL files. Installed from a wheel they are the package data
    ``optimanode.migrations`` (pyproject.toml maps the checkout's top-level ``migrations/`` onto that
    package). Run from a checkout (an editable install, or the checkout on ``sys.path``), that
    package cannot be imported: setuptools' editable finder maps only directories with an
    ``__init__.py``. There the files are read where the wheel takes them from. An installed package
    without them gets the place they should be, and opening a journal says that none are there."""
    try:
        return importlib.resources.files(MIGRATIONS_PACKAGE)
    except ModuleNotFoundError:
        package = Path(__file__).resolve().parent
        if (package.parent / "pyproject.toml").is_file():  # a checkout, never site-packages
            return package.parent / "migrations"
        return package / "migrations"


DEFAULT_MIGRATIONS = _default_migrations()
# Rows per fetchmany during replay: large enough that the fetch loop costs nothing per row.
REPLAY_FETCH_ROWS = 4096
REQUEST_TYPES = ("request_started", "request_finished")
WAL_SIZE_LIMIT = 16 << 20
STATE_TYPES = ("registered", "transition", "desired", "hashed")
# Files up to this size are checked in full at every open (about 0.25 s); larger ones only after a
# run that did not close the journal, else in the background (module docstring).
FULL_CHECK_BELOW = 256 << 20
BACKGROUND_CHECK_DELAY_S = 10.0
# Placeholder a caller appends; the writer replaces it by the fold at the event's own position.
_CHECKPOINT_MARK = Checkpoint()


class Event(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    ts: float
    stream: str
    version: int
    body: EventBody

    @property
    def type(self) -> str:
        return type(self.body).__struct_config__.tag  # type: ignore[return-value]


class ExecutorView(msgspec.Struct, frozen=True, kw_only=True):
    """What the journal says about one executor: the fold of its events."""

    id: str
    path: str
    state: State
    enabled: bool
    settings: ModelSettings
    info: ModelInfo
    last_seq: int


def project(view: ExecutorView | None, stream: str, seq: int, body: EventBody) -> ExecutorView | None:
    """Fold one event into an executor's view (pure; used by both append and replay)."""
    if isinstance(body, Registered):
        if view is None:
            return ExecutorView(id=stream, path=body.info.path, state="discovered", enabled=False,
                                settings=ModelSettings(), info=body.info, last_seq=seq)
        return msgspec.structs.replace(view, path=body.info.path, info=body.info, last_seq=seq)
    if view is None:
        return None
    if isinstance(body, Transition):
        return msgspec.structs.replace(view, state=body.dst, last_seq=seq)
    if isinstance(body, DesiredChanged):
        return msgspec.structs.replace(view, enabled=body.enabled, settings=body.settings, last_seq=seq)
    if isinstance(body, Hashed):
        if (body.size_bytes, body.mtime_ns) == (view.info.size_bytes, view.info.mtime_ns):
            info = msgspec.structs.replace(view.info, sha256=body.sha256)
            return msgspec.structs.replace(view, info=info, last_seq=seq)
        return view
    return view


class Notes(msgspec.Struct, frozen=True, kw_only=True):
    """What the runtime restores from an executor's transitions besides its state: the reason of
    the last transition into each state, and safe mode (the last transition that set it, and the
    reason of the last crash that did)."""

    reasons: dict[str, str] = {}
    safe_mode: bool | None = None
    safe_reason: str = ""


def note(notes: Notes | None, body: Transition) -> Notes:
    """Fold one transition into an executor's notes (pure)."""
    notes = notes or Notes()
    reasons = {**notes.reasons, body.dst: body.reason}
    if body.safe_mode is None:
        return Notes(reasons=reasons, safe_mode=notes.safe_mode, safe_reason=notes.safe_reason)
    return Notes(reasons=reasons, safe_mode=body.safe_mode,
                 safe_reason=body.reason if body.trigger == "crash" else notes.safe_reason)


def snapshot_of(view: ExecutorView, notes: Notes | None) -> ExecutorSnapshot:
    n = notes or Notes()
    return ExecutorSnapshot(id=view.id, path=view.path, state=view.state, enabled=view.enabled,
                            settings=view.settings, info=view.info, last_seq=view.last_seq,
                            reasons=n.reasons, safe_mode=n.safe_mode, safe_reason=n.safe_reason)


def view_of(s: ExecutorSnapshot) -> ExecutorView:
    return ExecutorView(id=s.id, path=s.path, state=s.state, enabled=s.enabled, settings=s.settings,
                        info=s.info, last_seq=s.last_seq)


class CheckpointRow(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    ts: float
    body: Checkpoint


def read_checkpoint(db: sqlite3.Connection, path: Path, *, oldest: bool = False) -> CheckpointRow | None:
    """The newest checkpoint (``oldest``: the oldest one), or None when the journal has none."""
    row = db.execute("SELECT seq, ts, data FROM events WHERE type = 'checkpoint'"
                     f" ORDER BY seq {'ASC' if oldest else 'DESC'} LIMIT 1").fetchone()
    if row is None:
        return None
    return CheckpointRow(seq=row[0], ts=row[1], body=_decode_as(path, row[0], row[2], Checkpoint))


def base_seq(db: sqlite3.Connection) -> int:
    """The checkpoint the kept state history starts from (0: the journal's first event)."""
    try:
        row = db.execute("SELECT value FROM journal_meta WHERE key = 'base_seq'").fetchone()
    except sqlite3.OperationalError:  # a journal from before migration 0003, opened read-only
        return 0
    return int(row[0]) if row else 0


def _sqlite_error(action: str, exc: BaseException) -> JournalError:
    return JournalError(f"journal {action} failed: {exc.__class__.__name__}: {exc}")


def _unreadable(path: Path, where: str, exc: Exception) -> JournalError:
    return JournalError(f"journal {path} is corrupt: {where} cannot be read ({exc.__class__.__name__}: {exc});"
                        " it was written by a newer node or damaged")


def _decode(path: Path, seq: int, data: str | bytes) -> EventBody:
    """One event's body; a row that does not decode (damaged, or from a newer node) is a JournalError."""
    try:
        return decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _unreadable(path, f"event seq {seq}", exc) from exc


def _decode_as(path: Path, seq: int, data: str | bytes, kind: type[_T]) -> _T:
    """``_decode``, for a row whose ``type`` column says what it must hold."""
    body = _decode(path, seq, data)
    if not isinstance(body, kind):
        raise _unreadable(path, f"event seq {seq}", TypeError(f"its type column and its body disagree"
                                                              f" ({type(body).__name__})"))
    return body


def _space_left(path: Path) -> str:
    """A hint for an operator when the journal's file system is (nearly) full; else empty."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    return f" (the file system holding it has {free} bytes free)" if free < (1 << 20) else ""


def _row_event(path: Path, row: Sequence[Any]) -> Event:
    seq, ts, stream, version, _type, data = row
    return Event(seq=seq, ts=ts, stream=stream, version=version, body=_decode(path, seq, data))


def replay_views(db: sqlite3.Connection, path: Path, *, indexed: bool = True,
                 full: bool = False) -> dict[str, ExecutorView]:
    """Every executor's view folded from the events, over an open sqlite3 connection.

    The fold behind ``Journal.replay`` (which runs it on a thread, on a connection of its own) and
    ``tools/inspect-journal`` (inside its read-only snapshot): the views of the newest checkpoint,
    then ``project`` over the state events after it in seq order. ``full``: from the base instead
    (the checkpoint retention's kept history starts from, or the first event when it has deleted
    nothing), through every state event since; the two must agree. Synchronous; it only reads.
    ``path`` names the file in the JournalError raised for a row that does not decode.
    ``indexed=False`` is for a journal no node has opened since migration 0002 (a reader that must
    not migrate it): the same rows, without the index.
    """
    start = 0
    views: dict[str, ExecutorView] = {}
    if full:
        start = base_seq(db)
        if start:
            row = db.execute("SELECT data FROM events WHERE seq = ?", (start,)).fetchone()
            if row is None:
                raise _unreadable(path, f"the base checkpoint (seq {start})", LookupError("it is missing"))
            body = _decode_as(path, start, row[0], Checkpoint)
            views = {s.id: view_of(s) for s in body.executors}
    elif (cp := read_checkpoint(db, path)) is not None:
        start, views = cp.seq, {s.id: view_of(s) for s in cp.body.executors}
    # INDEXED BY: the partial index of migration 0002 holds exactly these rows in seq order
    # (its WHERE must match this one, literally); the planner would otherwise read events_type
    # and sort the result.
    cur = db.execute(f"SELECT seq, stream, data FROM events{' INDEXED BY events_state' if indexed else ''}"
                     f" WHERE stream != '{NODE_STREAM}'"
                     " AND type IN ('registered', 'transition', 'desired', 'hashed') AND seq > ? ORDER BY seq",
                     (start,))
    cur.arraysize = REPLAY_FETCH_ROWS
    while rows := cur.fetchmany():
        for seq, stream, data in rows:
            new = project(views.get(stream), stream, seq, _decode(path, seq, data))
            if new is not None:
                views[stream] = new
    return views


def _replay(path: Path, full: bool) -> dict[str, ExecutorView]:
    """The fold behind ``Journal.replay``, synchronous (it runs on a thread)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA query_only = ON")
        db.execute("BEGIN")  # one snapshot for the checkpoint and the events after it
        return replay_views(db, path, full=full)
    finally:
        db.close()


def _writable(path: Path, stream: str, body: EventBody) -> str:
    """``body``'s row text (what the commit writes); JournalError unless it decodes again."""
    try:
        data = encode_event(body).decode()
        decode_event(data)
    except (msgspec.EncodeError, msgspec.DecodeError, msgspec.ValidationError, UnicodeError, OverflowError,
            TypeError, ValueError) as exc:
        raise JournalError(f"journal {path}: refused a {type(body).__name__} event of {stream}: it cannot be "
                           f"written as it would be read back ({type(exc).__name__}: {exc})") from None
    return data


# What the writer commits: (stream, body, its row text; None for the checkpoint mark, made in the commit).
_Batch = list[tuple[str, EventBody, str | None]]


class Journal:
    """Open with ``await Journal.open(path)``; close with ``await journal.close()``."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._versions: dict[str, int] = {}
        self._views: dict[str, ExecutorView] = {}
        self._queue: asyncio.Queue[tuple[_Batch, asyncio.Future[list[Event]]] | None] = (
            asyncio.Queue())
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._notes: dict[str, Notes] = {}
        # (stream, request_id) of every request started and not finished, in start order.
        self._open: dict[tuple[str, str], None] = {}
        self._last_seq = 0
        self.checkpoint_seq = 0
        self.checkpoint_ts = 0.0
        self.events_since_checkpoint = 0
        # Held by every group commit and by each of retention's transactions (module docstring).
        self.write_lock = asyncio.Lock()
        # Set by whoever holds write_lock besides the writer (retention): called when an append waits.
        self.on_append_waiting: Callable[[], None] | None = None
        # monotonic() of the last commit of appends (retention paces itself by it).
        self.last_append = 0.0
        # "" until checked, "ok", or what quick_check found (module docstring).
        self.integrity = ""
        self.checked_at_open = False
        # Whether this run has written journal_meta.open = 1 (with its first append).
        self._marked_open = False
        self._check: asyncio.Task[None] | None = None
        # request_hours at append time (optimanode/request_hours.py): the hours of the request
        # events committed since the last write of them, through seq _hours_through; None for a
        # journal without the table (tests of old schemas).
        self._hours: dict[tuple[str, int], HourFold] | None = {}
        self._hours_through = 0
        self._hours_written = monotonic()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike[str], migrations: Traversable = DEFAULT_MIGRATIONS, *,
                   full_check_below: int = FULL_CHECK_BELOW,
                   background_check_delay_s: float | None = BACKGROUND_CHECK_DELAY_S) -> Journal:
        """``full_check_below``, ``background_check_delay_s``: the integrity check (module docstring;
        None: no background check, ``check_integrity`` is the caller's)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise _sqlite_error(f"open of {path}", exc) from exc
        journal = cls(db, path)
        try:
            await journal._prepare(migrations, full_check_below)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, JournalError):
                raise
            if isinstance(exc, (sqlite3.Error, OSError)):
                # SQLite says "disk I/O error" when it cannot create the WAL index on a full disk.
                raise JournalError(str(_sqlite_error(f"open of {path}", exc)) + _space_left(path)) from exc
            raise
        journal._writer = asyncio.get_running_loop().create_task(journal._write_loop(), name="journal-writer")
        if not journal.checked_at_open and background_check_delay_s is not None:
            journal._check = asyncio.get_running_loop().create_task(
                journal._check_later(background_check_delay_s), name="journal-check")
        return journal

    async def _prepare(self, migrations: Traversable, full_check_below: int) -> None:
        db = self._db
        mode = await (await db.execute("PRAGMA journal_mode=WAL")).fetchone()
        if mode is None or mode[0].lower() != "wal":
            raise JournalError(f"journal {self.path}: could not switch to WAL mode (got {mode})")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        # The WAL file keeps its largest size unless told otherwise; this bounds what it keeps after
        # a checkpoint (retention counts the WAL against journal.max_bytes).
        await db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if not await self._closed_cleanly() or self.path.stat().st_size <= full_check_below:
            check = await (await db.execute("PRAGMA quick_check")).fetchall()
            if check != [("ok",)]:
                raise JournalError(f"journal {self.path} is corrupt: {check[:3]}")
            self.integrity, self.checked_at_open = "ok", True
        await apply_migrations(db, migrations)
        await self._load_position()
        await self._load_hours()
        self._views = await self._load_projection()
        # The mark "open" is written with the first append (_commit_locked), not here: a start
        # refused after open (a row that does not decode) must leave the file as it found it.

    async def _closed_cleanly(self) -> bool:
        """Whether the last run that opened this journal closed it (``journal_meta.open`` = 0). A
        journal without the mark (new, or from an older node) counts as not closed: checked in full."""
        try:
            row = await (await self._db.execute("SELECT value FROM journal_meta WHERE key = 'open'")).fetchone()
        except sqlite3.OperationalError:  # no journal_meta yet (a new file, or before migration 0003)
            return False
        return row is not None and row[0] == "0"

    async def _set_open_mark(self, value: int) -> None:
        try:
            await self._db.execute("INSERT OR REPLACE INTO journal_meta (key, value) VALUES ('open', ?)",
                                   (str(value),))
        except sqlite3.OperationalError:  # migrations without journal_meta (tests of old schemas)
            pass

    async def _check_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.check_integrity()

    async def check_integrity(self) -> str:
        """``PRAGMA quick_check`` of the whole file on a read-only connection of its own (a thread;
        appends go on): "ok" or what it found, kept in ``integrity``; a damaged journal is logged."""

        def check() -> list[tuple[Any, ...]]:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                return db.execute("PRAGMA quick_check").fetchall()
            finally:
                db.close()

        try:
            rows = await asyncio.to_thread(check)
            found = "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])
        except sqlite3.Error as exc:
            found = f"{exc.__class__.__name__}: {exc}"
        self.integrity = found
        if found != "ok":
            log.error("journal %s is corrupt: %s (PRAGMA quick_check; the node goes on serving, but appends"
                      " may fail: stop it and see docs/reliability.md \"The journal file is corrupt\")",
                      self.path, found)
        return found

    async def _load_position(self) -> None:
        """Versions, notes and open requests: the newest checkpoint's, then the events after it."""
        row = await (await self._db.execute(
            "SELECT seq, ts, data FROM events WHERE type = 'checkpoint' ORDER BY seq DESC LIMIT 1")).fetchone()
        start = 0
        if row is not None:
            cp = _decode_as(self.path, row[0], row[2], Checkpoint)
            start, self.checkpoint_seq, self.checkpoint_ts = row[0], row[0], row[1]
            self._versions = dict(cp.versions)
            self._open = {(s, r): None for s, r in cp.open_requests}
            self._notes = {s.id: Notes(reasons=s.reasons, safe_mode=s.safe_mode, safe_reason=s.safe_reason)
                           for s in cp.executors}
        count = 0
        # Only request ids and transitions are decoded; versions come from every row.
        cur = await self._db.execute(
            "SELECT seq, stream, version, type, CASE WHEN type IN ('request_started', 'request_finished')"
            " THEN json_extract(data, '$.request_id') WHEN type = 'transition' THEN data END"
            " FROM events WHERE seq > ? ORDER BY seq", (start,))
        while rows := await cur.fetchmany(REPLAY_FETCH_ROWS):
            for seq, stream, version, type_, data in rows:
                count += 1
                if version > self._versions.get(stream, 0):
                    self._versions[stream] = version
                if type_ == "request_started":
                    self._open[(stream, data)] = None
                elif type_ == "request_finished":
                    self._open.pop((stream, data), None)
                elif type_ == "transition":
                    body = _decode_as(self.path, seq, data, Transition)
                    self._notes[stream] = note(self._notes.get(stream), body)
        self.events_since_checkpoint = count
        (self._last_seq,) = await (await self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events")).fetchone()  # type: ignore[misc]

    async def _load_hours(self) -> None:
        """The request events after ``hours_through_seq`` (a run that ended before it wrote its
        hours), summed by SQLite into the hours to write with the next commit; nothing is written
        here (a refused start leaves the file as it found it)."""

        def fold() -> tuple[int, dict[tuple[str, int], HourFold]] | None:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                hours_from, through = hours_marks(db)
                if hours_from == NO_MARKS:
                    return None  # a journal without the marks (no migration 0005): no hours at append time
                lo = max(through + 1, hours_from)
                if lo > self._last_seq:
                    return through, {}
                return self._last_seq, fold_sql(db, lo, self._last_seq, float("inf"))[1]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # migrations without request_hours (tests of old schemas)
                    return None
                raise
            finally:
                db.close()

        got = await asyncio.to_thread(fold)
        if got is None:
            self._hours = None
            return
        self._hours_through, self._hours = got

    # -- writing ---------------------------------------------------------------------------

    async def append(self, stream: str, body: EventBody) -> Event:
        """Append one event; returns once it is committed to disk."""
        return (await self.append_many([(stream, body)]))[0]

    async def checkpoint(self) -> Event:
        """Append a checkpoint: the fold as of its own position (module docstring)."""
        return await self.append(NODE_STREAM, _CHECKPOINT_MARK)

    async def append_many(self, items: Iterable[tuple[str, EventBody]]) -> list[Event]:
        """Append events atomically (all or none); returns once they are committed to disk.

        An event that would not read back as itself (a path that is not UTF-8, an infinite float
        that JSON writes as null, an integer past 64 bits) is refused here with JournalError, before
        it is queued: written, it would make every later read of its rows fail.
        """
        if self._closed:
            raise JournalError("journal is closed")
        batch: _Batch = [(stream, body, None if body is _CHECKPOINT_MARK else _writable(self.path, stream, body))
                         for stream, body in items]
        fut: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        await self._queue.put((batch, fut))
        return await fut

    async def _write_loop(self) -> None:
        closing = False
        while not closing:
            pending = []
            item = await self._queue.get()
            while item is not None:
                pending.append(item)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            # None is close()'s sentinel: commit what came before it, then end.
            closing = item is None
            if not pending:
                continue
            try:
                results = await self._commit([b for b, _ in pending])
            except Exception as exc:  # noqa: BLE001 - whatever it is, the writer must outlive it
                # An error that is not the database's (a bug) fails its callers like a JournalError
                # would, instead of ending this task and leaving every later append waiting forever.
                # The whole group failed; retry each caller alone so one bad batch
                # does not fail its neighbours.
                if len(pending) == 1:
                    if not pending[0][1].done():
                        pending[0][1].set_exception(exc)
                    continue
                for batch, fut in pending:
                    try:
                        res = await self._commit([batch])
                    except Exception as one_exc:  # noqa: BLE001 - as above
                        if not fut.done():
                            fut.set_exception(one_exc)
                    else:
                        if not fut.done():
                            fut.set_result(res[0])
                continue
            for (_, fut), res in zip(pending, results):
                if not fut.done():
                    fut.set_result(res)

    async def _commit(self, batches: list[_Batch]) -> list[list[Event]]:
        if self.write_lock.locked() and self.on_append_waiting is not None:
            self.on_append_waiting()  # retention yields: its transaction rolls back (module docstring)
        async with self.write_lock:
            return await self._commit_locked(batches)

    async def _commit_locked(self, batches: list[_Batch]) -> list[list[Event]]:
        # Copies: the fold is kept only if the transaction commits.
        versions, views, notes, open_ = dict(self._versions), dict(self._views), dict(self._notes), dict(self._open)
        now = time.time()
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                cur = await db.execute("SELECT COALESCE(MAX(seq), 0) FROM events")
                (seq,) = await cur.fetchone()  # type: ignore[misc]
                rows: list[tuple[float, str, int, str, str]] = []
                events: list[list[Event]] = []
                touched: set[str] = set()
                checkpoint = None
                for batch in batches:
                    out = []
                    for stream, body, data in batch:
                        seq += 1
                        versions[stream] = versions.get(stream, 0) + 1
                        if body is _CHECKPOINT_MARK:
                            body = checkpoint = Checkpoint(
                                executors=[snapshot_of(v, notes.get(k)) for k, v in sorted(views.items())],
                                versions=dict(versions), open_requests=list(open_))
                        elif isinstance(body, RequestStarted):
                            open_[(stream, body.request_id)] = None
                        elif isinstance(body, RequestFinished):
                            open_.pop((stream, body.request_id), None)
                        elif isinstance(body, Transition):
                            notes[stream] = note(notes.get(stream), body)
                        rows.append((now, stream, versions[stream], body.__struct_config__.tag,  # type: ignore[attr-defined]
                                     data if data is not None else encode_event(body).decode()))
                        out.append(Event(seq=seq, ts=now, stream=stream, version=versions[stream], body=body))
                        if stream != NODE_STREAM:
                            new = project(views.get(stream), stream, seq, body)
                            if new is not None and new is not views.get(stream):
                                views[stream] = new
                                touched.add(stream)
                    events.append(out)
                await db.executemany("INSERT INTO events (ts, stream, version, type, data) VALUES (?, ?, ?, ?, ?)",
                                     rows)
                if touched:
                    await db.executemany(
                        "INSERT OR REPLACE INTO executors (id, path, state, enabled, settings, info, last_seq)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [_view_row(views[s]) for s in touched])
                wrote_hours = await self._write_hours(force=False)
                if not self._marked_open:
                    await self._set_open_mark(1)
                await db.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (SQLITE_FULL); only roll back what is open.
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _sqlite_error("append", exc) from exc
        self.last_append = monotonic()
        self._marked_open = True
        self._versions, self._views, self._notes, self._open = versions, views, notes, open_
        self._last_seq = seq
        self._add_hours(wrote_hours, events, now)
        if checkpoint is not None:
            last = [e for out in events for e in out if e.body is checkpoint][-1]
            self.checkpoint_seq, self.checkpoint_ts = last.seq, last.ts
            self.events_since_checkpoint = seq - last.seq
        else:
            self.events_since_checkpoint += len(rows)
        return events

    async def write_hours(self) -> None:
        """The hours held in memory into ``request_hours`` now, in a transaction of their own: at
        close (the next open has nothing to sum again) and before retention deletes (it deletes only
        what the table holds). A failure loses nothing: the next write, or the next open, has them."""
        if not self._hours:
            return
        async with self.write_lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    await self._write_hours(force=True)
                    await self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                log.warning("journal %s: the request hours were not written (%s); they stay for the next"
                            " write, or the next open sums them again", self.path, exc)
                return
        self._written_hours()

    async def _write_hours(self, *, force: bool) -> bool:
        """Inside a commit's transaction: the hours held in memory added to their rows, with the
        mark of how far they go, when FLUSH_S has passed since the last write (or ``force``).
        Whether it wrote them (they are dropped from memory only once the commit is through)."""
        if not self._hours or not (force or monotonic() - self._hours_written >= FLUSH_S):
            return False
        db = self._db
        rows = []
        for (stream, hour), fold in self._hours.items():
            row = await (await db.execute(HOURS_SELECT_ONE, (stream, hour))).fetchone()
            rows.append(merged(row, fold).row())
        await db.executemany(HOURS_UPSERT, rows)
        await db.execute("INSERT OR REPLACE INTO journal_meta (key, value) VALUES (?, ?)",
                         (HOURS_THROUGH, str(self._hours_through)))
        return True

    def _written_hours(self) -> None:
        """The hours held are in the table now: hold none until the next commit adds some."""
        self._hours = {}
        self._hours_written = monotonic()

    def _add_hours(self, wrote: bool, events: list[list[Event]], ts: float) -> None:
        """After a commit: drop the hours it wrote, add its request events to those held."""
        if self._hours is None:
            return
        if wrote:
            self._written_hours()
        hour = hour_of(ts)
        for out in events:
            for e in out:
                if isinstance(e.body, (RequestStarted, RequestFinished)):
                    fold = self._hours.get((e.stream, hour))
                    if fold is None:
                        fold = self._hours[(e.stream, hour)] = HourFold(stream=e.stream, hour=hour)
                    fold.add(e.seq, e.body)
        self._hours_through = self._last_seq

    # -- reading ---------------------------------------------------------------------------

    def views(self) -> dict[str, ExecutorView]:
        """The projection as of the last commit (in memory; no I/O)."""
        return dict(self._views)

    def notes(self) -> dict[str, Notes]:
        """Each executor's notes as of the last commit (in memory; no I/O)."""
        return dict(self._notes)

    def open_requests(self) -> list[tuple[str, str]]:
        """(stream, request_id) of each request started and not finished, as of the last commit."""
        return list(self._open)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    async def _load_projection(self) -> dict[str, ExecutorView]:
        rows = await (await self._db.execute(PROJECTION_SELECT)).fetchall()
        try:
            return {r[0]: view_from_row(r) for r in rows}
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _unreadable(self.path, "the executors projection", exc) from exc

    async def replay(self, *, full: bool = False) -> dict[str, ExecutorView]:
        """Recompute every executor's view from the newest checkpoint and the events after it
        (``full``: from the base and every state event since; ``replay_views``).

        The fold runs on a thread over a connection of its own (query_only; WAL gives it a
        consistent snapshot), row by row in plain Python: through aiosqlite each row costs an
        await and a hop between threads, which tripled the replay of a million-event journal
        (docs/benchmarks.md "Journal replay").
        """
        try:
            return await asyncio.to_thread(_replay, self.path, full)
        except sqlite3.Error as exc:
            raise _sqlite_error("replay", exc) from exc

    async def read(self, *, stream: str | None = None, types: Sequence[str] | None = None,
                   since_seq: int = 0, since_ts: float | None = None, until_ts: float | None = None,
                   limit: int | None = None, newest_first: bool = False) -> list[Event]:
        sql, args = select_events(stream=stream, types=types, since_seq=since_seq, since_ts=since_ts,
                                  until_ts=until_ts, limit=limit, newest_first=newest_first)
        try:
            rows = await (await self._db.execute(sql, args)).fetchall()
        except sqlite3.Error as exc:
            raise _sqlite_error("read", exc) from exc
        return [_row_event(self.path, r) for r in rows]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._check is not None:
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check
        if self._writer is not None:
            # The sentinel queues behind every accepted append: close never drops one.
            await self._queue.put(None)
            await asyncio.shield(self._writer)
            if self._marked_open:  # a run that appended nothing leaves the file as it found it
                await self.write_hours()
            # A clean close: the next open may skip the full check (module docstring). Only a
            # run that wrote the mark clears it (a refused start writes nothing).
            if self._marked_open:
                with contextlib.suppress(sqlite3.Error):
                    await self._set_open_mark(0)
        await self._db.close()


# The executors projection table, as view_from_row reads it (shared with tools/inspect-journal).
PROJECTION_SELECT = "SELECT id, path, state, enabled, settings, info, last_seq FROM executors"


def view_from_row(row: Sequence[Any]) -> ExecutorView:
    """One row of PROJECTION_SELECT as an ExecutorView (the inverse of ``_view_row``); a settings or
    info column that does not decode raises msgspec's DecodeError or ValidationError."""
    return ExecutorView(id=row[0], path=row[1], state=row[2], enabled=bool(row[3]),
                        settings=msgspec.json.decode(row[4], type=ModelSettings),
                        info=msgspec.json.decode(row[5], type=ModelInfo), last_seq=row[6])


def _view_row(v: ExecutorView) -> tuple[Any, ...]:
    return (v.id, v.path, v.state, int(v.enabled), msgspec.json.encode(v.settings).decode(),
            msgspec.json.encode(v.info).decode(), v.last_seq)


def select_events(*, stream: str | None = None, types: Sequence[str] | None = None, since_seq: int = 0,
                  since_ts: float | None = None, until_ts: float | None = None, limit: int | None = None,
                  newest_first: bool = False) -> tuple[str, list[Any]]:
    """The SQL for a filtered read of ``events`` (shared with tools/inspect-journal)."""
    where: list[str] = ["seq > ?"]
    args: list[Any] = [since_seq]
    if stream is not None:
        where.append("stream = ?")
        args.append(stream)
    if types:
        where.append(f"type IN ({', '.join('?' * len(types))})")
        args.extend(types)
    if since_ts is not None:
        where.append("ts >= ?")
        args.append(since_ts)
    if until_ts is not None:
        where.append("ts <= ?")
        args.append(until_ts)
    sql = ("SELECT seq, ts, stream, version, type, data FROM events WHERE " + " AND ".join(where)
           + f" ORDER BY seq {'DESC' if newest_first else 'ASC'}")
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return sql, args


async def apply_migrations(db: aiosqlite.Connection, migrations: Traversable) -> list[int]:
    """Apply each numbered SQL file not yet recorded, in order, each in its own transaction
    (a file whose first line is ``NO_TRANSACTION`` runs outside one, statement by statement).

    ``migrations`` is a directory: a Path, or what importlib.resources gives for a package."""
    await db.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
    done = {r[0] for r in await (await db.execute("SELECT version FROM schema_migrations")).fetchall()}
    try:
        entries = list(migrations.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    files = sorted((f for f in entries if fnmatch.fnmatchcase(f.name, MIGRATION_FILES) and f.is_file()),
                   key=lambda f: f.name)
    if not files:
        raise JournalError(f"no migrations found in {migrations}")
    applied = []
    for f in files:
        version = int(f.name[:4])
        if version in done:
            continue
        sql = f.read_text(encoding="utf-8")
        if sql.startswith(NO_TRANSACTION):
            # Statements SQLite refuses inside a transaction (VACUUM); such a file must be idempotent.
            for stmt in _split_sql(sql):
                await db.execute(stmt)
            await db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                             (version, f.name, time.time()))
            applied.append(version)
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            # executescript would COMMIT on its own; run statement by statement inside our transaction.
            for stmt in _split_sql(sql):
                await db.execute(stmt)
            await db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                             (version, f.name, time.time()))
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def _split_sql(sql: str) -> list[str]:
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        stripped = line.split("--", 1)[0]  # migrations must not put "--" inside a string literal
        buf += stripped if stripped.endswith("\n") or not line.endswith("\n") else stripped + "\n"
        if stripped.rstrip().endswith(";") and sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
