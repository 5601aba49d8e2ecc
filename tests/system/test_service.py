"""The node as a system service: sd_notify against a real socket, real signals, a real node and journal.

A stand-in for systemd is one AF_UNIX datagram socket (``NotifySocket``) whose reader thread stamps
each message on arrival. The service runs either in this test's event loop (``run_service`` in a
task; signals are delivered with ``os.kill(os.getpid(), ...)`` and its handlers are removed when it
returns) or as the real process (``python -m optimanode run``, with its Gateway link). Every wait is
bounded; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from optimanode.config import Settings, load_settings
from optimanode.errors import ConfigError, ShuttingDown
from optimanode.journal import Journal
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, Done, SamplingParams
from optimanode.service import (
    Notifier,
    Service,
    run_service,
)
from system.test_node import collect, make_settings, only_id, wait_ready

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


# -- a stand-in for systemd's notification socket ---------------------------------------------


@dataclass
class Message:
    index: int
    t: float  # time.monotonic() on arrival
    fields: dict[str, str]

    def has(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """Receives sd_notify datagrams as systemd would, recording each with its arrival time."""

    def __init__(self, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"optimanode-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # Not tmp_path: an AF_UNIX path must fit in 108 bytes, and pytest's can be longer.
            self._dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._cond:
                self.messages.append(Message(len(self.messages), time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, timeout: float, *, after: Message | None = None,
                 where: Callable[[Message], bool] = lambda m: True) -> Message:
        """The first message (after ``after``) that has ``key`` and satisfies ``where``."""
        start = after.index + 1 if after is not None else 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[start:]:
                    if m.has(key) and where(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key} within {timeout} s; got {self.kinds()}")
                self._cond.wait(left)

    async def await_for(self, key: str, timeout: float, **kw: object) -> Message:
        return await asyncio.to_thread(self.wait_for, key, timeout, **kw)  # type: ignore[arg-type]

    def kinds(self) -> list[str]:
        """The message kinds in order (the first field of each: READY, STATUS, WATCHDOG, ...)."""
        with self._cond:
            return [next(iter(m.fields)) for m in self.messages if m.fields]

    def all(self, key: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.has(key)]

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify():
    ns = NotifySocket()
    yield ns
    ns.close()


@pytest.fixture(autouse=True)
def restore_root_log_level():
    """The service sets the root level from the settings (and on SIGHUP); give pytest its own back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def notifier_for(ns: NotifySocket, watchdog_usec: int | None = None) -> Notifier:
    env = {"NOTIFY_SOCKET": ns.address}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return Notifier.from_environ(env)


@contextlib.asynccontextmanager
async def serving(settings, notifier: Notifier, **kw) -> AsyncIterator[tuple[Service, asyncio.Task[int]]]:
    """run_service in a task of this loop, with its signal handlers; yields once READY=1 was sent."""
    made = asyncio.Event()
    box: list[Service] = []

    def started(service: Service) -> None:
        box.append(service)
        made.set()

    task = asyncio.ensure_future(run_service(settings, notifier=notifier, started=started, **kw))
    try:
        async with asyncio.timeout(120):
            await made.wait()
            ready = asyncio.ensure_future(box[0].wait_ready())
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                task.result()  # raises what made it fail
        yield box[0], task
    finally:
        if not task.done():
            box[0].request_stop("test cleanup")
            box[0].request_stop("test cleanup")  # the second one skips the drain
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(60):
                    await task


def settled_junk_model(models: Path) -> None:
    """A file that registers (as invalid: not GGUF) without a worker: proof that a scan happened."""
    models.mkdir(parents=True, exist_ok=True)
    junk = models / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    os.utime(junk, (time.time() - 60, time.time() - 60))  # settled, not a file still being copied


def journal_rows(state: Path) -> list[tuple[int, str, str, dict]]:
    db = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return [(seq, stream, typ, json.loads(data)) for seq, stream, typ, data in
                db.execute("SELECT seq, stream, type, data FROM events ORDER BY seq")]
    finally:
        db.close()


def assert_journal_consistent(state: Path) -> list[tuple[int, str, str, dict]]:
    """inspect-journal's replay matches the projection, and the node's last event is node_stopped."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "inspect-journal"), "--state-dir", str(state),
                          "state", "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = journal_rows(state)
    node_events = [r for r in rows if r[1] == "node"]
    assert node_events[-1][2] == "node_stopped", node_events[-3:]
    return rows


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- the notifier against a real socket (its environment handling: tests/unit/test_service.py) --


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifications_reach_a_path_or_an_abstract_socket(abstract):
    ns = NotifySocket(abstract=abstract)
    try:
        n = notifier_for(ns)
        assert n.ready("serving 1 model") and n.watchdog() and n.reloading() and n.stopping("bye")
        assert n.extend_timeout(42.5)
        ns.wait_for("STOPPING", 5)
        first = ns.all("READY")[0].fields
        assert first == {"READY": "1", "STATUS": "serving 1 model"}
        reload = ns.all("RELOADING")[0].fields
        # MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, as Type=notify-reload wants it.
        assert abs(int(reload["MONOTONIC_USEC"]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
        ns.wait_for("EXTEND_TIMEOUT_USEC", 5, where=lambda m: m.fields["EXTEND_TIMEOUT_USEC"] == "42500000")
        assert ns.kinds() == ["READY", "WATCHDOG", "RELOADING", "STOPPING", "EXTEND_TIMEOUT_USEC"]
    finally:
        ns.close()


def test_a_vanished_notify_socket_does_not_break_the_node():
    ns = NotifySocket()
    n = notifier_for(ns)
    ns.close()
    assert n.watchdog() is False and n.status("still fine") is False


# -- the lifecycle, in this event loop ---------------------------------------------------------


async def test_ready_only_once_the_node_is_up_then_watchdog_pings_then_stopping(tmp_path, notify):
    settled_junk_model(tmp_path / "models")
    returned_at: list[float] = []

    class Recording(Node):
        async def start(self) -> None:
            await super().start()
            returned_at.append(time.monotonic())

    settings = make_settings(tmp_path)
    async with serving(settings, notifier_for(notify, watchdog_usec=200_000), make_node=Recording) as (service, task):
        ready = await notify.await_for("READY", 30)
        # READY came after node.start() returned: journal opened and replayed, models scanned.
        assert returned_at and ready.t >= returned_at[0]
        assert ready.fields["STATUS"] == "0 of 1 models running"
        assert len(service.node.executors) == 1
        starting = notify.all("STATUS")[0]
        assert starting.index < ready.index and starting.fields["STATUS"].startswith("starting")
        # Pings every half of WATCHDOG_USEC (0.1 s).
        pings = []
        for _ in range(5):
            pings.append(await notify.await_for("WATCHDOG", 5, after=pings[-1] if pings else ready))
        gaps = [b.t - a.t for a, b in zip(pings, pings[1:])]
        assert all(0.05 < g < 0.6 for g in gaps), gaps
        os.kill(os.getpid(), signal.SIGTERM)
        stopping = await notify.await_for("STOPPING", 30)
        async with asyncio.timeout(60):
            assert await task == 0
    last = notify.wait_for("STATUS", 5, where=lambda m: m.fields["STATUS"] == "stopped")
    kinds = notify.kinds()
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING") < last.index, kinds
    assert "READY" not in kinds[kinds.index("STOPPING"):], kinds
    assert stopping.fields["STATUS"].startswith("draining 0 requests")
    rows = assert_journal_consistent(tmp_path / "state")
    assert [r[3].get("reason") for r in rows if r[2] == "node_stopped"] == ["SIGTERM"]


async def test_a_wedged_event_loop_stops_the_watchdog_pings(tmp_path, notify):
    async with serving(make_settings(tmp_path), notifier_for(notify, watchdog_usec=200_000)) as (service, task):
        ready = await notify.await_for("READY", 30)
        before = await notify.await_for("WATCHDOG", 5, after=ready)
        blocked_from = time.monotonic()
        time.sleep(1.5)  # the loop is stuck here, as a wedged node would be
        blocked_until = time.monotonic()
        after = await notify.await_for("WATCHDOG", 5, where=lambda m: m.t > blocked_until)
        during = [m for m in notify.all("WATCHDOG") if blocked_from + 0.15 < m.t < blocked_until]
        assert during == [], "pings came from somewhere other than the event loop"
        assert after.index > before.index


async def test_signal_handlers_are_removed_and_the_previous_ones_restored(tmp_path, notify):
    seen: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda sig, frame: seen.append(sig))
    try:
        async with serving(make_settings(tmp_path), notifier_for(notify)) as (service, task):
            os.kill(os.getpid(), signal.SIGINT)
            async with asyncio.timeout(60):
                assert await task == 0
        assert service.stop_reason == "SIGINT"
        os.kill(os.getpid(), signal.SIGHUP)  # back to the handler this test installed
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert seen == [signal.SIGHUP]
        assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    finally:
        signal.signal(signal.SIGHUP, previous)


class FakeServer:
    """Stands in for the Gateway link: records what the service asks of it."""

    def __init__(self, fail_start: bool = False) -> None:
        self.calls: list[object] = []
        self.fail_start = fail_start

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise OSError(98, "Address already in use")

    async def stop(self) -> None:
        self.calls.append("stop")

    def apply_settings(self, settings) -> None:
        self.calls.append(("apply", settings.log_level))


def write_config(path: Path, tmp_path: Path, **top: object) -> Path:
    values = {"models_dir": str(tmp_path / "models"), "state_dir": str(tmp_path / "state"), "log_level": "info"}
    values.update({k: v for k, v in top.items() if not isinstance(v, dict)})
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    sections = {"scan": {"interval_s": 3600, "hash_models": False}, "model_defaults": {"n_ctx": 512}}
    for name, table in top.items():
        if isinstance(table, dict):
            sections.setdefault(name, {}).update(table)
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_sighup_applies_changed_settings_without_dropping_the_node_or_its_servers(tmp_path, notify):
    cfg = write_config(tmp_path / "optimanode.toml", tmp_path)
    load = lambda: load_settings(cfg, environ={})  # noqa: E731
    server = FakeServer()
    async with serving(load(), notifier_for(notify), load_settings=load,
                       make_servers=lambda node, s: [server]) as (service, task):
        node = service.node
        ready = await notify.await_for("READY", 30)
        assert logging.getLogger().getEffectiveLevel() == logging.INFO
        write_config(cfg, tmp_path, log_level="debug", models_dir=str(tmp_path / "elsewhere"),
                     scan={"interval_s": 5}, restart={"crash_budget": 2})
        os.kill(os.getpid(), signal.SIGHUP)
        reloading = await notify.await_for("RELOADING", 10, after=ready)
        assert "MONOTONIC_USEC" in reloading.fields
        await notify.await_for("READY", 10, after=reloading)
        assert service.node is node and not task.done()
        assert node.settings.log_level == "debug" and logging.getLogger().getEffectiveLevel() == logging.DEBUG
        assert node.settings.scan.interval_s == 5 and node.settings.restart.crash_budget == 2
        # models_dir needs a restart: the running value stays, and the reload says so.
        assert node.settings.models_dir == str(tmp_path / "models")
        assert service.last_reload.needs_restart == ("models_dir",)
        assert set(service.last_reload.changed) == {"log_level", "scan.interval_s", "restart.crash_budget"}
        assert server.calls == ["start", ("apply", "debug")]  # told, not restarted
        # The node still serves its API after the reload.
        assert node.list() == [] and (await node.rescan()).models == {}
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await task == 0
    assert server.calls[-1] == "stop"
    rows = journal_rows(tmp_path / "state")
    assert [r[2] for r in rows if r[1] == "node"] == ["node_started", "node_stopped"]


@pytest.mark.parametrize("bad", ['log_level = "loud"', "log_level = ", None,
                                 'log_level = "info"\nx = ' + "9" * 5000, 'log_level = "info"\nx = ' + "[" * 3000],
                         ids=["value", "syntax", "missing", "5000-digit-integer", "nested-3000-deep"])
async def test_a_bad_config_on_sighup_keeps_the_running_settings(tmp_path, notify, caplog, bad):
    """The last two are tomllib's own limits (ValueError, RecursionError): they once escaped the
    reload and stopped the node without draining."""
    cfg = write_config(tmp_path / "optimanode.toml", tmp_path)
    load = lambda: load_settings(cfg, environ={})  # noqa: E731
    async with serving(load(), notifier_for(notify), load_settings=load) as (service, task):
        node = service.node
        before = node.settings
        ready = await notify.await_for("READY", 30)
        if bad is None:
            cfg.unlink()
        else:
            cfg.write_text(cfg.read_text().replace('log_level = "info"', bad))
        os.kill(os.getpid(), signal.SIGHUP)
        again = await notify.await_for("READY", 10, after=ready)
        assert "last reload refused" in again.fields["STATUS"]
        assert node.settings is before and not task.done()
        assert service.last_reload_error and str(cfg) in service.last_reload_error
        assert any("reload refused" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        with pytest.raises(ConfigError):
            load()


async def test_a_settings_loader_that_fails_unexpectedly_on_sighup_keeps_the_node_serving(tmp_path, notify, caplog):
    cfg = write_config(tmp_path / "optimanode.toml", tmp_path)
    calls = []

    def load() -> Settings:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("a loader bug")
        return load_settings(cfg, environ={})

    async with serving(load(), notifier_for(notify), load_settings=load) as (service, task):
        ready = await notify.await_for("READY", 30)
        os.kill(os.getpid(), signal.SIGHUP)
        again = await notify.await_for("READY", 10, after=ready)
        assert "last reload refused: a loader bug" in again.fields["STATUS"] and not task.done()
        assert service.node.list() == []


async def test_a_server_that_cannot_start_stops_the_node_and_closes_the_journal(tmp_path, notify):
    failing = FakeServer(fail_start=True)
    with pytest.raises(OSError, match="Address already in use"):
        await run_service(make_settings(tmp_path), notifier=notifier_for(notify),
                          make_servers=lambda node, s: [failing])
    notify.wait_for("STATUS", 5, where=lambda m: m.fields["STATUS"] == "stopped")
    assert not notify.all("READY")
    statuses = [m.fields["STATUS"] for m in notify.all("STATUS")]
    assert any(s.startswith("failed to start: ") and "in use" in s for s in statuses), statuses
    assert statuses[-1] == "stopped"
    rows = assert_journal_consistent(tmp_path / "state")
    assert "server failed to start" in [r for r in rows if r[2] == "node_stopped"][0][3]["reason"]


# -- draining on SIGTERM, with the real model --------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path, smollm2_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    return d


async def running_model(service: Service) -> tuple[Node, str, int]:
    node = service.node
    eid = only_id(node)
    await node.wait_for_state(eid, {"running"}, timeout=90)
    return node, eid, node.status(eid).pid


async def timed_collect(stream) -> tuple[str, Done, float]:
    text, done = await collect(stream)
    return text, done, time.monotonic()


async def test_sigterm_lets_a_streaming_request_finish_and_leaves_a_consistent_journal(tmp_path, model_dir, notify):
    # A deadline far past what 100 tokens take even on a loaded 2-core machine: this is the "finishes" case.
    settings = make_settings(tmp_path, **{"scan.enable_new": "true", "drain_deadline_s": "150"})
    async with serving(settings, notifier_for(notify)) as (service, task):
        node, eid, pid = await running_model(service)
        stream = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=100)),
                            request_id="draining-request")
        await anext(stream)
        rest = asyncio.ensure_future(timed_collect(stream))
        os.kill(os.getpid(), signal.SIGTERM)
        stopping = await notify.await_for("STOPPING", 10)
        with pytest.raises(ShuttingDown):  # new requests are refused at once
            await anext(node.infer(eid, CompletionRequest(prompt="x", params=SamplingParams(max_tokens=2))))
        async with asyncio.timeout(180):
            text, done, done_at = await rest
            assert await task == 0
    # It finished in full, while the node was already draining.
    assert done.finish_reason == "length" and done.usage.completion_tokens == 100
    assert done_at > stopping.t
    assert gone(pid), "the worker outlived its node"
    rows = assert_journal_consistent(tmp_path / "state")
    finished = [r for r in rows if r[2] == "request_finished" and r[3]["request_id"] == "draining-request"]
    stopped = [r for r in rows if r[2] == "node_stopped"]
    assert finished and finished[0][3]["outcome"] == "length" and finished[0][0] < stopped[0][0]


async def test_sigterm_past_the_drain_deadline_cancels_with_shutting_down(tmp_path, model_dir, notify):
    settings = make_settings(tmp_path, **{"scan.enable_new": "true", "drain_deadline_s": "0.3"})
    async with serving(settings, notifier_for(notify)) as (service, task):
        node, eid, pid = await running_model(service)
        stream = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=400)),
                            request_id="too-long")
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(ShuttingDown) as info:
            async with asyncio.timeout(30):
                await rest
        assert info.value.code == "shutting_down"
        async with asyncio.timeout(60):
            assert await task == 0
    assert gone(pid)
    rows = assert_journal_consistent(tmp_path / "state")
    assert [r[3]["outcome"] for r in rows if r[2] == "request_finished"] == ["shutting_down"]


async def test_a_second_sigterm_stops_at_once_and_the_journal_opens_cleanly(tmp_path, model_dir, notify):
    settings = make_settings(tmp_path, **{"scan.enable_new": "true", "drain_deadline_s": "120"})
    async with serving(settings, notifier_for(notify)) as (service, task):
        node, eid, pid = await running_model(service)
        stream = node.infer(eid, CompletionRequest(prompt="1, 2,", params=SamplingParams(temperature=0, max_tokens=400)))
        await anext(stream)
        rest = asyncio.ensure_future(collect(stream))
        os.kill(os.getpid(), signal.SIGTERM)
        await notify.await_for("STOPPING", 10)
        first_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(ShuttingDown):
            async with asyncio.timeout(30):
                await rest
        async with asyncio.timeout(60):
            assert await task == 0
        # Far short of the 120 s deadline: the drain was cut, the workers still stopped in order.
        assert time.monotonic() - first_at < 40
    assert gone(pid)
    journal = await Journal.open(tmp_path / "state" / "journal.sqlite3")
    try:
        views = await journal.replay()
        assert views[eid].state == "discovered" and views[eid].enabled
    finally:
        await journal.close()
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    assert_journal_consistent(tmp_path / "state")


# -- the real process --------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_optimanode_run_under_a_stand_in_systemd(tmp_path, model_dir):
    """The real `optimanode run` (node, Gateway link, metrics): READY, WATCHDOG, SIGHUP, SIGTERM."""
    ns = NotifySocket()
    cfg = write_config(tmp_path / "optimanode.toml", tmp_path, scan={"enable_new": True})
    state = tmp_path / "state"
    env = dict(os.environ, NOTIFY_SOCKET=ns.address, WATCHDOG_USEC="1000000")
    env = {k: v for k, v in env.items() if not k.startswith("OPTIMANODE_")}
    log = tmp_path / "stderr.log"
    proc = subprocess.Popen([sys.executable, "-m", "optimanode", "run", "--config", str(cfg)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        ready = ns.wait_for("READY", 90)
        assert ready.fields["STATUS"].endswith("of 1 models running"), ready.fields
        # By READY the journal was opened and the model registered.
        types = [r[2] for r in journal_rows(state)]
        assert types[0] == "node_started" and "registered" in types
        eid = wait_ready(state / "journal.sqlite3", 1, 90)
        workers = [p for p in psutil.Process(proc.pid).children() if "optimanode.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1
        pings = [ns.wait_for("WATCHDOG", 5, after=ready)]
        pings.append(ns.wait_for("WATCHDOG", 5, after=pings[0]))
        assert 0.2 < pings[1].t - pings[0].t < 2.0  # every 0.5 s
        write_config(cfg, tmp_path, log_level="debug", scan={"enable_new": True})
        proc.send_signal(signal.SIGHUP)
        reloading = ns.wait_for("RELOADING", 10)
        ns.wait_for("READY", 10, after=reloading)
        assert proc.poll() is None and workers[0].is_running()  # the model was not restarted
        proc.send_signal(signal.SIGTERM)
        ns.wait_for("STOPPING", 10, after=reloading)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        ns.close()
    assert gone(workers[0].pid)
    kinds = ns.kinds()
    order = [kinds.index("READY"), kinds.index("WATCHDOG"), kinds.index("RELOADING"), kinds.index("STOPPING")]
    assert order == sorted(order), kinds
    rows = assert_journal_consistent(state)
    assert [r[3]["reason"] for r in rows if r[2] == "node_stopped"] == ["SIGTERM"]
    text = log.read_text()
    assert "reloaded settings; changed: log_level" in text, text[-3000:]
    # Structured lines: ts level logger msg; the debug level from the reload is in force.
    first = text.splitlines()[0]
    assert first[:4].isdigit() and first.split(" ")[1] in {"info", "debug", "warning", "error"}, first
    assert " debug " in text.split("reloaded settings")[1], "log level not applied on SIGHUP"
    assert eid
