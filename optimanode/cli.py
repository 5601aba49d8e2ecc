"""The ``optimanode`` command: ``run`` starts the node as a long-running service.

Settings come from ``--config`` (or OPTIMANODE_CONFIG, or /etc/optimanode/optimanode.toml), the
environment and the flags below, in that order of precedence (docs/configuration.md).
``run`` hands the node, its Gateway link and metrics, and the OpenMetrics endpoint when
``metrics_http.listen`` asks for it, to ``optimanode.service`` (sd_notify, signals: SIGTERM drains
and stops cleanly, SIGHUP reloads). ``client``, ``keygen`` and ``fingerprint`` are
``optimanode.client_cli``; ``doctor`` is ``optimanode.doctor``; ``openai`` is ``optimanode.openai_front``
(the ``openai`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import socket
import sys
from collections.abc import Callable

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


def node_id(settings: Settings) -> str:
    """This node's stable id (host name + random suffix), kept in the state directory."""
    path = settings.state_path / "node_id"
    try:
        nid = path.read_text(encoding="utf-8").strip()
        if nid:
            return nid
    except FileNotFoundError:
        pass
    settings.state_path.mkdir(parents=True, exist_ok=True)
    nid = f"{socket.gethostname()}-{secrets.token_hex(3)}"
    try:
        path.write_text(nid + "\n", encoding="utf-8")
    except OSError:
        path.unlink(missing_ok=True)  # never leave an empty id behind (a full disk creates the file, then fails)
        raise
    return nid


async def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """The node, its Gateway link and metrics, run as a service until SIGTERM/SIGINT (optimanode.service)."""
    from optimanode.gateway.server import GatewayServer
    from optimanode.metrics import Sampler
    from optimanode.openmetrics import metrics_server
    from optimanode.service import Server, run_service

    try:
        nid = node_id(settings)
    except OSError as exc:  # a full or read-only state directory on the first start: one line, not a traceback
        print(f"optimanode: cannot write the node id to {settings.state_path / 'node_id'}: {exc}", file=sys.stderr)
        return 3
    samplers: list[Sampler] = []

    def servers(node: Node, settings: Settings) -> list[Server]:
        # One sampler for the link and the metrics endpoint: psutil's CPU% is process-wide state.
        sampler = Sampler(node.list, node_id=nid, journal=node.journal_report)
        samplers.append(sampler)
        metrics = metrics_server(node, settings, sampler.sample, nid)  # None unless metrics_http.listen
        return [GatewayServer(node, settings, sampler.sample, nid), *([metrics] if metrics else [])]

    try:
        return await run_service(settings, reload, make_servers=servers)
    finally:
        for sampler in samplers:
            sampler.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimanode", description="OptimaNode: the OptimaGPT inference node")
    parser.add_argument("--version", action="version", version=f"optimanode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node in the foreground (what the service runs)")
    _settings_args(run)
    show = sub.add_parser("settings", help="print the effective settings as JSON and exit")
    _settings_args(show)
    doctor = sub.add_parser("doctor", help="check what operators get wrong, and say what to do")
    _settings_args(doctor)
    # These parse their own arguments (optimanode.client_cli).
    for name, text in (("client", "talk to a node over its Gateway link (models, infer, metrics, ...)"),
                       ("keygen", "write a new node access key (the previous one stays valid)"),
                       ("fingerprint", "print the TLS certificate fingerprint a Gateway pins"),
                       ("openai", "an OpenAI-compatible HTTP front on a fleet of nodes (the openai extra)")):
        sub.add_parser(name, help=text, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "openai":
        try:
            from optimanode import openai_front
        except ImportError as exc:  # the extra is not installed: say how to get it, not a traceback
            print(f"optimanode openai: {exc}", file=sys.stderr)
            return 2
        return openai_front.main(argv[1:])
    if argv and argv[0] in ("client", "keygen", "fingerprint"):
        # Handed over whole: argparse's REMAINDER would stop at the first "--option".
        from optimanode import client_cli

        entry = {"client": client_cli.main, "keygen": client_cli.keygen_main,
                 "fingerprint": client_cli.fingerprint_main}[argv[0]]
        return entry(argv[1:])
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"optimanode: bad configuration: {exc}", file=sys.stderr)
        return 2
    from optimanode.service import configure_logging

    configure_logging(settings)  # structured lines on stderr, keys and nonces redacted
    # transitions logs every state callback at INFO; our own transition log line says it once.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if args.command == "settings":
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(settings).decode(), indent=2))
        return 0
    if args.command == "doctor":
        from optimanode.doctor import print_checks, run_doctor

        return print_checks(run_doctor(settings))
    from optimanode.service import raise_open_files_limit

    raise_open_files_limit()
    try:
        return asyncio.run(serve(settings, lambda: settings_from(args)))
    except (JournalError, ConfigError) as exc:
        print(f"optimanode: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        # A path the node cannot use at start (a key file it may not create under a read-only
        # /etc, a node.lock another user owns, a models_dir under a file): one line, like the rest.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"optimanode: cannot start: {where}{exc.strerror or exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
