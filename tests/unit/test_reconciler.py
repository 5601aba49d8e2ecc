"""The reconciler's decisions are pure functions: decide of (facts, now, memory, policy), on_exit of a worker's end."""

import signal

import pytest

from optimanode.config import Restart
from optimanode.executors.reconciler import Facts, backoff_delay, decide, estimate_bytes, on_exit, on_spawn_failed
from optimanode.executors.supervisor import ExitInfo
from optimanode.protocol import ModelInfo

POLICY = Restart(backoff_base_s=1.0, backoff_cap_s=8.0, jitter=0.5, crash_budget=3, crash_window_s=60.0)
GB = 1 << 30


def triggers(decision):
    return [(a.executor_id, a.trigger) for a in decision.actions]


def test_a_discovered_model_that_is_wanted_is_enabled_then_started():
    assert triggers(decide({"a": Facts(state="discovered", enabled=True)}, 0, GB, POLICY)) == [("a", "enable")]
    assert triggers(decide({"a": Facts(state="enabled", enabled=True)}, 0, GB, POLICY)) == [("a", "start")]


def test_a_discovered_model_nobody_wants_is_left_alone():
    assert decide({"a": Facts(state="discovered", enabled=False)}, 0, GB, POLICY).actions == []


def test_running_models_that_are_no_longer_wanted_are_stopped():
    for state in ("starting", "running", "restarting"):
        assert triggers(decide({"a": Facts(state=state, enabled=False)}, 0, GB, POLICY)) == [("a", "stop")]


def test_a_stale_worker_is_stopped_so_it_comes_back_with_the_new_settings():
    d = decide({"a": Facts(state="running", enabled=True, stale=True)}, 0, GB, POLICY)
    assert triggers(d) == [("a", "stop")]
    assert "settings" in d.actions[0].reason


def test_a_crashed_model_waits_out_its_backoff_then_restarts():
    f = Facts(state="crashed", enabled=True, crash_times=(100.0,), restart_at=101.5)
    early = decide({"a": f}, 101.0, GB, POLICY)
    assert early.actions == [] and early.wake_at == 101.5
    assert triggers(decide({"a": f}, 101.5, GB, POLICY)) == [("a", "restart")]


def test_the_crash_budget_within_the_window_ends_in_failed():
    f = Facts(state="crashed", enabled=True, crash_times=(10.0, 20.0, 30.0), restart_at=31.0)
    d = decide({"a": f}, 40.0, GB, POLICY)
    assert triggers(d) == [("a", "give_up")]
    assert "3 crashes within 60 s" in d.actions[0].reason


def test_crashes_older_than_the_window_do_not_count():
    f = Facts(state="crashed", enabled=True, crash_times=(0.0, 5.0, 100.0), restart_at=101.0)
    assert triggers(decide({"a": f}, 102.0, GB, POLICY)) == [("a", "restart")]


def test_a_failed_model_stays_failed():
    assert decide({"a": Facts(state="failed", enabled=True)}, 0, GB, POLICY).actions == []


def test_a_crashed_model_that_is_disabled_goes_back_to_discovered():
    f = Facts(state="crashed", enabled=False, crash_times=(1.0,), restart_at=2.0)
    assert triggers(decide({"a": f}, 1.5, GB, POLICY)) == [("a", "disable")]


def test_a_model_that_does_not_fit_in_memory_is_held_with_the_reason():
    d = decide({"a": Facts(state="enabled", enabled=True, estimate_bytes=2 * GB)}, 0, GB, POLICY)
    assert triggers(d) == [("a", "hold")]
    assert "not enough memory" in d.actions[0].reason


def test_a_waiting_model_starts_when_memory_frees_up_and_is_not_held_again_meanwhile():
    f = Facts(state="waiting", enabled=True, estimate_bytes=2 * GB)
    assert decide({"a": f}, 0, GB, POLICY).actions == []
    assert triggers(decide({"a": f}, 0, 3 * GB, POLICY)) == [("a", "start")]


def test_models_still_loading_count_against_free_memory():
    facts = {"a": Facts(state="starting", enabled=True, estimate_bytes=GB),
             "b": Facts(state="enabled", enabled=True, estimate_bytes=GB)}
    assert triggers(decide(facts, 0, int(1.5 * GB), POLICY)) == [("b", "hold")]


def test_two_models_that_fit_only_one_at_a_time_start_one():
    facts = {"a": Facts(state="enabled", enabled=True, estimate_bytes=GB),
             "b": Facts(state="enabled", enabled=True, estimate_bytes=GB)}
    assert triggers(decide(facts, 0, int(1.5 * GB), POLICY)) == [("a", "start"), ("b", "hold")]


def test_the_memory_reserve_is_kept_free():
    f = Facts(state="enabled", enabled=True, estimate_bytes=GB)
    assert triggers(decide({"a": f}, 0, int(1.5 * GB), POLICY, reserve_bytes=GB)) == [("a", "hold")]


def test_what_running_workers_hold_in_their_host_caches_counts_as_room():
    # 1.5 GB available, 1 GB of it kept free: b (1 GB) fits only with a's 0.6 GB of cache given back.
    facts = {"a": Facts(state="running", enabled=True, estimate_bytes=GB, cache_bytes=int(0.6 * GB)),
             "b": Facts(state="enabled", enabled=True, estimate_bytes=GB)}
    assert triggers(decide(facts, 0, int(1.5 * GB), POLICY, reserve_bytes=GB)) == [("b", "start")]
    # Less cache than the shortfall: held, and nothing else changes.
    facts["a"] = Facts(state="running", enabled=True, estimate_bytes=GB, cache_bytes=int(0.4 * GB))
    assert triggers(decide(facts, 0, int(1.5 * GB), POLICY, reserve_bytes=GB)) == [("b", "hold")]
    # A worker no longer live (stopping) holds nothing the node can count on.
    facts["a"] = Facts(state="stopping", enabled=False, cache_bytes=int(0.6 * GB))
    assert triggers(decide(facts, 0, int(1.5 * GB), POLICY, reserve_bytes=GB)) == [("b", "hold")]


def test_backoff_doubles_to_the_cap_and_jitter_only_stretches_it():
    assert [backoff_delay(k, POLICY, 0.0) for k in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 8, 8]
    assert backoff_delay(2, POLICY, 0.999) < 2 * 1.5
    assert backoff_delay(2, POLICY, 0.5) == 2 * 1.25


def test_the_memory_estimate_is_the_weights_plus_an_f16_kv_cache():
    info = ModelInfo(path="m", files=["m"], size_bytes=100 << 20, mtime_ns=0, block_count=30,
                     embedding_length=576, head_count=9, head_count_kv=3)
    kv_per_token = 2 * 30 * (576 * 3 // 9) * 2
    assert estimate_bytes(info, 2048) == (100 << 20) + 2048 * kv_per_token + (64 << 20)
    assert estimate_bytes(info, 4096) > estimate_bytes(info, 2048)


def test_the_estimate_uses_the_stated_head_widths_when_the_model_has_them():
    # Gemma 3 states key_length 256 where embedding_length / head_count would say 160.
    info = ModelInfo(path="m", files=["m"], size_bytes=0, mtime_ns=0, block_count=18, embedding_length=640,
                     head_count=4, head_count_kv=1, key_length=256, value_length=256)
    assert estimate_bytes(info, 1000) == 1000 * 18 * 1 * (256 + 256) * 2 + (64 << 20)


# -- what a worker's end means: on_exit (no process, no journal) --------------------------------


def exited(**kw):
    base = dict(pid=42, exit_code=None, signal=None, uptime_s=1.0, stderr_tail=[])
    base.update(kw)
    return ExitInfo(**base)


def test_a_crash_after_ready_backs_off_and_counts_against_the_budget():
    f = Facts(state="running", enabled=True, crash_times=(1.0, 150.0))
    d = on_exit(f, exited(signal=signal.SIGKILL, was_ready=True, stderr_tail=["some line"]), 200.0, POLICY, 0.0)
    # The crash at 1.0 is out of the 60 s window: this is the second crash in it.
    assert d.crash_times == (150.0, 200.0) and d.restart_at == 202.0 and d.restart_in_s == 2.0
    assert d.reason == "worker 42 killed by SIGKILL" and not d.give_up and d.safe_mode is None
    # The budget-th crash in the window: no restart by backoff follows (decide gives up).
    d = on_exit(Facts(state="running", enabled=True, crash_times=(150.0, 160.0)), exited(exit_code=1, was_ready=True),
                200.0, POLICY, 0.5)
    assert len(d.crash_times) == 3 and d.restart_in_s is None
    assert triggers(decide({"a": Facts(state="crashed", enabled=True, crash_times=d.crash_times,
                                       restart_at=d.restart_at)}, 200.0, GB, POLICY)) == [("a", "give_up")]


def test_a_worker_that_fails_to_load_says_why_from_its_last_stderr_line():
    d = on_exit(Facts(state="starting", enabled=True), exited(exit_code=3, stderr_tail=["loading", "bad magic", " "]),
                10.0, POLICY, 0.0)
    assert d.reason == "worker 42 exited with code 3 while loading the model: bad magic"
    assert d.restart_in_s == 1.0 and d.crash_times == (10.0,)


def test_a_fatal_signal_while_loading_restarts_at_once_in_safe_mode_outside_the_budget():
    f = Facts(state="starting", enabled=True, crash_times=(5.0,))
    info = exited(signal=signal.SIGSEGV, stderr_tail=["Fatal Python error: Segmentation fault"], phase="warm-up")
    d = on_exit(f, info, 10.0, POLICY, 0.9)
    assert d.safe_mode is True and d.restart_at == 10.0 and d.restart_in_s == 0.0
    assert d.crash_times == (5.0,)  # a diagnosis, not part of a crash loop
    assert d.reason.startswith("worker 42 killed by SIGSEGV during warm-up while loading the model; safe mode turns off ")
    assert "Fatal Python error" not in d.reason  # faulthandler's report is no explanation
    # With safe mode off it is an ordinary crash; a worker the node killed did not fault.
    off = on_exit(Facts(state="starting", enabled=True, safe_mode="off"), info, 10.0, POLICY, 0.0)
    assert off.safe_mode is None and off.restart_in_s == 1.0 and off.crash_times == (10.0,)
    killed = on_exit(f, exited(signal=signal.SIGSEGV, killed_for="load timeout"), 10.0, POLICY, 0.0)
    assert killed.safe_mode is None and not killed.give_up


def test_a_safe_mode_worker_that_dies_of_a_fatal_signal_while_loading_gives_up_with_a_reason():
    f = Facts(state="restarting", enabled=True)
    d = on_exit(f, exited(signal=signal.SIGSEGV, safe_mode=True), 10.0, POLICY, 0.0)
    assert d.give_up.startswith("its worker died of SIGSEGV while loading even in safe mode")
    assert d.restart_in_s is None and d.safe_mode is None and d.crash_times == (10.0,)
    sigill = on_exit(f, exited(signal=signal.SIGILL, safe_mode=True), 10.0, POLICY, 0.0)
    assert sigill.give_up.startswith("this llama.cpp build uses instructions this CPU lacks")
    # After Ready a fault is an ordinary crash, safe mode or not.
    ready = on_exit(f, exited(signal=signal.SIGSEGV, safe_mode=True, was_ready=True), 10.0, POLICY, 0.0)
    assert not ready.give_up and ready.restart_in_s == 1.0


def test_a_worker_that_cannot_be_spawned_is_a_crash_with_backoff():
    d = on_spawn_failed(Facts(state="starting", enabled=True, crash_times=(9.0,)), "[Errno 12] no memory",
                        10.0, POLICY, 0.0)
    assert d.reason == "could not spawn the worker: [Errno 12] no memory"
    assert d.crash_times == (9.0, 10.0) and d.restart_at == 12.0 and d.restart_in_s == 2.0
    # Crashes older than the window are dropped, as on_exit does; at the budget no backoff is told.
    old = on_spawn_failed(Facts(state="starting", enabled=True, crash_times=(10.0 - POLICY.crash_window_s - 1,)),
                          "[Errno 12] no memory", 10.0, POLICY, 0.0)
    assert old.crash_times == (10.0,) and old.restart_in_s == 1.0
    full = tuple(10.0 - i for i in range(1, POLICY.crash_budget))
    last = on_spawn_failed(Facts(state="starting", enabled=True, crash_times=full), "[Errno 12] no memory",
                           10.0, POLICY, 0.0)
    assert len(last.crash_times) == POLICY.crash_budget and last.restart_in_s is None


# -- on-demand models: loaded by requests, unloaded when idle, evicted least recently used first ---


def _od(state: str, **kw) -> Facts:
    return Facts(state=state, enabled=True, on_demand=True, estimate_bytes=GB, **kw)


def test_an_on_demand_model_starts_only_when_a_request_wants_it() -> None:
    assert decide({"a": _od("enabled")}, 0, 8 * GB, POLICY).actions == []
    assert triggers(decide({"a": _od("enabled", demanded=True)}, 0, 8 * GB, POLICY)) == [("a", "start")]
    # An "always" model starts without one, as before.
    assert triggers(decide({"a": Facts(state="enabled", enabled=True)}, 0, 8 * GB, POLICY)) == [("a", "start")]


def test_an_idle_on_demand_model_is_unloaded_after_keep_alive() -> None:
    d = decide({"a": _od("running", idle_s=299.0, keep_alive_s=300.0)}, 1000.0, 8 * GB, POLICY)
    assert d.actions == [] and d.wake_at == pytest.approx(1001.0)
    d = decide({"a": _od("running", idle_s=300.0, keep_alive_s=300.0)}, 1000.0, 8 * GB, POLICY)
    assert [(a.trigger, a.reason) for a in d.actions] == [("stop", "idle for 300 s (keep_alive_s 300)")]
    # Busy (idle_s None) or "always": never unloaded for idleness.
    assert decide({"a": _od("running", keep_alive_s=0.0)}, 1000.0, 8 * GB, POLICY).actions == []
    assert decide({"a": Facts(state="running", enabled=True, idle_s=1e9, keep_alive_s=0.0)}, 0, 8 * GB,
                  POLICY).actions == []


def test_a_demanded_model_evicts_idle_on_demand_models_least_recently_used_first() -> None:
    facts = {"old": _od("running", idle_s=50.0, last_used=10.0), "new": _od("running", idle_s=5.0, last_used=20.0),
             "busy": _od("running", idle_s=None, last_used=1.0), "pinned": Facts(state="running", enabled=True,
                                                                                estimate_bytes=GB),
             "c": _od("enabled", demanded=True)}
    # The budget caps the live models at 4 GB: 4 running, so c needs one evicted: the least recently used idle one.
    d = decide(facts, 0, 64 * GB, POLICY, memory_budget_bytes=4 * GB)
    assert [(a.executor_id, a.trigger) for a in d.actions] == [("old", "stop")]
    assert d.actions[0].reason.startswith("evicted: the least recently used idle on-demand model, for c")
    # Two needed (c takes 2 GB): old, then new; never busy or pinned ("always").
    facts["c"] = Facts(state="enabled", enabled=True, on_demand=True, demanded=True, estimate_bytes=2 * GB)
    d = decide(facts, 0, 64 * GB, POLICY, memory_budget_bytes=4 * GB)
    assert sorted(a.executor_id for a in d.actions) == ["new", "old"]
    # While an evicted worker is still stopping, nothing more is evicted and c waits (no hold).
    facts["old"] = _od("stopping")
    assert decide(facts, 0, 64 * GB, POLICY, memory_budget_bytes=4 * GB).actions == []
    # Nothing idle to evict: c is held with the reason (its waiting requests are told it).
    facts = {"busy": _od("running", idle_s=None), "c": _od("enabled", demanded=True)}
    (a,) = decide(facts, 0, 64 * GB, POLICY, memory_budget_bytes=GB).actions
    assert (a.executor_id, a.trigger) == ("c", "hold") and a.reason.startswith("not enough memory in RAM")
