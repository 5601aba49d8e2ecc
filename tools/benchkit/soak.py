"""``tools/bench soak``: --requests distinct prompts through one node; RSS and tokens/s over time.

How it works: one node (``NodeProc``, parallel = --concurrency) and --concurrency tasks taking
request numbers from one queue, each prompt made distinct by its number. Every --every finished
requests the window's tokens/s and the RSS of the node and of the current worker are sampled
(the window is booked before any await, so concurrent finishers cannot split it); --max-seconds
stops sending. ``growth`` compares the first sample with the last: steady means within 5% or
8 MiB; more is a leak to find. ``print_soak`` is the table. Long: not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from .common import BASE_PROMPTS, add_common_options, log, machine, make_work, mib, model_path, peak_rss, report, rss
from .nodeproc import NodeProc


def growth(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """RSS change from the first window's sample (warm: model loaded, buffers grown) to the last."""
    xs = [(s["requests"], s[key]) for s in samples if s["requests"] and s[key] is not None]
    if len(xs) < 2:
        return {"from_mib": None, "to_mib": None, "mib": None, "mib_per_1000_requests": None, "steady": None}
    (r0, a), (r1, b) = xs[0], xs[-1]
    # Steady: within 5% or 8 MiB (allocator noise, caches that fill once). More is a leak to find, not a figure.
    return {"from_mib": a, "to_mib": b, "mib": round(b - a, 1),
            "mib_per_1000_requests": round((b - a) / (r1 - r0) * 1000, 2) if r1 > r0 else None,
            "steady": b - a <= max(8.0, 0.05 * a)}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    model = model_path(args.model)
    work = make_work("optimanode-soak-")
    requests = 100 if args.quick else args.requests
    tokens = 16 if args.quick else args.tokens
    every = args.every or min(100, max(1, requests // 4))
    node = NodeProc(model, work, tag="soak", sets={
        "model_defaults.n_threads": args.threads, "model_defaults.n_ctx": args.ctx_per_slot * args.concurrency,
        "model_defaults.parallel": args.concurrency, "scan.hash_models": "false"})
    samples: list[dict[str, Any]] = []
    errors: dict[str, int] = {}
    try:
        await node.start()
        wpid = first_wpid = await node.worker_pid()
        samples.append({"requests": 0, "node_rss_mib": mib(rss(node.pid)), "worker_rss_mib": mib(rss(wpid)),
                        "worker_pid": wpid})
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        done_at: list[tuple[float, int]] = []  # (finish time, tokens)
        t0 = time.perf_counter()
        window_start = [t0]
        marks = [0]  # request counts at which a sample was taken
        deadline = time.monotonic() + args.max_seconds

        async def worker() -> None:
            from optimanode.client import RemoteError
            from optimanode.protocol import CompletionRequest, InferDone, SamplingParams

            while not queue.empty() and time.monotonic() < deadline:
                i = queue.get_nowait()
                prompt = f"{i + 1}. {BASE_PROMPTS[i % len(BASE_PROMPTS)]}"  # distinct: the number differs
                n = 0
                try:
                    async for msg in node.client.infer(node.eid, CompletionRequest(
                            prompt=prompt, params=SamplingParams(max_tokens=tokens, temperature=0.0))):
                        if isinstance(msg, InferDone):
                            n = msg.usage.completion_tokens
                except RemoteError as exc:
                    errors[exc.code] = errors.get(exc.code, 0) + 1
                done_at.append((time.perf_counter(), n))
                if len(done_at) >= marks[-1] + every:
                    # Book the window now, before any await, so concurrent finishers cannot skip or split it.
                    count, now = len(done_at), time.perf_counter()
                    tok = sum(x[1] for x in done_at[marks[-1]:count])
                    span = now - window_start[0]
                    marks.append(count)
                    window_start[0] = now
                    pid = await node.worker_pid()  # the current worker (a crash would have replaced it)
                    samples.append({"requests": count, "node_rss_mib": mib(rss(node.pid)),
                                    "worker_rss_mib": mib(rss(pid)), "worker_pid": pid,
                                    "tok_s_window": tok / span if span > 0 else None, "elapsed_s": now - t0})
                    log(f"soak {count}/{requests}: {samples[-1]['tok_s_window']:.1f} tok/s, node RSS "
                        f"{samples[-1]['node_rss_mib']} MiB, worker RSS {samples[-1]['worker_rss_mib']} MiB")

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
        wpid = await node.worker_pid()
        samples.sort(key=lambda x: x["requests"])  # the awaits above may append out of order
        windows = [s for s in samples if s.get("tok_s_window") is not None]
        return {"machine": machine(), "model": model, "requests": len(done_at), "requested": requests,
                "tokens_per_request": tokens, "concurrency": args.concurrency, "threads": args.threads,
                "every": every, "seconds": wall, "errors": errors, "same_worker_throughout": wpid == first_wpid,
                "samples": samples,
                "first_window_tok_s": windows[0]["tok_s_window"] if windows else None,
                "last_window_tok_s": windows[-1]["tok_s_window"] if windows else None,
                "node_rss_growth": growth(samples, "node_rss_mib"),
                "worker_rss_growth": growth(samples, "worker_rss_mib"),
                "node_peak_rss_mib": mib(peak_rss(node.pid)), "worker_peak_rss_mib": mib(peak_rss(wpid))}
    finally:
        await node.close()


def print_soak(out: dict[str, Any]) -> None:
    print(f"\n{out['requests']} requests ({out['concurrency']} in flight, {out['tokens_per_request']} tokens each, "
          f"{out['threads']} threads) in {out['seconds']:.0f} s; errors {out['errors'] or 'none'}; "
          f"same worker throughout: {out['same_worker_throughout']}")
    print(f"{'requests':>8} {'node RSS':>9} {'worker RSS':>11} {'tok/s (window)':>17}")
    for s in out["samples"]:
        tps = s.get("tok_s_window")
        print(f"{s['requests']:>8} {s['node_rss_mib']:>7}Mi {s['worker_rss_mib']:>9}Mi "
              f"{'' if tps is None else f'{tps:.1f}':>17}")
    f, last = out["first_window_tok_s"], out["last_window_tok_s"]
    if f and last:
        print(f"tokens/s: first {out['every']} requests {f:.1f}, last {out['every']} {last:.1f}: x{last / f:.3f}")
    print(f"peak RSS: node {out['node_peak_rss_mib']} MiB, worker {out['worker_peak_rss_mib']} MiB")
    for who in ("node", "worker"):
        g = out[f"{who}_rss_growth"]
        if g["steady"] is None:
            print(f"{who} RSS growth: too few samples to say")
            continue
        verdict = "steady" if g["steady"] else "GROWING: a defect to find (issue #4), not a figure to print"
        print(f"{who} RSS from the first sample to the last: {g['from_mib']} → {g['to_mib']} MiB "
              f"({g['mib']:+} MiB, {g['mib_per_1000_requests']:+} MiB per 1,000 requests): {verdict}")
    if out["requests"] < 1000:
        print(f"(a smoke run: {out['requests']} requests; the soak of issue #4 is --requests 1000)")


def add_parser(sub: Any) -> None:
    so = sub.add_parser("soak", help="--requests distinct prompts through the node; RSS and tok/s over time",
                        description="A bounded soak run through the node (not for CI).")
    add_common_options(so)
    so.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, or a GGUF path")
    so.add_argument("--requests", type=int, default=1000, help="requests (default 1000)")
    so.add_argument("--tokens", type=int, default=16, help="completion tokens per request (default 16)")
    so.add_argument("--concurrency", type=int, default=4, help="requests in flight = node parallel (default 4)")
    so.add_argument("--ctx-per-slot", type=int, default=512, help="context per slot (default 512)")
    so.add_argument("--max-seconds", type=float, default=4 * 3600, help="stop sending after this long (default 4 h)")
    so.add_argument("--every", type=int, metavar="N",
                    help="sample RSS and tok/s every N requests (default 100, or a quarter of --requests if fewer)")


def run(args: argparse.Namespace) -> None:
    report(print_soak, asyncio.run(soak(args)), args.json)
