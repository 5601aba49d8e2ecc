"""lifecycle's journal part: append throughput and ``Journal.open`` + ``replay()`` of a big journal.

How it works: ``journal_throughput`` appends through ``optimanode.journal.Journal`` from 1, 8 and
64 concurrent tasks (group commit, synchronous=FULL) and times each append. ``build_journal``
writes an N-event journal quickly with plain sqlite3 ``executemany`` (the schema from
``Journal.open``), in one of two ``MIXES`` of request, transition and desired events, and returns
each executor's expected final state; ``time_replay`` then times ``Journal.open`` and
``replay()`` (the first pass writes the projection table a live node would have left and is not
counted) and checks the replay against that expectation.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import log, med, mib, pct


async def journal_throughput(work: Path, per_level: int, levels: Sequence[int]) -> list[dict[str, Any]]:
    from optimanode.journal import Journal
    from optimanode.protocol import RequestFinished, RequestStarted

    rows = []
    for conc in levels:
        path = work / f"append-{conc}.sqlite3"
        j = await Journal.open(path)
        lat: list[float] = []
        per_task = max(1, per_level // conc)

        async def appender(k: int) -> None:
            for i in range(per_task):
                body = (RequestStarted(request_id=f"r{k}-{i}", kind="completion", by="bench") if i % 2 == 0 else
                        RequestFinished(request_id=f"r{k}-{i - 1}", outcome="length", prompt_tokens=12,
                                        completion_tokens=128, ttft_s=0.05, total_s=2.1))
                t = time.perf_counter()
                await j.append(f"executor-{k % 8}", body)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(appender(k) for k in range(conc)))
        wall = time.perf_counter() - t0
        await j.close()
        n = per_task * conc
        rows.append({"concurrent_appenders": conc, "events": n, "seconds": wall, "events_per_s": n / wall,
                     "append_p50_ms": pct(lat, 0.5) * 1000, "append_p99_ms": pct(lat, 0.99) * 1000})
        log(f"journal append x{conc}: {n / wall:,.0f} events/s (p50 {rows[-1]['append_p50_ms']:.1f} ms)")
    return rows


TRANSITION_CYCLE = [("enable", "discovered", "enabled"), ("start", "enabled", "starting"),
                    ("ready", "starting", "running"), ("crash", "running", "crashed"),
                    ("restart", "crashed", "restarting"), ("ready", "restarting", "running"),
                    ("stop", "running", "stopping"), ("stopped", "stopping", "discovered")]
MIXES = {
    # what a serving node writes: two request events per request, a few state changes
    "realistic": {"request": 0.94, "transition": 0.05, "desired": 0.01},
    # a stress case: mostly the events replay has to fold
    "state-heavy": {"request": 0.40, "transition": 0.50, "desired": 0.10},
}


def build_journal(path: Path, events: int, mix: dict[str, float], executors: int = 20,
                  seed: int = 1) -> dict[str, str]:
    """A journal of ``events`` events with plain sqlite3; returns each executor's expected final state."""
    from optimanode.protocol import (DesiredChanged, ModelInfo, ModelSettings, NodeStarted, Registered,
                                     RequestFinished, RequestStarted, Transition, encode_event)

    async def schema() -> None:
        from optimanode.journal import Journal
        j = await Journal.open(path)
        await j.close()

    asyncio.run(schema())
    rng = random.Random(seed)
    ids = [f"model-{i:02d}-{rng.getrandbits(32):08x}" for i in range(executors)]
    version = {eid: 0 for eid in ids}
    version["node"] = 0
    state_i = {eid: 0 for eid in ids}
    expect = {eid: "discovered" for eid in ids}
    ts = time.time() - 86400 * 30
    seq_rows: list[tuple[float, str, int, str, str]] = []
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")

    def add(stream: str, body: Any) -> None:
        nonlocal ts
        ts += 0.01
        version[stream] += 1
        seq_rows.append((ts, stream, version[stream], body.__struct_config__.tag, encode_event(body).decode()))
        if len(seq_rows) >= 50_000:
            flush()

    def flush() -> None:
        db.executemany("INSERT INTO events (ts, stream, version, type, data) VALUES (?, ?, ?, ?, ?)", seq_rows)
        db.commit()
        seq_rows.clear()

    add("node", NodeStarted(pid=1234, version="0.1.0"))
    for i, eid in enumerate(ids):
        add(eid, Registered(info=ModelInfo(
            path=f"/srv/models/family-{i}/model-{i}.Q4_K_M.gguf", files=[f"/srv/models/family-{i}/model-{i}.Q4_K_M.gguf"],
            size_bytes=rng.randrange(10**8, 10**10), mtime_ns=time.time_ns(), architecture="llama",
            name=f"Model {i}", size_label="7B", parameter_count=7 * 10**9, file_type="Q4_K_M",
            context_length=8192, chat_template=True, tensor_count=291, block_count=32, embedding_length=4096,
            head_count=32, head_count_kv=8)))
    written = 1 + executors
    r = 0
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    while written < events:
        eid = rng.choice(ids)
        kind = rng.choices(kinds, weights)[0]
        if kind == "request":
            r += 1
            add(eid, RequestStarted(request_id=f"{r:032x}", kind="completion", by="gateway-1"))
            add(eid, RequestFinished(request_id=f"{r:032x}", outcome="length", prompt_tokens=rng.randrange(5, 400),
                                     completion_tokens=rng.randrange(1, 512), ttft_s=0.05, total_s=3.2))
            written += 2
        elif kind == "transition":
            trig, src, dst = TRANSITION_CYCLE[state_i[eid] % len(TRANSITION_CYCLE)]
            state_i[eid] += 1
            extra: dict[str, Any] = {}
            if trig == "crash":
                extra = dict(pid=rng.randrange(1000, 99999), signal=9, uptime_s=812.5, restart_in_s=1.1,
                             stderr_tail=["llama_model_load: loading model", "warning: something", "..."] * 2)
            elif trig == "ready":
                extra = dict(pid=rng.randrange(1000, 99999), reason="loaded in 1.52 s")
            add(eid, Transition(trigger=trig, src=src, dst=dst, **extra))
            expect[eid] = dst
            written += 1
        else:
            add(eid, DesiredChanged(enabled=rng.random() < 0.8, settings=ModelSettings(n_ctx=rng.choice([2048, 4096])),
                                    by="gateway-1"))
            written += 1
    flush()
    db.close()
    return expect


async def time_replay(path: Path, expect: dict[str, str], repeat: int) -> dict[str, Any]:
    from optimanode.journal import Journal

    opens, replays = [], []
    for i in range(repeat + 1):
        t = time.perf_counter()
        j = await Journal.open(path)
        t_open = time.perf_counter() - t
        t = time.perf_counter()
        views = await j.replay()
        t_replay = time.perf_counter() - t
        await j.close()
        if i == 0:
            # Make the projection table what a live node would have left (append keeps it in step).
            import msgspec
            with sqlite3.connect(path) as db:
                db.executemany("INSERT OR REPLACE INTO executors (id, path, state, enabled, settings, info, last_seq)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(v.id, v.path, v.state, int(v.enabled), msgspec.json.encode(v.settings).decode(),
                                 msgspec.json.encode(v.info).decode(), v.last_seq) for v in views.values()])
            db.close()
        got = {k: v.state for k, v in views.items()}
        if got != expect:
            raise RuntimeError("replay disagrees with the events written")
        if i:  # the first pass (page cache cold-ish, projection written) is not counted
            opens.append(t_open)
            replays.append(t_replay)
    return {"open_s": med(opens), "replay_s": med(replays), "open_plus_replay_s": med([a + b for a, b in zip(opens, replays)]),
            "runs": [{"open_s": a, "replay_s": b} for a, b in zip(opens, replays)]}


async def journal_replay(work: Path, events: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for name, mix in MIXES.items():
        path = work / f"replay-{name}.sqlite3"
        t = time.perf_counter()
        expect = await asyncio.to_thread(build_journal, path, events, mix)
        built = time.perf_counter() - t
        with sqlite3.connect(path) as db:
            counts = dict(db.execute("SELECT type, COUNT(*) FROM events GROUP BY type").fetchall())
        size = path.stat().st_size
        res = await time_replay(path, expect, repeat)
        rows.append({"mix": name, "events": sum(counts.values()), "by_type": counts, "file_mib": mib(size),
                     "build_s": built, **res})
        log(f"journal {name}: {sum(counts.values()):,} events ({mib(size)} MiB): open {res['open_s']:.2f} s, "
            f"replay {res['replay_s']:.2f} s")
        path.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return rows
