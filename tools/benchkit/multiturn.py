"""``tools/bench multiturn``: conversations that come back, on the node and on llama-server (issue 16, item 4).

How it works: C conversations run at once, T turns each. Every prompt is a plain completion of
the same text on every system: a shared system prompt of ~S tokens (different each round, so a
round starts cold), then the conversation's history (its earlier questions and the replies the
system gave), then this turn's question; each reply is ``--max-tokens`` greedy tokens, and a
conversation waits ``--gap`` seconds before its next turn. Three cases (``--case``):

``one-node`` (default): one node per ``--nodes`` entry (``NodeProc``: a real node subprocess over
TLS WebSocket, ``parallel`` slots sharing ``n_ctx``; the entry is its ``model_defaults.prefill``,
so the prompt scheduling policies run side by side) and one llama-server per ``--servers`` entry,
built from the same llama.cpp sources (tools/build-llama-server; ``-np`` / ``-c`` the same, its
defaults otherwise: ``cache_prompt`` on, its host-memory prompt cache ``--cache-ram`` on; an entry
N > 0 passes ``--cache-reuse N`` too). All run in turn within each round, the order reversed
every other round.

With ``--stagger S`` conversation c starts S x c seconds into the round, and with ``--private-words
W`` each opens with W words of its own after the shared system prompt (a document it was given,
say): new conversations then bring long cold prompts while others are on their short later turns,
the case the prompt scheduling policies (``prefill``) differ on.

``pool``: two nodes behind ``optimanode.client.NodePool`` (metrics subscribed every 0.25 s) against
two llama-servers behind round-robin (what a plain load balancer does), each node / server with
``--threads`` threads (1 on a 2-core machine: the pair shares the cores alike on both sides).
While the pool runs, both nodes' metrics are sampled every 0.25 s: a sample where one node has
more than 80 % of its slots busy (``in_flight / parallel``) while the other has nothing in flight
counts as an imbalance; the stricter count, ``queued_while_other_idle``, only those where requests
also waited, in a node's queue or in the pool (``NodePool.hold_s``), while a node had nothing.

``returning``: one conversation's first turn, then two waves of ``parallel`` unrelated prompts at
once (every slot is reused, so the conversation's cells survive only in the host cache), then its second
turn; against a cold prompt of the same length, order alternating, ``--repeats`` times, on the
node (first ``--nodes`` entry) and on llama-server (first ``--servers`` entry, its own
``--cache-ram``). The node's prompt-cache counters (``ExecutorStatus.prompt_cache``) say whether
the return restored from the host cache; the ratio return / cold is also given over those rows only.

Figures per system (medians over rounds): TTFT p50 over all turns, turn 1, later turns and per turn
number; completion tokens/s over the whole run (all conversations' tokens / wall time) and the
wall time; prompt tokens served from cache (the node's ``usage.cached_tokens``, llama-server's
``timings.cache_n``) out of all prompt tokens; the share of later turns that *landed where their
prefix is*: their cached tokens cover the conversation's previous prompt (less ``LANDED_SLACK``
tokens, for a tokenizer boundary). Ratios node / llama-server are medians of per-round ratios.
``--plot OUT.png`` draws TTFT p50 per turn number, one line per system.

``--step-log``: the nodes' workers log every decode step (``OPTIMANODE_WORKER_STEP_LOG``); each node
round gets its breakdown (``steps.breakdown``: the share of the wall inside ``llama_decode``, the
steps with prompt tokens, the prompt tokens evaluated) and its generation floor (the replies alone
at the cost of a token in a full step), set against llama-server's wall and later-turn TTFT in
the same round. Every system's later-turn TTFT is printed beside the closed-loop model's
(``steps.waiting_share``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import math
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from optimanode.protocol import CompletionRequest, InferDone, SamplingParams, TokenChunk

from .common import BASE_PROMPTS, add_common_options, free_port, log, machine, make_work, med, \
    model_path, report
from .compare import find_llama_server, start_llama_server
from .nodeproc import NodeProc
from .steps import breakdown, floor_of, read, waiting_share

# A later turn "landed where its prefix is" when its cached tokens reach the previous prompt's
# length less this many tokens (the previous prompt's last token may merge with the reply's first).
LANDED_SLACK = 4
# Blocking llama-server requests run here: more threads than conversations ever in flight.
HTTP_THREADS = ThreadPoolExecutor(max_workers=256, thread_name_prefix="llama-server-request")
FIGURES = ("ttft_p50_all", "ttft_p50_turn1", "ttft_p50_later", "tokens_per_s", "wall_s")


def system_prompt(round_no: int, words: int) -> str:
    """~``words`` words of instructions, different for each round from the first tokens on."""
    head = f"Round {round_no}. You are the assistant of a hardware shop; answer briefly.\n"
    body: list[str] = []
    i = 0
    while sum(len(s.split()) for s in body) < words:
        body.append(BASE_PROMPTS[i % len(BASE_PROMPTS)])
        i += 1
    return head + " ".join(body) + "\n"


def private_text(round_no: int, conv: int, words: int) -> str:
    """~``words`` words only conversation ``conv`` of round ``round_no`` has (none for 0)."""
    if words <= 0:
        return ""
    body: list[str] = []
    i = conv * 5 + round_no
    while sum(len(s.split()) for s in body) < words:
        body.append(BASE_PROMPTS[i % len(BASE_PROMPTS)])
        i += 3
    return f"Document of conversation {conv}, round {round_no}: " + " ".join(body) + "\n"


def question(conv: int, turn: int) -> str:
    return f"User ({conv}.{turn}): {BASE_PROMPTS[(conv * 7 + turn) % len(BASE_PROMPTS)]}\nAssistant:"


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else float("nan")


# NodeSystem.cache_report: the node's default heartbeat interval and a margin.
HEARTBEAT_WAIT_S = 1.3


class Turn:
    """One request's outcome as the caller saw it."""

    __slots__ = ("ttft", "text", "tokens", "prompt", "cached")

    def __init__(self, ttft: float, text: str, tokens: int, prompt: int, cached: int) -> None:
        self.ttft, self.text, self.tokens, self.prompt, self.cached = ttft, text, tokens, prompt, cached


async def node_turn(stream: Any, sent: float) -> Turn:
    first = None
    text: list[str] = []
    async with contextlib.aclosing(stream) as s:
        async for msg in s:
            if isinstance(msg, TokenChunk):
                if first is None:
                    first = time.perf_counter()
                text.append(msg.text)
            elif isinstance(msg, InferDone):
                u = msg.usage
                return Turn((first or time.perf_counter()) - sent, "".join(text), u.completion_tokens,
                            u.prompt_tokens, u.cached_tokens)
    raise RuntimeError("the stream ended without a done frame")


def completion(prompt: str, max_tokens: int) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))


class NodeSystem:
    """One node; ``prefill`` is its model_defaults.prefill."""

    def __init__(self, node: NodeProc, prefill: str) -> None:
        self.node = node
        self.prefill = prefill
        self.name = f"node[{prefill}]"
        self.step_logs: list[Path] = [node.step_log] if node.step_log else []

    async def turn(self, prompt: str, max_tokens: int) -> Turn:
        sent = time.perf_counter()
        return await node_turn(self.node.client.infer(self.node.eid, completion(prompt, max_tokens)), sent)

    async def cache_report(self) -> Any:
        """The worker's prompt-cache counters as of after everything sent so far: they come with its
        heartbeat (every ``restart.heartbeat_interval_s``, 1 s by default), so a read right after
        a turn can miss what that turn did (session 7's returning run counted a restore in 2 of 5
        pairs); a heartbeat and a little more is waited first."""
        await asyncio.sleep(HEARTBEAT_WAIT_S)
        return (await self.node.client.status(self.node.eid)).prompt_cache


class PoolSystem:
    """Two (or more) nodes behind one NodePool, as a Gateway would hold them."""

    def __init__(self, nodes: list[NodeProc], prefill: str) -> None:
        from optimanode.client import NodePool

        self.nodes = nodes
        self.pool = NodePool([n.client for n in nodes])
        self.eid = nodes[0].eid
        if any(n.eid != self.eid for n in nodes):
            raise RuntimeError(f"the nodes name the model differently: {[n.eid for n in nodes]}")
        self.name = f"NodePool x{len(nodes)} [{prefill}]"
        self.samples: list[tuple[float, ...]] = []
        self.step_logs: list[Path] = [n.step_log for n in nodes if n.step_log]

    async def watch(self) -> None:
        await self.pool.watch(0.25)

    async def turn(self, prompt: str, max_tokens: int) -> Turn:
        sent = time.perf_counter()
        return await node_turn(self.pool.infer(self.eid, completion(prompt, max_tokens)), sent)

    def occupancy(self) -> list[tuple[int, int, int] | None]:
        """(in_flight, queue_depth, parallel) per node from its latest metrics report."""
        out: list[tuple[int, int, int] | None] = []
        for n in self.nodes:
            rep = n.client.latest_metrics
            em = None if rep is None else next((e for e in rep.executors if e.id == self.eid), None)
            out.append(None if em is None else (em.in_flight, em.queue_depth, em.parallel))
        return out

    def stats(self) -> Any:
        st = getattr(self.pool, "stats", None)
        if st is None:
            return None
        if hasattr(st, "__struct_fields__"):
            return {f: getattr(st, f) for f in st.__struct_fields__}
        if hasattr(st, "__dataclass_fields__"):
            return {f: getattr(st, f) for f in st.__dataclass_fields__}
        return dict(st) if isinstance(st, dict) else repr(st)


class ServerSystem:
    """One llama-server (``cache_reuse`` > 0: ``--cache-reuse N``)."""

    def __init__(self, binary: str, model: str, parallel: int, threads: int, n_ctx: int, n_batch: int,
                 cache_reuse: int, log_path: Path, flash_attn: str = "auto") -> None:
        self.port = free_port()
        self.cache_reuse = cache_reuse
        self.name = "llama-server" + (f" --cache-reuse {cache_reuse}" if cache_reuse else "")
        self.cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
                    "-np", str(parallel), "-b", str(n_batch), "-ub", str(n_batch), "--host", "127.0.0.1",
                    "--port", str(self.port)]
        if flash_attn != "auto":
            self.cmd += ["-fa", flash_attn]
        if cache_reuse:
            self.cmd += ["--cache-reuse", str(cache_reuse)]
        self.proc = start_llama_server(self.cmd, self.port, log_path)

    def _turn(self, prompt: str, max_tokens: int, sent: float) -> Turn:
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "stream": True,
                           "cache_prompt": True})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.connect()
        c.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        first = None
        text: list[str] = []
        n = n_prompt = n_cached = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            ev = json.loads(line[6:])
            if ev.get("content"):
                if first is None:
                    first = time.perf_counter()
                text.append(ev["content"])
            if ev.get("stop"):
                n = ev.get("tokens_predicted", len(text))
                timings = ev.get("timings", {})
                n_prompt = ev.get("tokens_evaluated", 0)  # all prompt tokens, cached ones included
                n_cached = timings.get("cache_n", 0)
                break
        c.close()
        return Turn((first or time.perf_counter()) - sent, "".join(text), n, n_prompt, n_cached)

    async def turn(self, prompt: str, max_tokens: int) -> Turn:
        # A thread per request in flight, from a pool of its own: asyncio.to_thread's default pool
        # has min(32, cpus + 4) = 6 threads here, which would hold back conversations 7.. before
        # they are sent (and outside their TTFT). ``sent`` is taken before the hand-over.
        sent = time.perf_counter()
        return await asyncio.get_running_loop().run_in_executor(HTTP_THREADS, self._turn, prompt, max_tokens, sent)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RoundRobin:
    """Several llama-servers behind round-robin, request by request (a plain load balancer)."""

    def __init__(self, servers: list[ServerSystem]) -> None:
        self.servers = servers
        self._next = itertools.count()
        self.name = f"llama-server x{len(servers)} round-robin" + (
            f" --cache-reuse {servers[0].cache_reuse}" if servers[0].cache_reuse else "")

    async def turn(self, prompt: str, max_tokens: int) -> Turn:
        return await self.servers[next(self._next) % len(self.servers)].turn(prompt, max_tokens)


async def sample_occupancy(pool: PoolSystem, stop: asyncio.Event, out: dict[str, Any]) -> None:
    """Every 0.25 s: is one node above 80 % of its slots while the other has nothing in flight?"""
    n = imbalanced = queued = 0
    peak: list[float] = [0.0] * len(pool.nodes)
    # [s since start, [in_flight, queue_depth] per node, requests held in the pool] for a look afterwards
    trace: list[list[Any]] = []
    t0 = time.perf_counter()
    while not stop.is_set():
        occ = pool.occupancy()
        if all(o is not None for o in occ):
            n += 1
            busy = [o[0] / max(1, o[2]) for o in occ]  # type: ignore[index]
            idle = [o[0] == 0 and o[1] == 0 for o in occ]  # type: ignore[index]
            peak = [max(a, b) for a, b in zip(peak, busy)]
            holding = getattr(pool.pool, "holding", 0)  # requests waiting in the pool itself (NodePool.hold_s)
            if any(b > 0.8 for b in busy) and any(idle):
                imbalanced += 1
                # the stricter case: requests wait (in one node's queue, or in the pool) while a node has nothing
                queued += any(o[1] > 0 for o in occ) or holding > 0  # type: ignore[index]
            trace.append([round(time.perf_counter() - t0, 2), [list(o[:2]) for o in occ], holding])  # type: ignore[index]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    out.update({"samples": n, "imbalanced_samples": imbalanced, "queued_while_other_idle_samples": queued,
                "peak_busy_share": peak, "trace": trace})


async def one_round(system: Any, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    sys_text = system_prompt(round_no, args.system_words)
    ttfts: dict[int, list[float]] = {t: [] for t in range(args.turns)}
    totals = {"tokens": 0, "prompt": 0, "cached": 0, "later": 0, "landed": 0}
    first_prompt_tokens: list[int] = []

    async def conversation(c: int) -> None:
        await asyncio.sleep(c * args.stagger)
        history = sys_text + private_text(round_no, c, args.private_words) + f"Conversation {c}.\n"
        prev_prompt = 0
        for t in range(args.turns):
            prompt = history + question(c, t)
            r = await system.turn(prompt, args.max_tokens)
            ttfts[t].append(r.ttft)
            totals["tokens"] += r.tokens
            totals["prompt"] += r.prompt
            totals["cached"] += r.cached
            if t == 0:
                first_prompt_tokens.append(r.prompt)
            else:
                totals["later"] += 1
                totals["landed"] += r.cached >= prev_prompt - LANDED_SLACK
            prev_prompt = r.prompt
            history = prompt + r.text + "\n"
            if t + 1 < args.turns:
                await asyncio.sleep(args.gap)

    occupancy: dict[str, Any] = {}
    stop = asyncio.Event()
    sampler = None
    if isinstance(system, PoolSystem):
        sampler = asyncio.create_task(sample_occupancy(system, stop, occupancy))
    load0 = os.getloadavg()[0]
    m0 = time.monotonic()  # the workers' step logs use this clock
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    finally:
        wall = time.perf_counter() - t0
        m1 = time.monotonic()
        stop.set()
        if sampler is not None:
            await sampler
    later = [x for t in range(1, args.turns) for x in ttfts[t]]
    out = {"ttft_p50_all": p50([x for v in ttfts.values() for x in v]), "ttft_p50_turn1": p50(ttfts[0]),
           "ttft_p50_later": p50(later), "ttft_p90_later": p90(later), "tokens_per_s": totals["tokens"] / wall, "wall_s": wall,
           "prompt_tokens": totals["prompt"], "cached_tokens": totals["cached"],
           "landed_share": totals["landed"] / totals["later"] if totals["later"] else float("nan"),
           "ttft_p50_per_turn": [p50(ttfts[t]) for t in range(args.turns)],
           "first_prompt_tokens_p50": p50([float(x) for x in first_prompt_tokens]),
           "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "slots": args.parallel * len(getattr(system, "nodes", getattr(system, "servers", [system]))),
           "ttfts": {str(t + 1): [round(x, 4) for x in v] for t, v in ttfts.items()}}
    # TTFT of a later turn as the closed-loop model gives it from the wall (steps.waiting_share).
    out["ttft_later_model_s"] = wall * waiting_share(args.conversations, out["slots"], args.turns)
    if getattr(system, "step_logs", None):
        per_node = [breakdown(read([prefix], m0, m1), args.parallel, wall) for prefix in system.step_logs]
        out["steps"] = per_node
        out["generation_floor_s"] = floor_of(per_node)
    if isinstance(system, PoolSystem):
        out["occupancy"] = occupancy
        out["pool_stats"] = system.stats()
    return out


def summarize(out: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> None:
    """Medians over rounds per system, and medians of per-round ratios node / llama-server."""
    meds: dict[str, dict[str, Any]] = {}
    for k, v in results.items():
        m: dict[str, Any] = {f: med([x[f] for x in v]) for f in (*FIGURES, "prompt_tokens", "cached_tokens",
                                                                  "landed_share", "first_prompt_tokens_p50")}
        m["ttft_p90_later"] = med([x.get("ttft_p90_later", float("nan")) for x in v])
        m["ttft_later_model_s"] = med([x.get("ttft_later_model_s", float("nan")) for x in v])
        if "generation_floor_s" in v[0]:
            m["generation_floor_s"] = med([x["generation_floor_s"] for x in v])
            m["decode_share"] = med([statistics.mean(b["decode_share"] for b in x["steps"]) for x in v])
            m["full_step_token_ms"] = med([1000 * statistics.mean(b["full_step_token_s"] for b in x["steps"]) for x in v])
            m["prompt_tokens_evaluated"] = med([sum(b["prompt_tokens_evaluated"] for b in x["steps"]) for x in v])
            for part in ("decode_s", "prompt_marginal_s", "partial_steps_s"):  # per node (the mean of a pool's)
                m[part] = med([statistics.mean(b[part] for b in x["steps"]) for x in v])
        m["ttft_p50_per_turn"] = [med([x["ttft_p50_per_turn"][t] for x in v]) for t in range(len(v[0]["ttft_p50_per_turn"]))]
        if "occupancy" in v[0]:
            m["imbalanced_samples"] = sum(x["occupancy"].get("imbalanced_samples", 0) for x in v)
            m["occupancy_samples"] = sum(x["occupancy"].get("samples", 0) for x in v)
            m["queued_while_other_idle_samples"] = sum(x["occupancy"].get("queued_while_other_idle_samples", 0)
                                                       for x in v)
        meds[k] = m
    out["medians"] = meds
    nodes = [k for k in results if k.startswith(("node", "NodePool"))]
    servers = [k for k in results if k.startswith("llama-server")]
    ratios: dict[str, dict[str, float]] = {}
    for a in nodes:
        for b in servers:
            ratios[f"{a} / {b}"] = {f: med([x[f] / y[f] for x, y in zip(results[a], results[b]) if y[f]]) for f in FIGURES}
    out["ratios"] = ratios
    # The replies alone (steps.breakdown's generation floor) against the server's round, per round:
    # a node that evaluated no prompt token at all would still need this share of the wall, and
    # (the closed-loop model) of the later-turn TTFT.
    floors: dict[str, dict[str, float]] = {}
    for a in nodes:
        for b in servers:
            pairs = [(x, y) for x, y in zip(results[a], results[b]) if "generation_floor_s" in x]
            if pairs:
                share = waiting_share(out["conversations"], pairs[0][0]["slots"], out["turns"])
                floors[f"{a} / {b}"] = {
                    "floor_over_wall": med([x["generation_floor_s"] / y["wall_s"] for x, y in pairs]),
                    "floor_ttft_over_later_ttft": med([x["generation_floor_s"] * share / y["ttft_p50_later"]
                                                       for x, y in pairs])}
    if floors:
        out["generation_floors"] = floors
    goals = {"ttft_p50_later": ("<=", 0.3), "ttft_p50_all": ("<=", 0.5), "tokens_per_s": (">=", 1.8)}
    out["goals"] = {pair: {f: {"ratio": r[f], "goal": f"{op} {g}",
                               "met": (r[f] <= g) if op == "<=" else (r[f] >= g)}
                           for f, (op, g) in goals.items() if r.get(f) is not None}
                    for pair, r in ratios.items()}


async def run_rounds(systems: list[Any], args: argparse.Namespace, out: dict[str, Any]) -> None:
    names = [s.name for s in systems]
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        for s in order:
            res = await one_round(s, args, r + 1)
            results[s.name].append(res)
            log(f"round {r + 1} {s.name}: TTFT p50 {res['ttft_p50_all']:.2f} s (turn 1 {res['ttft_p50_turn1']:.2f}, "
                f"later {res['ttft_p50_later']:.2f}), {res['tokens_per_s']:.1f} tok/s, {res['wall_s']:.1f} s, "
                f"cached {res['cached_tokens']}/{res['prompt_tokens']}, landed {res['landed_share']:.0%}, "
                f"load {res['loadavg_1m']}" + (f", occupancy {res['occupancy']}" if "occupancy" in res else ""))
    out["rounds_detail"] = results
    summarize(out, results)


async def returning(node: NodeSystem | None, server: ServerSystem | None, args: argparse.Namespace,
                    out: dict[str, Any]) -> None:
    """A conversation returns after every slot was reused, against a cold prompt of the same length."""
    evict_words = 120  # > 32 tokens (what the worker saves), short so the repeats stay quick
    detail: dict[str, list[dict[str, Any]]] = {}
    for system in (s for s in (node, server) if s is not None):
        rows: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            base = 7000 + rep * 10
            conv = system_prompt(base, args.system_words) + "Conversation 1.\n"
            first = await system.turn(conv + question(1, 0), args.max_tokens)
            second_prompt = conv + question(1, 0) + first.text + "\n" + question(1, 1)
            for wave in range(2):  # two waves of `parallel` at once: every slot takes another prompt
                await asyncio.gather(*(system.turn(system_prompt(base + 1 + k, evict_words).replace(
                    "Round", f"Wave {wave}", 1), 8) for k in range(args.parallel)))
            # Cold from the first token on: no cache holds a prompt starting "Step".
            cold_prompt = system_prompt(base + 5, args.system_words).replace("Round", "Step", 1) + "Conversation 1.\n" + question(1, 0) + \
                first.text + "\n" + question(1, 1)
            before = await system.cache_report() if isinstance(system, NodeSystem) else None
            row: dict[str, Any] = {}
            for kind in (("return", "cold") if rep % 2 == 0 else ("cold", "return")):
                r = await system.turn(second_prompt if kind == "return" else cold_prompt, args.max_tokens)
                row[kind] = {"ttft": r.ttft, "prompt_tokens": r.prompt, "cached_tokens": r.cached}
                if kind == "return" and before is not None:
                    after = await system.cache_report()
                    row["host_cache_hits"] = after.hits - before.hits
                    row["slot_copies"] = after.slot_copies - before.slot_copies
                    before = after
            row["ratio"] = row["return"]["ttft"] / row["cold"]["ttft"]
            rows.append(row)
            log(f"returning {system.name} #{rep + 1}: return {row['return']['ttft'] * 1000:.0f} ms "
                f"({row['return']['cached_tokens']}/{row['return']['prompt_tokens']} cached"
                + (f", host-cache hits {row['host_cache_hits']}, slot copies {row['slot_copies']}" if 'host_cache_hits' in row else "")
                + f"), cold {row['cold']['ttft'] * 1000:.0f} ms ({row['cold']['cached_tokens']}/{row['cold']['prompt_tokens']}"
                f" cached): {row['ratio']:.3f}")
        detail[system.name] = rows
    out["returning"] = {name: {"return_ttft_p50_s": med([r["return"]["ttft"] for r in rows]),
                               "cold_ttft_p50_s": med([r["cold"]["ttft"] for r in rows]),
                               "ratio_p50": med([r["ratio"] for r in rows]),
                               # the node's rows whose return restored from the host cache (its counters)
                               "ratio_p50_host_cache": med([r["ratio"] for r in rows if r.get("host_cache_hits")]),
                               "rows_host_cache": sum(1 for r in rows if r.get("host_cache_hits")),
                               "prompt_tokens_p50": med([r["return"]["prompt_tokens"] for r in rows]),
                               "return_cached_p50": med([r["return"]["cached_tokens"] for r in rows]),
                               "host_cache_hits": sum(r.get("host_cache_hits", 0) for r in rows),
                               "rows": rows}
                        for name, rows in detail.items()}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = model_path(args.model)
    prefills = [p for p in args.nodes.split(",") if p]
    reuses = [int(x) for x in args.servers.split(",") if x]
    server_bin = find_llama_server(args.llama_server)
    if server_bin is None and (reuses or args.case == "pool"):
        raise SystemExit("llama-server is not built: run tools/build-llama-server (or pass --llama-server PATH)")
    work = make_work("optimanode-bench-multiturn-")
    out: dict[str, Any] = {
        "case": args.case, "machine": machine(), "model": model, "threads": args.threads,
        "conversations": args.conversations, "turns": args.turns, "system_words": args.system_words,
        "max_tokens": args.max_tokens, "gap_s": args.gap, "parallel": args.parallel, "n_ctx": args.n_ctx,
        "n_batch": args.n_batch, "flash_attn": args.flash_attn, "rounds": args.rounds, "llama_server": server_bin, "landed_slack": LANDED_SLACK,
        "stagger_s": args.stagger, "private_words": args.private_words,
        "method": "systems in turn within each round (order reversed every other round), a new system prompt each "
                  "round; medians of rounds, ratios are medians of per-round ratios",
    }
    nodes: list[NodeProc] = []
    servers: list[ServerSystem] = []

    def new_node(prefill: str, tag: str) -> NodeProc:
        n = NodeProc(model, work, tag=tag, sets={
            "model_defaults.n_threads": args.threads, "model_defaults.n_ctx": args.n_ctx,
            "model_defaults.parallel": args.parallel, "model_defaults.n_batch": args.n_batch,
            "model_defaults.prefill": prefill, "model_defaults.flash_attn": args.flash_attn,
            "scan.hash_models": "false"}, step_log=args.step_log)
        nodes.append(n)
        return n

    def new_server(reuse: int, tag: str) -> ServerSystem:
        s = ServerSystem(server_bin, model, args.parallel, args.threads, args.n_ctx, args.n_batch, reuse,
                         work / f"{tag}.log", args.flash_attn)
        servers.append(s)
        return s

    try:
        if args.case == "pool":
            pool_nodes = [new_node(prefills[0], f"pool-node-{i}") for i in range(2)]
            await asyncio.gather(*(n.start() for n in pool_nodes))
            pool = PoolSystem(pool_nodes, prefills[0])
            await pool.watch()
            rr = RoundRobin([new_server(reuses[0], f"llama-server-{i}") for i in range(2)])
            out["llama_server_cmd"] = " ".join(rr.servers[0].cmd)
            await run_rounds([pool, rr], args, out)
        elif args.case == "returning":
            n = new_node(prefills[0], "node-returning")
            await n.start()
            s = new_server(reuses[0], "llama-server") if reuses else None
            if s is not None:
                out["llama_server_cmd"] = " ".join(s.cmd)
            out["repeats"] = args.repeats
            await returning(NodeSystem(n, prefills[0]), s, args, out)
        else:
            node_systems = []
            for p in prefills:
                n = new_node(p, f"node-{p}")
                await n.start()
                node_systems.append(NodeSystem(n, p))
            server_systems = [new_server(r, f"llama-server-reuse{r}") for r in reuses]
            out["llama_server_cmds"] = [" ".join(s.cmd) for s in server_systems]
            await run_rounds([*node_systems, *server_systems], args, out)
    finally:
        for s in servers:
            s.close()
        for n in nodes:
            await n.close()
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def print_table(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"multiturn ({out['case']}): {Path(out['model']).name}, {out['threads']} threads each, "
          f"{out['conversations']} conversations x {out['turns']} turns, system ~{out['system_words']} words, "
          f"{out['max_tokens']} tokens a reply, gap {out['gap_s']} s, parallel {out['parallel']}, n_ctx "
          f"{out['n_ctx']}, {out['rounds']} rounds"
          + (f", starts {out['stagger_s']} s apart" if out.get("stagger_s") else "")
          + (f", ~{out['private_words']} words of each conversation's own" if out.get("private_words") else ""))
    print(f"machine: {m['cpu_model']} ({m['cpus']} CPUs), load {m['loadavg_at_start']} -> {m.get('loadavg_at_end')}")
    if "returning" in out:
        for name, r in out["returning"].items():
            print(f"{name}: a returning conversation (host cache) {r['return_ttft_p50_s'] * 1000:.0f} ms vs a cold "
                  f"prompt of the same length ({r['prompt_tokens_p50']:.0f} tokens) {r['cold_ttft_p50_s'] * 1000:.0f} ms: "
                  f"{r['ratio_p50']:.3f} (p50 of {out['repeats']}; {r['return_cached_p50']:.0f} tokens cached"
                  + (f", host-cache hits {r['host_cache_hits']}; restored from it in {r['rows_host_cache']} of "
                     f"{out['repeats']}: ratio p50 {r['ratio_p50_host_cache']})" if name.startswith("node") else ")"))
        return
    w = max(len(k) for k in out["medians"]) + 1
    print(f"{'system':<{w}} {'TTFT p50 all':>12} {'turn 1':>7} {'later':>7} {'p90':>7} {'tok/s':>7} {'wall s':>7} "
          f"{'cached/prompt':>15} {'landed':>7}   TTFT p50 per turn")
    for name, f in out["medians"].items():
        per_turn = " ".join(f"{x:.2f}" for x in f["ttft_p50_per_turn"])
        print(f"{name:<{w}} {f['ttft_p50_all']:>12.2f} {f['ttft_p50_turn1']:>7.2f} {f['ttft_p50_later']:>7.2f} "
              f"{f.get('ttft_p90_later', float('nan')):>7.2f} {f['tokens_per_s']:>7.1f} {f['wall_s']:>7.1f} {int(f['cached_tokens']):>7}/{int(f['prompt_tokens']):<7} "
              f"{f['landed_share']:>7.0%}   {per_turn}")
        if "imbalanced_samples" in f:
            print(f"{'':<{w}} imbalance (one node > 80 % of its slots, the other idle): {f['imbalanced_samples']} of "
                  f"{f['occupancy_samples']} samples (0.25 s); with requests waiting meanwhile: "
                  f"{f.get('queued_while_other_idle_samples', 0)}")
    for name, f in out["medians"].items():
        if not math.isnan(f.get("ttft_later_model_s", math.nan)):
            print(f"{name}: later-turn TTFT p50 {f['ttft_p50_later']:.2f} s, the closed-loop model "
                  f"(wall x waiting share) {f['ttft_later_model_s']:.2f} s")
        if "generation_floor_s" in f:
            print(f"{name}: {f['decode_share']:.0%} of the wall in llama_decode, {f['prompt_tokens_evaluated']:.0f} prompt "
                  f"tokens evaluated, a generated token in a full step {f['full_step_token_ms']:.1f} ms; "
                  f"generation floor (the replies alone) {f['generation_floor_s']:.1f} s; of its {f['decode_s']:.1f} s "
                  f"in llama_decode: the floor, {f['prompt_marginal_s']:.1f} s the prompt tokens added, "
                  f"{f['partial_steps_s']:.1f} s steps of fewer sequences")
    for pair, g in out["goals"].items():
        print(f"{pair}: " + ", ".join(f"{k} {v['ratio']:.2f} (goal {v['goal']}: {'met' if v['met'] else 'MISSED'})"
                                      for k, v in g.items())
              + f", wall {out['ratios'][pair]['wall_s']:.2f}, turn 1 {out['ratios'][pair]['ttft_p50_turn1']:.2f}")
        if pair in out.get("generation_floors", {}):
            fl = out["generation_floors"][pair]
            print(f"  generation floor / server wall {fl['floor_over_wall']:.2f}; the floor's later-turn TTFT "
                  f"(closed-loop model) / server's measured {fl['floor_ttft_over_later_ttft']:.2f}")


def plot(out: dict[str, Any], path: str) -> None:
    """TTFT p50 per turn number, one line per system (log scale)."""
    import matplotlib  # lazily: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = itertools.cycle(["o-", "s-", "D-", "^:", "v:", "x--"])
    for name, f in out["medians"].items():
        turns = list(range(1, len(f["ttft_p50_per_turn"]) + 1))
        ax.plot(turns, f["ttft_p50_per_turn"], next(styles), label=name)
    ax.set(xlabel="turn", ylabel="TTFT p50 (s, log scale)", yscale="log", xticks=list(range(1, out["turns"] + 1)))
    ax.set_title(f"{Path(out['model']).name}, {out['case']}: {out['conversations']} conversations x {out['turns']} "
                 f"turns, ~{out['system_words']}-word shared system prompt\nmedian of {out['rounds']} rounds", fontsize=9)
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, f"{out['machine']['cpu_model']}, {out['machine']['cpus']} vCPU, {out['threads']} thread(s) "
                         f"per system, load {out['machine']['loadavg_at_start'][0]}-{out['machine']['loadavg_at_end'][0]}",
             fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def add_parser(sub: Any) -> None:
    c = sub.add_parser("multiturn", help="multi-turn conversations: the node vs llama-server (prompt caches)",
                       description="Conversations that come back, on the node and on llama-server, in one run.")
    add_common_options(c)
    c.add_argument("--case", choices=("one-node", "pool", "returning"), default="one-node",
                   help="one-node (default), pool (two nodes behind NodePool vs two llama-servers round-robin), "
                        "returning (a conversation back after its slot was reused vs a cold prompt)")
    c.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, or a GGUF path")
    c.add_argument("--nodes", default="auto",
                   help="one node per entry, the entry its model_defaults.prefill, e.g. "
                        "one_per_step,shortest_first,together (default auto; pool/returning use the first)")
    c.add_argument("--servers", default="0",
                   help="one llama-server per entry, N > 0 passes --cache-reuse N, e.g. 0,256 (default 0; "
                        "pool/returning use the first)")
    c.add_argument("--conversations", type=int, default=8, help="conversations at once (default 8)")
    c.add_argument("--turns", type=int, default=6, help="turns per conversation (default 6)")
    c.add_argument("--system-words", type=int, default=600,
                   help="words of the shared system prompt (default 600: ~800 SmolLM2 tokens)")
    c.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per reply (default 32)")
    c.add_argument("--gap", type=float, default=0.2, help="seconds between a conversation's turns (default 0.2)")
    c.add_argument("--stagger", type=float, default=0.0,
                   help="seconds between conversation starts (default 0: all at once)")
    c.add_argument("--private-words", type=int, default=0,
                   help="words of each conversation's own text after the system prompt (default 0)")
    c.add_argument("--parallel", type=int, default=4, help="slots on each system (default 4)")
    c.add_argument("--n-ctx", type=int, default=8192, help="context shared by the slots on each (default 8192)")
    c.add_argument("--n-batch", type=int, default=512, help="n_batch (llama-server -b/-ub) on each (default 512)")
    c.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                   help="flash attention on every system: the node's model_defaults.flash_attn, llama-server's -fa "
                        "(default auto: both systems' own default)")
    c.add_argument("--step-log", action="store_true",
                   help="the nodes' workers log every decode step (OPTIMANODE_WORKER_STEP_LOG); each node's round "
                        "is broken down and its generation floor (the replies alone) set against llama-server "
                        "(benchkit/steps.py)")
    c.add_argument("--rounds", type=int, default=2, help="rounds, the order alternating (default 2)")
    c.add_argument("--repeats", type=int, default=5, help="returning: return/cold pairs (default 5)")
    c.add_argument("--llama-server", metavar="PATH", help="llama-server binary (default: the build under /tmp/lcp)")
    c.add_argument("--plot", metavar="OUT.png", help="TTFT p50 per turn number, one line per system (matplotlib)")
    c.add_argument("--replot", metavar="IN.json", help="measure nothing: draw --plot from what --json wrote")


def run(args: argparse.Namespace) -> None:
    if args.replot:
        if not args.plot:
            raise SystemExit("--replot IN.json needs --plot OUT.png")
        plot(json.loads(Path(args.replot).read_text()), args.plot)
        return
    if args.quick:
        args.rounds, args.conversations, args.turns, args.system_words, args.repeats = 1, 2, 3, 200, 2
    out = asyncio.run(bench(args))
    report(print_table, out, args.json)
    if args.plot and "medians" in out:
        plot(out, args.plot)
