"""The node as a system service: sd_notify, the watchdog, signals, reload, and structured logs.

How it works:

* ``Notifier`` speaks systemd's notification protocol with the standard library only: each message
  is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET`` (a
  path, or ``@name`` for the abstract namespace). systemd identifies the sender by the kernel's
  credentials, so ``NotifyAccess=main`` accepts only this process. Without ``NOTIFY_SOCKET`` (a
  terminal, launchd, Windows, a test) every call is a no-op. ``from_environ`` removes the
  variables, as libsystemd's ``sd_notify(unset_environment=1)`` does, so worker processes never
  inherit them.
* The watchdog: systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) when the unit has
  ``WatchdogSec=``; we send ``WATCHDOG=1`` every half of it *from a task on the event loop*. A loop
  that is blocked or wedged stops pinging, and systemd kills and restarts the node; a thread would
  keep pinging for a dead loop. The same task refreshes ``STATUS=`` ("2 of 3 models running").
* ``Service`` is one run of the node: install the signal handlers on the running loop, start the
  node (journal opened and replayed, models scanned), start the servers (the Gateway link), then
  ``READY=1``. SIGHUP reloads: ``RELOADING=1`` + ``MONOTONIC_USEC``, the settings are loaded again
  through the caller's loader, what can change live is applied (``apply_settings``), the models
  directory is rescanned, then ``READY=1``; a bad file is logged and the old settings stay. No
  connection is dropped: the servers are told the new settings, never stopped. New model defaults
  replace the workers they change one model at a time, each draining first (``apply_settings``). SIGTERM or SIGINT
  stops: ``STOPPING=1``, ``node.drain`` (new requests, and those still queued, refused at once
  with ``shutting_down``, so a Gateway can send them elsewhere; running ones may finish until
  ``drain_deadline_s``, then end with ``shutting_down``), the servers stop, ``node.stop`` (workers:
  Shutdown → SIGTERM → SIGKILL; ``node_stopped`` journaled; the journal closed). A second
  SIGTERM/SIGINT during the drain cuts it short (running requests cancelled at once) but still
  stops the workers and closes the journal; a third is only logged (systemd's TimeoutStopSec and
  SIGKILL are the last word, and SQLite in WAL mode survives even that).
* Signal handlers are added with ``loop.add_signal_handler`` inside ``Service.signal_handlers()``
  and removed when it exits, restoring whatever handlers were there before, so a test can run a
  service inside its own event loop and deliver real signals to itself.
* Logging: ``LineFormatter`` writes one line per record, ``ts level logger msg key=value ...`` (or
  a JSON object per line), with the fields given through ``extra=`` or set for a block with
  ``log_context(request_id=..., executor_id=...)`` (contextvars, so each asyncio task keeps its
  own). ``RedactFilter`` rewrites every record before it is written: values of key-, token-,
  nonce- and password-like fields, long random-looking strings (base64 or hex), PEM private keys
  and the node's own access key (read from its file) become ``[redacted]``. On journald
  (``$JOURNAL_STREAM`` names our stderr) each line is prefixed with its syslog priority
  (``<3>``...``<7>``) so ``journalctl -p warning`` works.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol, TextIO

import msgspec

from optimanode.config import Settings
from optimanode.errors import ConfigError
from optimanode.node import Node

log = logging.getLogger("optimanode.service")

# The seconds between STATUS refreshes when there is no watchdog to piggyback on.
STATUS_REFRESH_S = 5.0
# How long one datagram to systemd may block the loop (its queue full): a notification is not
# worth a stalled node, so past this it is dropped and logged.
NOTIFY_SEND_TIMEOUT_S = 0.5
# Time allowed after the drain for cancels to land and the journal to close, added to what we ask
# systemd for with EXTEND_TIMEOUT_USEC (node.drain waits up to 5 s for cancelled requests to end).
STOP_MARGIN_S = 15.0


# -- sd_notify ---------------------------------------------------------------------------------


def watchdog_usec(environ: Mapping[str, str] | None = None) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours), else None."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # set for another process (we were exec'ed by a wrapper that kept it)
        except ValueError:
            return None
    return usec


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
    usec = watchdog_usec(environ)
    return None if usec is None else usec / 2 / 1_000_000


class Notifier:
    """Datagrams to systemd's notification socket; every method is a no-op without one."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            # Relative paths and vsock: (systemd 253+, VMs) are not ours to guess at.
            log.warning("NOTIFY_SOCKET=%r is not an absolute path or @abstract name; not notifying", address)
            address = None
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failed = False
        self._lock = threading.Lock()  # the Windows service stops from another thread

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read NOTIFY_SOCKET and the watchdog variables; by default remove them (children must not see them)."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog_usec(env))
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        return None if self.watchdog_usec is None else self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE`` each) as one datagram; True if it was sent."""
        if self.address is None:
            return False
        # A newline inside a value would start a bogus field of its own.
        data = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(NOTIFY_SEND_TIMEOUT_S)
                self._sock.sendto(data, target)
            except OSError as exc:
                if not self._failed:  # once: a missing socket would otherwise log every ping
                    log.warning("sd_notify to %s failed: %s", self.address, exc)
                    self._failed = True
                return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        # MONOTONIC_USEC is what Type=notify-reload (systemd 253+) requires with RELOADING=1; with
        # Type=notify it is ignored, and READY=1 afterwards ends the reload in both.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for at least ``seconds`` more in the current start/stop (it never shortens one)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, math.ceil(seconds * 1_000_000))}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


# -- settings that can change while the node runs -----------------------------------------------

# Keys a reload cannot change: the journal and registry are open on these paths, the hasher task
# exists or not, and the listening sockets (the Gateway link, the metrics endpoint) are bound. A reload that changes one keeps the running
# value and says that a restart is needed.
RESTART_ONLY = ("models_dir", "state_dir", "listen", "scan.hash_models", "metrics_http",
                # Retention holds the journal settings it started with (docs/configuration.md says
                # they apply at the next start); a reload said "changed" and applied nothing.
                "journal")


def _flat(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(tree: Mapping[str, Any], prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(msgspec.to_builtins(settings), "")
    return out


def _restart_only(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_ONLY)


@dataclass(frozen=True)
class Reloaded:
    """What a reload did: the settings now in force, the keys applied, the keys left for a restart."""

    settings: Settings
    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]


def merge_live(old: Settings, new: Settings) -> Reloaded:
    """The settings to run with after a reload: ``new``, except the keys that need a restart."""
    before, after = _flat(old), _flat(new)
    changed = tuple(k for k in after if after[k] != before.get(k) and not _restart_only(k))
    pending = tuple(k for k in after if after[k] != before.get(k) and _restart_only(k))
    tree = msgspec.to_builtins(new)
    for key in pending:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node[leaf] = before[key]
    return Reloaded(msgspec.convert(tree, Settings), changed, pending)


def apply_settings(node: Node, new: Settings) -> Reloaded:
    """Put the live part of ``new`` in force on a running node; returns what changed.

    Everything that derives from the settings is read from ``node.settings`` when it is used (the
    reconciler reads the restart policy and memory reserve each tick, the scanner its interval on
    each pass, ``effective()`` the model defaults), so swapping the object is enough, plus the
    per-model admission bounds (queue size, parallel) that are built from the defaults. Model
    defaults that change a running worker's effective settings make the reconciler replace that
    worker, exactly as a per-model ``configure`` does: the old worker drains (its requests finish,
    up to ``drain_timeout_s``) while new requests queue for the new one, and several models are
    replaced one at a time (the reconciler's rule), so the node keeps serving the others.
    """
    result = merge_live(node.settings, new)
    before = {eid: node.effective(ex) for eid, ex in node.executors.items() if ex.worker is not None}
    node.apply_settings(result.settings)
    restarted = [eid for eid, eff in before.items() if node.effective(node.executors[eid]) != eff]
    if restarted:
        log.warning("new model defaults: replacing the workers of %s, one at a time (each drains first)",
                    ", ".join(sorted(restarted)))
    return result


# -- the service -------------------------------------------------------------------------------


class Server(Protocol):
    """Anything the service starts after the node and stops before it (the Gateway link)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServerFactory = Callable[[Node, Settings], Iterable[Server]]


def describe(node: Node) -> str:
    """The one-line STATUS: what `systemctl status` shows under the unit."""
    states = [ex.state for ex in node.executors.values()]
    running = states.count("running")
    text = f"{running} of {len(states)} models running"
    busy = node.busy()
    if busy:
        text += f", {busy} requests in flight"
    failed = states.count("failed") + states.count("crashed")
    if failed:
        text += f", {failed} failed or crashed"
    return text


@dataclass
class Service:
    """One run of the node as a service. ``await Service(...).run()`` returns the exit code.

    ``load_settings`` is called on SIGHUP and must raise ConfigError for a bad file (the cli's
    ``settings_from(args)`` does, with the same flags as at start). ``make_servers(node, settings)``
    is called once the node is up. ``request_stop`` and ``request_reload`` are what the signals
    call; ``request_stop_threadsafe`` is for a service manager's own thread (Windows).
    """

    settings: Settings
    load_settings: Callable[[], Settings] | None = None
    make_node: Callable[[Settings], Node] = Node
    make_servers: ServerFactory | None = None
    notifier: Notifier = field(default_factory=Notifier.from_environ)
    node: Node | None = field(default=None, init=False)
    servers: list[Server] = field(default_factory=list, init=False)
    last_reload: Reloaded | None = field(default=None, init=False)
    last_reload_error: str = field(default="", init=False)
    stop_reason: str = field(default="", init=False)
    _stop_requests: int = field(default=0, init=False)
    _reload_requested: bool = field(default=False, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _hurry: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # Made inside the loop it will run on (run_service does): a service manager's thread may
        # ask it to stop from the moment it exists.
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    # -- requests (from signals, or from a service manager) ----------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            log.info("%s: draining, then stopping", reason)
            self.stop_reason = reason
        elif self._stop_requests == 2:
            log.warning("%s again: cancelling running requests now", reason)
            self._hurry.set()
        else:
            log.warning("%s: already stopping (workers and journal are being closed)", reason)
        self._wake.set()

    def request_reload(self, reason: str = "SIGHUP") -> None:
        log.info("%s: reloading settings", reason)
        self._reload_requested = True
        self._wake.set()

    def request_stop_threadsafe(self, reason: str = "service stop") -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_stop, reason)

    async def wait_ready(self) -> None:
        """Return once READY=1 was sent (the node is up and the servers listen)."""
        await self._ready.wait()

    @contextlib.contextmanager
    def signal_handlers(self, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[None]:
        """SIGTERM/SIGINT → stop, SIGHUP → reload, on the running loop; the previous handlers come back on exit."""
        loop = loop or asyncio.get_running_loop()
        wanted: list[tuple[signal.Signals, Callable[[], None]]] = [
            (signal.SIGTERM, lambda: self.request_stop("SIGTERM")),
            (signal.SIGINT, lambda: self.request_stop("SIGINT")),
        ]
        if hasattr(signal, "SIGHUP"):
            wanted.append((signal.SIGHUP, lambda: self.request_reload("SIGHUP")))
        previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
        try:
            for sig, handler in wanted:
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, handler)
            yield
        finally:
            for sig, old in previous.items():
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
                # remove_signal_handler leaves SIG_DFL (default_int_handler for SIGINT); put back
                # what was there, e.g. pytest's or an embedding application's own handler.
                with contextlib.suppress(Exception):
                    signal.signal(sig, old if old is not None else signal.SIG_DFL)

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        set_log_level(self.settings.log_level)  # as after every reload: the level follows the settings
        self.notifier.status("starting: opening the journal and scanning the models directory")
        node = self.node = self.make_node(self.settings)
        try:
            await node.start()
        except BaseException as exc:
            self.notifier.status(f"failed to start: {exc}")
            raise
        heartbeat: asyncio.Task[None] | None = None
        try:
            try:
                for server in (self.make_servers(node, node.settings) if self.make_servers else ()):
                    await server.start()
                    self.servers.append(server)
            except BaseException as exc:
                self.notifier.status(f"failed to start: {exc}")
                self.stop_reason = f"a server failed to start: {exc}"
                raise
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(node), name="service-heartbeat")
            if not self._stop_requests:
                # Only now: the journal is replayed, the models scanned, the Gateway link listening.
                self.notifier.ready(describe(node))
                log.info("node up: %s; journal %s", describe(node), node.settings.journal_path)
            self._ready.set()
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._stop_requests:
                    break
                if self._reload_requested:
                    self._reload_requested = False
                    await self._reload(node)
            await self._drain(node)
        finally:
            # Reached on a clean stop, a failed server start, or this task being cancelled: the
            # workers are stopped and the journal closed in every case (shielded from the cancel,
            # and awaited to the end even then).
            stopping = asyncio.ensure_future(self._stop(node))
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                await stopping
                raise
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            self.notifier.status("stopped")
            self.notifier.close()
        return 0

    async def _heartbeat(self, node: Node) -> None:
        """WATCHDOG=1 every half WatchdogSec, and STATUS= when it changed. Runs on the loop on purpose."""
        interval = self.notifier.watchdog_interval()
        last = describe(node)  # what READY=1 carries
        while True:
            if interval is not None:
                self.notifier.watchdog()
            if not self._stop_requests:
                text = describe(node)
                if text != last:
                    self.notifier.status(text)
                    last = text
            await asyncio.sleep(interval if interval is not None else STATUS_REFRESH_S)

    async def _reload(self, node: Node) -> None:
        self.notifier.reloading("reloading settings")
        if self.load_settings is None:
            log.warning("reload asked for, but this service has no settings loader; nothing changed")
            self.notifier.ready(describe(node))
            return
        try:
            # A thread: reading the file must not hold up the loop (and the watchdog) on a slow disk.
            new = await asyncio.to_thread(self.load_settings)
        except Exception as exc:  # noqa: BLE001 - whatever a bad file raises, the node serves on
            # ConfigError and OSError are the expected ones; anything else (a parser's own limit)
            # must not escape: it would skip the drain and stop the node.
            self.last_reload_error = str(exc)
            log.error("reload refused, the running settings stay: bad configuration: %s", exc)
            self.notifier.ready(f"{describe(node)}; last reload refused: {exc}")
            return
        self.last_reload_error = ""
        try:
            result = apply_settings(node, new)
        except Exception as exc:  # noqa: BLE001 - as above: refused, not fatal
            self.last_reload_error = str(exc)
            log.exception("reload refused, the running settings stay: applying them failed")
            self.notifier.ready(f"{describe(node)}; last reload refused: {exc}")
            return
        self.last_reload = result
        set_log_level(result.settings.log_level)
        for server in self.servers:
            hook = getattr(server, "apply_settings", None)
            if hook is not None:
                try:
                    maybe = hook(result.settings)
                    if asyncio.iscoroutine(maybe):
                        await maybe
                except Exception:  # noqa: BLE001 - a server's reload failing must not stop the node
                    log.exception("server %r could not apply the new settings", server)
        if result.needs_restart:
            log.warning("reloaded; these keys change only on restart and keep their running value: %s",
                        ", ".join(result.needs_restart))
        log.info("reloaded settings; changed: %s", ", ".join(result.changed) or "nothing")
        try:
            await node.rescan()
        except Exception:  # noqa: BLE001 - the scanner loop will try again at its interval
            log.exception("rescan after reload failed")
        self.notifier.ready(describe(node))

    async def _drain(self, node: Node) -> None:
        s = node.settings
        self.notifier.stopping(f"draining {node.busy()} requests (deadline {s.drain_deadline_s:g} s)")
        # TimeoutStopSec should already cover this; if an operator raised drain_deadline_s past it,
        # ask for the time rather than be SIGKILLed mid-drain.
        self.notifier.extend_timeout(s.drain_deadline_s + s.restart.stop_grace_s + STOP_MARGIN_S)
        loop = asyncio.get_running_loop()
        drain = loop.create_task(node.drain(s.drain_deadline_s), name="service-drain")
        hurry = loop.create_task(self._hurry.wait(), name="service-hurry")
        try:
            await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
                self.notifier.status("stopping now: running requests cancelled")
                cut = await node.drain(0)
            else:
                cut = drain.result()
            if cut:
                log.warning("%d requests were still running at the drain deadline and ended with shutting_down", cut)
        except Exception:  # noqa: BLE001 - whatever happened, the workers must still be stopped
            log.exception("drain failed; stopping anyway")
        finally:
            hurry.cancel()

    async def _stop(self, node: Node) -> None:
        self.notifier.status("stopping: servers, workers, journal")
        for server in reversed(self.servers):
            try:
                await server.stop()
            except Exception:  # noqa: BLE001 - one server's failure must not leave workers running
                log.exception("server %r did not stop cleanly", server)
        await node.stop(self.stop_reason or "stopped")
        log.info("node stopped (%s)", self.stop_reason or "stopped")


async def run_service(
    settings: Settings,
    load_settings: Callable[[], Settings] | None = None,
    *,
    make_node: Callable[[Settings], Node] = Node,
    make_servers: ServerFactory | None = None,
    notifier: Notifier | None = None,
    install_signals: bool = True,
    started: Callable[[Service], Awaitable[None] | None] | None = None,
) -> int:
    """Run the node as a service until SIGTERM/SIGINT; see the module docstring. Returns the exit code.

    ``started(service)`` is called once the Service exists (before the node starts), for callers
    that want to observe or stop it (tests, the Windows service). With ``install_signals=False``
    nothing touches the process's signals (Windows, or an application embedding the node).
    """
    service = Service(settings, load_settings, make_node=make_node, make_servers=make_servers,
                      notifier=notifier if notifier is not None else Notifier.from_environ())
    if started is not None:
        maybe = started(service)
        if asyncio.iscoroutine(maybe):
            await maybe
    if not install_signals:
        return await service.run()
    with service.signal_handlers():
        return await service.run()


# -- logging -----------------------------------------------------------------------------------

_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar("optimanode_log_fields", default={})


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add ``fields`` (e.g. request_id, executor_id) to every log line written inside the block."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


# Every attribute a plain LogRecord has; whatever else is on a record came through extra=.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
# Shown first, in this order, when present.
_FIRST = ("request_id", "executor_id")
_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The context fields, then the record's extra= fields (which win), request_id/executor_id first."""
    merged: dict[str, object] = dict(_fields.get())
    merged.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    ordered = {k: merged.pop(k) for k in _FIRST if k in merged}
    ordered.update(sorted(merged.items()))
    return ordered


def _logfmt(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not re.search(r'[\s="\\]', text):
        return text
    return json.dumps(text)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _escape_control(m: re.Match[str]) -> str:
    return repr(m.group())[1:-1]


def raise_open_files_limit(want: int = 65536) -> tuple[int, int] | None:
    """Raise the soft limit on open files toward ``want`` (at most the hard limit); returns
    (before, after), or None where there is no such limit (Windows).

    Every Gateway connection, every connection still in its handshake (gateway/server.py bounds
    them) and every worker's pipes is a descriptor; the usual soft limit of 1024 is a small part
    of what the hard limit allows (what Go's runtime and nginx raise too). systemd's unit sets
    LimitNOFILE as well; this covers a node started by hand or by another service manager.
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class LineFormatter(logging.Formatter):
    """``2025-01-02T03:04:05.678Z info optimanode.node message key=value ...`` or one JSON object per line."""

    def __init__(self, *, json_lines: bool = False, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.json_lines = json_lines
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        level = record.levelname.lower()
        msg = record.getMessage()
        if not self.json_lines:
            # One record, one line: a newline or other control character in the message (a peer's
            # value quoted in an error) is escaped, so it cannot start a forged line of its own.
            # Tracebacks keep their lines below.
            msg = _CONTROL.sub(_escape_control, msg)
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        if record.stack_info:
            exc = (exc + "\n" if exc else "") + self.formatStack(record.stack_info)
        fields = record_fields(record)
        if self.json_lines:
            doc: dict[str, object] = {"ts": ts, "level": level, "logger": record.name, "msg": msg, **fields}
            if exc:
                doc["exc"] = exc
            line = json.dumps(doc, default=str, ensure_ascii=False)
        else:
            line = f"{ts} {level} {record.name} {msg}" + "".join(f" {k}={_logfmt(v)}" for k, v in fields.items())
            if exc:
                line += "\n" + exc
        if self.syslog_prefix:
            prio = _SYSLOG.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            line = "\n".join(f"<{prio}>{part}" for part in line.split("\n"))
        return line


class Redactor:
    """Replaces what looks like a secret with ``[redacted]``; see the module docstring for what that is."""

    MARK = "[redacted]"
    # name=value / name: value / "name": "value" for secret-like names (not key_file, key_id, ...).
    _NAMED = re.compile(
        r"""(?ix)
        (?P<name>\b(?:access[_-]?key|api[_-]?key|private[_-]?key|secret|token|nonce|password|passwd|
                      authorization|signature|hmac|psk|key)\b)
        (?P<sep>["']?\s*[=:]\s*["']?)
        (?!\[redacted\])
        (?P<value>(?:bearer\s+|basic\s+)?[^\s"',;}\]]{6,})""")
    # "nonce 0a1b...", "the token is AbC...": a secret-like word, then a long opaque value.
    _WORD = re.compile(r"(?i)\b(?P<name>secret|token|nonce|key|password|passphrase)(?P<sep>\s+(?:is\s+)?)"
                       r"(?P<value>[A-Za-z0-9+/_=-]{16,})")
    _BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
    _PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S)
    # Long runs of the base64/base64url alphabet ('.' ends one, so file names split at their
    # extension; paths and names are spared by the entropy bar in _random_looking).
    _TOKEN = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])")
    _HEX = re.compile(r"(?i)(?<![0-9a-z])[0-9a-f]{40,}(?![0-9a-z])")
    # A content hash of a model or a certificate fingerprint is not a secret; it is labelled so.
    _HASH_LABEL = re.compile(r"(?i)(sha256|sha-256|digest|fingerprint)[\"']?\s*[=:]?\s*[\"']?$")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = {s for s in secrets if len(s) >= 8}

    def add_secret(self, value: str) -> None:
        if len(value) >= 8:
            self.secrets.add(value)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, self.MARK)
        text = self._PEM.sub(self.MARK, text)
        text = self._NAMED.sub(lambda m: f"{m.group('name')}{m.group('sep')}{self.MARK}", text)
        text = self._WORD.sub(lambda m: f"{m.group('name')}{m.group('sep')}{self.MARK}", text)
        text = self._BEARER.sub(lambda m: f"{m.group(1)} {self.MARK}", text)
        text = self._HEX.sub(lambda m: m.group(0) if self._labelled(text, m.start()) else self.MARK, text)
        return self._TOKEN.sub(lambda m: self.MARK if _random_looking(m.group(0)) else m.group(0), text)

    def _labelled(self, text: str, start: int) -> bool:
        return bool(self._HASH_LABEL.search(text[max(0, start - 16):start]))

    def redact_value(self, name: str, value: object) -> object:
        if re.search(r"(?i)(^|_)(key|secret|token|nonce|password|passwd|signature|hmac|psk)$", name):
            return self.MARK
        if isinstance(value, str):
            return self.redact(value)
        return value


def _random_looking(token: str) -> bool:
    """A random base64 token has a high character entropy for its length; model names and ids do not.

    Measured: 32-character random base64url tokens score 4.26 bits/char at the lowest (4.54 at the
    1st percentile), 43-character ones 4.65; GGUF file names of 35 to 49 characters 4.0 to 4.42
    (long runs of letters, repeated separators). The bar rises with the length between those.
    """
    if token.startswith("/") or token.count("/") >= 2:
        # A path: judged segment by segment, so /home/u/models/Mistral-7B-Instruct stays readable
        # (standard base64 with two or more '/' is missed here; the exact key is redacted anyway).
        return any(len(part) >= 32 and _random_looking(part) for part in token.split("/"))
    core = token.rstrip("=")
    classes = [any(c.isupper() for c in core), any(c.islower() for c in core), any(c.isdigit() for c in core)]
    if sum(classes) < 2:
        return False
    n = len(core)
    entropy = -sum(k / n * math.log2(k / n) for k in collections.Counter(core).values())
    bar = min(4.55, 4.2 + max(0, n - 32) * 0.3 / 8)
    return entropy >= bar


class RedactFilter(logging.Filter):
    """Rewrites each record in place so no handler can write a secret (message, extra fields, traceback)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        r = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must still be logged, not raise here
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = r.redact(message), None
        for k, v in list(vars(record).items()):
            if k not in _STANDARD and not k.startswith("_"):
                setattr(record, k, r.redact_value(k, v))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = r.redact(record.exc_text)
        return True


class _ContextRedactingFormatter(LineFormatter):
    """Context fields (log_context) are added at format time; they are redacted there too."""

    def __init__(self, redactor: Redactor, **kw: Any) -> None:
        super().__init__(**kw)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        token = _fields.set({k: self.redactor.redact_value(k, v) for k, v in _fields.get().items()})
        try:
            return super().format(record)
        finally:
            _fields.reset(token)


def stderr_is_journal(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is the journald stream systemd gave us ($JOURNAL_STREAM=dev:inode)."""
    env = os.environ if environ is None else environ
    want = env.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        dev, ino = (int(x) for x in want.split(":"))
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(settings: Settings, *, stream: TextIO | None = None, json_lines: bool | None = None,
                      syslog_prefix: bool | None = None) -> logging.Handler:
    """Install the structured, redacting stderr handler on the root logger (replacing a previous one).

    ``json_lines`` defaults to ``settings.log_format == "json"`` when that key exists. The node's
    access key (and ``<key>.previous`` during a rotation), if readable, is redacted word for word.
    """
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = getattr(settings, "log_format", "text") == "json"
    if syslog_prefix is None:
        syslog_prefix = stderr_is_journal(stream)
    redactor = Redactor()
    key = settings.key_path
    for path in (key, key.with_name(key.name + ".previous")):  # the previous key during a rotation
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.is_file() and path.stat().st_size <= 4096:
                redactor.add_secret(path.read_text(encoding="utf-8").strip())
    handler = logging.StreamHandler(stream)
    handler.set_name("optimanode")
    handler.setFormatter(_ContextRedactingFormatter(redactor, json_lines=json_lines, syslog_prefix=syslog_prefix))
    handler.addFilter(RedactFilter(redactor))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "optimanode"]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_log_level(settings.log_level)
    # transitions logs every state callback at INFO; our own transition line says it once.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    return handler


def set_log_level(level: str) -> None:
    """The root level from a settings value (debug, info, warning, error); applied live on SIGHUP."""
    logging.getLogger().setLevel(level.upper())


__all__: Sequence[str] = (
    "Notifier", "watchdog_interval", "watchdog_usec", "Service", "run_service", "Server", "Reloaded",
    "merge_live", "apply_settings", "describe", "RESTART_ONLY", "log_context", "LineFormatter", "Redactor",
    "RedactFilter", "configure_logging", "set_log_level", "stderr_is_journal",
)
