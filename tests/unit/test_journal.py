"""The journal: WAL SQLite, migrations once each, durable ordered appends, replay equals the projection."""

import asyncio
import sqlite3

import pytest

from optimanode.errors import JournalError
from optimanode.journal import NODE_STREAM, Journal, apply_migrations, project
from optimanode.protocol import (
    DesiredChanged,
    DrainStarted,
    Hashed,
    ModelInfo,
    ModelSettings,
    NodeStarted,
    Registered,
    RequestStarted,
    Transition,
)

INFO = ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=10, mtime_ns=5, architecture="llama")


async def test_a_new_journal_is_in_wal_mode_with_every_migration_recorded(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.close()
    db = sqlite3.connect(tmp_path / "j.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version, name FROM schema_migrations").fetchall() == [
        (1, "0001_initial.sql"), (2, "0002_replay_index.sql"), (3, "0003_retention.sql"),
        (4, "0004_incremental_vacuum.sql"), (5, "0005_request_hours_at_append.sql")]
    assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental


async def test_migrations_are_applied_once_and_new_ones_in_order(tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_a.sql").write_text("CREATE TABLE a (x INTEGER);")
    import aiosqlite

    async with aiosqlite.connect(tmp_path / "db", isolation_level=None) as db:
        assert await apply_migrations(db, migrations) == [1]
        assert await apply_migrations(db, migrations) == []
        (migrations / "0002_b.sql").write_text("-- a comment; with a semicolon\nCREATE TABLE b (y TEXT);\nINSERT INTO b VALUES ('z');")
        assert await apply_migrations(db, migrations) == [2]
        assert await (await db.execute("SELECT y FROM b")).fetchall() == [("z",)]


async def test_a_failing_migration_leaves_nothing_half_applied(tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_bad.sql").write_text("CREATE TABLE a (x INTEGER);\nINSERT INTO nope VALUES (1);")
    import aiosqlite

    async with aiosqlite.connect(tmp_path / "db", isolation_level=None) as db:
        with pytest.raises(sqlite3.Error):
            await apply_migrations(db, migrations)
        tables = {r[0] for r in await (await db.execute("SELECT name FROM sqlite_master")).fetchall()}
        assert "a" not in tables
        assert await (await db.execute("SELECT COUNT(*) FROM schema_migrations")).fetchone() == (0,)


async def test_appends_get_increasing_seq_and_per_stream_versions(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    e1 = await j.append("a", Registered(info=INFO))
    e2 = await j.append("b", Registered(info=INFO))
    e3 = await j.append("a", DesiredChanged(enabled=True))
    assert (e1.seq, e2.seq, e3.seq) == (1, 2, 3)
    assert (e1.version, e2.version, e3.version) == (1, 1, 2)
    await j.close()


async def test_concurrent_appends_share_commits_and_keep_every_event(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.append("a", Registered(info=INFO))
    events = await asyncio.gather(*[j.append("a", RequestStarted(request_id=str(i), kind="completion"))
                                    for i in range(200)])
    assert sorted(e.version for e in events) == list(range(2, 202))
    assert len(await j.read(stream="a")) == 201
    await j.close()


async def test_an_event_that_would_not_read_back_is_refused_and_the_writer_goes_on(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    bad = ModelInfo(path="/m/caf\udce9.gguf", files=["/m/caf\udce9.gguf"], size_bytes=10, mtime_ns=5)
    with pytest.raises(JournalError, match="refused a Registered event of a: .*UnicodeEncodeError"):
        await asyncio.wait_for(j.append("a", Registered(info=bad)), 5)
    # JSON writes an infinite float as null, which does not read back as a float.
    with pytest.raises(JournalError, match="refused a DrainStarted event of b: .*ValidationError"):
        await asyncio.wait_for(j.append("b", DrainStarted(pid=1, timeout_s=float("inf"))), 5)
    e = await asyncio.wait_for(j.append("a", Registered(info=INFO)), 5)
    assert e.seq == 1 and [x.seq for x in await j.read()] == [1]
    await j.close()


async def test_an_unexpected_error_in_a_commit_fails_its_callers_and_the_writer_goes_on(tmp_path, monkeypatch):
    j = await Journal.open(tmp_path / "j.sqlite3")
    real = j._commit_locked
    calls = []

    async def broken_once(batches):
        calls.append(len(batches))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return await real(batches)

    monkeypatch.setattr(j, "_commit_locked", broken_once)
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(j.append("a", Registered(info=INFO)), 5)
    e = await asyncio.wait_for(j.append("a", Registered(info=INFO)), 5)  # without the fix: waits forever
    assert e.seq == 1
    await j.close()


async def test_a_committed_event_survives_reopening(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.append("a", Registered(info=INFO))
    await j.append("a", DesiredChanged(enabled=True, settings=ModelSettings(n_ctx=512)))
    await j.close()
    j = await Journal.open(tmp_path / "j.sqlite3")
    views = await j.replay()
    assert views["a"].enabled and views["a"].settings.n_ctx == 512
    e = await j.append("a", Transition(trigger="enable", src="discovered", dst="enabled"))
    assert e.version == 3  # versions continue where they were
    await j.close()


async def test_replay_equals_the_projection_kept_in_the_same_transaction(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.append_many([("a", Registered(info=INFO)), ("a", DesiredChanged(enabled=True))])
    for trig, src, dst in (("enable", "discovered", "enabled"), ("start", "enabled", "starting"),
                           ("ready", "starting", "running")):
        await j.append("a", Transition(trigger=trig, src=src, dst=dst))
    await j.append("a", Hashed(sha256="ab" * 32, size_bytes=10, mtime_ns=5))
    await j.append("b", Registered(info=INFO))
    await j.append(NODE_STREAM, NodeStarted(pid=1, version="x"))
    replayed = await j.replay()
    assert replayed == j.views()
    assert replayed["a"].state == "running" and replayed["a"].info.sha256 == "ab" * 32
    await j.close()
    j = await Journal.open(tmp_path / "j.sqlite3")
    assert j.views() == replayed  # the table on disk, read back
    await j.close()


async def test_a_journal_from_before_the_replay_index_gains_it_and_replays_the_same(tmp_path):
    """An older node's journal (migration 0001 only) is upgraded on open; the replay query walks
    the partial index without a sort, and skips request events however many there are."""
    from optimanode.journal import DEFAULT_MIGRATIONS

    old = tmp_path / "old-migrations"
    old.mkdir()
    (old / "0001_initial.sql").write_text((DEFAULT_MIGRATIONS / "0001_initial.sql").read_text())
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path, migrations=old)
    await j.append("a", Registered(info=INFO))
    for i in range(300):  # request events: not state, never folded
        await j.append("a", RequestStarted(request_id=f"r{i}", kind="completion"))
    await j.append("a", Transition(trigger="enable", src="discovered", dst="enabled"))
    before = j.views()
    await j.close()
    j = await Journal.open(path)
    assert await j.replay() == before == j.views()
    await j.close()
    db = sqlite3.connect(path)
    plan = " ".join(r[3] for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT seq, stream, data FROM events INDEXED BY events_state WHERE stream != 'node'"
        " AND type IN ('registered', 'transition', 'desired', 'hashed') ORDER BY seq"))
    assert "events_state" in plan and "TEMP B-TREE" not in plan, plan
    assert db.execute("SELECT COUNT(*) FROM events INDEXED BY events_state WHERE stream != 'node' AND type IN"
                      " ('registered', 'transition', 'desired', 'hashed')").fetchone()[0] == 2


def test_a_hash_for_an_older_version_of_the_file_is_not_applied():
    view = project(None, "a", 1, Registered(info=INFO))
    assert project(view, "a", 2, Hashed(sha256="x", size_bytes=11, mtime_ns=5)).info.sha256 == ""


async def test_a_conflicting_append_from_a_second_writer_fails_and_loses_nothing(tmp_path):
    j1 = await Journal.open(tmp_path / "j.sqlite3")
    j2 = await Journal.open(tmp_path / "j.sqlite3")
    await j1.append("a", Registered(info=INFO))
    with pytest.raises(JournalError, match="UNIQUE"):
        await j2.append("a", DesiredChanged(enabled=True))  # j2 thinks version 1 is free
    assert [e.type for e in await j1.read(stream="a")] == ["registered"]
    await j1.close()
    await j2.close()


async def test_a_corrupt_journal_file_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="journal"):
        await Journal.open(path)


async def test_a_full_disk_fails_the_append_and_keeps_what_was_committed(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.append("a", Registered(info=INFO))
    # SQLite's own limit stands in for a full disk: the next page cannot be allocated.
    pages = (await (await j._db.execute("PRAGMA page_count")).fetchone())[0]
    await j._db.execute(f"PRAGMA max_page_count={pages}")
    big = ModelInfo(path="x" * 200_000, files=[], size_bytes=0, mtime_ns=0)
    with pytest.raises(JournalError, match="full"):
        await j.append("b", Registered(info=big))
    await j._db.execute("PRAGMA max_page_count=1073741823")
    e = await j.append("a", DesiredChanged(enabled=True))
    assert e.version == 2  # the failed batch did not consume a version
    assert [ev.type for ev in await j.read()] == ["registered", "desired"]
    assert "b" not in j.views()
    await j.close()


async def test_read_filters_by_stream_type_and_time(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.append("a", Registered(info=INFO))
    await j.append("b", Registered(info=INFO))
    await j.append("a", DesiredChanged(enabled=True))
    assert [e.stream for e in await j.read(types=["registered"])] == ["a", "b"]
    assert [e.type for e in await j.read(stream="a", newest_first=True, limit=1)] == ["desired"]
    assert await j.read(since_ts=1e12) == []
    await j.close()


async def test_close_commits_every_append_it_accepted_even_one_mid_commit(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    tasks = [asyncio.create_task(j.append("node", NodeStarted(pid=i, version="x"))) for i in range(5)]
    for _ in range(20):
        await asyncio.sleep(0)  # let the writer take a batch and start committing it
    await j.close()
    events = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [e.version for e in events] == [1, 2, 3, 4, 5]
    db = sqlite3.connect(tmp_path / "j.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (5,)


async def _damaged_after_a_clean_close(path) -> bytes:
    """A journal closed cleanly, then the root page of its events_ts index scrambled (as in
    tests/system/test_reliability.py): damage only a whole-file check sees at open."""
    import os

    from optimanode.protocol import NodeStopped

    j = await Journal.open(path)
    await j.append_many([(NODE_STREAM, NodeStopped(reason="x" * 200)) for _ in range(500)])
    await j.close()  # the WAL is checkpointed into the file
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[4 * page:5 * page] = os.urandom(page)  # page 5: the events_ts root (migrations/0001)
    path.write_bytes(bytes(data))
    return bytes(data)


def _open_mark(path) -> str | None:
    db = sqlite3.connect(path)
    row = db.execute("SELECT value FROM journal_meta WHERE key = 'open'").fetchone()
    db.close()
    return row[0] if row else None


async def test_a_large_journal_closed_cleanly_opens_without_the_full_check_and_the_background_check_reports_damage(
        tmp_path, caplog):
    path = tmp_path / "j.sqlite3"
    await _damaged_after_a_clean_close(path)
    assert _open_mark(path) == "0"
    # A small file is checked in full at every open, clean stop or not: refused.
    with pytest.raises(JournalError, match="corrupt"):
        await Journal.open(path)
    # Above full_check_below after a clean close: open skips the whole-file read...
    j = await Journal.open(path, full_check_below=0, background_check_delay_s=None)
    assert (j.checked_at_open, j.integrity) == (False, "")
    assert _open_mark(path) == "0"  # nothing written yet: a start refused here leaves the file as it was
    # ...and the check after start-up finds the damage, says so in the log and the metrics' report.
    with caplog.at_level("ERROR", logger="optimanode.journal"):
        found = await j.check_integrity()
    assert found != "ok" and j.integrity == found
    assert any("is corrupt" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    from optimanode.config import JournalSettings
    from optimanode.retention import Retention

    ret = await Retention.open(j, JournalSettings())
    assert ret.report().integrity == found
    await ret.close()
    await j.close()


async def test_the_open_mark_is_written_with_the_first_append_and_cleared_by_a_clean_close(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path, background_check_delay_s=None)
    await j.append("a", Registered(info=INFO))
    assert _open_mark(path) == "1"  # a kill from here on leaves the mark: the next open checks in full
    await j.close()
    assert _open_mark(path) == "0"
    j = await Journal.open(path, full_check_below=0, background_check_delay_s=None)
    assert not j.checked_at_open and _open_mark(path) == "0"  # opened, nothing written: untouched
    await j.close()
    assert _open_mark(path) == "0"


async def test_after_a_run_that_did_not_close_the_journal_a_damaged_one_is_refused_whatever_its_size(tmp_path):
    path = tmp_path / "j.sqlite3"
    await _damaged_after_a_clean_close(path)
    # What a killed node leaves: the mark its open set, never cleared by a close.
    db = sqlite3.connect(path)
    db.execute("UPDATE journal_meta SET value = '1' WHERE key = 'open'")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(JournalError, match="is corrupt"):
        await Journal.open(path, full_check_below=0)
    assert path.read_bytes() == before  # refused before anything was written


async def test_a_sound_journal_passes_the_background_check(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await j.append(NODE_STREAM, NodeStarted(pid=1, version="x"))
    await j.close()
    j = await Journal.open(path, full_check_below=0, background_check_delay_s=0.0)
    assert not j.checked_at_open
    for _ in range(500):  # bounded: the check of a tiny file takes milliseconds
        if j.integrity:
            break
        await asyncio.sleep(0.01)
    assert j.integrity == "ok"
    await j.close()
