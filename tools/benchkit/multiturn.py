"""``tools/bench multiturn``: conversations that come back, on the node and on llama-server (issue 16, item 4).

How it works: C conversations run at once, T turns each. Every prompt is a plain completion of
the same text on both systems: a shared system prompt of ~S tokens (different each round, so a
round starts cold), then the conversation's history (its earlier questions and the replies the
system gave), then this turn's question; each reply is ``--max-tokens`` greedy tokens, and a
conversation waits ``--gap`` seconds before its next turn. One node (``NodeProc``: a real node
subprocess over TLS WebSocket, ``parallel`` slots sharing ``n_ctx``) and one llama-server built
from the same llama.cpp sources (tools/build-llama-server; ``-np`` / ``-c`` the same, its
defaults otherwise: ``cache_prompt`` on, its host-memory prompt cache ``--cache-ram`` on;
``--cache-reuse N`` passes that option too) run in turn within each round, the order alternating.
Figures per system (medians over rounds): TTFT p50 over all turns, over turn 1, over later turns;
completion tokens/s over the whole run (all conversations' tokens / wall time) and the wall time;
for the node, the prompt tokens served from cache (``usage.cached_tokens``) out of all prompt
tokens. Not yet here (issue 16): the two-node ``NodePool`` case and the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from optimanode.protocol import CompletionRequest, InferDone, SamplingParams, TokenChunk

from .common import BASE_PROMPTS, add_common_options, free_port, log, machine, make_work, med, \
    model_path, report
from .compare import find_llama_server, start_llama_server
from .nodeproc import NodeProc


def system_prompt(round_no: int, words: int) -> str:
    """~``words`` words of instructions (about as many tokens), different for each round."""
    head = f"Round {round_no}. You are the assistant of a hardware shop; answer briefly.\n"
    body: list[str] = []
    i = 0
    while sum(len(s.split()) for s in body) < words:
        body.append(BASE_PROMPTS[i % len(BASE_PROMPTS)])
        i += 1
    return head + " ".join(body) + "\n"


def question(conv: int, turn: int) -> str:
    return f"User ({conv}.{turn}): {BASE_PROMPTS[(conv * 7 + turn) % len(BASE_PROMPTS)]}\nAssistant:"


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class NodeSystem:
    name = "node"

    def __init__(self, node: NodeProc) -> None:
        self.node = node

    async def turn(self, prompt: str, max_tokens: int) -> tuple[float, str, int, int, int]:
        """(ttft s, reply text, completion tokens, prompt tokens, cached tokens)."""
        req = CompletionRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
        sent = time.perf_counter()
        first = None
        text: list[str] = []
        async for msg in self.node.client.infer(self.node.eid, req):
            if isinstance(msg, TokenChunk):
                if first is None:
                    first = time.perf_counter()
                text.append(msg.text)
            elif isinstance(msg, InferDone):
                u = msg.usage
                return ((first or time.perf_counter()) - sent, "".join(text), u.completion_tokens, u.prompt_tokens,
                        u.cached_tokens)
        raise RuntimeError("the stream ended without a done frame")


class ServerSystem:
    name = "llama-server"

    def __init__(self, binary: str, model: str, parallel: int, threads: int, n_ctx: int, n_batch: int,
                 cache_reuse: int, log_path: Path) -> None:
        self.port = free_port()
        self.cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
                    "-np", str(parallel), "-b", str(n_batch), "-ub", str(n_batch), "--host", "127.0.0.1",
                    "--port", str(self.port)]
        if cache_reuse:
            self.cmd += ["--cache-reuse", str(cache_reuse)]
        self.proc = start_llama_server(self.cmd, self.port, log_path)

    def _turn(self, prompt: str, max_tokens: int) -> tuple[float, str, int, int, int]:
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "stream": True,
                           "cache_prompt": True})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.connect()
        sent = time.perf_counter()
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
                n_prompt = ev.get("tokens_evaluated", 0)
                n_cached = timings.get("cache_n", 0)
                break
        c.close()
        return (first or time.perf_counter()) - sent, "".join(text), n, n_prompt, n_cached

    async def turn(self, prompt: str, max_tokens: int) -> tuple[float, str, int, int, int]:
        return await asyncio.to_thread(self._turn, prompt, max_tokens)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one_round(system: Any, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    sys_text = system_prompt(round_no, args.system_words)
    ttfts: dict[int, list[float]] = {t: [] for t in range(args.turns)}
    totals = {"tokens": 0, "prompt": 0, "cached": 0}

    async def conversation(c: int) -> None:
        history = sys_text + f"Conversation {c}.\n"
        for t in range(args.turns):
            prompt = history + question(c, t)
            ttft, reply, n, n_prompt, n_cached = await system.turn(prompt, args.max_tokens)
            ttfts[t].append(ttft)
            totals["tokens"] += n
            totals["prompt"] += n_prompt
            totals["cached"] += n_cached
            history = prompt + reply + "\n"
            if t + 1 < args.turns:
                await asyncio.sleep(args.gap)

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    wall = time.perf_counter() - t0
    later = [x for t in range(1, args.turns) for x in ttfts[t]]
    return {"ttft_p50_all": p50([x for v in ttfts.values() for x in v]), "ttft_p50_turn1": p50(ttfts[0]),
            "ttft_p50_later": p50(later), "tokens_per_s": totals["tokens"] / wall, "wall_s": wall,
            "prompt_tokens": totals["prompt"], "cached_tokens": totals["cached"]}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = model_path(args.model)
    server_bin = find_llama_server(args.llama_server)
    if server_bin is None:
        raise SystemExit("llama-server is not built: run tools/build-llama-server (or pass --llama-server PATH)")
    work = make_work("optimanode-bench-multiturn-")
    out: dict[str, Any] = {
        "machine": machine(), "model": model, "threads": args.threads, "conversations": args.conversations,
        "turns": args.turns, "system_words": args.system_words, "max_tokens": args.max_tokens, "gap_s": args.gap,
        "parallel": args.parallel, "n_ctx": args.n_ctx, "rounds": args.rounds, "cache_reuse": args.cache_reuse,
        "llama_server": server_bin, "rounds_detail": {},
        "method": "systems in turn within each round (order alternating), a new system prompt each round; "
                  "medians of rounds",
    }
    node = NodeProc(model, work, tag="node-multiturn", sets={
        "model_defaults.n_threads": args.threads, "model_defaults.n_ctx": args.n_ctx,
        "model_defaults.parallel": args.parallel, "model_defaults.n_batch": args.n_batch,
        "scan.hash_models": "false"})
    server = None
    try:
        await node.start()
        server = ServerSystem(server_bin, model, args.parallel, args.threads, args.n_ctx, args.n_batch,
                              args.cache_reuse, work / "llama-server.log")
        out["llama_server_cmd"] = " ".join(server.cmd)
        systems: dict[str, Any] = {"node": NodeSystem(node), "llama-server": server}
        names = list(systems)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                res = await one_round(systems[name], args, r + 1)
                results[name].append(res)
                log(f"round {r + 1} {name}: TTFT p50 {res['ttft_p50_all']:.2f} s (turn 1 {res['ttft_p50_turn1']:.2f}, "
                    f"later {res['ttft_p50_later']:.2f}), {res['tokens_per_s']:.1f} tok/s, {res['wall_s']:.1f} s, "
                    f"cached {res['cached_tokens']}/{res['prompt_tokens']} prompt tokens")
        out["rounds_detail"] = results
        out["medians"] = {k: {f: med([x[f] for x in v]) for f in v[0]} for k, v in results.items()}
        node_m, srv_m = out["medians"]["node"], out["medians"]["llama-server"]
        out["ratios_node_over_llama_server"] = {
            f: node_m[f] / srv_m[f] for f in ("ttft_p50_all", "ttft_p50_turn1", "ttft_p50_later", "tokens_per_s",
                                              "wall_s") if srv_m[f]}
    finally:
        if server is not None:
            server.close()
        await node.close()
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def print_table(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"multiturn: {Path(out['model']).name}, {out['threads']} threads, {out['conversations']} conversations x "
          f"{out['turns']} turns, system ~{out['system_words']} words, {out['max_tokens']} tokens a reply, gap "
          f"{out['gap_s']} s, parallel {out['parallel']}, n_ctx {out['n_ctx']}, {out['rounds']} rounds"
          + (f", llama-server --cache-reuse {out['cache_reuse']}" if out["cache_reuse"] else ""))
    print(f"machine: {m['cpu_model']} ({m['cpus']} CPUs), load {m['loadavg_at_start']} -> {m.get('loadavg_at_end')}")
    print(f"{'system':<13} {'TTFT p50 all':>12} {'turn 1':>8} {'later':>8} {'tok/s':>7} {'wall s':>7} {'cached/prompt':>15}")
    for name, f in out["medians"].items():
        print(f"{name:<13} {f['ttft_p50_all']:>12.2f} {f['ttft_p50_turn1']:>8.2f} {f['ttft_p50_later']:>8.2f} "
              f"{f['tokens_per_s']:>7.1f} {f['wall_s']:>7.1f} {int(f['cached_tokens']):>7}/{int(f['prompt_tokens'])}")
    print("node / llama-server: " + ", ".join(f"{k} {v:.2f}" for k, v in out["ratios_node_over_llama_server"].items()))


def add_parser(sub: Any) -> None:
    c = sub.add_parser("multiturn", help="multi-turn conversations: the node vs llama-server (prompt caches)",
                       description="Conversations that come back, on the node and on llama-server, in one run.")
    add_common_options(c)
    c.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, or a GGUF path")
    c.add_argument("--conversations", type=int, default=8, help="conversations at once (default 8)")
    c.add_argument("--turns", type=int, default=6, help="turns per conversation (default 6)")
    c.add_argument("--system-words", type=int, default=600, help="words of the shared system prompt (~tokens; default 600)")
    c.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per reply (default 32)")
    c.add_argument("--gap", type=float, default=0.2, help="seconds between a conversation's turns (default 0.2)")
    c.add_argument("--parallel", type=int, default=4, help="slots on both (default 4)")
    c.add_argument("--n-ctx", type=int, default=8192, help="context shared by the slots on both (default 8192)")
    c.add_argument("--n-batch", type=int, default=512, help="n_batch (llama-server -b/-ub) on both (default 512)")
    c.add_argument("--rounds", type=int, default=2, help="rounds, the order alternating (default 2)")
    c.add_argument("--cache-reuse", type=int, default=0, help="llama-server --cache-reuse N (default: not passed)")
    c.add_argument("--llama-server", metavar="PATH", help="llama-server binary (default: the build under /tmp/lcp)")


def run(args: argparse.Namespace) -> None:
    if args.quick:
        args.rounds, args.conversations, args.turns, args.system_words = 1, 2, 3, 200
    out = asyncio.run(bench(args))
    report(print_table, out, args.json)
