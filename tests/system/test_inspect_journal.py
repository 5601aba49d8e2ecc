"""tools/inspect-journal against journals written by the real Journal, run as a subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.machinery
import importlib.util
import json
import sqlite3
import subprocess
import sys
import time
import types
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

import optimanode.journal as journal_mod
from optimanode.journal import Journal
from optimanode.protocol import (
    DesiredChanged,
    Hashed,
    ModelInfo,
    ModelSettings,
    NodeStarted,
    Registered,
    RequestFinished,
    RequestStarted,
    Transition,
)

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "inspect-journal"
NOW = time.time()
T0 = NOW - 7200  # the fixture's story starts two hours ago
A, B, B2 = "alpha-7b-q4", "beta-3b", "beta-3b-instruct"


def info(name: str) -> ModelInfo:
    path = f"/models/{name}.gguf"
    return ModelInfo(path=path, files=[path], size_bytes=4_000_000_000, mtime_ns=1_700_000_000_000_000_000,
                     architecture="llama", size_label="7B", file_type="Q4_K_M")


def tr(trigger: str, src: str, dst: str, **kw: Any) -> Transition:
    return Transition(trigger=trigger, src=src, dst=dst, **kw)


# (seconds after T0, stream, body): one healthy executor that crashes once (SIGKILL) and comes
# back, one that crashes three times and gives up, one that is only registered.
STORY: list[tuple[float, str, Any]] = [
    (0, "node", NodeStarted(pid=100, version="0.1.0")),
    (10, A, Registered(info=info(A))),
    (11, A, Hashed(sha256="ab" * 32, size_bytes=4_000_000_000, mtime_ns=1_700_000_000_000_000_000)),
    (20, A, DesiredChanged(enabled=True, settings=ModelSettings(n_ctx=4096), by="operator")),
    (21, A, tr("enable", "discovered", "enabled")),
    (22, A, tr("start", "enabled", "starting", pid=1234)),
    (30, A, tr("ready", "starting", "running", pid=1234)),
    (600, A, tr("crash", "running", "crashed", reason="worker died", pid=1234, exit_code=None, signal=9,
                uptime_s=570.0, stderr_tail=["ggml_cuda: out of memory", "Killed"], restart_in_s=1.0)),
    (601, A, tr("restart", "crashed", "restarting", pid=1240)),
    (610, A, tr("ready", "restarting", "running", pid=1240)),
    (3600, B, Registered(info=info(B))),
    (3601, B, DesiredChanged(enabled=True)),
    (3602, B, tr("enable", "discovered", "enabled")),
    (3603, B, tr("start", "enabled", "starting", pid=2000)),
    (3610, B, tr("ready", "starting", "running", pid=2000)),
    (3640, B, tr("crash", "running", "crashed", reason="exited", pid=2000, exit_code=1,
                 stderr_tail=["error: bad tensor"], restart_in_s=1.0)),
    (3641, B, tr("restart", "crashed", "restarting", pid=2001)),
    (3645, B, tr("crash", "restarting", "crashed", reason="exited", pid=2001, exit_code=-11)),
    (3646, B, tr("restart", "crashed", "restarting", pid=2002)),
    (3650, B, tr("crash", "restarting", "crashed", reason="exited", pid=2002, exit_code=1)),
    (3651, B, tr("give_up", "crashed", "failed", reason="3 crashes in 300s")),
    (3700, B2, Registered(info=info(B2))),
    (7140, A, RequestStarted(request_id="r1", kind="chat", by="gw")),
    (7141, A, RequestFinished(request_id="r1", outcome="stop", prompt_tokens=12, completion_tokens=30,
                              ttft_s=0.2, total_s=1.5)),
]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The journal stamps events with time.time(); tests set it so that filters by time are exact."""
    now = [T0]
    monkeypatch.setattr(journal_mod, "time", types.SimpleNamespace(time=lambda: now[0]))
    return now


async def write_story(j: Journal, clock: list[float], story: list[tuple[float, str, Any]] = STORY) -> None:
    for offset, stream, body in story:
        clock[0] = T0 + offset
        await j.append(stream, body)


@pytest.fixture
async def journal_path(tmp_path: Path, clock: list[float]) -> Path:
    path = tmp_path / "state" / "journal.sqlite3"
    j = await Journal.open(path)
    try:
        await write_story(j, clock)
    finally:
        await j.close()
    return path


def run(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def run_json(path: Path, *args: str) -> Any:
    p = run("--journal", str(path), "--json", *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def iso(offset: float) -> str:
    """As the timeline shows times (to the millisecond, local, with offset)."""
    return datetime.fromtimestamp(T0 + offset).astimezone().isoformat(timespec="milliseconds")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tool() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("inspect_journal", str(TOOL))
    spec = importlib.util.spec_from_loader("inspect_journal", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


# -- timeline -----------------------------------------------------------------------------------


def test_timeline_lists_every_event_in_order_with_transition_summaries(journal_path: Path) -> None:
    p = run("--journal", str(journal_path), "timeline")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == len(STORY)
    assert lines[0].startswith(datetime.fromtimestamp(T0).astimezone().isoformat(timespec="milliseconds"))
    crash = lines[7]
    assert A in crash and "transition" in crash
    assert "running → crashed (crash)" in crash
    assert "signal=9 (SIGKILL)" in crash and "pid=1234" in crash and "reason='worker died'" in crash
    assert "exit_code=1" in lines[15]
    assert "signal=11 (SIGSEGV)" in lines[17]  # a negative exit code is a signal
    assert "/models/alpha-7b-q4.gguf" in lines[1]


def test_timeline_is_the_default_command_and_reads_state_dir(journal_path: Path) -> None:
    p = run("--state-dir", str(journal_path.parent), "--limit", "2")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 2
    p = run("--limit", "1", cwd=journal_path.parent.parent)  # default ./state/journal.sqlite3
    assert p.returncode == 0, p.stderr
    assert "request_finished" in p.stdout


def test_timeline_json_has_decoded_bodies_and_filters_by_executor_prefix(journal_path: Path) -> None:
    doc = run_json(journal_path, "timeline", "--executor", "alp")
    evs = doc["events"]
    assert {e["stream"] for e in evs} == {A}
    assert [e["seq"] for e in evs] == sorted(e["seq"] for e in evs)
    crash = next(e for e in evs if e["type"] == "transition" and e["data"]["trigger"] == "crash")
    assert crash["data"]["signal"] == 9 and crash["data"]["exit_code"] is None
    assert crash["data"]["stderr_tail"] == ["ggml_cuda: out of memory", "Killed"]
    assert crash["ts"] == pytest.approx(T0 + 600)


def test_timeline_exact_executor_id_wins_over_prefix_and_ambiguous_prefix_exits_2(journal_path: Path) -> None:
    doc = run_json(journal_path, "timeline", "--executor", B)
    assert {e["stream"] for e in doc["events"]} == {B}
    p = run("--journal", str(journal_path), "timeline", "--executor", "beta")
    assert p.returncode == 2
    assert "ambiguous" in p.stderr and B2 in p.stderr
    p = run("--journal", str(journal_path), "timeline", "--executor", "zeta")
    assert p.returncode == 2 and "no executor matches" in p.stderr


def test_timeline_filters_by_type_repeatable(journal_path: Path) -> None:
    doc = run_json(journal_path, "timeline", "--type", "registered", "--type", "desired")
    assert [e["type"] for e in doc["events"]] == ["registered", "desired", "registered", "desired", "registered"]


def test_timeline_filters_by_iso_since_until_both_inclusive(journal_path: Path) -> None:
    doc = run_json(journal_path, "timeline", "--since", iso(3600), "--until", iso(3610))
    assert [e["seq"] for e in doc["events"]] == list(range(11, 16))
    assert {e["stream"] for e in doc["events"]} == {B}
    naive = datetime.fromtimestamp(T0 + 3599.5).isoformat()  # no offset: local time
    doc = run_json(journal_path, "timeline", "--since", naive, "--until", iso(3600.5))
    assert [e["seq"] for e in doc["events"]] == [11]


def test_timeline_filters_by_relative_since(journal_path: Path) -> None:
    # Relative to the real clock, and T0 was fixed when the module was collected (a whole suite can
    # run for many minutes before this test): reach one minute past the request's start.
    window_s = int(time.time() - (T0 + 7140)) + 60
    doc = run_json(journal_path, "timeline", "--since", f"{window_s}s")
    assert [e["type"] for e in doc["events"]] == ["request_started", "request_finished"]
    doc = run_json(journal_path, "timeline", "--until", "90m")  # older than 90 minutes
    assert [e["ts"] - T0 for e in doc["events"]][-1] == pytest.approx(610)


def test_timeline_limit_shows_the_newest_oldest_first(journal_path: Path) -> None:
    doc = run_json(journal_path, "timeline", "--limit", "3")
    assert [e["seq"] for e in doc["events"]] == [len(STORY) - 2, len(STORY) - 1, len(STORY)]


def test_timeline_bad_time_exits_2_with_a_message(journal_path: Path) -> None:
    p = run("--journal", str(journal_path), "timeline", "--since", "yesterday-ish")
    assert p.returncode == 2 and "bad time" in p.stderr


# -- crashes ------------------------------------------------------------------------------------


def test_crashes_report_signal_name_stderr_uptime_and_restarts(journal_path: Path) -> None:
    p = run("--journal", str(journal_path), "crashes")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "killed by signal 9 (SIGKILL)" in out
    assert "| ggml_cuda: out of memory" in out and "| Killed" in out
    assert "up 9m30s" in out  # uptime_s=570 from the event
    assert "FAILED: gave up at" in out
    assert "restarts since: 2" in out


def test_crashes_json_per_executor(journal_path: Path) -> None:
    reps = {r["executor"]: r for r in run_json(journal_path, "crashes")["executors"]}
    assert set(reps) == {A, B}
    a = reps[A]
    assert a["failed"] is False and a["state"] == "running" and a["crash_count"] == 1
    (c,) = a["crashes"]
    assert (c["signal"], c["signal_name"], c["exit_code"]) == (9, "SIGKILL", None)
    assert c["uptime_s"] == 570.0 and c["uptime_source"] == "event"
    assert c["stderr_tail"] == ["ggml_cuda: out of memory", "Killed"]
    assert c["restarts_since"] == 1 and c["next"] == "restart"
    b = reps[B]
    assert b["failed"] is True and b["state"] == "failed" and b["gave_up_at"] is not None
    assert [x["restarts_since"] for x in b["crashes"]] == [2, 1, 0]
    assert [x["next"] for x in b["crashes"]] == ["restart", "restart", "give_up"]
    # No uptime_s in the events: computed from the ready before, or from the spawn when never ready.
    assert b["crashes"][0]["uptime_s"] == pytest.approx(30) and b["crashes"][0]["uptime_source"] == "ready"
    assert b["crashes"][1]["uptime_s"] == pytest.approx(4) and b["crashes"][1]["uptime_source"] == "spawn"
    assert (b["crashes"][1]["signal"], b["crashes"][1]["signal_name"]) == (11, "SIGSEGV")


def test_crashes_filters_by_executor_and_time(journal_path: Path) -> None:
    reps = run_json(journal_path, "crashes", "--executor", "alpha")["executors"]
    assert [r["executor"] for r in reps] == [A]
    reps = run_json(journal_path, "crashes", "--since", iso(3642))["executors"]
    assert [r["executor"] for r in reps] == [B] and reps[0]["crash_count"] == 2
    # Restarts are counted over the whole history even when the window cuts it.
    assert reps[0]["crashes"][0]["restarts_since"] == 1


async def test_crashes_prints_no_crashes_for_a_healthy_journal(tmp_path: Path, clock: list[float]) -> None:
    j = await Journal.open(tmp_path / "j.sqlite3")
    await write_story(j, clock, STORY[:7])
    await j.close()
    p = run("--journal", str(j.path), "crashes")
    assert p.returncode == 0 and p.stdout.strip() == "no crashes"


# -- state --------------------------------------------------------------------------------------


async def test_state_equals_the_journals_projection_and_replay(journal_path: Path) -> None:
    j = await Journal.open(journal_path)
    try:
        replayed = await j.replay()
        views = j.views()
    finally:
        await j.close()
    rows = {r["executor"]: r for r in run_json(journal_path, "state")["executors"]}
    assert set(rows) == set(replayed) == set(views) == {A, B, B2}
    for eid, v in replayed.items():
        assert v == views[eid]
        r = rows[eid]
        assert (r["state"], r["enabled"], r["path"], r["last_seq"]) == (v.state, v.enabled, v.path, v.last_seq)
        assert r["settings"] == msgspec.to_builtins(v.settings)
        assert r["info"] == msgspec.to_builtins(v.info)
    assert rows[A]["state"] == "running" and rows[A]["settings"] == {"n_ctx": 4096}
    assert rows[A]["info"]["sha256"] == "ab" * 32
    assert rows[B]["state"] == "failed" and rows[B2]["state"] == "discovered" and rows[B2]["enabled"] is False
    assert rows[A]["last_event_ts"] == pytest.approx(T0 + 7141)  # request events count as activity


def test_state_text_shows_state_desired_settings_and_path(journal_path: Path) -> None:
    p = run("--journal", str(journal_path), "state", "--executor", "alpha")
    assert p.returncode == 0, p.stderr
    head, row, path = p.stdout.splitlines()
    assert head.split()[:4] == ["EXECUTOR", "STATE", "DESIRED", "LAST"]
    assert row.split()[:3] == [A, "running", "enabled"] and "n_ctx=4096" in row
    assert path.strip() == "/models/alpha-7b-q4.gguf"


def test_state_check_passes_on_a_healthy_journal(journal_path: Path) -> None:
    p = run("--journal", str(journal_path), "state", "--check")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "matches the replay (3 executors)" in p.stdout
    assert run_json(journal_path, "state", "--check")["check"] == {"ok": True, "differences": []}


def test_state_check_fails_with_exit_1_after_tampering_with_the_executors_table(journal_path: Path) -> None:
    with sqlite3.connect(journal_path) as db:
        db.execute("UPDATE executors SET state = 'running' WHERE id = ?", (B,))
        db.execute("DELETE FROM executors WHERE id = ?", (B2,))
    db.close()
    p = run("--journal", str(journal_path), "state", "--check")
    assert p.returncode == 1
    assert f'DIFFERS {B}.state: table="running" replay="failed"' in p.stdout
    assert f"DIFFERS {B2}: only in the replay" in p.stdout
    p = run("--journal", str(journal_path), "--json", "state", "--check")
    assert p.returncode == 1
    diffs = json.loads(p.stdout)["check"]["differences"]
    assert {"executor": B, "field": "state", "replay": "failed", "table": "running"} in diffs


async def test_state_and_crashes_read_a_journal_from_before_the_replay_index(tmp_path: Path,
                                                                             clock: list[float]) -> None:
    """A journal no node has opened since migration 0002 has no events_state index, and the tool
    must not migrate it: the node's replay reads the same rows without the index."""
    old = tmp_path / "old-migrations"
    old.mkdir()
    (old / "0001_initial.sql").write_text((journal_mod.DEFAULT_MIGRATIONS / "0001_initial.sql").read_text())
    path = tmp_path / "old.sqlite3"
    j = await Journal.open(path, migrations=old)
    try:
        await write_story(j, clock)
        views = j.views()
    finally:
        await j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'events_state'").fetchone() == (0,)
    db.close()
    doc = run_json(path, "state", "--check")
    assert doc["check"] == {"ok": True, "differences": []}
    assert {r["executor"]: r["state"] for r in doc["executors"]} == {eid: v.state for eid, v in views.items()}
    reps = run_json(path, "crashes")["executors"]
    assert {r["executor"]: r["state"] for r in reps} == {A: "running", B: "failed"}
    with sqlite3.connect(path) as db:  # still not migrated
        assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'events_state'").fetchone() == (0,)
    db.close()


def test_a_state_event_that_does_not_decode_exits_2_naming_its_seq(journal_path: Path) -> None:
    """timeline shows such a row raw; state and crashes replay the state as the node does, and stop
    where the node would, with a one-line message instead of a traceback."""
    with sqlite3.connect(journal_path) as db:
        seq = db.execute("INSERT INTO events (ts, stream, version, type, data) VALUES (?, ?, 99, 'transition', ?)",
                         (NOW, A, '{"type":"transition","trigger":5}')).lastrowid
    db.close()
    p = run("--journal", str(journal_path), "timeline", "--limit", "1")
    assert p.returncode == 0 and '"trigger":5' in p.stdout
    for cmd in ("state", "crashes"):
        p = run("--journal", str(journal_path), cmd)
        assert p.returncode == 2, p.stdout
        assert p.stderr.startswith("inspect-journal: error:") and f"event seq {seq} " in p.stderr
        assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


# -- follow, live node, safety --------------------------------------------------------------------


async def test_follow_prints_an_event_appended_while_it_runs(journal_path: Path, clock: list[float]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(TOOL), "--journal", str(journal_path), "--json", "timeline", "--limit", "1",
        "--follow-for", "3", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15))  # type: ignore[union-attr]
        assert first["seq"] == len(STORY)
        j = await Journal.open(journal_path)
        try:
            clock[0] = NOW
            await j.append(B, tr("enable", "failed", "enabled", reason="operator re-enabled"))
        finally:
            await j.close()
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    (new,) = [json.loads(line) for line in out.decode().splitlines()]
    assert new["seq"] == len(STORY) + 1 and new["data"]["trigger"] == "enable" and new["stream"] == B


async def test_follow_respects_the_filters(journal_path: Path, clock: list[float]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(TOOL), "--journal", str(journal_path), "timeline", "--executor", "alpha",
        "--type", "transition", "--limit", "1", "--follow-for", "2.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()  # type: ignore[union-attr]
        assert "restarting → running (ready)" in first
        j = await Journal.open(journal_path)
        try:
            clock[0] = NOW
            await j.append(B, tr("enable", "failed", "enabled"))       # other executor: not shown
            await j.append(A, RequestStarted(request_id="r2", kind="chat"))  # other type: not shown
            await j.append(A, tr("stop", "running", "stopping", reason="disabled"))
        finally:
            await j.close()
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 1 and "running → stopping (stop)" in lines[0]


async def test_reads_a_journal_that_a_node_has_open_and_is_writing(tmp_path: Path, clock: list[float]) -> None:
    path = tmp_path / "journal.sqlite3"
    j = await Journal.open(path)
    try:
        await write_story(j, clock, STORY[:12])
        assert Path(f"{path}-wal").stat().st_size > 0  # the newest commits live in the WAL
        doc = await asyncio.to_thread(run_json, path, "state", "--check")
        assert doc["check"]["ok"] is True
        assert {r["executor"]: r["state"] for r in doc["executors"]} == {
            eid: v.state for eid, v in j.views().items()}
        await write_story(j, clock, STORY[12:])
        doc = await asyncio.to_thread(run_json, path, "timeline")
        assert len(doc["events"]) == len(STORY)
        # The reader did not get in the writer's way.
        ev = await j.append(A, RequestStarted(request_id="r3", kind="completion"))
        assert ev.seq == len(STORY) + 1
        other = sqlite3.connect(path)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()
    finally:
        await j.close()


def test_missing_journal_exits_2_with_a_one_line_message(tmp_path: Path) -> None:
    p = run("--journal", str(tmp_path / "nope.sqlite3"), "state")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no journal at" in p.stderr
    assert not (tmp_path / "nope.sqlite3").exists()  # not created either
    p = run("--state-dir", str(tmp_path / "nodir"))
    assert p.returncode == 2 and "nodir/journal.sqlite3" in p.stderr


def test_a_file_that_is_not_a_journal_exits_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database, " * 200)
    p = run("--journal", str(junk), "crashes")
    assert p.returncode == 2 and p.stderr.startswith("inspect-journal: error:") and "Traceback" not in p.stderr
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    p = run("--journal", str(other), "timeline")
    assert p.returncode == 2 and "not an OptimaNode journal" in p.stderr


def test_the_tool_never_writes_the_journal(journal_path: Path) -> None:
    before = (sha(journal_path), journal_path.stat().st_mtime_ns)
    with sqlite3.connect(journal_path) as db:
        count = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    db.close()
    for args in (["timeline"], ["--json", "timeline", "--follow-for", "0.6"], ["crashes"], ["state", "--check"],
                 ["--json", "state"]):
        assert run("--journal", str(journal_path), *args).returncode == 0
    assert (sha(journal_path), journal_path.stat().st_mtime_ns) == before
    with sqlite3.connect(journal_path) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == count
    db.close()


def test_help_has_an_example_for_each_subcommand() -> None:
    p = run("--help")
    assert p.returncode == 0
    for example in ("inspect-journal --state-dir /var/lib/optimanode timeline", "inspect-journal crashes",
                    "inspect-journal state --check", "--follow"):
        assert example in p.stdout
    for cmd in ("timeline", "crashes", "state"):
        sub = run(cmd, "--help")
        assert sub.returncode == 0 and f"inspect-journal {cmd}" in sub.stdout.split("example:")[1]


def test_the_tool_does_not_import_llama_cpp(journal_path: Path) -> None:
    code = (f"import sys, runpy; sys.argv = ['inspect-journal', '--journal', {str(journal_path)!r}, 'state'];"
            f"\ntry:\n    runpy.run_path({str(TOOL)!r}, run_name='__main__')\nexcept SystemExit:\n    pass"
            "\nassert 'llama_cpp' not in sys.modules, 'llama_cpp imported'\nprint('clean')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("clean")


def test_run_by_a_python3_without_the_packages_it_runs_again_under_the_checkouts_venv(journal_path: Path) -> None:
    """README runs `tools/inspect-journal` as it is: its shebang's python3 lacks msgspec, so the tool
    runs itself again under the checkout's .venv instead of failing with ModuleNotFoundError."""
    import shutil

    plain = shutil.which("python3", path="/usr/bin:/bin")
    venv = ROOT / ".venv"
    if plain is None or not (venv / "bin" / "python").exists():
        pytest.skip("needs a system python3 and the checkout's .venv")
    if subprocess.run([plain, "-c", "import msgspec"], capture_output=True).returncode == 0:
        pytest.skip("this system python3 has msgspec: nothing to run again")
    p = subprocess.run([plain, str(TOOL), "--journal", str(journal_path), "--json", "state"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert {r["executor"] for r in json.loads(p.stdout)["executors"]} >= {A, B}
