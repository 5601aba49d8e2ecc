"""The OpenMetrics endpoint on a real node: HTTP on loopback, scraped and parsed by prometheus_client's own parsers.

The node runs as a service in this test's loop (``run_service``), with its Gateway link and the
endpoint, the real SmolLM2 behind it and a ``FakeNvml`` GPU (the one fake: there is no NVIDIA GPU
here). Requests go over the real TLS link and the in-process API; a scrape is a real HTTP GET from
another thread, as Prometheus' would be. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from optimanode import __version__, cli
from optimanode.client import NodeClient
from optimanode.config import Settings
from optimanode.errors import ConfigError, Overloaded
from optimanode.executors.supervisor import CRASH_CAUSES
from optimanode.gateway import keys
from optimanode.gateway.server import GatewayServer
from optimanode.metrics import Sampler
from optimanode.node import Node
from optimanode.openmetrics import OpenMetricsServer, metrics_server
from optimanode.protocol import CompletionRequest, InferDone, SamplingParams
from optimanode.service import Notifier, Service, run_service
from optimanode.testing import GiB, FakeGpu, FakeNvml
from system.test_node import collect, make_settings

REPO = Path(__file__).resolve().parents[2]
NODE_ID = "metrics-node"
SHORT = SamplingParams(temperature=0.0, max_tokens=4)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

pytestmark = pytest.mark.timeout(300)

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str, accept: str | None = None, timeout: float = 15.0) -> tuple[str, str]:
    """(Content-Type, body) of a GET, from the calling thread."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback, http)
        return resp.headers["Content-Type"], resp.read().decode()


def parse(body: str, *, openmetrics: bool) -> Samples:
    """Every sample, parsed by prometheus_client: name → {sorted labels: value}."""
    out: Samples = {}
    for family in (parse_openmetrics if openmetrics else parse_text)(body):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def scrape(url: str, *, openmetrics: bool = False) -> Samples:
    """A scrape from another thread (as Prometheus' would come in), parsed."""
    ctype, body = await asyncio.to_thread(fetch, url, OPENMETRICS if openmetrics else None)
    assert ctype.startswith("application/openmetrics-text" if openmetrics else "text/plain"), ctype
    if openmetrics:
        assert body.endswith("# EOF\n")
    return parse(body, openmetrics=openmetrics)


def one(m: Samples, metric: str, /, **labels: str) -> float:
    return m[metric][tuple(sorted(labels.items()))]


def of_model(m: Samples, metric: str, eid: str, key: str) -> dict[str, float]:
    return {dict(k)[key]: v for k, v in m[metric].items() if dict(k)["model"] == eid}


@contextlib.asynccontextmanager
async def serving(settings: Settings, gpu: FakeGpu) -> AsyncIterator[tuple[Service, GatewayServer, OpenMetricsServer]]:
    """The node as a service with its Gateway link and the endpoint: what ``optimanode run`` starts, and a fake GPU."""
    made: list[object] = []
    box: list[Service] = []
    ready = asyncio.Event()
    samplers: list[Sampler] = []

    def servers(node: Node, s: Settings) -> list[object]:
        sampler = Sampler(node.list, node_id=NODE_ID, nvml=FakeNvml([gpu]))
        samplers.append(sampler)
        metrics = metrics_server(node, s, sampler.sample, NODE_ID)
        assert metrics is not None
        made[:] = [GatewayServer(node, s, sampler.sample, NODE_ID, host="127.0.0.1", port=0), metrics]
        return made  # type: ignore[return-value]

    def started(service: Service) -> None:
        box.append(service)
        ready.set()

    task = asyncio.ensure_future(run_service(settings, make_servers=servers, notifier=Notifier(None),
                                             install_signals=False, started=started))
    try:
        async with asyncio.timeout(120):
            await ready.wait()
            up = asyncio.ensure_future(box[0].wait_ready())
            await asyncio.wait({task, up}, return_when=asyncio.FIRST_COMPLETED)
            up.cancel()
            if task.done():
                task.result()
        yield box[0], made[0], made[1]  # type: ignore[misc]
    finally:
        if not task.done():
            box[0].request_stop("test cleanup")
            box[0].request_stop("test cleanup")
        async with asyncio.timeout(60):
            assert await task == 0
        for sampler in samplers:
            sampler.close()


@pytest.fixture(autouse=True)
def restore_root_log_level():
    """The service sets the root level from the settings; give pytest its own back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


async def test_a_serving_node_is_scraped_and_parsed_with_its_requests_crashes_gpu_and_journal(
        tmp_path: Path, smollm2_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "smollm2.gguf").symlink_to(smollm2_path)
    port = free_port()
    # A bare port: served on loopback.
    settings = make_settings(tmp_path, **{"scan.enable_new": "true", "metrics_http.listen": str(port),
                                          "model_defaults.queue_size": "0"})
    gpu = FakeGpu(name="NVIDIA H200", uuid="GPU-0000-test", memory_total=141 * GiB, memory_used=7 * GiB,
                  utilization_gpu=40, temperature_c=48, power_mw=150_000, power_limit_mw=700_000)
    caplog.set_level(logging.INFO)
    async with serving(settings, gpu) as (service, gateway, endpoint):
        assert (endpoint.host, endpoint.port) == ("127.0.0.1", port)
        url = endpoint.url
        node = service.node
        assert node is not None
        (eid,) = node.executors
        await node.wait_for_state(eid, {"running"}, timeout=90)
        pid = node.status(eid).pid
        assert pid is not None
        gpu.compute_processes[pid] = 3 * GiB  # the worker holds VRAM, as NVML would list it

        # Three requests: two over the Gateway link (one connection), one in-process.
        caplog.clear()
        key = keys.read_key(settings.key_path)
        async with await NodeClient.connect(f"wss://127.0.0.1:{gateway.port}", key, fingerprint=gateway.fingerprint,
                                            gateway_id="gw-metrics", open_timeout=10) as client:
            (session,) = gateway.sessions
            completion = 0
            for prompt in ("The capital of France is", "1, 2, 3,"):
                async with asyncio.timeout(60):
                    done = [m async for m in client.infer(eid, CompletionRequest(prompt=prompt, params=SHORT))][-1]
                assert isinstance(done, InferDone)
                completion += done.usage.completion_tokens
        async with asyncio.timeout(60):
            _, in_process = await collect(node.infer(eid, CompletionRequest(prompt="Hello", params=SHORT)))
        completion += in_process.usage.completion_tokens
        # Two more: one cancelled while it streams, one refused meanwhile (one slot, no queue).
        long = node.infer(eid, CompletionRequest(prompt="Count:", params=SamplingParams(max_tokens=300)),
                          request_id="long")
        async with asyncio.timeout(60):
            await anext(long)
            with pytest.raises(Overloaded):
                await anext(node.infer(eid, CompletionRequest(prompt="x", params=SHORT)))
            assert node.cancel("long")
            _, cancelled = await collect(long)
        assert cancelled.finish_reason == "cancelled"
        completion += cancelled.usage.completion_tokens
        await eventually(lambda: not gateway.sessions, "the Gateway's session ended")
        # The node's side of the connection (the Gateway's client logs under websockets.client).
        connection_lines = [r for r in caplog.records if r.levelno >= logging.INFO
                            and r.name.startswith("optimanode.gateway")]

        m = await scrape(url)
        om = await scrape(url, openmetrics=True)

        # The model's state: one series per state, 1 for running.
        states = of_model(m, "optimanode_model_state", eid, "state")
        assert states["running"] == 1 and sum(states.values()) == 1
        assert one(om, "optimanode_model_state", model=eid, state="running") == 1
        # Requests: three ended with stop or length, one cancelled, one refused as overloaded. Every
        # one has a duration; the refused one no queue wait; the four with a Done a TTFT.
        outcomes = of_model(m, "optimanode_requests_total", eid, "outcome")
        assert outcomes.pop("cancelled") == 1 and outcomes.pop("overloaded") == 1, outcomes
        assert set(outcomes) <= {"stop", "length"} and sum(outcomes.values()) == 3, outcomes
        assert of_model(om, "optimanode_requests_total", eid, "outcome")["overloaded"] == 1
        for hist, count in (("duration", 5), ("queue", 4), ("ttft", 4)):
            assert one(m, f"optimanode_request_{hist}_seconds_count", model=eid) == count, hist
            assert one(m, f"optimanode_request_{hist}_seconds_bucket", model=eid, le="+Inf") == count, hist
            assert one(om, f"optimanode_request_{hist}_seconds_count", model=eid) == count, hist
        assert one(m, "optimanode_request_ttft_seconds_sum", model=eid) > 0
        assert (one(m, "optimanode_request_duration_seconds_sum", model=eid)
                >= one(m, "optimanode_request_ttft_seconds_sum", model=eid))
        assert one(m, "optimanode_model_tokens_generated_total", model=eid) == completion
        # Capacity now: idle, one slot free.
        assert one(m, "optimanode_model_free_slots", model=eid) == 1
        assert one(m, "optimanode_model_queue_depth", model=eid) == 0
        assert one(m, "optimanode_model_in_flight", model=eid) == 0
        assert one(m, "optimanode_model_restarts_total", model=eid) == 0
        assert of_model(m, "optimanode_model_crashes_total", eid, "cause") == {c: 0 for c in CRASH_CAUSES}
        # GPU and VRAM from the fake NVML; host and worker from psutil; the journal's file.
        gpu_labels = {"gpu": "0", "name": "NVIDIA H200", "uuid": "GPU-0000-test"}
        assert one(m, "optimanode_gpus") == 1
        assert one(m, "optimanode_gpu_memory_total_bytes", **gpu_labels) == 141 * GiB
        assert one(m, "optimanode_gpu_utilization_percent", **gpu_labels) == 40
        assert one(m, "optimanode_model_worker_vram_bytes", model=eid) == 3 * GiB
        assert one(m, "optimanode_model_worker_rss_bytes", model=eid) > 10 << 20  # a loaded model
        assert one(m, "optimanode_host_memory_total_bytes") == psutil.virtual_memory().total
        assert one(m, "optimanode_journal_file_bytes") > 0
        assert one(m, "optimanode_event_loop_responsive") == 1
        assert one(m, "process_resident_memory_bytes") > 0
        assert one(m, "optimanode_info", node_id=NODE_ID, version=__version__) == 1

        # A crash: the worker killed from outside (as the OOM killer would) counts under "killed".
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: node.status(eid).restarts == 1 and node.status(eid).state == "running",
                         "the model restarted", timeout=90)
        m = await scrape(url, openmetrics=True)
        crashes = of_model(m, "optimanode_model_crashes_total", eid, "cause")
        assert crashes == {c: (1 if c == "killed" else 0) for c in CRASH_CAUSES}, crashes
        assert one(m, "optimanode_model_restarts_total", model=eid) == 1
        assert one(m, "optimanode_model_recent_crashes", model=eid) == 1
    # Stopped with the node: nothing listens on the port any more.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(fetch, url, None, 2.0)

    # One INFO line for the Gateway's connection, naming its address and session; websockets' own
    # lines ("connection open", a repr of the connection object) are not at INFO.
    texts = [r.getMessage() for r in connection_lines]
    assert len(connection_lines) == 1, texts
    assert "127.0.0.1" in texts[0] and session.sid in texts[0] and "gw-metrics" in texts[0]
    assert not any("object at 0x" in r.getMessage() or "object at 0x" in str(vars(r)) for r in caplog.records)


async def eventually(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def test_a_scrape_while_the_event_loop_is_blocked_says_so_instead_of_hanging(tmp_path: Path, caplog) -> None:
    settings = make_settings(tmp_path)
    async with Node(settings) as node:
        sampler = Sampler(node.list, nvml=FakeNvml.without_driver())
        endpoint = OpenMetricsServer(node, settings, sampler.sample, host="127.0.0.1", port=0, scrape_timeout_s=0.3)
        await endpoint.start()
        try:
            got: list[tuple[str, str]] = []
            scraper = threading.Thread(target=lambda: got.append(fetch(endpoint.url)))
            with caplog.at_level(logging.WARNING, logger="optimanode.openmetrics"):
                scraper.start()
                time.sleep(1.5)  # the loop is blocked: the scrape cannot read the node
                await asyncio.to_thread(scraper.join, 10)
            stuck = parse(got[0][1], openmetrics=False)
            assert one(stuck, "optimanode_event_loop_responsive") == 0
            assert "optimanode_host_cpu_percent" not in stuck and one(stuck, "process_resident_memory_bytes") > 0
            assert [r.getMessage() for r in caplog.records if "no answer from the event loop" in r.getMessage()]
            m = await scrape(endpoint.url)  # the loop runs again: a full answer
            assert one(m, "optimanode_event_loop_responsive") == 1 and "optimanode_host_cpu_percent" in m
        finally:
            await endpoint.stop()
            sampler.close()


async def test_a_port_in_use_is_a_clear_error_at_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = OpenMetricsServer(Node(settings), settings, lambda: pytest.fail("sampled"), host="127.0.0.1",
                                     port=port)
        with pytest.raises(ConfigError, match=rf"^metrics_http\.listen: 127\.0\.0\.1:{port}: expected an address of "
                                              r"this machine with a free port .*, got 'Address already in use'$"):
            await endpoint.start()
        await endpoint.stop()  # nothing started: nothing to stop, no error


def test_optimanode_run_serves_the_endpoint_when_asked_and_a_bad_value_stops_it_with_one_line(tmp_path: Path,
                                                                                              capsys) -> None:
    # A bad value: the command says which key and what it takes, and exits 2 before anything starts.
    rc = cli.main(["run", "--models-dir", str(tmp_path / "m"), "--state-dir", str(tmp_path / "s"),
                   "--set", "metrics_http.listen=all-interfaces"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "s").exists()
    assert err.startswith("optimanode: bad configuration: command line: metrics_http.listen: expected") and \
        "'all-interfaces'" in err, err
    # The real command with the endpoint on: scraped over HTTP, then SIGTERM stops it.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIMANODE_", "NOTIFY_", "WATCHDOG_"))}
    log = tmp_path / "stderr.log"
    proc = subprocess.Popen([sys.executable, "-m", "optimanode", "run", "--models-dir", str(tmp_path / "models"),
                             "--state-dir", str(tmp_path / "state"), "--port", str(free_port()),
                             "--set", f"metrics_http.listen=127.0.0.1:{port}"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        body = None
        deadline = time.monotonic() + 60
        while body is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                body = fetch(f"http://127.0.0.1:{port}/metrics", OPENMETRICS, 5.0)[1]
            except OSError:
                time.sleep(0.2)
        assert body is not None, log.read_text()[-3000:]
        m = parse(body, openmetrics=True)
        assert one(m, "optimanode_event_loop_responsive") == 1
        assert one(m, "optimanode_journal_file_bytes") > 0
        assert "optimanode_model_state" not in m  # no model in an empty directory
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert f"OpenMetrics endpoint on http://127.0.0.1:{port}/metrics" in log.read_text()


# -- the HTTP server's limits: a timeout per connection, a cap, one read shared by concurrent scrapes --


def half_request(port: int) -> socket.socket:
    """A connection that sends part of a request line and then nothing, as a stalled or hostile client."""
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"GET /metrics HTTP/1.1\r\n")  # the headers never end
    return c


def closed_by_server(c: socket.socket, wait_s: float) -> bool:
    """True when the server has closed ``c`` (EOF or reset) within ``wait_s``; False when it stays open."""
    c.settimeout(wait_s)
    try:
        return c.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def scrape_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "openmetrics-scrape")


@contextlib.asynccontextmanager
async def endpoint_on(tmp_path: Path, **limits: float) -> AsyncIterator[tuple[OpenMetricsServer, list[int]]]:
    """A node without models and its endpoint on an ephemeral loopback port; the list counts samples."""
    settings = make_settings(tmp_path)
    samples: list[int] = []
    async with Node(settings) as node:
        sampler = Sampler(node.list, nvml=FakeNvml.without_driver())

        def sample():
            samples.append(1)
            return sampler.sample()

        endpoint = OpenMetricsServer(node, settings, sample, host="127.0.0.1", port=0, **limits)  # type: ignore[arg-type]
        await endpoint.start()
        try:
            yield endpoint, samples
        finally:
            await endpoint.stop()
            sampler.close()


async def test_a_client_that_stalls_mid_request_is_disconnected_after_the_connection_timeout(tmp_path: Path) -> None:
    async with endpoint_on(tmp_path, connection_timeout_s=0.5) as (endpoint, _):
        stalled = half_request(endpoint.port)
        try:
            started = time.monotonic()
            # Closed by the server (prometheus_client's server kept it, and its thread, for good).
            assert await asyncio.to_thread(closed_by_server, stalled, 10.0)
            assert time.monotonic() - started >= 0.3  # by the timeout, not at once
        finally:
            stalled.close()
        m = await scrape(endpoint.url)
        assert one(m, "optimanode_event_loop_responsive") == 1 and "optimanode_host_cpu_percent" in m


async def test_connections_beyond_the_cap_close_the_longest_waiting_and_a_scrape_still_succeeds(
        tmp_path: Path) -> None:
    cap, extra = 4, 3
    # A long connection timeout: every close here is the cap's doing.
    async with endpoint_on(tmp_path, connection_timeout_s=60, max_connections=cap) as (endpoint, _):
        idle = [half_request(endpoint.port) for _ in range(cap + extra)]
        try:
            # The three oldest are closed to make room; the newest four are held.
            oldest = await asyncio.gather(*(asyncio.to_thread(closed_by_server, c, 10.0) for c in idle[:extra]))
            assert all(oldest)
            newest = await asyncio.gather(*(asyncio.to_thread(closed_by_server, c, 0.3) for c in idle[extra:]))
            assert not any(newest)
            assert scrape_threads() <= cap
            # A real scrape, while the cap is full of idle connections: answered in full.
            m = await scrape(endpoint.url, openmetrics=True)
            assert one(m, "optimanode_event_loop_responsive") == 1 and "optimanode_host_cpu_percent" in m
            # It took the place of the oldest idle one.
            assert await asyncio.to_thread(closed_by_server, idle[extra], 10.0)
            assert scrape_threads() <= cap
        finally:
            for c in idle:
                c.close()


async def test_when_every_slot_is_answering_a_new_connection_is_closed_unanswered(tmp_path: Path) -> None:
    async with endpoint_on(tmp_path, max_connections=2, scrape_timeout_s=5.0) as (endpoint, _):
        got: list[tuple[str, str]] = []
        scrapers = [threading.Thread(target=lambda: got.append(fetch(endpoint.url))) for _ in range(2)]
        for t in scrapers:
            t.start()
        # The loop is blocked here: both scrapes have their request in and wait for the node's answer.
        httpd = endpoint._httpd
        assert httpd is not None
        deadline = time.monotonic() + 10
        while not (len(httpd._open) == 2 and not any(httpd._open.values())):
            assert time.monotonic() < deadline, httpd._open
            time.sleep(0.01)
        third = socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
        try:
            third.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert closed_by_server(third, 10.0)  # refused while the loop is still blocked
        finally:
            third.close()
        for t in scrapers:
            await asyncio.to_thread(t.join, 10)
        # The two answered in full once the loop ran.
        assert len(got) == 2
        for _, body in got:
            assert one(parse(body, openmetrics=False), "optimanode_event_loop_responsive") == 1


async def test_concurrent_scrapes_share_one_sample(tmp_path: Path) -> None:
    async with endpoint_on(tmp_path, snapshot_ttl_s=5.0) as (endpoint, samples):
        bodies = await asyncio.gather(*(asyncio.to_thread(fetch, endpoint.url) for _ in range(8)))
        assert len(samples) == 1  # one Sampler.sample for eight scrapes (it was eight)
        for _, body in bodies:
            assert one(parse(body, openmetrics=False), "optimanode_event_loop_responsive") == 1


async def test_stop_closes_the_connections_still_open(tmp_path: Path) -> None:
    async with endpoint_on(tmp_path, connection_timeout_s=60) as (endpoint, _):
        idle = half_request(endpoint.port)
        try:
            await endpoint.stop()
            assert await asyncio.to_thread(closed_by_server, idle, 10.0)  # at stop, not 60 s later
            for t in [t for t in threading.enumerate() if t.name == "openmetrics-scrape"]:
                await asyncio.to_thread(t.join, 10)
            assert scrape_threads() == 0  # its thread ended with it
        finally:
            idle.close()
