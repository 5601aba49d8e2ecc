"""``tools/bench plot IN.json OUT.png`` (and compare's ``--plot``): tokens/s and TTFT against concurrency.

How it works: matplotlib is optional (the node does not depend on it), so ``need_matplotlib``
stops the tool with install instructions before a long run starts; ``plot`` draws, with the Agg
backend, one line per system from a compare ``--json`` document: total tokens/s and TTFT p50
(log scale) for each concurrency level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import log


def need_matplotlib() -> None:
    """The plot is optional: matplotlib is not a dependency of the node. Say so before a long run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "The plot (--plot, tools/bench plot) needs matplotlib, which is not installed in .venv (the node "
            "does not depend on it).\n"
            "Either install it:  .venv/bin/pip install matplotlib\n"
            "or run without --plot: every figure is in the table and in --json, and "
            "`tools/bench plot OUT.json OUT.png` draws the plot later from that file.") from None


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib  # lazily: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(n) for n in out["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("direct", "s--"), ("node", "o-"), ("llama-server", "^:")):
        if name not in out["levels"][str(levels[0])]:
            continue
        ax1.plot(levels, [out["levels"][str(n)][name]["total_tok_s"] for n in levels], style, label=name)
        ax2.plot(levels, [out["levels"][str(n)][name]["ttft_p50_s"] * 1000 for n in levels], style, label=name)
    ax1.set(xlabel="concurrent streams", ylabel="total tokens/s", title="Throughput", xticks=levels)
    ax2.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms, log scale)", title="Time to first token", xticks=levels,
            yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(out['model']).name}, {out['threads']} threads, {out['tokens']} tokens/request "
                 f"(direct serves concurrent requests in turn)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def add_parser(sub: Any) -> None:
    pl = sub.add_parser("plot", help="draw the compare plot again from a --json file",
                        description="Draw tokens/s and TTFT against concurrency from `tools/bench --json` output.")
    pl.add_argument("json_in", metavar="IN.json", help="what `tools/bench [compare] --json IN.json` wrote")
    pl.add_argument("png_out", metavar="OUT.png")


def run(args: argparse.Namespace) -> None:
    plot(json.loads(Path(args.json_in).read_text()), args.png_out)
