"""What every subcommand of tools/bench shares: paths, prompts, processes, figures and output.

How it works:

* Paths: ``ROOT`` is the repository; ``LAUNCHER`` is ``tools/bench`` itself, which the
  subcommands re-run as a child for their helper processes (``_direct``, ``_flood``).
* Processes: every child gets ``die_with_parent`` as its preexec_fn (Linux: SIGTERM when the bench
  dies), scratch directories come from ``make_work`` and are listed in ``WORK_DIRS`` (the CLI
  removes them after a run that succeeded and names them after one that failed).
* Figures: ``Stream`` is one request as its caller saw it (send time, a stamp per chunk, the token
  count); ``round_figures`` and the percentile/median helpers turn them into the reported numbers;
  psutil and /proc give CPU time and (peak) RSS per pid.
* Output: ``report`` prints a subcommand's table and writes its ``--json``; ``target`` and
  ``print_targets`` state each target of issue #4 as met / MISSED with its margin.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent
LAUNCHER = ROOT / "tools" / "bench"

# Open-ended prompts SmolLM2-135M continues past 128 tokens without an end-of-generation token
# (each system's real completion-token count is what is counted, so an early stop is still fair).
BASE_PROMPTS = [
    "counting: 1, 2, 3, 4, 5, 6, 7,",
    "Here is a long list of animals: cat, dog, horse, cow,",
    "The history of the Roman Empire began when",
    "Chapter 1. The old lighthouse keeper had lived alone for",
    "A recipe for bread: first, take flour and",
    "The following is a detailed description of the solar system. The Sun",
    "def main():\n    # read the configuration file\n",
    "Dear diary, today was the strangest day of my life. In the morning",
    "The committee met on Tuesday to discuss the new budget, and",
    "In the beginning of the twentieth century, the city of Vienna",
    "Instructions for assembling the bookshelf: step one,",
    "The quick brown fox jumps over the lazy dog. Then the fox",
]


def prompts_for(round_no: int, n: int, offset: int = 0) -> list[str]:
    """n distinct prompts for this round; the leading number differs per round and per request."""
    return [f"{round_no * 1000 + offset + i + 1}. {BASE_PROMPTS[(offset + i) % len(BASE_PROMPTS)]}"
            for i in range(n)]


def die_with_parent() -> None:
    """preexec_fn: on Linux, SIGTERM this child when the bench dies, so no node or server outlives it."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


WORK_DIRS: list[Path] = []


def make_work(prefix: str) -> Path:
    """A scratch directory (models links, node state, logs); removed after a run that succeeded."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    WORK_DIRS.append(work)
    return work


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_path(arg: str) -> str:
    if arg in ("smollm2", "gemma3"):
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "fetch-models"), arg],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"tools/fetch-models {arg} failed:\n{out.stderr}")
        return out.stdout.strip().splitlines()[-1]
    if not Path(arg).is_file():
        raise SystemExit(f"--model: {arg} is neither smollm2, gemma3 nor a GGUF file")
    return arg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    from importlib.metadata import version

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": sys.version.split()[0], "llama_cpp_python": version("llama_cpp_python"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def peak_rss(pid: int | None) -> int | None:
    """Peak resident set size (VmHWM) of a live process, in bytes; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def rss(pid: int | None) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except psutil.Error:
        return None


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def mib(b: int | None) -> float | None:
    return None if b is None else round(b / 2**20, 1)


def pct(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def med(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def add_common_options(p: argparse.ArgumentParser) -> None:
    """--threads, --json and --quick: every measuring subcommand has them."""
    p.add_argument("--threads", type=int, default=2, help="n_threads for every system (default 2)")
    p.add_argument("--json", metavar="OUT", help="write every figure as JSON to OUT ('-': stdout)")
    p.add_argument("--quick", action="store_true", help="a short run for iterating (fewer tokens, rounds, levels)")


def report(print_table: Any, data: dict[str, Any], json_out: str | None) -> None:
    """The table on stdout, and the JSON where --json says; with --json - the table goes to stderr."""
    if json_out == "-":
        with contextlib.redirect_stdout(sys.stderr):
            print_table(data)
    else:
        print_table(data)
    write_json(json_out, data)


def write_json(out: str | None, data: dict[str, Any]) -> None:
    if not out:
        return
    text = json.dumps(data, indent=2)
    if out == "-":
        print(text)
    else:
        Path(out).write_text(text + "\n")
        log(f"wrote {out}")


@dataclass
class Stream:
    """One request as its caller saw it."""

    sent: float                     # perf_counter when the request was sent
    stamps: list[float]             # perf_counter at each chunk's arrival
    tokens: int                     # completion tokens (as the system counts them)
    worker_ttft: float | None = None  # the node worker's own TTFT (InferDone.timings.ttft_s)

    @property
    def ttft(self) -> float | None:
        return self.stamps[0] - self.sent if self.stamps else None

    @property
    def tpot(self) -> float | None:
        if len(self.stamps) < 2 or self.tokens < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (self.tokens - 1)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def round_figures(streams: list[Stream]) -> dict[str, float]:
    t0 = min(s.sent for s in streams)
    t1 = max((s.stamps[-1] if s.stamps else s.sent) for s in streams)
    tokens = sum(s.tokens for s in streams)
    return {"tokens": tokens, "wall_s": t1 - t0, "total_tok_s": tokens / (t1 - t0) if t1 > t0 else 0.0}


def target(name: str, value: float | None, limit: float, unit: str, *, higher_is_better: bool = False,
           note: str = "", smoke: bool = False) -> dict[str, Any]:
    """One target of issue #4: met or missed, and by how much (in the target's own unit).

    ``smoke``: measured at a smaller size than the target names, so the value is shown, not judged."""
    if value is None:
        return {"target": name, "limit": limit, "unit": unit, "value": None, "met": None, "margin": None,
                "note": note or "not measured in this run", "smoke": smoke}
    margin = value - limit if higher_is_better else limit - value  # > 0: room left; < 0: missed by that much
    met = None if smoke else (value >= limit if higher_is_better else value < limit)
    return {"target": name, "limit": limit, "unit": unit, "value": value, "met": met, "margin": margin, "note": note,
            "smoke": smoke}


def fmt_target(t: dict[str, Any]) -> str:
    unit = t["unit"]
    num = (lambda x: f"{x:.2f} s") if unit == "s" else (lambda x: f"{x:.1f} {unit}" if unit != "%" else f"{x:.1f}%")
    if t["value"] is None:
        return f"  [not measured] {t['target']}: {t['note']}"
    if t["smoke"]:
        return f"  [smoke size, not judged] {t['target']}: {num(t['value'])} (limit {num(t['limit'])}); {t['note']}"
    verdict = "met" if t["met"] else "MISSED"
    how = "to spare" if t["met"] else "short"
    m = abs(t["margin"])
    margin = f"{m:.1f} points" if unit == "%" else num(m)
    line = f"  [{verdict}] {t['target']}: {num(t['value'])} (limit {num(t['limit'])}; {margin} {how})"
    return line + (f"; {t['note']}" if t["note"] else "")


def print_targets(targets: list[dict[str, Any]]) -> None:
    print("\ntargets of issue #4 (figures from a shared machine are indicative only)")
    for t in targets:
        print(fmt_target(t))


def fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")
