"""tools/inspect-journal on a journal retention has worked on: hours of folded requests in the timeline, every kept crash in `crashes`, and `state --check` comparing the checkpoint replay with the full replay."""

import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from optimanode.config import JournalSettings
from optimanode.journal import Journal
from optimanode.protocol import ModelInfo, Registered, RequestFinished, RequestStarted, Transition
from optimanode.retention import DAY_S, Retention

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "inspect-journal"
INFO = ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=10, mtime_ns=5, architecture="llama")


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60)


async def retained_journal(path: Path) -> None:
    j = await Journal.open(path)
    await j.append("alpha", Registered(info=INFO))
    for i in range(6):
        await j.append("alpha", Transition(trigger="crash", src="running", dst="crashed", reason=f"crash {i}",
                                           exit_code=1, stderr_tail=[f"tail of crash {i}"]))
        await j.append("alpha", Transition(trigger="restart", src="crashed", dst="restarting"))
    rng = random.Random(4)
    for i in range(120):
        await j.append_many([("alpha", RequestStarted(request_id=f"r{i}", kind="chat")),
                             ("alpha", RequestFinished(request_id=f"r{i}", outcome=rng.choice(["stop", "length"]),
                                                       prompt_tokens=10, completion_tokens=20, ttft_s=0.2,
                                                       total_s=1.5))])
    await j.checkpoint()
    later = time.time() + 91 * DAY_S
    ret = await Retention.open(j, JournalSettings(crashes_kept=4, checkpoint_interval_s=1e12), clock=lambda: later)
    report = await ret.pass_once()
    assert report.requests_folded == 240 and report.events_deleted > 0
    await ret.close()
    await j.close()


async def test_the_timeline_shows_folded_hours_and_crashes_keeps_the_retained_ones(tmp_path):
    path = tmp_path / "journal.sqlite3"
    await retained_journal(path)
    out = tool("--journal", str(path), "timeline")
    assert out.returncode == 0, out.stderr
    hours = [line for line in out.stdout.splitlines() if "request_hour" in line]
    assert len(hours) in (1, 2)  # the requests were written within a second, maybe across an hour
    assert sum(int(line.split("request_hour")[1].split()[0]) for line in hours) == 120
    assert "tokens" in hours[0] and "ttft p50 0.2" in hours[0]
    doc = json.loads(tool("--journal", str(path), "--json", "timeline", "--type", "request_hour").stdout)
    assert sum(e["data"]["requests"] for e in doc["events"]) == 120
    crashes = json.loads(tool("--journal", str(path), "--json", "crashes").stdout)
    (alpha,) = crashes["executors"]
    assert [c["reason"] for c in alpha["crashes"]] == ["crash 2", "crash 3", "crash 4", "crash 5"]
    assert [c["stderr_tail"] for c in alpha["crashes"]][-1] == ["tail of crash 5"]


async def test_state_check_compares_the_checkpoint_replay_with_the_full_replay(tmp_path):
    path = tmp_path / "journal.sqlite3"
    await retained_journal(path)
    out = tool("--journal", str(path), "state", "--check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matches the full replay from base checkpoint seq" in out.stdout
    # A newer checkpoint that disagrees with the events before it (written by hand) is caught.
    db = sqlite3.connect(path)
    (data,) = db.execute("SELECT data FROM events WHERE type = 'checkpoint' ORDER BY seq DESC").fetchone()
    assert '"state":"restarting"' in data
    db.execute("INSERT INTO events (ts, stream, version, type, data) VALUES (?, 'node', 1000, 'checkpoint', ?)",
               (time.time(), data.replace('"state":"restarting"', '"state":"running"')))
    db.commit()
    db.close()
    out = tool("--journal", str(path), "--json", "state", "--check")
    assert out.returncode == 1
    diffs = json.loads(out.stdout)["check"]["differences"]
    assert any(d.get("source") == "full replay" and d["field"] == "state" for d in diffs), diffs


async def test_hours_still_whole_show_event_by_event_and_an_hour_being_deleted_shows_once(tmp_path):
    """The journal writes request_hours as requests come: the timeline shows an hour's row only once
    retention has deleted some of its events, and then not the events left in it (its row counts
    them already), so each request is shown exactly once either way."""
    from optimanode.retention import fold_step

    path = tmp_path / "journal.sqlite3"
    j = await Journal.open(path)
    for i in range(50):
        await j.append_many([("alpha", RequestStarted(request_id=f"r{i}", kind="chat")),
                             ("alpha", RequestFinished(request_id=f"r{i}", outcome="stop", prompt_tokens=1,
                                                       completion_tokens=2, ttft_s=0.1, total_s=0.5))])
    await j.close()
    doc = json.loads(tool("--journal", str(path), "--json", "timeline").stdout)
    assert [e["type"] for e in doc["events"]].count("request_finished") == 50
    assert not [e for e in doc["events"] if e["type"] == "request_hour"]
    db = sqlite3.connect(path, isolation_level=None)
    assert fold_step(db, before_ts=time.time() + DAY_S, before_seq=10**9, limit=30).rows == 30
    db.close()
    doc = json.loads(tool("--journal", str(path), "--json", "timeline").stdout)
    hours = [e for e in doc["events"] if e["type"] == "request_hour"]
    finished = [e for e in doc["events"] if e["type"] == "request_finished"]
    assert sum(h["data"]["requests"] for h in hours) + len(finished) == 50
    assert len(hours) in (1, 2)  # within a second, maybe across an hour
