"""The reconciler's decision is a pure function of (facts, now, memory, policy)."""

from optimanode.config import Restart
from optimanode.executors.reconciler import Facts, backoff_delay, decide, estimate_bytes
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
