"""The ``optimanode`` command: ``run`` starts the node as a long-running service.

Settings come from ``--config`` (or OPTIMANODE_CONFIG, or /etc/optimanode/optimanode.toml), the
environment and the flags below, in that order of precedence (docs/configuration.md).
SIGTERM and SIGINT stop the node cleanly: workers stopped, the stop journaled, the journal closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from optimanode import __version__
from optimanode.config import Settings, default_config_file, load_settings
from optimanode.errors import ConfigError, JournalError
from optimanode.node import Node

log = logging.getLogger("optimanode")


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (default: $OPTIMANODE_CONFIG or /etc/optimanode/optimanode.toml)")
    p.add_argument("--models-dir", help="directory scanned for GGUF files")
    p.add_argument("--state-dir", help="directory for the journal, key and certificate")
    p.add_argument("--port", help="listen port (default 8022)")
    p.add_argument("--enable-new", action="store_true", help="start newly discovered models at once")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting by its dotted key, e.g. --set restart.crash_budget=3 (repeatable)")


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("command line", item, "KEY=VALUE")
        overrides[key.strip()] = value.strip()
    for flag, key in (("models_dir", "models_dir"), ("state_dir", "state_dir"), ("port", "listen.port")):
        if getattr(args, flag, None) is not None:
            overrides[key] = str(getattr(args, flag))
    if getattr(args, "enable_new", False):
        overrides["scan.enable_new"] = "true"
    return load_settings(args.config or default_config_file(), overrides=overrides)


async def serve(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = Node(settings)
    await node.start()
    log.info("node up: %d models registered in %s; journal %s", len(node.executors), settings.models_path,
             settings.journal_path)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await node.stop("signal")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimanode", description="OptimaNode: the OptimaGPT inference node")
    parser.add_argument("--version", action="version", version=f"optimanode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node in the foreground (what the service runs)")
    _settings_args(run)
    show = sub.add_parser("settings", help="print the effective settings as JSON and exit")
    _settings_args(show)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"optimanode: bad configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transitions logs every state callback at INFO; our own transition log line says it once.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if args.command == "settings":
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(settings).decode(), indent=2))
        return 0
    try:
        return asyncio.run(serve(settings))
    except JournalError as exc:
        print(f"optimanode: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
