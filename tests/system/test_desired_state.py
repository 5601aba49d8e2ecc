"""The operator's desired state (enable, disable, configure) against a real journal, with no model.

Each change is acknowledged only once it is journaled, and the running node must hold exactly
what the journal holds: two changes at once each keep their own half, a caller cancelled
mid-call (a Gateway that disconnects) leaves no change journaled but not applied, and a
re-enable of a failed model is one commit (a crash cannot keep the desire but drop the retry).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from optimanode.config import load_settings
from optimanode.errors import JournalError
from optimanode.executors.lifecycle import Lifecycle
from optimanode.executors.runtime import Background, Executor, Runtime
from optimanode.journal import Journal
from optimanode.node import Node
from optimanode.protocol import DesiredChanged, ModelInfo, ModelSettings, Registered, Transition

pytestmark = pytest.mark.timeout(60)


def make_settings(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    # Not a GGUF file: the model is registered (invalid) and no worker is ever spawned for it.
    f = models / "m.gguf"
    f.write_bytes(b"not a gguf" * 10)
    os.utime(f, (1, 1))  # settled: not a file still being copied
    return load_settings(environ={}, overrides={
        "models_dir": str(models), "state_dir": str(tmp_path / "state"),
        "scan.hash_models": "false", "scan.interval_s": "3600",
    })


def held(node: Node, eid: str) -> tuple[bool, int | None]:
    st = node.status(eid)
    return st.enabled, st.settings.n_ctx


def journaled(node: Node, eid: str) -> tuple[bool, int | None]:
    view = node.journal.views()[eid]
    return view.enabled, view.settings.n_ctx


@pytest.mark.parametrize("order", [("configure", "disable"), ("disable", "configure")])
async def test_a_configure_and_a_disable_at_once_both_hold_in_memory_and_after_a_restart(tmp_path, order):
    settings = make_settings(tmp_path)
    async with Node(settings) as node:
        (eid,) = node.executors
        await node.enable(eid, by="setup")
        calls = {"configure": lambda: node.configure(eid, ModelSettings(n_ctx=4096), by="gateway-a"),
                 "disable": lambda: node.disable(eid, by="gateway-b")}
        # Both in one group commit of the journal: each read the other's half before its append.
        replies = dict(zip(order, await asyncio.gather(*(calls[c]() for c in order))))
        assert replies["configure"].settings.n_ctx == 4096
        assert not replies["disable"].enabled
        # The later reply holds the earlier change too: the changes were made in the order asked.
        last = replies[order[1]]
        assert (last.enabled, last.settings.n_ctx) == (False, 4096)
        assert held(node, eid) == journaled(node, eid) == (False, 4096)
    async with Node(settings) as node:
        assert held(node, eid) == (False, 4096)


async def test_an_enable_and_a_configure_at_once_both_hold(tmp_path):
    settings = make_settings(tmp_path)
    async with Node(settings) as node:
        (eid,) = node.executors
        await asyncio.gather(node.enable(eid, by="gateway-a"),
                             node.configure(eid, ModelSettings(n_ctx=2048), by="gateway-b"))
        assert held(node, eid) == journaled(node, eid) == (True, 2048)
    async with Node(settings) as node:
        assert held(node, eid) == (True, 2048)


@pytest.mark.parametrize("yields", range(6))
async def test_a_configure_whose_caller_is_cancelled_leaves_memory_and_journal_agreeing(tmp_path, yields):
    """The Gateway's Configure cut when its connection closes (its control task is cancelled)
    ``yields`` steps after it was issued: committed and applied, or neither."""
    settings = make_settings(tmp_path)
    async with Node(settings) as node:
        (eid,) = node.executors
        before = node.journal.last_seq
        call = asyncio.create_task(node.configure(eid, ModelSettings(n_ctx=4096), by="gateway"))
        for _ in range(yields):
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Appended after anything the configure queued (the journal commits in order): once it is
        # committed, so is the configure's change if it was asked at all.
        await node.journal.checkpoint()
        asked = any(isinstance(e.body, DesiredChanged) for e in await node.events(eid) if e.seq > before)
        assert held(node, eid) == journaled(node, eid) == ((False, 4096) if asked else (False, None))
        if yields >= 3:
            assert asked  # (the case the reviewer saw: queued before the cancel)
    async with Node(settings) as node:
        assert held(node, eid) == ((False, 4096) if asked else (False, None))


class Clock:
    def __call__(self) -> float:
        return 1000.0


def model_info(tmp_path) -> ModelInfo:
    """A record of a model file; the runtime tests below never start its worker."""
    path = str(tmp_path / "models" / "m.gguf")
    return ModelInfo(path=path, files=[path], size_bytes=100, mtime_ns=1)


async def test_re_enabling_a_failed_model_journals_the_desire_and_the_retry_in_one_commit(tmp_path, monkeypatch):
    """A crash right after the desire's commit cannot leave the node wanting the model but still
    failed (the operator's "try again" dropped): both are one append, or neither."""
    settings = make_settings(tmp_path)
    path = tmp_path / "j.sqlite3"
    journal = await Journal.open(path, background_check_delay_s=None)
    info = model_info(tmp_path)
    try:
        await journal.append_many([
            ("m", Registered(info=info)),
            ("m", DesiredChanged(enabled=True, by="setup")),
            ("m", Transition(trigger="give_up", src="crashed", dst="failed", reason="3 crashes")),
        ])
        runtime = Runtime(settings, journal, Background(), clock=Clock())
        ex = Executor(id="m", life=Lifecycle("m", "failed"), info=info, enabled=False,
                      crash_times=[990.0, 995.0, 999.0], safe=True, safe_reason="SIGSEGV while loading")
        runtime.executors["m"] = ex
        await runtime.desire(ex, False, ex.settings, by="setup")  # disabled while failed (no transition)
        assert ex.state == "failed"

        # From here on, the node dies at its next write: only the first commit survives.
        real, writes = journal.append_many, []

        async def dies_after_one_write(items):
            writes.append(list(items))
            if len(writes) > 1:
                raise JournalError("the node died here")
            return await real(writes[-1])

        monkeypatch.setattr(journal, "append_many", dies_after_one_write)
        await runtime.enable(ex, by="operator")
        assert len(writes) == 1 and [type(b) for _, b in writes[0]] == [DesiredChanged, Transition]
        assert (ex.state, ex.enabled, ex.crash_times, ex.safe) == ("enabled", True, [], False)
        assert ex.reason == "re-enabled by operator"
    finally:
        await journal.close()
    reopened = await Journal.open(path, background_check_delay_s=None)
    try:
        view = (await reopened.replay())["m"]
        assert (view.state, view.enabled) == ("enabled", True)
        (retry,) = [e for e in await reopened.read(stream="m", types=["transition"]) if e.body.trigger == "enable"]
        assert retry.body.safe_mode is False and retry.body.src == "failed"
    finally:
        await reopened.close()


@pytest.mark.parametrize("yields", range(6))
async def test_a_transition_whose_caller_is_cancelled_is_journaled_and_applied_or_neither(tmp_path, yields):
    """``fire`` has the same shape (append, then move the machine): the reconcile loop or a
    worker's stop cancelled mid-transition (the node stopping) leaves the machine where the
    journal says it is."""
    settings = make_settings(tmp_path)
    path = tmp_path / "j.sqlite3"
    journal = await Journal.open(path, background_check_delay_s=None)
    info = model_info(tmp_path)
    try:
        await journal.append("m", Registered(info=info))
        runtime = Runtime(settings, journal, Background(), clock=Clock())
        ex = Executor(id="m", life=Lifecycle("m"), info=info)
        runtime.executors["m"] = ex
        call = asyncio.create_task(runtime.fire(ex, "enable", reason="wanted"))
        for _ in range(yields):
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await journal.checkpoint()  # committed after anything the transition queued
        assert ex.state == journal.views()["m"].state
        if yields >= 3:
            assert ex.state == "enabled"
    finally:
        await journal.close()
