"""``tools/bench embeddings``: inputs/s of the node's embed requests beside llama-server's ``/embedding``.

How it works: one node (``NodeProc``: a real node subprocess, reached over TLS WebSocket by
``NodeClient.embed``) and one ``llama-server --embedding --pooling mean`` built from the same
llama.cpp sources (tools/build-llama-server), same model, threads and batch size (``-b``/``-ub``
= the worker's ``n_batch``, the per-input limit on both), ``-np`` = the largest batch with one
unified KV cache, so llama-server can put every input of a request in one decode as the worker
does. Per batch size B (1, 8, 32) and round (a warm-up round, then --rounds), the systems run in
turn, the order rotated each round: each sends --inputs inputs as requests of B inputs, one
request after another (``request`` mode: one ``EmbedRequest`` of B inputs; one ``/embedding`` POST
with ``content`` a list of B strings), or with ``--mode concurrent`` as B requests of one input
each, sent at once (the node's cross-request batching; llama-server's slots). Inputs are
sentences of ~30 tokens (``--short``: ~5), numbered per round and input, so no cache helps. Figures: inputs/s per
system and B (median of rounds), the per-round ratio node / llama-server (median), and the
cosine between the two systems' vectors for the same inputs (both normalized; a check that they
computed the same thing).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .common import (BASE_PROMPTS, add_common_options, free_port, log, machine, make_work, med,
                     model_path, report)
from .compare import find_llama_server, start_llama_server
from .nodeproc import NodeProc


def inputs_for(round_no: int, n: int, offset: int = 0, short: bool = False) -> list[str]:
    """n distinct sentences of ~30 tokens for this round (``short``: a number and a word, ~5 tokens)."""
    k = len(BASE_PROMPTS)
    if short:
        return [f"{round_no * 10000 + offset + i + 1} {BASE_PROMPTS[i % k].split()[1]}" for i in range(n)]
    return [f"{round_no * 10000 + offset + i + 1}. {BASE_PROMPTS[i % k]} {BASE_PROMPTS[(i + 5) % k]}"
            for i in range(n)]


class NodeEmbed:
    name = "node"

    def __init__(self, node: NodeProc) -> None:
        self.node = node

    async def embed(self, texts: list[str]) -> list[list[float]]:
        vectors, _ = await self.node.client.embed(self.node.eid, texts)
        return vectors

    async def run(self, texts: list[str], batch: int, concurrent: bool) -> list[list[float]]:
        if concurrent:
            out: list[list[float]] = []
            for i in range(0, len(texts), batch):
                parts = await asyncio.gather(*(self.embed([t]) for t in texts[i:i + batch]))
                out += [p[0] for p in parts]
            return out
        return [v for i in range(0, len(texts), batch) for v in await self.embed(texts[i:i + batch])]


class ServerEmbed:
    name = "llama-server"

    def __init__(self, binary: str, model: str, threads: int, n_batch: int, slots: int, log_path: Path) -> None:
        self.port = free_port()
        # -kvu: one KV cache all slots share (the worker's embedding context has one too); -c: room
        # for every slot's input at once; -cram 0: no host-memory prompt cache.
        self.cmd = [binary, "-m", model, "--embedding", "--pooling", "mean", "-t", str(threads), "-tb", str(threads),
                    "-b", str(n_batch), "-ub", str(n_batch), "-np", str(slots), "-kvu", "-c", str(n_batch * 4),
                    "-cram", "0", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = start_llama_server(self.cmd, self.port, log_path)
        self.pid = self.proc.pid

    def _post(self, texts: list[str]) -> list[list[float]]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("POST", "/embedding", body=json.dumps({"content": texts}),
                  headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        body = resp.read()
        c.close()
        if resp.status != 200:
            raise RuntimeError(f"llama-server /embedding: {resp.status} {body[:300]!r}")
        items = sorted(json.loads(body), key=lambda x: x["index"])
        return [item["embedding"][0] for item in items]  # pooled: one row per input

    def _run(self, texts: list[str], batch: int, concurrent: bool) -> list[list[float]]:
        if not concurrent:
            return [v for i in range(0, len(texts), batch) for v in self._post(texts[i:i + batch])]
        out: list[Any] = [None] * len(texts)

        def one(i: int) -> None:
            out[i] = self._post([texts[i]])[0]

        for s in range(0, len(texts), batch):
            threads = [threading.Thread(target=one, args=(i,)) for i in range(s, min(s + batch, len(texts)))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return out

    async def run(self, texts: list[str], batch: int, concurrent: bool) -> list[list[float]]:
        return await asyncio.to_thread(self._run, texts, batch, concurrent)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = model_path(args.model)
    batches = [int(x) for x in args.batches.split(",")]
    server_bin = find_llama_server(args.llama_server)
    if server_bin is None:
        raise SystemExit("llama-server is not built: run tools/build-llama-server (or pass --llama-server PATH)")
    work = make_work("optimanode-bench-embed-")
    out: dict[str, Any] = {
        "machine": machine(), "model": model, "threads": args.threads, "n_batch": args.n_batch,
        "inputs_per_measurement": args.inputs, "rounds": args.rounds, "mode": args.mode, "short": args.short,
        "llama_server": server_bin, "batches": {},
        "method": "systems in turn within each round (order rotated), after a warm-up round; medians of rounds",
    }
    node = NodeProc(model, work, tag="node-embed", sets={
        "model_defaults.n_threads": args.threads, "model_defaults.n_ctx": args.n_batch * 2,
        "model_defaults.n_batch": args.n_batch, "scan.hash_models": "false",
        # Concurrent one-input requests reach the worker together only as far as `parallel` admits them.
        "model_defaults.parallel": max(batches) if args.mode == "concurrent" else 1})
    server = None
    try:
        await node.start()
        server = ServerEmbed(server_bin, model, args.threads, args.n_batch, max(batches), work / "llama-server.log")
        out["llama_server_cmd"] = " ".join(server.cmd)
        systems: dict[str, Any] = {"node": NodeEmbed(node), "llama-server": server}
        names = list(systems)
        concurrent = args.mode == "concurrent"
        for b in batches:
            log(f"--- batch {b}")
            rates: dict[str, list[float]] = {k: [] for k in names}
            ratios: list[float] = []
            cosines: list[float] = []
            for r in range(args.rounds + 1):
                texts = inputs_for(r, args.inputs if r else min(args.inputs, 2 * b), offset=1000 * b, short=args.short)
                order = names[r % len(names):] + names[:r % len(names)]
                got: dict[str, list[list[float]]] = {}
                round_rate: dict[str, float] = {}
                for name in order:
                    t = time.perf_counter()
                    got[name] = await systems[name].run(texts, b, concurrent)
                    round_rate[name] = len(texts) / (time.perf_counter() - t)
                if not r:
                    continue  # the warm-up round
                for name in names:
                    rates[name].append(round_rate[name])
                ratios.append(round_rate["node"] / round_rate["llama-server"])
                cosines += [cosine(a, c) for a, c in zip(got["node"], got["llama-server"])]
                log(f"    round {r}: " + ", ".join(f"{k} {v:.1f} inputs/s" for k, v in round_rate.items()))
            out["batches"][str(b)] = {
                "inputs_per_s": {k: med(v) for k, v in rates.items()},
                "inputs_per_s_rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                "ratio_node_over_llama_server": med(ratios),
                "ratio_rounds": [round(x, 3) for x in ratios],
                "cosine_node_vs_llama_server_min": min(cosines) if cosines else None,
                "cosine_node_vs_llama_server_mean": statistics.mean(cosines) if cosines else None,
            }
    finally:
        if server is not None:
            server.close()
        await node.close()
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def print_table(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"embeddings: {Path(out['model']).name}, {out['threads']} threads, n_batch {out['n_batch']}, "
          f"{out['inputs_per_measurement']} {'short ' if out['short'] else ''}inputs per measurement, "
          f"{out['rounds']} rounds, mode {out['mode']}")
    print(f"machine: {m['cpu_model']} ({m['cpus']} CPUs), load {m['loadavg_at_start']} -> {m.get('loadavg_at_end')}")
    print(f"{'batch':>5}  {'node inputs/s':>14}  {'llama-server':>13}  {'node/server':>11}  {'cosine min':>10}")
    for b, f in out["batches"].items():
        ips = f["inputs_per_s"]
        print(f"{b:>5}  {ips['node']:>14.1f}  {ips['llama-server']:>13.1f}  {f['ratio_node_over_llama_server']:>11.2f}  "
              f"{f['cosine_node_vs_llama_server_min']:>10.5f}")


def add_parser(sub: Any) -> None:
    c = sub.add_parser("embeddings", help="embed inputs/s: the node vs llama-server's /embedding",
                       description="Embedding throughput of the node beside llama-server's /embedding, in one run.")
    add_common_options(c)
    c.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, or a GGUF path")
    c.add_argument("--batches", default="1,8,32", help="inputs per request (default 1,8,32)")
    c.add_argument("--inputs", type=int, default=64, help="inputs per measurement (default 64)")
    c.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up round (default 3)")
    c.add_argument("--n-batch", type=int, default=512, help="n_batch (and llama-server -ub) for both (default 512)")
    c.add_argument("--mode", choices=("request", "concurrent"), default="request",
                   help="request: one request of B inputs at a time; concurrent: B one-input requests at once")
    c.add_argument("--short", action="store_true", help="inputs of ~5 tokens instead of ~30 (where batching pays most)")
    c.add_argument("--llama-server", metavar="PATH", help="llama-server binary (default: the build under /tmp/lcp)")


def run(args: argparse.Namespace) -> None:
    if args.quick:
        args.rounds = 1
        args.inputs = min(args.inputs, 32)
    out = asyncio.run(bench(args))
    report(print_table, out, args.json)
