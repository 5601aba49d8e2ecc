"""What ``optimanode run`` does once cli.serve is wired to optimanode.service (the lead's change).

``python tests/service_driver.py run --models-dir ... --state-dir ...`` takes the same flags as
``optimanode run``: the settings come from the cli's own ``settings_from``, SIGHUP reloads them with
the same flags, logging is the service's structured stderr handler. test_service.py runs it as the
real process under a stand-in systemd until ``python -m optimanode run`` does the same.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimanode import cli  # noqa: E402
from optimanode.errors import ConfigError  # noqa: E402
from optimanode.service import configure_logging, run_service  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="service_driver")
    sub = parser.add_subparsers(dest="command", required=True)
    cli._settings_args(sub.add_parser("run"))  # noqa: SLF001 - the very flags `optimanode run` takes
    args = parser.parse_args(argv)
    try:
        settings = cli.settings_from(args)
    except ConfigError as exc:
        print(f"optimanode: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    return asyncio.run(run_service(settings, lambda: cli.settings_from(args)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
