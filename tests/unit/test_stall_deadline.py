"""The stall watch and request deadlines, pure parts: progress in the heartbeat, the stall rule, deadline arithmetic, their limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from optimanode import protocol as p
from optimanode.config import ModelDefaults, load_settings
from optimanode.constraints import explain
from optimanode.errors import BY_CODE, BadRequest, ConfigError, DeadlineExceeded, NodeFault, WorkerCrashed, error_for
from optimanode.executors.effective import checked, deadline, stall_timeout
from optimanode.executors.supervisor import ExitInfo, stall_reason
from optimanode.gateway.session import error_frame
from optimanode.inference import Admission
from optimanode.worker.blackbox import _DecodeHang
from optimanode.worker.jobs import _Job, _Jobs
from optimanode.worker.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------------------
# The worker's progress report


def test_a_worker_with_nothing_pending_reports_its_steps_and_no_wait() -> None:
    clock = Clock()
    progress = Progress(clock)
    progress.stepped()
    clock.t += 500  # idle for a long time is not a stall
    assert progress.pong(3, 0, None) == p.Pong(seq=3, steps=1, pending=0, since_step_s=0.0)


def test_pending_work_counts_from_the_last_step_or_from_its_arrival_whichever_is_later() -> None:
    clock = Clock()
    progress = Progress(clock)
    progress.stepped()  # at 100
    clock.t = 400.0
    # Work arrived at an idle worker at 390: it has waited 10 s, not 300.
    assert progress.pong(1, 1, 390.0).since_step_s == 10.0
    progress.stepped()  # at 400
    clock.t = 402.5
    assert progress.pong(2, 2, 390.0) == p.Pong(seq=2, steps=2, pending=2, since_step_s=2.5)


def test_the_job_queue_says_since_when_the_worker_has_had_work() -> None:
    jobs = _Jobs()
    req = p.CompletionRequest(prompt="x")
    assert jobs.pending() == (0, None)
    a, b = _Job(id="a", request=req, received=10.0), _Job(id="b", request=req, received=20.0)
    jobs.add(a)
    jobs.add(b)
    assert jobs.pending() == (2, 10.0)  # the first arrival, not the latest
    jobs.finished(a)
    assert jobs.pending() == (1, 10.0)
    jobs.finished(b)
    assert jobs.pending() == (0, None)
    c = _Job(id="c", request=req, received=30.0)
    jobs.add(c)
    assert jobs.pending() == (1, 30.0)


# ---------------------------------------------------------------------------------------------
# The stall rule


@pytest.mark.parametrize(("pong", "timeout", "stalled"), [
    (None, 10.0, False),                                               # no heartbeat answered yet
    (p.Pong(seq=1, steps=9, pending=0, since_step_s=0.0), 10.0, False),  # idle
    (p.Pong(seq=1, steps=9, pending=2, since_step_s=9.9), 10.0, False),  # slow, within the timeout
    (p.Pong(seq=1, steps=9, pending=2, since_step_s=10.0), 10.0, True),
    (p.Pong(seq=1, steps=0, pending=1, since_step_s=500.0), 120.0, True),
])
def test_a_worker_is_stalled_only_with_work_pending_and_no_step_for_the_timeout(pong: p.Pong | None,
                                                                               timeout: float,
                                                                               stalled: bool) -> None:
    assert bool(stall_reason(pong, timeout)) is stalled


def test_the_stall_reason_names_the_wait_the_requests_and_the_setting() -> None:
    why = stall_reason(p.Pong(seq=4, steps=17, pending=2, since_step_s=12.34), 10.0)
    assert why == "stalled: no decode step for 12.3 s with 2 requests pending (stall_timeout_s 10; 17 steps before)"


def test_a_stalled_crash_says_stalled_first_then_the_step_it_was_stuck_in() -> None:
    info = ExitInfo(pid=42, exit_code=None, signal=9, uptime_s=3.0, stderr_tail=[],
                    killed_for="stalled: no decode step for 2.5 s with 1 request pending (stall_timeout_s 2; 7 steps before)",
                    was_ready=True, phase="generation", in_decode=True, batch_tokens=1, batch_seqs=1,
                    requests=("r1",))
    assert info.stalled and not info.fatal_signal
    assert info.describe() == ("stalled: no decode step for 2.5 s with 1 request pending (stall_timeout_s 2; "
                               "7 steps before); worker 42 killed by SIGKILL in llama_decode during generation "
                               "of a 1-token batch (request r1)")
    other = ExitInfo(pid=42, exit_code=None, signal=9, uptime_s=3.0, stderr_tail=[], killed_for="no heartbeat for 10 s")
    assert not other.stalled and other.describe().endswith("(no heartbeat for 10 s)")


def test_the_stall_timeout_of_a_model_overrides_the_default() -> None:
    defaults = ModelDefaults()
    assert defaults.stall_timeout_s == 120.0
    assert stall_timeout(p.ModelSettings(), defaults) == 120.0
    assert stall_timeout(p.ModelSettings(stall_timeout_s=5.0), defaults) == 5.0


# ---------------------------------------------------------------------------------------------
# The fault injection that hangs the decode thread (one worker only)


def test_the_decode_hang_is_taken_by_one_worker_only(tmp_path: Path, monkeypatch: Any) -> None:
    flag = tmp_path / "hang"
    flag.write_text("3")
    monkeypatch.setenv("OPTIMANODE_TEST_FAULT", f"decode-hang:{flag}")
    first, second = _DecodeHang(), _DecodeHang()
    first.arm_from_env()
    second.arm_from_env()  # the next worker of the model: the file is gone
    assert (first.after, second.after) == (3, None) and not flag.exists()
    second.check(10**6)  # unarmed: returns at once
    monkeypatch.setenv("OPTIMANODE_TEST_FAULT", "warmup-segv")
    third = _DecodeHang()
    third.arm_from_env()
    assert third.after is None


# ---------------------------------------------------------------------------------------------
# Deadlines


@pytest.mark.parametrize(("requested", "model", "default", "expected"), [
    (None, None, 0.0, None),     # nothing set anywhere: no deadline
    (5.0, None, 0.0, 5.0),       # the request's own
    (None, None, 30.0, 30.0),    # the node's default for every model
    (None, 10.0, 30.0, 10.0),    # the model's over the default
    (60.0, 10.0, 0.0, 10.0),     # the model's is a cap: a request cannot ask for more
    (2.0, 10.0, 0.0, 2.0),       # but may ask for less
    (60.0, 0.0, 30.0, 60.0),     # a model's 0 means "none", even over a default
])
def test_a_request_gets_the_shortest_of_its_own_deadline_and_its_models(requested: float | None,
                                                                        model: float | None, default: float,
                                                                        expected: float | None) -> None:
    assert deadline(requested, p.ModelSettings(deadline_s=model), ModelDefaults(deadline_s=default)) == expected


def test_deadline_exceeded_is_a_stable_error_code_of_a_node_fault() -> None:
    assert "deadline_exceeded" in p.ERROR_CODES
    assert BY_CODE["deadline_exceeded"] is DeadlineExceeded and issubclass(DeadlineExceeded, NodeFault)
    err = error_for("deadline_exceeded", "too slow", deadline_ms=500)
    assert isinstance(err, DeadlineExceeded) and err.details == {"deadline_ms": 500}
    # On the wire it is an Error like any other (the link decodes the code).
    frame = p.Error(id="r1", code="deadline_exceeded", message="too slow", details={"deadline_ms": 500})
    assert p.decode_from_node(p.encode_link(frame)) == frame


def test_a_gateway_gets_both_errors_as_stable_codes_with_their_details() -> None:
    stalled = error_frame("a", WorkerCrashed("stalled: no decode step for 5.2 s ...", executor="m", exit_code=None,
                                             signal=9, cause="stalled"))
    assert (stalled.code, stalled.details) == ("worker_crashed", {"executor": "m", "signal": 9, "cause": "stalled"})
    late = error_frame("b", DeadlineExceeded("request b passed its deadline of 0.5 s", executor="m",
                                             deadline_ms=500))
    assert (late.code, late.details) == ("deadline_exceeded", {"executor": "m", "deadline_ms": 500})


async def test_a_request_whose_deadline_passes_in_the_queue_ends_with_deadline_exceeded() -> None:
    admission = Admission(parallel=1, queue_size=4)
    loop = asyncio.get_running_loop()
    async with admission.slot("m"):
        with pytest.raises(DeadlineExceeded) as exc:
            async with admission.slot("m", loop.time() + 0.05):
                pytest.fail("admitted while the only slot was taken")
        assert exc.value.details["executor"] == "m"
        assert (admission.waiting, admission.running) == (0, 1)  # its place in the queue is given back
    async with admission.slot("m", loop.time() + 5.0):  # a free slot: the deadline does not matter
        assert admission.running == 1


# ---------------------------------------------------------------------------------------------
# Bad values are refused, with the path and what was expected


@pytest.mark.parametrize("bad", [0, -1, 86_401, float("inf"), float("nan"), "soon"])
def test_a_request_deadline_out_of_range_is_refused_naming_the_field(bad: Any) -> None:
    raw = {"type": "infer", "id": "r", "model": "m",
           "request": {"type": "completion", "prompt": "x", "params": {"deadline_s": bad}}}
    with pytest.raises(msgspec.ValidationError) as exc:
        p.decode_from_gateway(msgspec.msgpack.encode(raw))
    path, expected = explain(exc.value, p.GatewayToNode)
    assert path == "request.params.deadline_s"
    if not isinstance(bad, str):
        assert expected == "a number of seconds > 0, at most 86400"
    # The in-process API: the same limit, as BadRequest with the field.
    if not isinstance(bad, str):
        with pytest.raises(BadRequest) as err:
            checked(p.CompletionRequest(prompt="x", params=p.SamplingParams(deadline_s=bad)), "request")
        assert err.value.details["field"] == "request.params.deadline_s"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("stall_timeout_s", 0.5, "a number of seconds from 1 to 86400"),
    ("stall_timeout_s", 0, "a number of seconds from 1 to 86400"),
    ("deadline_s", -1, "0 (no deadline) or a number of seconds up to 86400"),
    ("deadline_s", 100_000, "0 (no deadline) or a number of seconds up to 86400"),
])
def test_model_settings_out_of_range_are_refused(key: str, value: float, expected: str) -> None:
    raw = {"type": "configure", "id": "c", "model": "m", "settings": {key: value}}
    with pytest.raises(msgspec.ValidationError) as exc:
        p.decode_from_gateway(msgspec.msgpack.encode(raw))
    assert explain(exc.value, p.GatewayToNode) == (f"settings.{key}", expected)
    with pytest.raises(ConfigError) as cfg:
        load_settings(environ={}, overrides={f"model_defaults.{key}": str(value)})
    assert cfg.value.key == f"model_defaults.{key}" and cfg.value.expected == expected


def test_the_settings_take_both_keys_from_every_layer(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text("[model_defaults]\nstall_timeout_s = 30\ndeadline_s = 600\n")
    s = load_settings(f, environ={"OPTIMANODE_MODEL_DEFAULTS_DEADLINE_S": "300"})
    assert (s.model_defaults.stall_timeout_s, s.model_defaults.deadline_s) == (30.0, 300.0)
    assert load_settings(environ={}).model_defaults.deadline_s == 0.0  # no deadline by default
