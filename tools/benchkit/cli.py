"""The command line of tools/bench: one parser, a subcommand module per subcommand.

How it works: ``main`` first hands the two internal helper commands to their modules (``_direct``:
the llama-cpp-python process of compare; ``_flood``: the flooding Gateway of lifecycle). Otherwise
``compare`` is put first when no subcommand is named, and each subcommand module adds its own
parser (``add_parser``: its options, the shared ``--threads``/``--json``/``--quick`` from
``common.add_common_options``) and runs it (``run``: measure, then ``common.report``). The help
text is the package docstring. SIGTERM becomes SystemExit so that every ``finally`` stops the
nodes and servers it started; the scratch directories are removed after a run that succeeded and
named on stderr after one that failed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from typing import Any

from . import USAGE, compare, embeddings, lifecycle, multiturn, plot, soak
from .common import WORK_DIRS, log
from .lifecycle_flood import flood_main

SUBCOMMANDS = {"compare": compare, "lifecycle": lifecycle, "soak": soak, "plot": plot, "embeddings": embeddings,
               "multiturn": multiturn}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tools/bench", description=USAGE.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=USAGE.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_direct":
        return compare.direct_main(argv[1:])
    if argv and argv[0] == "_flood":
        return flood_main(argv[1:])
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["compare", *argv]
    args = build_parser().parse_args(argv)
    if getattr(args, "plot", None) or args.command == "plot":
        plot.need_matplotlib()

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks: nodes and servers are stopped

    signal.signal(signal.SIGTERM, on_term)
    try:
        SUBCOMMANDS[args.command].run(args)
    except BaseException:
        for w in WORK_DIRS:
            log(f"kept for a look (node, worker and llama-server logs): {w}")
        raise
    for w in WORK_DIRS:
        shutil.rmtree(w, ignore_errors=True)
    return 0
