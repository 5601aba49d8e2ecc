"""Scanning: what the models directory holds, applied to the executors.

How it works: ``rescan`` runs ``Registry.scan`` in a thread (passing what is known, so unchanged
files are not re-read) and applies the result through the runtime: a new file is registered
(``Registered``, and ``DesiredChanged`` when ``scan.enable_new``) and becomes an executor; a
changed file is re-registered, and a failed, invalid or missing model whose file is back or
changed is ``rediscover``\\ed with a fresh crash budget; an unusable file is invalidated, and a
removed one vanishes (``Runtime.retire``: at once, or once its worker has stopped). A directory
that could not be read this time removes nothing. The loop (``run``) rescans every
``scan.interval_s``, sooner while a file is still being copied; ``hash_loop`` computes each
model's content identity (SHA-256 of its parts) once, in a thread, and journals it (``Hashed``);
a file it cannot read (removed, no permission, a directory now) is logged once and skipped until
a rescan sees it changed, and the others are hashed all the same. What a scan could not use (an
unreadable directory, a file it cannot stat, a name that is not UTF-8, two files with one id) is
logged at WARNING when it first appears and at INFO when it is gone, not at every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from optimanode.executors.lifecycle import Lifecycle
from optimanode.executors.registry import Registry, ScanResult, sha256_of
from optimanode.executors.runtime import Executor, Runtime
from optimanode.protocol import DesiredChanged, EventBody, Hashed, ModelInfo, Registered

log = logging.getLogger(__name__)


class Scanner:
    """The models directory, kept in step with the executors."""

    def __init__(self, runtime: Runtime, registry: Registry) -> None:
        self.runtime = runtime
        self.registry = registry
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # Executor id -> (path, size, mtime) of a file hash_loop could not read; retried once it changes.
        self._unhashable: dict[str, tuple[str, int, int]] = {}
        # The scan errors already logged (path -> message), so each is said once, not every interval.
        self._errors_said: dict[str, str] = {}

    def wake(self) -> None:
        """Start the next interval now (a reload may have changed it)."""
        self._wake.set()

    async def rescan(self) -> ScanResult:
        """Scan the models directory now and apply what changed; returns the raw result."""
        async with self._lock:
            known = {eid: ex.info for eid, ex in self.runtime.executors.items()}
            result = await asyncio.to_thread(self.registry.scan, known)
            self._say_errors(result.errors)
            await self._apply(result)
        return result

    def _say_errors(self, errors: dict[str, str]) -> None:
        for path, message in errors.items():
            if self._errors_said.get(path) != message:
                log.warning("models directory: %s: %s", path, message)
        for path in set(self._errors_said) - set(errors):
            log.info("models directory: %s: no longer an error", path)
        self._errors_said = dict(errors)

    async def _apply(self, result: ScanResult) -> None:
        pending = set(result.pending)
        for eid, info in result.models.items():
            await self._seen(eid, info, None)
        for eid, (info, reason) in result.invalid.items():
            await self._seen(eid, info, reason)
        seen = set(result.models) | set(result.invalid)
        for eid, ex in self.runtime.executors.items():
            if eid in seen or ex.state == "missing" or ex.info.path in pending:
                continue
            if result.errors and any(ex.info.path.startswith(d.rstrip("/") + "/") for d in result.errors):
                continue  # its directory could not be read this time; that is not a removal
            await self.runtime.retire(ex, "vanish", "model file removed")

    async def _seen(self, eid: str, info: ModelInfo, invalid_reason: str | None) -> None:
        runtime, journal = self.runtime, self.runtime.journal
        ex = runtime.executors.get(eid)
        if ex is None:
            ex = Executor(id=eid, life=Lifecycle(eid), info=info)
            batch: list[tuple[str, EventBody]] = [(eid, Registered(info=info))]
            if invalid_reason is None and runtime.settings.scan.enable_new:
                batch.append((eid, DesiredChanged(enabled=True, by="scan.enable_new")))
                ex.enabled = True
            await journal.append_many(batch)
            runtime.executors[eid] = ex
            log.info("registered %s (%s)", eid, info.path)
        elif (info.size_bytes, info.mtime_ns, info.path) != (ex.info.size_bytes, ex.info.mtime_ns, ex.info.path):
            await journal.append(eid, Registered(info=info))
            ex.info = info
            log.info("model file of %s changed; re-read", eid)
            if ex.state in ("failed", "invalid", "missing") and invalid_reason is None:
                ex.crash_times.clear()
                await runtime.fire(ex, "rediscover", reason="model file changed")
        elif ex.state == "missing" and invalid_reason is None:
            await runtime.fire(ex, "rediscover", reason="model file is back")
        if invalid_reason is not None and ex.state != "invalid":
            await runtime.retire(ex, "invalidate", invalid_reason)
        runtime.wake()

    async def run(self) -> None:
        """Rescan every ``scan.interval_s``; a file still being copied is looked at again soon."""
        pending = False
        while True:
            interval = self.runtime.settings.scan.interval_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval, self.registry.settle_s + 0.5) if pending else interval):
                    await self._wake.wait()  # a reload wakes it so a new interval applies now
            pending = bool((await self.rescan()).pending)

    async def hash_loop(self) -> None:
        """Compute each model's content identity once, in a thread; the journal caches it."""
        while True:
            for eid in set(self._unhashable) - set(self.runtime.executors):
                del self._unhashable[eid]  # retired
            for ex in list(self.runtime.executors.values()):
                info = ex.info
                if info.sha256 or ex.state in ("invalid", "missing"):
                    continue
                seen = (info.path, info.size_bytes, info.mtime_ns)
                if self._unhashable.get(ex.id) == seen:
                    continue  # failed on this very file; a rescan that sees it change re-registers it
                try:
                    digest = await asyncio.to_thread(sha256_of, info.files)
                except OSError as exc:  # removed, unreadable, a directory now: skip it, hash the rest
                    self._unhashable[ex.id] = seen
                    log.warning("cannot hash %s (%s): %s; skipped until the file changes", ex.id, info.path, exc)
                    continue
                self._unhashable.pop(ex.id, None)
                if (ex.info.size_bytes, ex.info.mtime_ns) != (info.size_bytes, info.mtime_ns):
                    continue  # changed while hashing; the next pass takes the new one
                await self.runtime.journal.append(ex.id, Hashed(sha256=digest, size_bytes=info.size_bytes,
                                                                mtime_ns=info.mtime_ns))
                ex.info = msgspec.structs.replace(ex.info, sha256=digest)
            await asyncio.sleep(5.0)
