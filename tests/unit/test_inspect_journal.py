"""tools/inspect-journal loaded in process: its connection to a journal written by the real Journal is read-only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from system.test_inspect_journal import clock, journal_path, load_tool  # noqa: F401 - fixtures


def test_the_tools_connection_is_read_only(journal_path: Path) -> None:
    tool = load_tool()
    conn = tool.connect_ro(journal_path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only|attempt to write"):
            conn.execute("INSERT INTO events (ts, stream, version, type, data) VALUES (0, 'x', 1, 'x', '{}')")
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM executors")
        # Its journal mode is the node's (WAL), untouched.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert journal_path.read_bytes()[18:20] == b"\x02\x02"  # header: WAL read/write versions
