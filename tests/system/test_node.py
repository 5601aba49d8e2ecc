"""The node with real parts: the real SmolLM2 model, real worker processes, real signals, a real journal.

Each test states one behaviour an operator relies on. Waits are bounded (wait_for_state has a
timeout); nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psutil
import pytest

from optimanode.config import load_settings
from optimanode.errors import (BadRequest, ConfigError, ModelNotRunning, NodeFault, Overloaded, ShuttingDown, UnknownModel,
                              WorkerCrashed)
from optimanode.journal import Journal
from optimanode.node import Node
from optimanode.protocol import (ChatMessage, ChatRequest, Chunk, CompletionRequest, Done, ModelSettings,
                                 Models, SamplingParams, TaskExited, Transition, encode_link)
import gguf_files

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)

pytestmark = pytest.mark.timeout(240)


def make_settings(tmp_path: Path, **overrides: str):
    base = {
        "models_dir": str(tmp_path / "models"),
        "state_dir": str(tmp_path / "state"),
        "model_defaults.n_ctx": "512",
        # One slot, as these tests were written for; parallel = "auto" (the default since issue 14)
        # is tested in test_gpu_placement.py.
        "model_defaults.parallel": "1",
        "restart.backoff_base_s": "0.2",
        "restart.backoff_cap_s": "1.0",
        "restart.heartbeat_interval_s": "0.5",
        "scan.hash_models": "false",
        "scan.interval_s": "3600",
    }
    base.update(overrides)
    return load_settings(environ={}, overrides=base)


@pytest.fixture
def models(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    return d


async def collect(stream) -> tuple[str, Done]:
    text, done = [], None
    async for msg in stream:
        if isinstance(msg, Chunk):
            text.append(msg.text)
        else:
            done = msg
    assert done is not None
    return "".join(text), done


def only_id(node: Node) -> str:
    (eid,) = node.executors
    return eid


async def test_an_enabled_model_runs_and_streams_a_completion_and_a_chat_completion(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        assert node.status(eid).state == "discovered"
        await node.enable(eid, by="test")
        assert await node.wait_for_state(eid, {"running"}, timeout=60) == "running"
        chunks = []
        async for msg in node.infer(eid, CompletionRequest(prompt="The capital of France is", params=GREEDY)):
            chunks.append(msg)
        assert isinstance(chunks[-1], Done) and len(chunks) > 2
        assert chunks[-1].usage.completion_tokens == sum(c.tokens for c in chunks[:-1])
        text, done = await collect(node.infer(eid, ChatRequest(
            messages=[ChatMessage(role="user", content="Say hello.")], params=GREEDY)))
        assert text.strip() and done.finish_reason in {"stop", "length"}
        st = node.status(eid)
        assert st.requests_served == 2 and st.pid is not None and st.effective.n_ctx == 512
        trail = [(e.body.src, e.body.dst) for e in await node.events(eid) if e.type == "transition"]
        assert trail == [("discovered", "enabled"), ("enabled", "starting"), ("starting", "running")]


async def test_infer_to_hands_over_the_same_chunks_and_a_failing_receiver_fails_only_its_request(tmp_path, models):
    """The Gateway's path (chunks pushed from the pipe callback) against the iterator's path."""
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        req = CompletionRequest(prompt="The capital of France is", params=GREEDY)
        text, done = await collect(node.infer(eid, req))
        pushed: list[Chunk] = []
        done_to = await node.infer_to(eid, req, pushed.append, request_id="pushed")
        assert "".join(c.text for c in pushed) == text
        # The same counts; the second request reuses the first one's prompt cells (cached_tokens).
        assert (done_to.usage.prompt_tokens, done_to.usage.completion_tokens) == \
            (done.usage.prompt_tokens, done.usage.completion_tokens)
        assert done.usage.cached_tokens == 0 and done_to.usage.cached_tokens == done.usage.prompt_tokens - 1
        assert done_to.usage.completion_tokens == sum(c.tokens for c in pushed)

        def broken(chunk: Chunk) -> None:
            raise RuntimeError("receiver bug")

        pid = node.status(eid).pid
        long = CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=300))
        with pytest.raises(NodeFault, match="receiver bug") as err:
            await node.infer_to(eid, long, broken, request_id="broken")
        assert err.value.code == "internal"
        # The worker was not blamed, and the slot was freed (a Cancel went down): the next request runs.
        again: list[Chunk] = []
        assert (await node.infer_to(eid, req, again.append)).finish_reason == "length"
        assert "".join(c.text for c in again) == text
        st = node.status(eid)
        assert st.pid == pid and st.state == "running" and st.requests_served == 3
        ends = {e.body.request_id: e.body.outcome for e in await node.events(eid) if e.type == "request_finished"}
        assert ends["pushed"] == "length" and ends["broken"] == "internal"


async def test_a_killed_worker_fails_its_request_at_once_and_the_model_comes_back(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        stream = node.infer(eid, CompletionRequest(prompt="Count: 1, 2, 3,", params=SamplingParams(
            temperature=0.0, max_tokens=400)))
        first = await anext(stream)
        assert isinstance(first, Chunk)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(WorkerCrashed) as info:
            async for _ in stream:
                pass
        told_after = time.monotonic() - killed_at
        assert told_after < 1.0, told_after
        assert info.value.code == "worker_crashed" and info.value.details["signal"] == signal.SIGKILL
        await node.wait_for_state(eid, {"crashed"}, timeout=5)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        assert node.status(eid).pid != pid and node.status(eid).restarts == 1
        text, done = await collect(node.infer(eid, CompletionRequest(prompt="Hello", params=GREEDY)))
        assert done.usage.completion_tokens > 0
        trail = [e.body.trigger for e in await node.events(eid) if e.type == "transition"]
        assert trail[-3:] == ["crash", "restart", "ready"]
        crash = next(e.body for e in await node.events(eid) if e.type == "transition" and e.body.trigger == "crash")
        assert crash.signal == signal.SIGKILL and crash.pid == pid and crash.uptime_s > 0
        assert crash.restart_in_s is not None
        journal = tmp_path / "state" / "journal.sqlite3"
    # The post-mortem tool reads the crash back from the journal.
    out = subprocess.run([sys.executable, str(REPO / "tools" / "inspect-journal"), "--journal", str(journal),
                          "crashes"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "SIGKILL" in out.stdout and eid in out.stdout
    js = subprocess.run([sys.executable, str(REPO / "tools" / "inspect-journal"), "--journal", str(journal),
                         "crashes", "--json"], capture_output=True, text=True, timeout=60)
    report = json.loads(js.stdout)
    assert "SIGKILL" in json.dumps(report) and str(pid) in json.dumps(report)


async def test_a_model_that_never_loads_ends_failed_after_the_crash_budget(tmp_path):
    (tmp_path / "models").mkdir()
    # A valid header with a known architecture but none of its tensors: the registry accepts it,
    # llama.cpp refuses to load it, every time.
    broken = gguf_files.write_model(tmp_path / "models" / "broken.gguf")
    os.utime(broken, (time.time() - 60, time.time() - 60))  # settled: not a file still being copied
    settings = make_settings(tmp_path, **{"restart.crash_budget": "3", "restart.backoff_base_s": "0.3"})
    async with Node(settings) as node:
        eid = only_id(node)
        assert node.status(eid).state == "discovered"
        await node.enable(eid)
        await node.wait_for_state(eid, {"failed"}, timeout=60)
        events = [e for e in await node.events(eid) if e.type == "transition"]
        crashes = [e for e in events if e.body.trigger == "crash"]
        assert len(crashes) == 3  # three loads, no more: it does not burn the CPU
        assert all(c.body.exit_code == 3 for c in crashes)
        assert "while loading the model" in crashes[0].body.reason
        assert any("cannot load model" in line for line in crashes[0].body.stderr_tail)
        # The backoff held between loads: each restart came at least the base delay after its crash.
        restarts = [e for e in events if e.body.trigger == "restart"]
        for crash, restart in zip(crashes, restarts):
            assert restart.ts - crash.ts >= 0.3 * 0.99
        assert events[-1].body.trigger == "give_up" and "3 crashes" in events[-1].body.reason
        assert node.status(eid).reason.startswith("3 crashes")
        spawned = len(crashes)
        await asyncio.sleep(1.0)  # the failed state is stable: nothing respawns
        assert len([e for e in await node.events(eid) if e.type == "transition" and e.body.trigger == "crash"]) == spawned
        with pytest.raises(ModelNotRunning) as info:
            await anext(node.infer(eid, CompletionRequest(prompt="x")))
        assert info.value.details["state"] == "failed"


async def test_disable_stops_the_worker_and_settings_changes_restart_it_with_the_new_values(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        await node.configure(eid, ModelSettings(n_ctx=256))
        await node.wait_for_state(eid, {"stopping", "discovered", "enabled", "starting"}, timeout=10)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        assert node.status(eid).effective.n_ctx == 256 and node.status(eid).pid != pid
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        pid = node.status(eid).pid
        await node.disable(eid)
        await node.wait_for_state(eid, {"discovered"}, timeout=15)
        assert node.status(eid).pid is None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(BadRequest, match="n_ctx"):
            await node.configure(eid, ModelSettings(n_ctx=-5))


async def test_requests_beyond_the_queue_are_refused_as_overloaded(tmp_path, models):
    settings = make_settings(tmp_path, **{"model_defaults.queue_size": "0"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        long = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=300)))
        await anext(long)
        with pytest.raises(Overloaded) as info:
            await anext(node.infer(eid, CompletionRequest(prompt="x", params=GREEDY)))
        assert info.value.code == "overloaded"
        await long.aclose()  # the caller went away: its slot frees
        _, done = await collect(node.infer(eid, CompletionRequest(prompt="x", params=GREEDY)))
        assert done.usage.completion_tokens > 0


async def test_cancel_by_request_id_stops_decoding_within_a_token(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        stream = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=300)),
                            request_id="r1")
        n = 0
        async for msg in stream:
            if isinstance(msg, Chunk):
                n += msg.tokens
                if n == 3:
                    assert node.cancel("r1")
            else:
                done = msg
        assert done.finish_reason == "cancelled" and done.usage.completion_tokens <= 5


async def test_bad_requests_get_a_stable_code_naming_the_problem(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        with pytest.raises(UnknownModel):
            await anext(node.infer("nope", CompletionRequest(prompt="x")))
        with pytest.raises(ModelNotRunning, match="discovered"):
            await anext(node.infer(eid, CompletionRequest(prompt="x")))
        with pytest.raises(BadRequest, match="top_p"):
            await anext(node.infer(eid, CompletionRequest(prompt="x", params=SamplingParams(top_p=0))))


async def test_a_model_that_does_not_fit_in_memory_waits_and_says_why(tmp_path, models):
    total_mb = psutil.virtual_memory().total // (1 << 20)
    async with Node(make_settings(tmp_path, memory_reserve_mb=str(total_mb))) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"waiting"}, timeout=10)
        assert "not enough memory" in node.status(eid).reason
        assert node.status(eid).pid is None


async def test_a_hung_worker_is_killed_and_counts_as_a_crash(tmp_path, models):
    settings = make_settings(tmp_path, **{"restart.heartbeat_timeout_s": "2"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        os.kill(pid, signal.SIGSTOP)
        await node.wait_for_state(eid, {"crashed"}, timeout=15)
        crash = [e.body for e in await node.events(eid) if e.type == "transition"][-1]
        assert crash.trigger == "crash" and "no heartbeat" in crash.reason and crash.signal == signal.SIGKILL
        await node.wait_for_state(eid, {"running"}, timeout=60)


async def test_a_worker_that_dies_while_a_stop_is_being_fired_ends_stopped_not_stuck(tmp_path, models):
    # The race: the worker's exit is handled while a stop holds the executor's lock, so by the time
    # the exit's crash is fired the executor is `stopping`. That exit completes the stop.
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        ex = node.executors[eid]
        async with ex.lock:  # what Runtime.fire holds while it journals a transition
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while not ex.lock._waiters:  # the exit handler now waits to fire its crash
                assert time.monotonic() < deadline, "the worker's exit was never handled"
                await asyncio.sleep(0.01)
            await node.journal.append(eid, Transition(trigger="stop", src="running", dst="stopping", reason="test"))
            ex.life.fire("stop")
        await node.wait_for_state(eid, {"discovered", "enabled", "starting", "running"}, timeout=30)
        stopped = [e.body for e in await node.events(eid) if e.type == "transition" and e.body.trigger == "stopped"]
        assert stopped and stopped[-1].signal == signal.SIGKILL and stopped[-1].pid == pid
        # Still desired enabled: it comes back.
        await node.wait_for_state(eid, {"running"}, timeout=60)


async def test_removing_the_file_stops_the_worker_and_marks_the_executor_missing(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        (models / "smollm2.gguf").unlink()
        await node.rescan()
        await node.wait_for_state(eid, {"missing"}, timeout=15)
        assert node.status(eid).reason == "model file removed"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_model_file_whose_name_is_not_utf8_is_reported_and_the_node_goes_on(tmp_path):
    """A name from a Latin-1 share once stopped the journal's writer: the node never finished starting."""
    models = tmp_path / "models"
    models.mkdir()
    good = gguf_files.write_model(models / "tiny.gguf")
    bad = Path(os.fsdecode(os.fsencode(str(models)) + b"/caf\xe9.gguf"))
    gguf_files.copy(good, bad)
    gguf_files.settle(good, bad)
    async with asyncio.timeout(30):
        async with Node(make_settings(tmp_path)) as node:
            assert [st.info.path for st in node.list()] == [str(good)]
            result = await node.rescan()
            assert result.errors == {f"{models}/caf\\xe9.gguf": "the name is not valid UTF-8: rename it (the node "
                                                                   "records paths as UTF-8 text)"}
            await node.disable(only_id(node))  # the journal still takes appends
            assert not node.status(only_id(node)).enabled


async def test_a_second_node_on_the_same_state_directory_is_refused_before_it_touches_the_journal(tmp_path):
    """It would journal the first one's requests as dead, recover its models and break its appends."""
    (tmp_path / "models").mkdir()
    settings = make_settings(tmp_path)
    async with Node(settings) as first:
        events = len(await first.journal.read())
        with pytest.raises(ConfigError, match=rf"state_dir: .*expected a state directory no other running node uses "
                                              rf"\(a node, pid {os.getpid()}, holds .*node.lock"):
            await Node(settings).start()
        with pytest.raises(ConfigError, match="no other running node"):
            await Node.open(settings)
        assert len(await first.journal.read()) == events  # nothing written by the refused ones
        await first.journal.append("node", TaskExited(task="t", error="still appending"))
    async with Node(settings) as again:  # stopped: the directory is free again
        assert again.list() == []


async def test_a_model_recorded_with_absurd_widths_does_not_break_the_model_list(tmp_path):
    """A record journaled before gguf.py's width caps keeps its header's numbers: its estimate is
    saturated in the status, so the model list still encodes for everyone."""
    (tmp_path / "models").mkdir()
    gguf_files.settle(gguf_files.write_model(tmp_path / "models" / "tiny.gguf"))
    async with Node(make_settings(tmp_path)) as node:
        ex = node.executors[only_id(node)]
        ex.info = msgspec.structs.replace(ex.info, embedding_length=2**62, head_count=2**62, head_count_kv=2**62)
        [status] = node.list()
        assert status.memory_estimate_bytes == 2**63 - 1
        encode_link(Models(id="x", models=node.list()))


async def test_a_changed_file_is_reread_and_its_worker_restarted(tmp_path, models, smollm2_path):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        pid = node.status(eid).pid
        link = models / "smollm2.gguf"
        # Same name, new file (a real copy): size stays, mtime moves.
        link.unlink()
        gguf_files.copy(smollm2_path, link)
        old = time.time() - 60
        os.utime(link, (old, old))
        await node.rescan()
        await node.wait_for_state(eid, {"stopping", "discovered", "enabled", "starting"}, timeout=10)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        assert node.status(eid).pid != pid
        assert node.status(eid).info.mtime_ns == link.stat().st_mtime_ns
        types = [e.type for e in await node.events(eid)]
        assert types.count("registered") == 2


async def test_new_models_start_enabled_when_the_policy_says_so_and_state_survives_a_clean_restart(tmp_path, models):
    settings = make_settings(tmp_path, **{"scan.enable_new": "true"})
    async with Node(settings) as node:
        eid = only_id(node)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        await node.configure(eid, ModelSettings(n_threads=1))
        await node.wait_for_state(eid, {"stopping", "discovered", "enabled", "starting"}, timeout=10)
        await node.wait_for_state(eid, {"running"}, timeout=60)
    async with Node(make_settings(tmp_path)) as node:
        # enable_new is off now, but this model's own desired state was journaled.
        await node.wait_for_state(eid, {"running"}, timeout=60)
        assert node.status(eid).effective.n_threads == 1


def wait_ready(journal: Path, count: int, timeout: float) -> str:
    """Poll the journal (read-only, as any outsider would) until `count` ready transitions; the executor id."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
            rows = db.execute("SELECT stream FROM events WHERE type = 'transition'"
                              " AND json_extract(data, '$.trigger') = 'ready'").fetchall()
            db.close()
        except sqlite3.Error:
            rows = []
        if len(rows) >= count:
            return rows[0][0]
        time.sleep(0.2)
    raise AssertionError(f"journal never showed {count} ready transitions")


def test_a_sigkilled_node_restarted_on_the_same_state_brings_back_its_enabled_models(tmp_path, models):
    state = tmp_path / "state"
    journal = state / "journal.sqlite3"
    cmd = [sys.executable, "-m", "optimanode", "run", "--models-dir", str(models), "--state-dir", str(state),
           "--enable-new", "--set", "model_defaults.n_ctx=512", "--set", "scan.hash_models=false"]
    first = subprocess.Popen(cmd, stderr=(tmp_path / "first.log").open("wb"), stdout=subprocess.DEVNULL)
    try:
        eid = wait_ready(journal, 1, 90)
        node = psutil.Process(first.pid)
        (worker,) = node.children()
        first.kill()
        first.wait(10)
        # The worker dies with its node (no orphan holds the model's memory).
        worker.wait(10)
    finally:
        first.kill()
        first.wait(10)
    # Restart without --enable-new: the model comes back because the journal says it was enabled.
    without_enable_new = [a for a in cmd if a != "--enable-new"]
    second = subprocess.Popen(without_enable_new, stderr=(tmp_path / "second.log").open("wb"), stdout=subprocess.DEVNULL)
    try:
        wait_ready(journal, 2, 90)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        second.kill()
        second.wait(10)
    out = subprocess.run([sys.executable, str(REPO / "tools" / "inspect-journal"), "--journal", str(journal),
                          "timeline", "--json", "--executor", eid], capture_output=True, text=True, timeout=60)
    events = json.loads(out.stdout)
    events = events["events"] if isinstance(events, dict) else events
    triggers = [e["data"].get("trigger") for e in events if e["type"] == "transition"]
    # The whole history: the first life, the recovery after SIGKILL, the second life, the clean stop.
    assert triggers == ["enable", "start", "ready", "recover", "start", "ready", "stop", "stopped"], triggers


async def test_each_model_gets_a_content_hash_once_and_keeps_it_across_restarts(tmp_path, models, smollm2_path):
    import hashlib

    want = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    settings = make_settings(tmp_path, **{"scan.hash_models": "true"})
    async with Node(settings) as node:
        eid = only_id(node)
        async with asyncio.timeout(60):
            while not node.status(eid).info.sha256:
                await asyncio.sleep(0.1)
        assert node.status(eid).info.sha256 == want
    async with Node(settings) as node:
        await node.rescan()
        assert node.status(eid).info.sha256 == want
        await asyncio.sleep(0.5)  # give the hasher a pass: it must find nothing to do
        assert [e.type for e in await node.events(eid)].count("hashed") == 1


async def test_drain_lets_running_requests_finish_within_the_deadline(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        stream = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=20)))
        first = await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        assert await node.drain(deadline_s=30) == 0
        text, done = await rest
        assert done.finish_reason == "length" and done.usage.completion_tokens == 20
        with pytest.raises(ShuttingDown):
            await anext(node.infer(eid, CompletionRequest(prompt="x", params=GREEDY)))


async def test_drain_past_the_deadline_cancels_with_shutting_down(tmp_path, models):
    async with Node(make_settings(tmp_path)) as node:
        eid = only_id(node)
        await node.enable(eid)
        await node.wait_for_state(eid, {"running"}, timeout=60)
        stream = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=400)))
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        assert await node.drain(deadline_s=0.3) == 1
        with pytest.raises(ShuttingDown) as info:
            await rest
        assert info.value.code == "shutting_down" and "drain deadline" in info.value.message


async def test_the_journal_is_open_before_the_node_is_built_on_it(tmp_path, models):
    """``Node.open`` opens the journal first; a node given an open journal uses it; an unstarted one says so."""
    settings = make_settings(tmp_path)
    node = await Node.open(settings)
    try:
        eid = only_id(node)
        assert node.status(eid).state == "discovered"
        assert [e.type for e in await node.journal.read(stream="node")] == ["node_started"]
    finally:
        await node.stop()
    journal = await Journal.open(settings.journal_path)
    async with Node(settings, journal=journal) as again:
        assert again.journal is journal and only_id(again) == eid
    unstarted = Node(settings)
    with pytest.raises(RuntimeError, match="not started"):
        unstarted.status(eid)


async def test_a_missing_models_dir_and_what_a_scan_cannot_use_are_said_once_at_warning(tmp_path, caplog):
    """A misspelt models_dir ran an empty node without a word, and scan errors (a name that is
    not UTF-8, an unreadable directory) reached no log: now a WARNING each, said when they appear
    and not again at every rescan, and an INFO when one is gone."""
    import logging

    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path, models_dir=str(tmp_path / "no-such-models"))
    async with Node(settings) as node:
        assert any(r.levelno == logging.WARNING and "does not exist: creating it" in r.getMessage()
                   for r in caplog.records)
        bad = os.fsencode(str(tmp_path / "no-such-models")) + b"/caf\xe9.gguf"
        with open(bad, "wb") as f:
            f.write(b"GGUF")
        caplog.clear()
        await node.rescan()
        await node.rescan()
        said = [r for r in caplog.records if r.levelno == logging.WARNING and "not valid UTF-8" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in caplog.records]
        os.unlink(bad)
        caplog.clear()
        await node.rescan()
        assert any(r.levelno == logging.INFO and "no longer an error" in r.getMessage() for r in caplog.records)
