"""The OpenMetrics endpoint's pure parts: the listen setting, families from a snapshot, request stats, crash causes."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from optimanode.config import load_settings, metrics_address
from optimanode.errors import ConfigError
from optimanode.executors.lifecycle import STATES
from optimanode.executors.supervisor import CRASH_CAUSES, ExitInfo
from optimanode.gateway.server import _LinkLog
from optimanode.metrics import Sampler
from optimanode.openmetrics import Snapshot, families, metrics_server
from optimanode.protocol import ExecutorStatus, JournalReport, ModelInfo, PromptCacheReport
from optimanode.stats import TTFT_BUCKETS, RequestStats
from optimanode.testing import GiB, FakeGpu, FakeNvml

REPO = Path(__file__).resolve().parents[2]

# -- the setting ---------------------------------------------------------------------------------


def test_the_endpoint_is_off_by_default():
    settings = load_settings(environ={})
    assert settings.metrics_http.listen == ""
    assert metrics_address(settings.metrics_http.listen) is None
    # What optimanode run builds (cli.serve): nothing, so nothing listens.
    assert metrics_server(object(), settings, lambda: pytest.fail("sampled")) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("listen", "address"), [
    ("9464", ("127.0.0.1", 9464)),  # a bare port: loopback
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("metrics.example:9464", ("metrics.example", 9464)),
])
def test_a_listen_value_is_a_port_on_loopback_or_host_and_port(listen, address):
    settings = load_settings(environ={}, overrides={"metrics_http.listen": listen})
    assert metrics_address(settings.metrics_http.listen) == address


@pytest.mark.parametrize("bad", ["abc", "0", "65536", "70000", "127.0.0.1:", ":9464", "::1:9464", "9464 ",
                                 "http://127.0.0.1:9464", "127.0.0.1:9464/metrics", "-1"])
def test_a_bad_listen_value_is_a_clear_error_naming_the_key_and_the_expected_form(bad):
    with pytest.raises(ConfigError) as err:
        load_settings(environ={}, overrides={"metrics_http.listen": bad})
    text = str(err.value)
    assert "command line" in text and "metrics_http.listen" in text
    assert "a port (served on 127.0.0.1) or HOST:PORT" in text and repr(bad) in text


def test_a_bad_listen_value_in_the_file_or_the_environment_names_that_layer(tmp_path: Path):
    config = tmp_path / "optimanode.toml"
    config.write_text("[metrics_http]\nlisten = 9464\n")  # a number, not the string "9464"
    with pytest.raises(ConfigError, match=r"optimanode\.toml: metrics_http\.listen: expected \"\" \(off\), a port"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match=r"environment.*metrics_http\.listen: expected"):
        load_settings(environ={"OPTIMANODE_METRICS_HTTP_LISTEN": "localhost"})
    config.write_text('[metrics_http]\nlisten = "9464"\nport = 1\n')
    with pytest.raises(ConfigError, match=r"metrics_http\.port: expected a known key"):
        load_settings(config, environ={})


# -- families from a snapshot --------------------------------------------------------------------


def status(eid: str, **kw: object) -> ExecutorStatus:
    info = ModelInfo(path=f"/m/{eid}.gguf", files=[f"/m/{eid}.gguf"], size_bytes=1, mtime_ns=1)
    return ExecutorStatus(id=eid, info=info, **kw)  # type: ignore[arg-type]


def scrape(snap: Snapshot, *, openmetrics: bool = False) -> dict[str, dict[tuple, float]]:
    """``snap`` served and parsed back by prometheus_client: family name → {sorted labels: value}."""

    class One:
        def collect(self):
            return families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())  # type: ignore[arg-type]
    if openmetrics:
        parsed = parse_openmetrics(generate_openmetrics(registry).decode())
    else:
        parsed = text_string_to_metric_families(generate_latest(registry).decode())
    out: dict[str, dict[tuple, float]] = {}
    for family in parsed:
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(metrics: dict[str, dict[tuple, float]], metric: str, /, **labels: str) -> float:
    return metrics[metric][tuple(sorted(labels.items()))]


@pytest.fixture
def gpu_snapshot() -> Snapshot:
    """Two models (one running with a worker on a fake GPU, one failed) sampled by the real Sampler."""
    worker_pid = os.getpid()  # a live process stands in for the worker (psutil reads its RSS and CPU)
    gpu = FakeGpu(name="NVIDIA H200", uuid="GPU-abc", memory_total=141 * GiB, memory_used=20 * GiB,
                  utilization_gpu=63, temperature_c=51, power_mw=312_000, power_limit_mw=700_000,
                  compute_processes={worker_pid: 18 * GiB})
    statuses = [status("llm", state="running", enabled=True, pid=worker_pid, parallel=4, in_flight=1, queue_depth=2,
                       queue_size=16, restarts=3, recent_crashes=1, tokens_generated=1234, gpus=[0],
                       memory_estimate_bytes=300 << 20, vram_estimate_bytes={0: 17 * GiB}, loaded=True,
                       last_used=1700000000.5, evictions=2,
                       prompt_cache=PromptCacheReport(tokens_served=900, hits=2, bytes=5 << 20, cap_bytes=1 << 30,
                                                      entries=1)),
                status("broken", state="failed", enabled=True, recent_crashes=5, safe_mode=True)]
    sampler = Sampler(lambda: statuses, node_id="node-1", nvml=FakeNvml([gpu]))
    try:
        sampler.sample()
        report = sampler.sample()  # the second: CPU% needs an interval
    finally:
        sampler.close()
    return Snapshot(report=report, statuses=statuses, crashes={"llm": {"killed": 2, "heartbeat_timeout": 1},
                                                                 "broken": {"fatal_signal": 5}},
                    crash_budget=5, journal_bytes=1 << 20, journal_wal_bytes=4096, journal_max_bytes=1 << 30,
                    loop_lag_s=0.002, node_id="node-1")


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_each_model_has_one_series_per_state_and_every_crash_cause(gpu_snapshot, openmetrics):
    m = scrape(gpu_snapshot, openmetrics=openmetrics)
    for model, current in (("llm", "running"), ("broken", "failed")):
        states = {dict(k)["state"]: v for k, v in m["optimanode_model_state"].items() if dict(k)["model"] == model}
        assert states == {s: (1.0 if s == current else 0.0) for s in STATES}
    crashes = {dict(k)["cause"]: v for k, v in m["optimanode_model_crashes_total"].items() if dict(k)["model"] == "llm"}
    # Every cause has a series from the start (so increase() sees a first crash), the counts as kept.
    assert crashes == {c: {"killed": 2.0, "heartbeat_timeout": 1.0}.get(c, 0.0) for c in CRASH_CAUSES}
    assert one(m, "optimanode_model_crashes_total", model="broken", cause="fatal_signal") == 5
    assert one(m, "optimanode_model_restarts_total", model="llm") == 3
    assert one(m, "optimanode_model_recent_crashes", model="broken") == 5
    assert one(m, "optimanode_restart_crash_budget") == 5
    assert one(m, "optimanode_model_enabled", model="llm") == 1
    assert one(m, "optimanode_model_safe_mode", model="broken") == 1
    assert one(m, "optimanode_model_safe_mode", model="llm") == 0


def test_capacity_tokens_gpu_host_and_journal_come_from_the_report(gpu_snapshot):
    m = scrape(gpu_snapshot)
    assert one(m, "optimanode_model_queue_depth", model="llm") == 2
    assert one(m, "optimanode_model_queue_size", model="llm") == 16
    assert one(m, "optimanode_model_in_flight", model="llm") == 1
    assert one(m, "optimanode_model_slots", model="llm") == 4
    assert one(m, "optimanode_model_free_slots", model="llm") == 3  # 4 slots, 1 in flight
    assert one(m, "optimanode_model_free_slots", model="broken") == 0
    assert one(m, "optimanode_model_tokens_generated_total", model="llm") == 1234
    assert one(m, "optimanode_model_tokens_per_second", model="llm") == 0  # the counter did not move
    assert one(m, "optimanode_model_worker_rss_bytes", model="llm") > 0
    assert one(m, "optimanode_model_worker_cpu_percent", model="llm") >= 0
    assert one(m, "optimanode_model_worker_vram_bytes", model="llm") == 18 * GiB
    assert ("model", "broken") not in {k[0] for k in m["optimanode_model_worker_vram_bytes"]}  # no worker: no sample
    gpu = {"gpu": "0", "name": "NVIDIA H200", "uuid": "GPU-abc"}
    assert one(m, "optimanode_gpus") == 1
    assert one(m, "optimanode_gpu_memory_total_bytes", **gpu) == 141 * GiB
    assert one(m, "optimanode_gpu_memory_used_bytes", **gpu) == 20 * GiB
    assert one(m, "optimanode_gpu_utilization_percent", **gpu) == 63
    assert one(m, "optimanode_gpu_temperature_celsius", **gpu) == 51
    assert one(m, "optimanode_gpu_power_watts", **gpu) == 312
    assert one(m, "optimanode_gpu_power_limit_watts", **gpu) == 700
    # Placement: the GPU's free memory, the model placed on it, and the model's estimate.
    assert one(m, "optimanode_gpu_memory_free_bytes", **gpu) == 121 * GiB
    assert m["optimanode_gpu_model"] == {(("gpu", "0"), ("model", "llm")): 1}  # the failed model is on none
    assert one(m, "optimanode_model_memory_estimate_bytes", model="llm") == 300 << 20
    assert one(m, "optimanode_model_vram_estimate_bytes", model="llm", gpu="0") == 17 * GiB
    e = {x.id: x for x in gpu_snapshot.report.executors}["llm"]
    assert (e.gpus, e.memory_estimate_bytes, e.vram_estimate_bytes) == ([0], 300 << 20, 17 * GiB)
    # On-demand loading.
    assert (e.loaded, e.last_used, e.evictions) == (True, 1700000000.5, 2)
    assert one(m, "optimanode_model_loaded", model="llm") == 1 and one(m, "optimanode_model_loaded", model="broken") == 0
    assert one(m, "optimanode_model_last_used_seconds", model="llm") == 1700000000.5
    assert one(m, "optimanode_model_evictions_total", model="llm") == 2
    r = gpu_snapshot.report
    assert one(m, "optimanode_host_memory_total_bytes") == r.memory.total_bytes > 0
    assert one(m, "optimanode_host_cpu_cores", kind="logical") == r.cpu.cores_logical
    assert one(m, "optimanode_host_load_average", period="15m") == r.cpu.load_15m
    assert one(m, "optimanode_journal_file_bytes") == 1 << 20
    assert one(m, "optimanode_journal_wal_bytes") == 4096
    assert one(m, "optimanode_journal_max_bytes") == 1 << 30
    assert one(m, "optimanode_event_loop_responsive") == 1
    assert one(m, "optimanode_event_loop_lag_seconds") == 0.002
    assert one(m, "optimanode_info", node_id="node-1", version=gpu_snapshot.version) == 1


def test_a_gpu_field_the_driver_refuses_has_no_sample_rather_than_a_zero():
    gpu = FakeGpu(uuid="GPU-x", unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature"})
    sampler = Sampler(lambda: [], nvml=FakeNvml([gpu]))
    try:
        report = sampler.sample()
    finally:
        sampler.close()
    m = scrape(Snapshot(report=report, statuses=[], crashes={}, crash_budget=5, journal_bytes=None,
                        journal_wal_bytes=None))
    assert "optimanode_gpu_power_watts" not in m and "optimanode_gpu_temperature_celsius" not in m
    assert one(m, "optimanode_gpu_memory_total_bytes", gpu="0", name=gpu.name, uuid="GPU-x") == gpu.memory_total
    assert "optimanode_journal_file_bytes" not in m  # a journal that cannot be stat'ed: no sample, no error


def test_without_a_driver_there_are_no_gpu_series_and_the_count_is_zero():
    sampler = Sampler(lambda: [], nvml=FakeNvml.without_driver())
    try:
        report = sampler.sample()
    finally:
        sampler.close()
    m = scrape(Snapshot(report=report, statuses=[], crashes={}, crash_budget=5, journal_bytes=1,
                        journal_wal_bytes=0))
    assert one(m, "optimanode_gpus") == 0
    assert not any(name.startswith("optimanode_gpu_") for name in m)


# -- request stats -------------------------------------------------------------------------------


def test_request_stats_count_outcomes_and_fill_the_histograms():
    stats = RequestStats()
    stats.finished("llm", "stop", duration_s=0.4, queued_s=0.0, ttft_s=0.03)
    stats.finished("llm", "length", duration_s=1.2, queued_s=0.5, ttft_s=0.2)
    stats.finished("llm", "overloaded", duration_s=0.0001)  # refused before a slot: no queue wait, no TTFT
    stats.finished("other", "worker_crashed", duration_s=3.0, queued_s=0.1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(stats)  # type: ignore[arg-type]
    m = scrape_registry(registry)
    assert one(m, "optimanode_requests_total", model="llm", outcome="stop") == 1
    assert one(m, "optimanode_requests_total", model="llm", outcome="overloaded") == 1
    assert one(m, "optimanode_request_duration_seconds_count", model="llm") == 3
    assert one(m, "optimanode_request_queue_seconds_count", model="llm") == 2
    assert one(m, "optimanode_request_ttft_seconds_count", model="llm") == 2
    assert one(m, "optimanode_request_ttft_seconds_sum", model="llm") == pytest.approx(0.23)
    assert one(m, "optimanode_request_ttft_seconds_bucket", model="llm", le="0.05") == 1
    assert one(m, "optimanode_request_ttft_seconds_bucket", model="llm", le="+Inf") == 2
    assert one(m, "optimanode_request_ttft_seconds_bucket", model="llm", le=str(TTFT_BUCKETS[-1])) == 2
    assert ("model", "other") not in {k[0] for k in m["optimanode_request_ttft_seconds_count"]}


def scrape_registry(registry: CollectorRegistry) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_two_nodes_in_one_process_keep_separate_stats():
    a, b = RequestStats(), RequestStats()
    a.finished("llm", "stop", duration_s=1.0)
    assert [s.value for m in b.collect() for s in m.samples if s.name == "optimanode_requests_total"] == []


# -- crash causes --------------------------------------------------------------------------------


def exit_info(**kw: object) -> ExitInfo:
    code, sig = kw.pop("exit_code", None), kw.pop("signal", None)
    return ExitInfo(pid=1, exit_code=code, signal=sig, uptime_s=1.0, stderr_tail=[], **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("info", "cause"), [
    (exit_info(signal=signal.SIGSEGV), "fatal_signal"),
    (exit_info(signal=signal.SIGKILL), "killed"),  # nobody here sent it: the OOM killer, an operator
    (exit_info(exit_code=1), "exited"),
    (exit_info(exit_code=0), "exited"),
    (exit_info(signal=signal.SIGKILL, killed_for="no heartbeat for 10 s"), "heartbeat_timeout"),
    (exit_info(signal=signal.SIGKILL, killed_for="not ready after 300 s"), "load_timeout"),
    (exit_info(signal=signal.SIGKILL, killed_for="protocol error"), "protocol_error"),
    (exit_info(signal=signal.SIGKILL, killed_for="stalled: no decode step for 120.0 s"), "stalled"),
])
def test_every_exit_has_one_cause_from_the_fixed_list(info, cause):
    assert info.cause == cause
    assert cause in CRASH_CAUSES


# -- websockets' log lines -----------------------------------------------------------------------


def test_websockets_info_lines_go_to_debug_with_the_peer_and_its_warnings_keep_their_level(caplog):
    fields: dict[str, object] = {"peer": "192.0.2.7"}
    adapter = _LinkLog(logging.getLogger("optimanode.gateway.websockets"), fields)
    with caplog.at_level(logging.DEBUG, logger="optimanode.gateway.websockets"):
        adapter.info("connection open")
        fields["session"] = "ab12cd34"
        adapter.warning("something odd")
    opened, odd = caplog.records
    assert (opened.levelno, opened.getMessage()) == (logging.DEBUG, "connection open")
    assert opened.peer == "192.0.2.7"  # type: ignore[attr-defined]
    assert (odd.levelno, odd.session) == (logging.WARNING, "ab12cd34")  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="optimanode.gateway.websockets"):
        adapter.info("connection closed")
    assert caplog.records == []


def test_the_journal_damaged_gauge_follows_the_integrity_check(gpu_snapshot):
    """Absent until the check has run, 0 for "ok", 1 for what quick_check found."""
    def served(integrity: str) -> dict:
        report = msgspec.structs.replace(gpu_snapshot.report,
                                         journal=JournalReport(bytes=1, cap_bytes=2, integrity=integrity))
        snap = Snapshot(**{**{f: getattr(gpu_snapshot, f) for f in gpu_snapshot.__dataclass_fields__},
                           "report": report})
        return scrape(snap, openmetrics=True)

    assert "optimanode_journal_damaged" not in served("")
    assert served("ok")["optimanode_journal_damaged"] == {(): 0.0}
    assert served("*** in database main *** Page 5: btreeInitPage() returns error code 11")[
        "optimanode_journal_damaged"] == {(): 1.0}


# -- the docs --------------------------------------------------------------------------------------


def test_every_metric_docs_operations_names_is_served(gpu_snapshot):
    """The metric table, the alert rules and the suggestions in docs/operations.md name real series."""
    doc = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Monitoring"):doc.index("## Troubleshooting")]
    # Names ending in "_" are the stems of brace lists (optimanode_gpu_{...}): their parts are checked
    # through the table rows that spell them out.
    named = {n for n in re.findall(r"optimanode_[a-z_]+", section) if not n.endswith("_")}
    stats = RequestStats()
    stats.finished("llm", "stop", duration_s=1.0, queued_s=0.1, ttft_s=0.05)
    report = msgspec.structs.replace(gpu_snapshot.report,
                                     journal=JournalReport(bytes=1, cap_bytes=2, integrity="ok"))
    snap = Snapshot(**{**{f: getattr(gpu_snapshot, f) for f in gpu_snapshot.__dataclass_fields__},
                       "report": report, "extra": list(stats.collect())})
    samples = set(scrape(snap))
    served = samples | {n.removesuffix("_count") for n in samples if n.endswith("_count")}  # histograms by name
    assert len(named) > 20 and named <= served, sorted(named - served)
    # The brace lists, spelt out: optimanode_host_memory_{total,available,used}_bytes and the like.
    expanded = {f"{stem}{part.strip()}{tail}"
                for stem, parts, tail in re.findall(r"`(optimanode_[a-z_]+_)\{([a-z_, ]+)\}([a-z_]*)", section)
                for part in parts.split(",")}
    assert len(expanded) > 10 and expanded <= served, sorted(expanded - served)

