"""The OpenMetrics endpoint: the node's state for Prometheus, read at scrape time (``metrics_http.listen``).

How it works:

* Off unless ``metrics_http.listen`` is set (``metrics_server`` returns None then); "PORT" serves
  on 127.0.0.1, "HOST:PORT" where the operator says. ``OpenMetricsServer`` is one of the
  service's servers (optimanode/cli.py ``serve``): started after the node, stopped before it.
* The HTTP side is ``prometheus_client``'s WSGI app (``make_wsgi_app``: it negotiates the format,
  OpenMetrics 1.0 for a Prometheus that asks for it, the classic text format otherwise, and gzip)
  under ``_ScrapeServer``, wsgiref's server with a thread per connection in a daemon thread of its
  own. Chosen over an ASGI server on the node's loop because a scrape then never runs on the event
  loop (formatting a few hundred series is the bulk of a scrape's cost), and it needs no dependency
  beyond ``prometheus_client``. Unlike the library's ``start_http_server`` (no timeout, no limit:
  400 connections that send half a request and stall held 400 threads and descriptors for good),
  each connection has a socket timeout (``connection_timeout_s``, 5 s without progress closes it)
  and at most ``max_connections`` (16) are served at once. One more connection closes the one that
  has waited longest without completing its request (so idle or stalled connections cannot shut a
  scraper out), or, when every slot is busy answering a request, is itself closed unanswered.
  One request per connection (HTTP/1.0-style close), as before.
* Nothing is kept up to date in between: ``_NodeCollector.collect`` runs in the scrape's thread,
  asks the event loop for one ``Snapshot`` (``asyncio.run_coroutine_threadsafe``: the node's
  dicts are read on the loop that changes them, so no lock and no torn state; the loop's share is
  one ``Sampler.sample``, whose cost docs/benchmarks.md "Metrics report cost" measures, a status
  per model and two ``stat`` calls) and turns it into metric families with the pure ``families``.
  A loop that does not answer within ``scrape_timeout_s`` gives ``optimanode_event_loop_responsive
  0`` and the process metrics instead of an error page, and the time the loop took to run the read
  is ``optimanode_event_loop_lag_seconds``. Scrapes that come together share one read: a snapshot
  serves the scrapes that ask within ``snapshot_ttl_s`` (0.1 s) of it, and a scrape that asks while
  a read is in flight waits for that read rather than queueing its own sample on the loop.
* What is served: host CPU, load and memory, each NVIDIA GPU (NVML through the sampler: its free
  memory, and one ``optimanode_gpu_model`` series per model placed on it), and per
  model its state (one series per state, 1 for the current one), enabled, safe mode, restarts,
  crashes by cause (every cause present from the start, so ``increase()`` sees the first crash),
  crashes in the restart window, queue depth and size, requests in flight, slots and free slots,
  tokens generated and tokens/s, the worker's RSS, CPU and VRAM; request counts by outcome and the
  duration, queue-wait and TTFT histograms (optimanode/stats.py, observed as requests end); the
  journal file's size (and its WAL); ``prometheus_client``'s process collector for the node process.
  docs/operations.md ("Monitoring") lists the names and gives a scrape config and alert rules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from optimanode import __version__
from optimanode.config import Settings, metrics_address
from optimanode.errors import ConfigError
from optimanode.executors.lifecycle import STATES
from optimanode.executors.supervisor import CRASH_CAUSES
from optimanode.protocol import ExecutorStatus, MetricsReport

if TYPE_CHECKING:
    from optimanode.node import Node

log = logging.getLogger(__name__)

# A scrape waits this long for the event loop; Prometheus' own scrape_timeout defaults to 10 s.
SCRAPE_TIMEOUT_S = 5.0
# A connection that makes no progress (sends nothing more of its request, reads none of the answer)
# for this long is closed.
CONNECTION_TIMEOUT_S = 5.0
# Connections served at once, one thread each (a Prometheus scrapes over one at a time).
MAX_CONNECTIONS = 16
# A snapshot serves the scrapes that ask within this long of it.
SNAPSHOT_TTL_S = 0.1


@dataclass(frozen=True)
class Snapshot:
    """Everything one scrape serves, read at one moment on the event loop."""

    report: MetricsReport
    statuses: Sequence[ExecutorStatus]
    # model → cause → crashes since the node started.
    crashes: Mapping[str, Mapping[str, int]]
    crash_budget: int
    journal_bytes: int | None
    journal_wal_bytes: int | None
    journal_max_bytes: int | None = None
    loop_lag_s: float = 0.0
    node_id: str = ""
    version: str = __version__
    extra: Sequence[Metric] = field(default_factory=tuple)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def families(snap: Snapshot) -> list[Metric]:
    """The metric families of ``snap`` (pure: a test drives it with values)."""
    out: list[Metric] = []
    info = InfoMetricFamily("optimanode", "This node: its version and id.")
    info.add_metric([], {"version": snap.version, "node_id": snap.node_id or snap.report.node_id})
    out.append(info)
    responsive = _gauge("optimanode_event_loop_responsive", "1 when the node's event loop answered this scrape.")
    responsive.add_metric([], 1)
    lag = _gauge("optimanode_event_loop_lag_seconds", "How long this scrape's read waited for the event loop.")
    lag.add_metric([], snap.loop_lag_s)
    out += [responsive, lag]
    out += _host(snap.report)
    out += _gpus(snap.report)
    out += _models(snap)
    out += _prompt_cache(snap)
    out += _journal(snap)
    out += list(snap.extra)
    return out


def _host(r: MetricsReport) -> list[Metric]:
    cpu = _gauge("optimanode_host_cpu_percent", "Host CPU use since the previous sample, % of all cores.")
    cpu.add_metric([], r.cpu.percent)
    cores = _gauge("optimanode_host_cpu_cores", "The host's CPU cores.", ["kind"])
    cores.add_metric(["logical"], r.cpu.cores_logical)
    cores.add_metric(["physical"], r.cpu.cores_physical)
    load = _gauge("optimanode_host_load_average", "The host's load average.", ["period"])
    for period, value in (("1m", r.cpu.load_1m), ("5m", r.cpu.load_5m), ("15m", r.cpu.load_15m)):
        load.add_metric([period], value)
    out: list[Metric] = [cpu, cores, load]
    m = r.memory
    for name, value, doc in (("memory_total", m.total_bytes, "The host's RAM."),
                             ("memory_available", m.available_bytes, "RAM available without swapping."),
                             ("memory_used", m.used_bytes, "RAM in use."),
                             ("swap_total", m.swap_total_bytes, "Swap space."),
                             ("swap_used", m.swap_used_bytes, "Swap in use.")):
        g = _gauge(f"optimanode_host_{name}_bytes", doc)
        g.add_metric([], value)
        out.append(g)
    return out


def _gpus(r: MetricsReport) -> list[Metric]:
    count = _gauge("optimanode_gpus", "NVIDIA GPUs NVML reports (0 without a driver or GPU).")
    count.add_metric([], len(r.gpus))
    labels = ["gpu", "name", "uuid"]
    util = _gauge("optimanode_gpu_utilization_percent", "GPU busy time over NVML's last sample period.", labels)
    total = _gauge("optimanode_gpu_memory_total_bytes", "The GPU's memory (VRAM).", labels)
    used = _gauge("optimanode_gpu_memory_used_bytes", "VRAM in use, by every process.", labels)
    temp = _gauge("optimanode_gpu_temperature_celsius", "GPU core temperature.", labels)
    power = _gauge("optimanode_gpu_power_watts", "GPU power draw.", labels)
    limit = _gauge("optimanode_gpu_power_limit_watts", "GPU enforced power limit.", labels)
    free = _gauge("optimanode_gpu_memory_free_bytes", "VRAM free (NVML), what admission places models by.", labels)
    placed = _gauge("optimanode_gpu_model", "1 for each model whose worker is placed on this GPU (starting or "
                    "running).", ["gpu", "model"])
    for g in r.gpus:
        lv = [str(g.index), g.name, g.uuid]
        total.add_metric(lv, g.memory_total_bytes)
        used.add_metric(lv, g.memory_used_bytes)
        if g.memory_free_bytes is not None:
            free.add_metric(lv, g.memory_free_bytes)
        for model in g.models:
            placed.add_metric([str(g.index), model], 1)
        # A field the driver refuses (None) has no sample rather than a made-up 0.
        for family, value in ((util, g.utilization_percent), (temp, g.temperature_c), (power, g.power_w),
                              (limit, g.power_limit_w)):
            if value is not None:
                family.add_metric(lv, value)
    return [count, util, total, used, temp, power, limit, free, placed]


def _models(snap: Snapshot) -> list[Metric]:
    m = ["model"]
    state = _gauge("optimanode_model_state", "1 for the model's current state, 0 for the others.", ["model", "state"])
    enabled = _gauge("optimanode_model_enabled", "1 when the operator wants the model running.", m)
    safe = _gauge("optimanode_model_safe_mode", "1 when the model's worker runs (or will start) in safe mode.", m)
    restarts = CounterMetricFamily("optimanode_model_restarts", "Worker restarts since the node started.", labels=m)
    crashes = CounterMetricFamily("optimanode_model_crashes", "Worker crashes since the node started, by cause.",
                                  labels=["model", "cause"])
    recent = _gauge("optimanode_model_recent_crashes", "Crashes within restart.crash_window_s (the node fails the "
                    "model when they reach restart.crash_budget; journaled crashes count across node restarts).", m)
    queue = _gauge("optimanode_model_queue_depth", "Requests waiting for a slot.", m)
    queue_size = _gauge("optimanode_model_queue_size", "Requests that may wait beyond those running.", m)
    in_flight = _gauge("optimanode_model_in_flight", "Requests running on the worker.", m)
    slots = _gauge("optimanode_model_slots", "Requests the worker serves at once (parallel).", m)
    free = _gauge("optimanode_model_free_slots", "Slots free now (0 unless the model is running).", m)
    tokens = CounterMetricFamily("optimanode_model_tokens_generated", "Completion tokens generated since the node "
                                 "started.", labels=m)
    tps = _gauge("optimanode_model_tokens_per_second", "Tokens generated per second since the previous sample.", m)
    rss = _gauge("optimanode_model_worker_rss_bytes", "The worker process's resident memory.", m)
    cpu = _gauge("optimanode_model_worker_cpu_percent", "The worker's CPU use since the previous sample, % of one "
                 "core.", m)
    vram = _gauge("optimanode_model_worker_vram_bytes", "VRAM the worker holds (NVML's per-process accounting).", m)
    est_ram = _gauge("optimanode_model_memory_estimate_bytes", "The memory estimate's RAM part (weights, KV cache, "
                     "compute buffers on the CPU).", m)
    est_vram = _gauge("optimanode_model_vram_estimate_bytes", "The memory estimate's GPU part, by GPU.", ["model", "gpu"])
    loaded = _gauge("optimanode_model_loaded", "1 while the model's worker is running (on-demand models come and go).", m)
    last_used = _gauge("optimanode_model_last_used_seconds", "When a request last started or ended on the model "
                       "(Unix seconds; 0: not since the node started).", m)
    evictions = CounterMetricFamily("optimanode_model_evictions", "Times the model was unloaded for another "
                                    "model's memory.", labels=m)
    sampled = {e.id: e for e in snap.report.executors}
    for st in snap.statuses:
        lv = [st.id]
        for s in STATES:
            state.add_metric([st.id, s], 1 if st.state == s else 0)
        enabled.add_metric(lv, int(st.enabled))
        safe.add_metric(lv, int(st.safe_mode))
        restarts.add_metric(lv, st.restarts)
        by_cause = snap.crashes.get(st.id, {})
        for cause in (*CRASH_CAUSES, *sorted(set(by_cause) - set(CRASH_CAUSES))):
            crashes.add_metric([st.id, cause], by_cause.get(cause, 0))
        recent.add_metric(lv, st.recent_crashes)
        queue.add_metric(lv, st.queue_depth)
        queue_size.add_metric(lv, st.queue_size)
        in_flight.add_metric(lv, st.in_flight)
        slots.add_metric(lv, st.parallel)
        tokens.add_metric(lv, st.tokens_generated)
        est_ram.add_metric(lv, st.memory_estimate_bytes)
        loaded.add_metric(lv, int(st.loaded))
        last_used.add_metric(lv, st.last_used)
        evictions.add_metric(lv, st.evictions)
        for gpu, b in sorted(st.vram_estimate_bytes.items()):
            est_vram.add_metric([st.id, str(gpu)], b)
        e = sampled.get(st.id)
        free.add_metric(lv, e.free_slots if e is not None else 0)
        tps.add_metric(lv, e.tokens_per_s if e is not None else 0.0)
        if e is not None:
            for family, value in ((rss, e.rss_bytes), (cpu, e.cpu_percent), (vram, e.vram_bytes)):
                if value is not None:
                    family.add_metric(lv, value)
    budget = _gauge("optimanode_restart_crash_budget", "restart.crash_budget: crashes in the window that fail a model.")
    budget.add_metric([], snap.crash_budget)
    return [state, enabled, safe, restarts, crashes, recent, budget, queue, queue_size, in_flight, slots, free,
            tokens, tps, rss, cpu, vram, est_ram, est_vram, loaded, last_used, evictions]


def _prompt_cache(snap: Snapshot) -> list[Metric]:
    """Each running worker's prompt cache (ExecutorStatus.prompt_cache, from its last heartbeat)."""
    m = ["model"]
    counters = [(CounterMetricFamily(f"optimanode_model_prompt_cache_{name}", doc, labels=m), name) for name, doc in (
        ("tokens_served", "Prompt tokens served from cached K/V (the slot's own cells, another slot's, the host "
                          "cache) since the worker started."),
        ("slot_copies", "Prompts that copied a prefix from another slot's cells."),
        ("hits", "Prompts that restored a prefix from the host-RAM prompt cache."),
        ("misses", "Prompts evaluated past what the cells held, with nothing usable in the host cache."),
        ("saves", "Sequence states saved to the host cache."),
        ("evictions", "Host cache entries dropped to stay under prompt_cache_mib."),
        ("pressure_evictions", "Host cache entries dropped, or not stored, to leave the machine the RAM the node "
                               "keeps free (memory_reserve_mb and what loading models will allocate)."))]
    gauges = [(_gauge(f"optimanode_model_prompt_cache_{name}", doc, m), name) for name, doc in (
        ("bytes", "Bytes the host cache holds."),
        ("cap_bytes", "The host cache's cap (prompt_cache_mib; 0: off)."),
        ("entries", "Entries the host cache holds."))]
    for st in snap.statuses:
        c = st.prompt_cache
        if c is None:
            continue
        for family, name in (*counters, *gauges):
            family.add_metric([st.id], getattr(c, name))
    return [family for family, _ in (*counters, *gauges)]


def _journal(snap: Snapshot) -> list[Metric]:
    out: list[Metric] = []
    # The report's journal part (retention's view: its cap, what it folded) when the sampler has one.
    j = getattr(snap.report, "journal", None)
    cap = j.cap_bytes if j is not None and j.cap_bytes else snap.journal_max_bytes
    for name, value, doc in (
            ("optimanode_journal_file_bytes", snap.journal_bytes, "Size of the journal's SQLite file."),
            ("optimanode_journal_wal_bytes", snap.journal_wal_bytes, "Size of its write-ahead log (-wal)."),
            ("optimanode_journal_max_bytes", cap, "journal.max_bytes: the cap retention keeps the file and its "
             "WAL under."),
            ("optimanode_journal_near_cap", None if j is None else int(j.near_cap), "1 past 90 % of the cap, or "
             "when retention had to fold early to stay under it."),
            ("optimanode_journal_damaged", None if j is None or not j.integrity else int(j.integrity != "ok"),
             "1 when PRAGMA quick_check found the journal damaged (absent until the check has run).")):
        if value is not None:
            g = _gauge(name, doc)
            g.add_metric([], value)
            out.append(g)
    if j is not None:
        for name, value, doc in (
                ("optimanode_journal_requests_folded", j.requests_folded, "Request events folded into hourly "
                 "aggregates by retention since the node started."),
                ("optimanode_journal_events_deleted", j.events_deleted, "State events deleted by retention since "
                 "the node started.")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            out.append(c)
    return out


def _file_bytes(path: str | os.PathLike[str]) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class _NodeCollector:
    """A prometheus_client collector that reads the node at each scrape (see the module docstring)."""

    def __init__(self, server: OpenMetricsServer) -> None:
        self._server = server
        self._stuck = False

    def collect(self) -> Iterable[Metric]:
        srv = self._server
        try:
            snap = srv.snapshot()
        except (TimeoutError, concurrent.futures.TimeoutError, RuntimeError) as exc:
            # RuntimeError: the loop is closed (a scrape racing the node's end).
            if not self._stuck:
                log.warning("a metrics scrape got no answer from the event loop within %g s (%s); serving "
                            "optimanode_event_loop_responsive 0", srv.scrape_timeout_s, exc or type(exc).__name__)
            self._stuck = True
            g = _gauge("optimanode_event_loop_responsive", "1 when the node's event loop answered this scrape.")
            g.add_metric([], 0)
            yield g
            return
        if self._stuck:
            log.info("the event loop answers metrics scrapes again")
            self._stuck = False
        yield from families(snap)


class _ScrapeHandler(WSGIRequestHandler):
    """wsgiref's handler, silent (no access log line per scrape), telling the server once the request is in."""

    server: _ScrapeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        pass

    def parse_request(self) -> bool:
        # The request line and headers are read: from here the connection is serving, not waiting.
        return super().parse_request() and self.server.answering(self.connection)


class _ScrapeServer(WSGIServer):
    """wsgiref's WSGI server with a thread per connection, a socket timeout and a cap (module docstring).

    Threads are counted from accept to close. At the cap, a new connection closes the connection
    that has waited longest for its request to come in, or, when none is waiting, is refused
    (closed at once): threads stay under ``2 * max_connections`` even while closed ones finish.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], family: int, *, timeout_s: float, max_connections: int) -> None:
        self.address_family = family
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self._lock = threading.Lock()
        self._live = 0  # handler threads running
        self._open: dict[socket.socket, bool] = {}  # connection → still waiting for its request (oldest first)
        self.refused = self.evicted = 0
        self._refusal_logged = float("-inf")
        super().__init__(address, _ScrapeHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if self._live >= self.max_connections:
                victim = next((c for c, waiting in self._open.items() if waiting), None)
                if victim is None or self._live >= 2 * self.max_connections:
                    self.refused += 1
                    self._log_refusal()
                    self.shutdown_request(request)
                    return
                self._open[victim] = False  # no longer a candidate; its thread ends and counts itself out
                self.evicted += 1
                _abort(victim)
            self._live += 1
            self._open[request] = True
        try:
            request.settimeout(self.timeout_s)
            threading.Thread(target=self._serve, args=(request, client_address), daemon=True,
                             name="openmetrics-scrape").start()
        except BaseException:
            self._done(request)
            raise

    def answering(self, connection: socket.socket) -> bool:
        """The handler has the request; False when the connection was closed to make room meanwhile."""
        with self._lock:
            if self._open.get(connection):
                self._open[connection] = False
                return True
            return False

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._done(request)
            self.shutdown_request(request)

    def _done(self, request: Any) -> None:
        with self._lock:
            self._live -= 1
            self._open.pop(request, None)

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if now - self._refusal_logged >= 60:
            self._refusal_logged = now
            log.warning("the metrics endpoint has %d connections answering requests (its limit); closed a new "
                        "one unanswered (%d so far)", self._live, self.refused)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # timed out, reset, closed to make room: the client's end
            log.debug("metrics endpoint: connection from %s ended: %s", client_address, sys.exc_info()[1])
            return
        log.warning("metrics endpoint: error serving %s", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:  # the connections still open end now rather than at their timeout
            for connection in self._open:
                _abort(connection)


def _abort(connection: socket.socket) -> None:
    """Ends a connection another thread serves: its blocked read returns at once (it closes the socket)."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class OpenMetricsServer:
    """``OpenMetricsServer(node, settings, sample)``; ``await start()``, ``.port``, ``await stop()``.

    ``sample`` is the node's ``Sampler.sample`` (shared with the Gateway link, so host CPU% and
    tokens/s cover the time since whichever asked last). ``host``/``port`` override
    ``metrics_http.listen`` (tests use port 0). ``start`` raises ConfigError when the address
    cannot be bound. ``connection_timeout_s``, ``max_connections`` and ``snapshot_ttl_s`` are the
    HTTP server's limits and the shared snapshot's age (module docstring; tests make them small).
    """

    def __init__(self, node: Node, settings: Settings, sample: Callable[[], MetricsReport], node_id: str = "", *,
                 host: str | None = None, port: int | None = None,
                 scrape_timeout_s: float = SCRAPE_TIMEOUT_S, connection_timeout_s: float = CONNECTION_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, snapshot_ttl_s: float = SNAPSHOT_TTL_S) -> None:
        address = metrics_address(settings.metrics_http.listen) or ("127.0.0.1", 0)
        self.node, self.node_id = node, node_id
        self.host = address[0] if host is None else host
        self._port = address[1] if port is None else port
        self.scrape_timeout_s = scrape_timeout_s
        self.connection_timeout_s, self.max_connections = connection_timeout_s, max_connections
        self.snapshot_ttl_s = snapshot_ttl_s
        self._sample = sample
        # The last snapshot (completed at, snapshot) and the read in flight, shared by concurrent scrapes.
        self._cache_lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None
        self._reading: concurrent.futures.Future[Snapshot] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_NodeCollector(self))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)
        self._httpd: _ScrapeServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        return int(self._httpd.server_port) if self._httpd is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            # In a thread: a host name is resolved (getaddrinfo) before the bind.
            self._httpd, self._thread = await asyncio.to_thread(self._serve)
        except OSError as exc:
            raise ConfigError("metrics_http.listen", f"{self.host}:{self._port}",
                              "an address of this machine with a free port for the metrics endpoint (is another "
                              "program using it?)", got=exc.strerror or str(exc)) from exc
        log.info("OpenMetrics endpoint on %s", self.url)

    def _serve(self) -> tuple[_ScrapeServer, threading.Thread]:
        # The address family the host asks for (an IPv6 literal or name binds AF_INET6).
        family, _, _, _, sockaddr = socket.getaddrinfo(self.host, self._port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
        httpd = _ScrapeServer((sockaddr[0], self._port), family, timeout_s=self.connection_timeout_s,
                              max_connections=self.max_connections)
        httpd.set_app(make_wsgi_app(self.registry))
        thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="openmetrics")
        thread.start()
        return httpd, thread

    async def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        # shutdown() waits for serve_forever's next poll (up to 0.5 s): not on the loop.
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
        self._httpd = self._thread = None

    # -- the read, on the event loop --------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The node read once, on its event loop.

        From a scrape's thread this waits for the loop up to ``scrape_timeout_s`` (TimeoutError),
        or returns the snapshot read less than ``snapshot_ttl_s`` ago, or waits for the read another
        scrape has in flight (its snapshot or its error); on the loop's own thread (a test calling
        the registry there) it reads directly.
        """
        loop = self._loop
        asked = time.monotonic()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return self._read(asked)
        with self._cache_lock:
            cached, shared = self._cached, self._reading
            if cached is not None and time.monotonic() - cached[0] < self.snapshot_ttl_s:
                return cached[1]
            mine = shared is None
            if shared is None:
                shared = self._reading = concurrent.futures.Future()
        if not mine:
            return shared.result(self.scrape_timeout_s + 1.0)
        try:
            snap = self._ask_loop(loop, asked)
        except BaseException as exc:
            with self._cache_lock:
                self._reading = None
            shared.set_exception(exc)
            raise
        with self._cache_lock:
            self._cached, self._reading = (time.monotonic(), snap), None
        shared.set_result(snap)
        return snap

    def _ask_loop(self, loop: asyncio.AbstractEventLoop, asked: float) -> Snapshot:
        async def read() -> Snapshot:
            return self._read(asked)

        future = asyncio.run_coroutine_threadsafe(read(), loop)
        try:
            return future.result(self.scrape_timeout_s)
        except BaseException:
            future.cancel()
            raise

    def _read(self, asked: float) -> Snapshot:
        lag = time.monotonic() - asked
        node = self.node
        settings = node.settings
        journal = settings.journal_path
        return Snapshot(
            report=self._sample(), statuses=node.list(),
            crashes={eid: dict(ex.crashes) for eid, ex in node.executors.items()},
            crash_budget=settings.restart.crash_budget,
            journal_bytes=_file_bytes(journal), journal_wal_bytes=_file_bytes(f"{journal}-wal"),
            journal_max_bytes=settings.journal.max_bytes,
            loop_lag_s=lag, node_id=self.node_id,
            # Collected here too, so the histograms' counts, sums and buckets are of the same moment.
            extra=list(node.request_stats.collect()))


def metrics_server(node: Node, settings: Settings, sample: Callable[[], MetricsReport],
                   node_id: str = "") -> OpenMetricsServer | None:
    """The endpoint ``metrics_http.listen`` asks for, or None when it is off (the default)."""
    if metrics_address(settings.metrics_http.listen) is None:
        return None
    return OpenMetricsServer(node, settings, sample, node_id)


__all__ = ["CONNECTION_TIMEOUT_S", "MAX_CONNECTIONS", "SCRAPE_TIMEOUT_S", "SNAPSHOT_TTL_S", "OpenMetricsServer",
           "Snapshot", "families", "metrics_server"]
