"""``tools/bench [compare]``: the node beside direct llama-cpp-python and llama-server, in one run.

How it works: one ``Direct`` process (llama-cpp-python's ``Llama`` in a child of its own, driven
over JSON lines by ``tools/bench _direct``: ``direct_main``) serves every level; per concurrency
level N a fresh node (``NodeProc``, ``model_defaults.parallel=N``) and, when built, a
``llama-server -np N -cb`` are started. After the node's idle CPU is sampled, each round (a
warm-up round first, then --rounds) runs the systems in turn, the order rotated each round, with
prompts unique to the round (no prefix cache helps). ``pooled`` turns a system's measured rounds
into TTFT/TPOT/ITL/tokens-per-second figures, the node's CPU (its own pid, not the worker's) and
peak RSS are read around its runs, ``ratios`` takes medians of per-round ratios, and
``compare_targets`` judges the targets of issue #4. ``print_compare`` is the table.

``--baseline-tree DIR`` adds a second node, ``node@base``, run from another checkout (e.g.
``git worktree add /tmp/base <commit>``) in the same rounds, so a change to the node is judged by
per-round ratios in one run (``node/node@base``: tokens/s and the node process's CPU per token)
rather than by figures from two runs on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .common import (LAUNCHER, Stream, add_common_options, cpu_s, die_with_parent, free_port, log, machine,
                     make_work, med, mib, model_path, peak_rss, pct, print_targets, prompts_for, report,
                     round_figures, target)
from .nodeproc import NodeProc
from .plot import plot

LCP_VERSION = "0.3.36"  # the llama-cpp-python pin in pyproject.toml (and tools/build-llama-server)
DEFAULT_LLAMA_SERVER = Path(f"/tmp/lcp/llama_cpp_python-{LCP_VERSION}/vendor/llama.cpp/build/bin/llama-server")
BUILD_LLAMA_SERVER = f"""\
(c) llama-server skipped: not built (looked for --llama-server PATH and {DEFAULT_LLAMA_SERVER}).
Build the llama.cpp vendored by llama-cpp-python {LCP_VERSION} (the kernels the worker runs; about
10 minutes on 2 cores, needs cmake, a C++ compiler and PyPI), then run this again:

    tools/build-llama-server            # builds into /tmp/lcp, prints the binary's path last

or pass --llama-server PATH to a llama-server built from that same sdist. Nothing built goes
into the repository."""


def pooled(rounds: list[list[Stream]]) -> dict[str, Any]:
    """Figures over every measured round of one system at one level."""
    per_round = [round_figures(r) for r in rounds]
    streams = [s for r in rounds for s in r]
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    tpots = [s.tpot for s in streams if s.tpot is not None]
    gaps = [g for s in streams for g in s.gaps()]
    per_stream = [s.tokens / (s.stamps[-1] - s.sent) for s in streams if s.stamps and s.stamps[-1] > s.sent]
    out: dict[str, Any] = {
        "requests": len(streams), "tokens": sum(s.tokens for s in streams),
        # every request: (TTFT s, TPOT s, completion tokens), for auditing the summary figures
        "per_request": [[round(s.ttft or 0, 5), round(s.tpot or 0, 5), s.tokens] for s in streams],
        "total_tok_s": med([r["total_tok_s"] for r in per_round]),
        "total_tok_s_rounds": [round(r["total_tok_s"], 2) for r in per_round],
        "stream_tok_s": statistics.mean(per_stream) if per_stream else None,
        "decode_tok_s": 1 / statistics.mean(tpots) if tpots else None,
        "ttft_mean_s": statistics.mean(ttfts) if ttfts else None, "ttft_p50_s": pct(ttfts, 0.5),
        "tpot_mean_s": statistics.mean(tpots) if tpots else None,
        "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99),
    }
    wt = [s.worker_ttft for s in streams if s.worker_ttft is not None]
    if wt:
        over = [s.ttft - s.worker_ttft for s in streams if s.worker_ttft is not None and s.ttft is not None]
        out["worker_ttft_p50_s"] = pct(wt, 0.5)
        # What the node adds to the first token: client-observed TTFT minus the worker's own.
        out["node_ttft_overhead_p50_s"] = pct(over, 0.5)
    return out


# ---------------------------------------------------------------------------------------------
# (a) llama-cpp-python directly, in a subprocess: `tools/bench _direct` speaks JSON lines


def direct_main(argv: list[str]) -> int:
    model, threads, ctx, n_batch = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=n_batch, verbose=False)
    print(json.dumps({"ready": time.perf_counter() - t, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        sent = time.perf_counter()  # concurrent requests arrive together and are served in turn
        out = []
        for prompt in job["prompts"]:
            if job.get("sequential"):
                sent = time.perf_counter()  # one after another: each is sent when the previous ended
            llm.reset()  # no prefix reuse from the previous request
            stamps: list[float] = []
            for chunk in llm.create_completion(prompt, max_tokens=job["max_tokens"], temperature=0.0, stream=True):
                if chunk["choices"][0]["finish_reason"] is None:  # the last chunk only says why it ended
                    stamps.append(time.perf_counter())
            out.append({"sent": sent, "stamps": stamps, "tokens": len(stamps)})
        print(json.dumps({"streams": out}), flush=True)
    return 0



def start_llama_server(cmd: list[str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start llama-server (it dies with this process) and wait, bounded, until /health answers 200."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"), preexec_fn=die_with_parent)
    deadline = time.monotonic() + 300
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llama-server did not start: {' '.join(cmd)} (log: {log_path})")
        time.sleep(0.2)

class Direct:
    name = "direct"

    def __init__(self, model: str, threads: int, ctx: int, n_batch: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(LAUNCHER), "_direct", model, str(threads), str(ctx), str(n_batch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     preexec_fn=die_with_parent)
        ready = json.loads(self.proc.stdout.readline() or "{}")  # type: ignore[union-attr]
        if "ready" not in ready:
            raise RuntimeError("the direct llama-cpp-python process did not start")
        self.pid = self.proc.pid
        self.load_s = ready["ready"]

    def _run(self, prompts: list[str], max_tokens: int, sequential: bool) -> list[Stream]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens,  # type: ignore[union-attr]
                                          "sequential": sequential}) + "\n")
        self.proc.stdin.flush()  # type: ignore[union-attr]
        res = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        return [Stream(sent=s["sent"], stamps=s["stamps"], tokens=s["tokens"]) for s in res["streams"]]

    async def run(self, prompts: list[str], max_tokens: int, sequential: bool = False) -> list[Stream]:
        """Sequential: each request sent when the previous one ended. Otherwise they all arrive at
        once and one Llama serves them in turn (their TTFT includes the wait)."""
        return await asyncio.to_thread(self._run, prompts, max_tokens, sequential)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# (c) llama-server over HTTP


class LlamaServer:
    name = "llama-server"

    def __init__(self, binary: str, model: str, parallel: int, threads: int, ctx_per_slot: int, n_batch: int,
                 log_path: Path) -> None:
        self.port = free_port()
        # -np N sets N slots (the KV cache split per slot, as the worker does); -cram 0: no host-memory
        # prompt cache (no prompt repeats here, and it would only add to its RSS).
        self.cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(ctx_per_slot * parallel),
                    "-np", str(parallel), "-cb", "-b", str(n_batch), "-ub", str(n_batch), "-cram", "0",
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = start_llama_server(self.cmd, self.port, log_path)
        self.pid = self.proc.pid

    def _one(self, prompt: str, max_tokens: int, start: threading.Barrier, out: list[Any], i: int) -> None:
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "stream": True,
                           "cache_prompt": False})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.connect()
        start.wait()
        sent = time.perf_counter()
        c.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        stamps: list[float] = []
        n = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            ev = json.loads(line[6:])
            if ev.get("content"):
                stamps.append(now)
            if ev.get("stop"):
                n = ev.get("tokens_predicted", len(stamps))
                break
        c.close()
        out[i] = Stream(sent=sent, stamps=stamps, tokens=n)

    def _run(self, prompts: list[str], max_tokens: int, sequential: bool = False) -> list[Stream]:
        out: list[Any] = [None] * len(prompts)
        if sequential:
            for i, p in enumerate(prompts):
                self._one(p, max_tokens, threading.Barrier(1), out, i)
            return out
        start = threading.Barrier(len(prompts))
        threads = [threading.Thread(target=self._one, args=(p, max_tokens, start, out, i))
                   for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    async def run(self, prompts: list[str], max_tokens: int, sequential: bool = False) -> list[Stream]:
        return await asyncio.to_thread(self._run, prompts, max_tokens, sequential)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def find_llama_server(arg: str | None) -> str | None:
    if arg:
        if not os.access(arg, os.X_OK):
            raise SystemExit(f"--llama-server: {arg} is not an executable")
        return arg
    return str(DEFAULT_LLAMA_SERVER) if os.access(DEFAULT_LLAMA_SERVER, os.X_OK) else None


# ---------------------------------------------------------------------------------------------
# compare


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    model = model_path(args.model)
    levels = [int(x) for x in args.concurrency.split(",")]
    server_bin = None if args.no_llama_server else find_llama_server(args.llama_server)
    skipped = None
    if server_bin is None and not args.no_llama_server:
        skipped = BUILD_LLAMA_SERVER
        log(skipped)
    out: dict[str, Any] = {
        "machine": machine(), "model": model, "threads": args.threads, "tokens": args.tokens,
        "ctx_per_slot": args.ctx_per_slot, "n_batch": args.n_batch, "rounds": args.rounds,
        "single_stream_requests_per_round": args.single, "levels": {}, "llama_server": server_bin,
        "llama_server_skipped": skipped,
        "method": "systems in turn within each round (order rotated), after a warm-up round; medians of rounds",
    }
    work = make_work("optimanode-bench-")
    direct = Direct(model, args.threads, args.ctx_per_slot, args.n_batch)
    log(f"(a) direct llama-cpp-python loaded in {direct.load_s:.2f} s (pid {direct.pid})")
    try:
        for n in levels:
            out["levels"][str(n)] = await compare_level(args, model, n, direct, server_bin, work)
        out["direct_peak_rss_mib"] = mib(peak_rss(direct.pid))
    finally:
        direct.close()
    out["ratios"] = ratios(out)
    out["targets"] = compare_targets(out)
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def compare_level(args: argparse.Namespace, model: str, n: int, direct: Direct, server_bin: str | None,
                        work: Path) -> dict[str, Any]:
    log(f"--- concurrency {n}: starting a node with parallel={n}"
        + (f" and llama-server -np {n}" if server_bin else ""))
    node = NodeProc(model, work, tag=f"node-c{n}", sets={
        "model_defaults.n_threads": args.threads, "model_defaults.n_ctx": args.ctx_per_slot * n,
        "model_defaults.n_batch": args.n_batch, "model_defaults.parallel": n, "scan.hash_models": "false"})
    server = None
    try:
        await node.start()
        wpid = await node.worker_pid()
        # The node's CPU figure is psutil's cpu_times() of the node pid: its own threads (event loop,
        # aiosqlite, TLS), never its children's. Check the worker really is a separate child process.
        children = {p.pid for p in psutil.Process(node.pid).children(recursive=True)}
        if wpid is None or wpid == node.pid or wpid not in children:
            raise RuntimeError(f"worker pid {wpid} is not a child process of the node (pid {node.pid})")
        if server_bin:
            server = LlamaServer(server_bin, model, n, args.threads, args.ctx_per_slot, args.n_batch,
                                 work / f"llama-server-c{n}.log")
        # Node idle CPU (reconciler tick, heartbeats): the floor under the streaming figure.
        c0, t0 = cpu_s(node.pid), time.perf_counter()
        await asyncio.sleep(args.idle_s)
        idle_pct = (cpu_s(node.pid) - c0) / (time.perf_counter() - t0) * 100
        systems: dict[str, Any] = {"direct": direct, "node": node}
        if server:
            systems["llama-server"] = server
        results: dict[str, list[list[Stream]]] = {k: [] for k in systems}
        base = None
        if args.baseline_tree:
            base = NodeProc(model, work, tag=f"base-c{n}", root=Path(args.baseline_tree), sets={
                "model_defaults.n_threads": args.threads, "model_defaults.n_ctx": args.ctx_per_slot * n,
                "model_defaults.n_batch": args.n_batch, "model_defaults.parallel": n, "scan.hash_models": "false"})
            await base.start()
            systems["node@base"] = base
            results["node@base"] = []
        # Per node system: CPU seconds of the node pid and tokens, per measured round.
        cpu_rounds: dict[str, list[tuple[float, int]]] = {k: [] for k in systems if k.startswith("node")}
        node_cpu, node_wall, worker_cpu, client_cpu = 0.0, 0.0, 0.0, 0.0
        me = psutil.Process()
        names = list(systems)
        count = args.single if n == 1 else n
        for r in range(args.rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                sysm = systems[name]
                prompts = prompts_for(r, count, offset=100 * n)
                max_tokens = args.tokens if r else min(8, args.tokens)  # round 0: warm-up
                sequential = n == 1
                nc0, wc0, cc0 = cpu_s(sysm.pid), cpu_s(wpid) if wpid else 0.0, sum(me.cpu_times()[:2])
                t = time.perf_counter()
                streams = await sysm.run(prompts, max_tokens, sequential=sequential)
                wall = time.perf_counter() - t
                if name in cpu_rounds and r:
                    cpu_rounds[name].append((cpu_s(sysm.pid) - nc0, sum(s.tokens for s in streams)))
                if name == "node" and r:
                    node_cpu += cpu_s(node.pid) - nc0
                    worker_cpu += (cpu_s(wpid) - wc0) if wpid else 0.0
                    client_cpu += sum(me.cpu_times()[:2]) - cc0
                    node_wall += wall
                fig = round_figures(streams)
                log(f"c={n} round {r} {name:<13} {fig['total_tok_s']:7.1f} tok/s total, "
                    f"ttft {statistics.mean(s.ttft for s in streams if s.ttft) * 1000:7.1f} ms, "
                    f"{fig['tokens']} tokens" + ("" if r else " (warm-up)"))
                if r:
                    results[name].append(streams)
        level: dict[str, Any] = {name: pooled(rs) for name, rs in results.items()}
        node_tok_s = sum(s.tokens for r in results["node"] for s in r) / node_wall
        level["node"].update({
            "node_cpu_s": round(node_cpu, 3), "node_cpu_pct_of_core": node_cpu / node_wall * 100,
            "node_cpu_pct_per_100_tok_s": (node_cpu / node_wall * 100) / (node_tok_s / 100),
            "node_idle_cpu_pct": idle_pct, "worker_cpu_pct_of_core": worker_cpu / node_wall * 100,
            "client_cpu_pct_of_core": client_cpu / node_wall * 100,
            "node_peak_rss_mib": mib(peak_rss(node.pid)), "worker_peak_rss_mib": mib(peak_rss(wpid)),
            "node_pid": node.pid, "worker_pid": wpid,
            "cpu_scope": "node: user+system CPU of the node process alone (psutil cpu_times of its pid, children "
                         "excluded); worker: the same for the worker pid; peak RSS = VmHWM of each pid",
        })
        for name, rounds_ in cpu_rounds.items():
            level[name]["node_cpu_ms_per_token_rounds"] = [round(c / t * 1000, 4) if t else None for c, t in rounds_]
        if server:
            level["llama-server"]["peak_rss_mib"] = mib(peak_rss(server.pid))
        return level
    finally:
        if base:
            await base.close()
        if server:
            server.close()
        rc = await node.close()
        if rc not in (0, None):
            log(f"the node exited with {rc}:\n{node.tail()}")


def ratios(out: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for n, level in out["levels"].items():
        b = level["node"]
        for other, key in (("direct", "node/direct"), ("llama-server", "node/llama-server")):
            o = level.get(other)
            if not o:
                continue
            per_round = [x / y for x, y in zip(b["total_tok_s_rounds"], o["total_tok_s_rounds"]) if y]
            res[f"{key}@{n}"] = {
                "total_tok_s": med(per_round),
                "ttft_p50": b["ttft_p50_s"] / o["ttft_p50_s"] if o["ttft_p50_s"] else None,
                "ttft_p50_diff_ms": (b["ttft_p50_s"] - o["ttft_p50_s"]) * 1000,
                "itl_p50": b["itl_p50_s"] / o["itl_p50_s"] if o["itl_p50_s"] else None,
                "itl_p99": b["itl_p99_s"] / o["itl_p99_s"] if o["itl_p99_s"] else None,
                "decode_tok_s": b["decode_tok_s"] / o["decode_tok_s"] if o["decode_tok_s"] else None,
            }
        o = level.get("node@base")
        if o:
            per_round = [x / y for x, y in zip(b["total_tok_s_rounds"], o["total_tok_s_rounds"]) if y]
            cpu = [x / y for x, y in zip(b["node_cpu_ms_per_token_rounds"], o["node_cpu_ms_per_token_rounds"])
                   if x is not None and y]
            res[f"node/node@base@{n}"] = {
                "total_tok_s": med(per_round),
                "ttft_p50": b["ttft_p50_s"] / o["ttft_p50_s"] if o["ttft_p50_s"] else None,
                "ttft_p50_diff_ms": (b["ttft_p50_s"] - o["ttft_p50_s"]) * 1000,
                "itl_p50": b["itl_p50_s"] / o["itl_p50_s"] if o["itl_p50_s"] else None,
                "itl_p99": b["itl_p99_s"] / o["itl_p99_s"] if o["itl_p99_s"] else None,
                "decode_tok_s": b["decode_tok_s"] / o["decode_tok_s"] if o["decode_tok_s"] else None,
                # the node process's own CPU per streamed token, median of per-round ratios
                "node_cpu_per_token": med(cpu) if cpu else None,
                "node_cpu_per_token_rounds": [round(x, 3) for x in cpu],
            }
    return res


def compare_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    r, levels = out["ratios"], out["levels"]
    d1 = r.get("node/direct@1")
    s1 = r.get("node/llama-server@1")
    no_server = "llama-server not run: " + ("--no-llama-server" if out["llama_server"] is None and
                                            not out["llama_server_skipped"] else "not built (tools/build-llama-server)")
    lv1 = levels.get("1", {}).get("node")
    lv8 = levels.get("8", {}).get("node")
    return [
        target("one stream through the node: tokens/s >= 97% of (a) direct",
               d1["total_tok_s"] * 100 if d1 else None, 97, "%", higher_is_better=True,
               note="" if d1 else "needs concurrency level 1"),
        target("one stream through the node: tokens/s >= 95% of (c) llama-server",
               s1["total_tok_s"] * 100 if s1 else None, 95, "%", higher_is_better=True,
               note="" if s1 else (no_server if "1" in levels else "needs concurrency level 1")),
        target("node overhead on TTFT < 5 ms over (a): TTFT p50 (b) - (a), one stream",
               d1["ttft_p50_diff_ms"] if d1 else None, 5, "ms", note="" if d1 else "needs concurrency level 1"),
        target("  the same from inside the node: client TTFT - the worker's own TTFT, p50",
               lv1["node_ttft_overhead_p50_s"] * 1000 if lv1 and lv1.get("node_ttft_overhead_p50_s") is not None
               else None, 5, "ms", note="" if lv1 else "needs concurrency level 1"),
        target("node process CPU at 8 streams < 5% of one core per 100 tokens/s",
               lv8["node_cpu_pct_per_100_tok_s"] if lv8 else None, 5, "% of a core",
               note="" if lv8 else "needs concurrency level 8 (--concurrency 1,4,8; --quick runs 1,4)"),
    ]


def print_compare(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"\nmodel {Path(out['model']).name}; {out['threads']} threads; {out['tokens']} greedy tokens/request; "
          f"context {out['ctx_per_slot']}/slot; n_batch {out['n_batch']}; {out['rounds']} rounds (+1 warm-up)")
    print(f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB, Python {m['python']}, "
          f"llama-cpp-python {m['llama_cpp_python']}; load average {m['loadavg_at_start']} → {m.get('loadavg_at_end')}")
    if out["llama_server_skipped"]:
        print(out["llama_server_skipped"])
    elif out["llama_server"] is None:
        print("(c) llama-server: skipped (--no-llama-server)")
    else:
        print(f"(c) llama-server: {out['llama_server']}")
    hdr = (f"{'c':>2} {'system':<13} {'tok/s total':>11} {'tok/s/stream':>12} {'TTFT p50':>9} {'TPOT':>8} "
           f"{'ITL p50':>8} {'ITL p99':>8} {'peak RSS':>9}")
    print(hdr)
    for n, level in out["levels"].items():
        for name, f in level.items():
            rss_ = f.get("peak_rss_mib") or f.get("worker_peak_rss_mib")
            rss_ = out.get("direct_peak_rss_mib") if name == "direct" else rss_
            print(f"{n:>2} {name:<13} {f['total_tok_s']:>11.1f} {f['stream_tok_s'] or 0:>12.1f} "
                  f"{(f['ttft_p50_s'] or 0) * 1000:>7.1f}ms {(f['tpot_mean_s'] or 0) * 1000:>6.1f}ms "
                  f"{(f['itl_p50_s'] or 0) * 1000:>6.1f}ms {(f['itl_p99_s'] or 0) * 1000:>6.1f}ms "
                  f"{rss_ if rss_ is not None else '':>7}{'MiB' if rss_ is not None else ''}")
        nd = level["node"]
        ticks = round(nd["node_cpu_s"] * 100)
        coarse = (f" [only {ticks} clock ticks of node CPU: ±1 tick = 10 ms, so the per-100-tok/s figure is "
                  f"coarse; run more tokens/rounds]" if ticks < 100 else "")
        print(f"   node process: CPU {nd['node_cpu_pct_of_core']:.2f}% of a core while streaming "
              f"({nd['node_cpu_pct_per_100_tok_s']:.2f}% per 100 tok/s; idle {nd['node_idle_cpu_pct']:.2f}%), "
              f"peak RSS {nd['node_peak_rss_mib']} MiB; worker peak RSS {nd['worker_peak_rss_mib']} MiB, "
              f"CPU {nd['worker_cpu_pct_of_core']:.0f}%; bench client CPU {nd['client_cpu_pct_of_core']:.1f}%; "
              f"TTFT added by the node (p50) {(nd.get('node_ttft_overhead_p50_s') or 0) * 1000:.1f} ms{coarse}")
    print("\nratios (median of per-round ratios for tok/s)")
    for k, v in out["ratios"].items():
        print(f"  {k:<22} tok/s x{v['total_tok_s']:.3f}   TTFT p50 x{v['ttft_p50'] or 0:.3f} "
              f"({v['ttft_p50_diff_ms']:+.1f} ms)   ITL p50 x{v['itl_p50'] or 0:.3f}   ITL p99 x{v['itl_p99'] or 0:.3f}"
              + (f"   node CPU/token x{v['node_cpu_per_token']:.3f} (rounds {v['node_cpu_per_token_rounds']})"
                 if v.get("node_cpu_per_token") is not None else ""))
    print_targets(out["targets"])


def add_parser(sub: Any) -> None:
    c = sub.add_parser("compare", help="node vs direct llama-cpp-python vs llama-server (the default)",
                       description="Node vs direct llama-cpp-python vs llama-server, side by side in one run.")
    add_common_options(c)
    c.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, or a GGUF path")
    c.add_argument("--tokens", type=int, default=128, help="completion tokens per request (default 128)")
    c.add_argument("--concurrency", default="1,4,8", help="levels; node parallel and llama-server -np = level (default 1,4,8)")
    c.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up round (default 3)")
    c.add_argument("--single", type=int, default=3, help="requests per round at concurrency 1, one after another (default 3)")
    c.add_argument("--ctx-per-slot", type=int, default=512, help="context per slot; n_ctx = this x level (default 512)")
    c.add_argument("--n-batch", type=int, default=512, help="n_batch for every system (default 512)")
    c.add_argument("--llama-server", metavar="PATH", help=f"llama-server binary (default {DEFAULT_LLAMA_SERVER} if built)")
    c.add_argument("--no-llama-server", action="store_true", help="skip (c)")
    c.add_argument("--baseline-tree", metavar="DIR", help="also run a node from this checkout (e.g. a git worktree of "
                   "an older commit) in the same rounds: ratios node/node@base for tokens/s and node CPU per token")
    c.add_argument("--idle-s", type=float, default=2.0, help="seconds of idle node CPU measured per level (default 2)")
    c.add_argument("--plot", metavar="OUT.png", help="plot tokens/s and TTFT against concurrency (needs matplotlib)")


def run(args: argparse.Namespace) -> None:
    if args.quick:
        args.tokens = min(args.tokens, 32)
        args.rounds = 1
        args.single = 1
        if args.concurrency == "1,4,8":
            args.concurrency = "1,4"
        args.idle_s = 1.0
    out = asyncio.run(compare(args))
    report(print_compare, out, args.json)
    if args.plot:
        plot(out, args.plot)
