"""The operator's commands for the Gateway link: ``optimanode client``, ``keygen`` and ``fingerprint``.

Three entry points, each taking the arguments after its sub-command and returning an exit status
(optimanode/cli.py wires them in):

* ``main(argv)`` — ``optimanode client --url wss://host:8022 --key-file F --fingerprint sha256:...
  COMMAND``: a one-shot Gateway (optimanode.client) for looking at and steering a node by hand.
  Commands: ``models``, ``status ID``, ``enable ID``, ``disable ID [--now]``, ``configure ID --n-ctx N ...``,
  ``rescan``, ``events [ID] [--limit N]``, ``infer ID --prompt TEXT [--chat] [--stream]
  [--max-tokens N] [--tools FILE [--tool-choice C]]`` (calls print as ``tool call ID: NAME(ARGS)``),
  ``embed ID TEXT... [--no-normalize]`` (the vectors as one JSON array),
  ``metrics [--watch] [--interval S]``. Plain text by default, ``--json`` for machines (one JSON
  document, or one per line for streams).
* ``keygen_main(argv)`` — ``optimanode keygen [--key-file F]``: a new access key; the replaced one
  stays valid as ``F.previous`` until deleted (docs/protocol.md, "Key rotation"). The key itself
  is never printed: copy the file to the Gateways.
* ``fingerprint_main(argv)`` — ``optimanode fingerprint [--state-dir D]``: the certificate
  fingerprint Gateways pin.

Exit status: 0 done; 1 the node answered with an error (its code is printed); 2 bad usage or
configuration; 3 the node could not be reached or refused the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from optimanode.client import ClientError, ConnectionFailed, NodeClient, RemoteError
from optimanode.config import default_config_file, load_settings
from optimanode.errors import ConfigError
from optimanode.gateway import keys, tls
from optimanode.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EventRecord,
    ExecutorStatus,
    GrammarFormat,
    InferDone,
    JsonObjectFormat,
    JsonSchemaFormat,
    MetricsReport,
    NamedToolChoice,
    PREFILL_POLICIES,
    SAFE_MODES,
    ModelSettings,
    SamplingParams,
    TokenChunk,
    Tool,
    ToolCall,
)

_SETTING_FLAGS = ("n_ctx", "n_threads", "n_gpu_layers", "n_batch", "queue_size")  # integers
_SECONDS_FLAGS = ("stall_timeout_s", "deadline_s")  # numbers of seconds
_SETTINGS = (*_SETTING_FLAGS, *_SECONDS_FLAGS, "parallel", "prefill", "safe_mode", "chat_template")


def _int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _setting(text: str) -> tuple[str, object]:
    """KEY=VALUE of --set: VALUE is read as JSON (numbers, lists, true) or else taken as a word."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optimanode client", description="Talk to a node over the Gateway link.")
    p.add_argument("--url", required=True, help="the node, e.g. wss://node1:8022")
    p.add_argument("--key-file", required=True, help="the node access key file (mode 0600)")
    p.add_argument("--fingerprint", help="the node certificate's fingerprint, sha256:AB:CD:... "
                                         "(`optimanode fingerprint` on the node prints it)")
    p.add_argument("--gateway-id", default=None, help="how this client names itself to the node")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a control call")
    p.add_argument("--insecure-plaintext-for-development", action="store_true", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the node's models")
    for name in ("status", "enable", "disable"):
        sub.add_parser(name, help=f"{name} a model").add_argument("model")
    sub.choices["disable"].add_argument("--now", action="store_true",
                                        help="cut its running requests at once instead of letting them finish")
    conf = sub.add_parser("configure", help="set a model's overrides (the ones not given return to the defaults)")
    conf.add_argument("model")
    for flag in _SETTING_FLAGS:
        conf.add_argument("--" + flag.replace("_", "-"), type=int, dest=flag)
    conf.add_argument("--parallel", type=_int_or_auto, dest="parallel", help="slots: an integer or auto")
    conf.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE", dest="set_",
                      help="any model setting of docs/configuration.md, e.g. kv_cache_type=q8_0, gpus=[0,1], "
                           "enable=on_demand, keep_alive_s=600, prompt_cache_mib=512 (VALUE: JSON or a word)")
    conf.add_argument("--prefill", choices=PREFILL_POLICIES, dest="prefill",
                      help="how waiting prompts share decode steps")
    conf.add_argument("--safe-mode", choices=SAFE_MODES, dest="safe_mode",
                      help="run without llama.cpp's extra buffer types and persistent threadpool: "
                           "auto (after a crash while loading), on, off")
    for flag in _SECONDS_FLAGS:
        conf.add_argument("--" + flag.replace("_", "-"), type=float, dest=flag)
    conf.add_argument("--chat-template", dest="chat_template",
                      help="a template name llama.cpp knows (chatml, gemma, llama3, ...) or @FILE with Jinja text")
    sub.add_parser("rescan", help="scan the models directory now")
    ev = sub.add_parser("events", help="journal events of a model (or of the whole node)")
    ev.add_argument("model", nargs="?")
    ev.add_argument("--limit", type=int, default=50)
    inf = sub.add_parser("infer", help="run one completion")
    inf.add_argument("model")
    inf.add_argument("--prompt", required=True)
    inf.add_argument("--chat", action="store_true", help="send the prompt as a user message (the chat template)")
    inf.add_argument("--stream", action="store_true", help="print the text as it comes")
    inf.add_argument("--max-tokens", type=int, default=256)
    inf.add_argument("--temperature", type=float, default=None)
    inf.add_argument("--seed", type=int, default=None)
    inf.add_argument("--deadline-s", type=float, default=None, help="end the request with deadline_exceeded after this")
    shape = inf.add_mutually_exclusive_group()
    shape.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    shape.add_argument("--json-schema", metavar="FILE", help="constrain the output to this JSON schema (a file)")
    shape.add_argument("--grammar", metavar="FILE", help="constrain the output to this GBNF grammar (a file)")
    inf.add_argument("--tools", metavar="FILE", help="functions the model may call: a JSON list of {name, description, "
                                                    "parameters} (or OpenAI's {type: function, function: {...}}); "
                                                    "implies --chat; the calls are printed")
    inf.add_argument("--tool-choice", metavar="CHOICE", default=None,
                     help="auto (the default), none, required, or the name of one function to call")
    emb = sub.add_parser("embed", help="embed texts: one vector per text, printed as a JSON array of arrays")
    emb.add_argument("model")
    emb.add_argument("texts", nargs="+", metavar="TEXT", help="the inputs, one vector each, in order")
    emb.add_argument("--no-normalize", dest="normalize", action="store_false",
                     help="the raw pooled vectors (default: scaled to unit length)")
    emb.add_argument("--deadline-s", type=float, default=None, help="end the request with deadline_exceeded after this")
    met = sub.add_parser("metrics", help="the node's metrics report")
    met.add_argument("--watch", action="store_true", help="keep printing reports (Ctrl-C ends)")
    met.add_argument("--interval", type=float, default=1.0)
    met.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """``optimanode client ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        key = keys.read_key(args.key_file)
        _read_files(args)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"optimanode client: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, key))
    except KeyboardInterrupt:
        return 0
    except ValueError as exc:
        print(f"optimanode client: {exc}", file=sys.stderr)
        return 2
    except ConnectionFailed as exc:
        print(f"optimanode client: {exc}", file=sys.stderr)
        return 3
    except RemoteError as exc:
        print(f"optimanode client: {exc.code}: {exc.message}"
              + (f" ({', '.join(f'{k}={v}' for k, v in exc.details.items())})" if exc.details else ""),
              file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"optimanode client: {exc}", file=sys.stderr)
        return 3


def _read_files(args: argparse.Namespace) -> None:
    """Replace the file arguments with their contents, before anything is sent."""
    if getattr(args, "json_schema", None):
        try:
            args.json_schema = json.loads(Path(args.json_schema).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema {args.json_schema}: not JSON: {exc}") from None
    if getattr(args, "grammar", None):
        args.grammar = Path(args.grammar).read_text()
    if getattr(args, "tools", None):
        args.tools = _tools(args.tools)
    if str(getattr(args, "chat_template", None) or "").startswith("@"):
        args.chat_template = Path(args.chat_template[1:]).read_text()


async def _run(args: argparse.Namespace, key: bytes) -> int:
    client = await NodeClient.connect(args.url, key, fingerprint=args.fingerprint, gateway_id=args.gateway_id,
                                      call_timeout=args.timeout,
                                      insecure_plaintext_for_development=args.insecure_plaintext_for_development)
    try:
        return await _command(client, args)
    finally:
        await client.close()


async def _command(c: NodeClient, args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in ("models", "rescan"):
        models = await (c.models() if cmd == "models" else c.rescan())
        _emit(args, models, _models_text)
    elif cmd in ("status", "enable", "disable"):
        st = await (c.disable(args.model, now=args.now) if cmd == "disable" else getattr(c, cmd)(args.model))
        _emit(args, st, _status_text)
    elif cmd == "configure":
        values: dict[str, object] = dict(args.set_)
        values.update({f: getattr(args, f) for f in _SETTINGS if getattr(args, f) is not None})
        # Checked here as the node checks it, so a typo is named before anything is sent.
        unknown = sorted(set(values) - set(ModelSettings.__struct_fields__))
        try:
            if unknown:
                raise msgspec.ValidationError(f"unknown setting {unknown[0]!r} (docs/configuration.md lists them)")
            settings = msgspec.convert(values, ModelSettings)
        except msgspec.ValidationError as exc:
            print(f"optimanode client: configure: {exc}", file=sys.stderr)
            return 2
        st = await c.configure(args.model, settings)
        _emit(args, st, _status_text)
    elif cmd == "events":
        events = await c.events(args.model, limit=args.limit)
        _emit(args, events, _events_text)
    elif cmd == "infer":
        return await _infer(c, args)
    elif cmd == "embed":
        vectors, usage = await c.embed(args.model, args.texts, args.normalize, deadline_s=args.deadline_s)
        if args.json:
            print(_json({"embeddings": vectors, "usage": usage}))
        else:
            print(_json(vectors))
            print(f"[{len(vectors)} vectors of {len(vectors[0]) if vectors else 0} dimensions; "
                  f"{usage.prompt_tokens} tokens]", file=sys.stderr)
    elif cmd == "metrics":
        count = 0
        async for report in c.metrics(args.interval):
            _emit(args, report, _metrics_text)
            count += 1
            if not args.watch or (args.count is not None and count >= args.count):
                break
    return 0


async def _infer(c: NodeClient, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.seed is not None:
        params["seed"] = args.seed
    if args.deadline_s is not None:
        params["deadline_s"] = args.deadline_s
    if args.json_object:
        params["response_format"] = JsonObjectFormat()
    elif args.json_schema:
        params["response_format"] = JsonSchemaFormat(schema=args.json_schema)
    elif args.grammar:
        params["response_format"] = GrammarFormat(gbnf=args.grammar)
    sp = SamplingParams(**params)
    chat: dict[str, Any] = {}
    if args.tools:
        chat["tools"] = args.tools
    if args.tool_choice is not None:
        chat["tool_choice"] = (args.tool_choice if args.tool_choice in ("auto", "none", "required")
                               else NamedToolChoice(name=args.tool_choice))
    request = (ChatRequest(messages=[ChatMessage(role="user", content=args.prompt)], params=sp, **chat)
               if args.chat or chat else CompletionRequest(prompt=args.prompt, params=sp))
    text: list[str] = []
    done: InferDone | None = None
    async for msg in c.infer(args.model, request):
        if isinstance(msg, TokenChunk):
            text.append(msg.text)
            if args.stream:
                if args.json:
                    print(_json(msg), flush=True)
                else:
                    print(msg.text, end="", flush=True)
                    for call in msg.tool_calls or ():
                        print(_call_text(call), flush=True)
        else:
            done = msg
    assert done is not None
    calls = done.tool_calls or []
    if args.json:
        print(_json(done) if args.stream else _json({"text": "".join(text), "finish_reason": done.finish_reason,
                                                     "usage": done.usage, "timings": done.timings,
                                                     **({"tool_calls": calls} if calls else {})}))
    else:
        if not args.stream:
            body = "".join(text)
            print("\n".join(([body] if body else []) + [_call_text(c) for c in calls]), end="")
        print()
        t = done.timings
        print(f"[{done.finish_reason}; {done.usage.prompt_tokens} prompt + {done.usage.completion_tokens} completion "
              f"tokens; first token {t.ttft_s:.2f} s, {t.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _tools(path: str) -> list[Tool]:
    """--tools FILE: our Tool shape or OpenAI's ({"type": "function", "function": {...}})."""
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, list):
            raise ValueError("expected a JSON list of functions")
        return [msgspec.convert(t.get("function", t) if isinstance(t, dict) else t, Tool) for t in raw]
    except (json.JSONDecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"--tools {path}: {exc}") from None


# -- output ----------------------------------------------------------------------------------


def _call_text(call: ToolCall) -> str:
    return f"tool call {call.id}: {call.name}({call.arguments})"


def _json(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


def _emit(args: argparse.Namespace, obj: Any, text: Any) -> None:
    print(_json(obj) if args.json else text(obj), flush=True)


def _models_text(models: list[ExecutorStatus]) -> str:
    rows = [("ID", "STATE", "ENABLED", "RUNNING", "QUEUED", "FILE", "REASON")]
    for m in models:
        state = m.state + (" (safe mode)" if m.safe_mode else "")
        rows.append((m.id, state, "yes" if m.enabled else "no", f"{m.in_flight}/{m.parallel}",
                     f"{m.queue_depth}/{m.queue_size}", Path(m.info.path).name, m.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows).rstrip()


def _status_text(m: ExecutorStatus) -> str:
    lines = [f"{m.id}: {m.state}{' (' + m.reason + ')' if m.reason else ''}, {'enabled' if m.enabled else 'disabled'}",
             f"  file      {m.info.path}"]
    overrides = msgspec.structs.asdict(m.settings)
    lines.append("  settings  " + (", ".join(f"{k}={v}" for k, v in overrides.items() if v is not None) or "defaults"))
    if m.effective is not None:
        e = m.effective
        lines.append(f"  effective n_ctx={e.n_ctx} n_threads={e.n_threads} n_gpu_layers={e.n_gpu_layers} "
                     f"n_batch={e.n_batch} parallel={e.parallel} prefill={e.prefill} safe_mode={e.safe_mode}")
    if m.safe_mode:
        lines.append(f"  SAFE MODE {m.safe_mode_reason}")
    lines.append(f"  pid {m.pid or '-'}, restarts {m.restarts}, served {m.requests_served}, "
                 f"tokens {m.tokens_generated}, running {m.in_flight}/{m.parallel}, queued {m.queue_depth}/{m.queue_size}")
    return "\n".join(lines)


def _events_text(events: list[EventRecord]) -> str:
    out = []
    for e in events:
        ts = datetime.datetime.fromtimestamp(e.ts).isoformat(timespec="milliseconds")
        out.append(f"{e.seq:>6} {ts} {e.stream} {e.type} {_json(e.data)}")
    return "\n".join(out)


def _metrics_text(r: MetricsReport) -> str:
    gib = 1 << 30
    ts = datetime.datetime.fromtimestamp(r.ts).isoformat(timespec="seconds")
    lines = [f"{ts} {r.node_id}: cpu {r.cpu.percent:.0f}% (load {r.cpu.load_1m:.2f}), memory "
             f"{r.memory.used_bytes / gib:.1f}/{r.memory.total_bytes / gib:.1f} GiB"]
    for g in r.gpus:
        util = "-" if g.utilization_percent is None else f"{g.utilization_percent:.0f}%"
        lines.append(f"  gpu{g.index} {g.name}: {util}, {g.memory_used_bytes / gib:.1f}/{g.memory_total_bytes / gib:.1f} GiB")
    if not r.gpus and r.gpu_status:
        lines.append(f"  no GPUs: {r.gpu_status}")
    for e in r.executors:
        lines.append(f"  {e.id} {e.state}: free {e.free_slots}/{e.parallel}, queued {e.queue_depth}, "
                     f"{e.tokens_per_s:.1f} tokens/s, served {e.requests_served}")
    return "\n".join(lines)


# -- keygen and fingerprint -------------------------------------------------------------------


def _settings_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="TOML settings file (default: $OPTIMANODE_CONFIG or /etc/optimanode/optimanode.toml)")
    p.add_argument("--state-dir", help="the node's state directory")
    return p


def _settings(args: argparse.Namespace) -> Any:
    overrides = {"state_dir": args.state_dir} if args.state_dir else {}
    return load_settings(args.config or default_config_file(), overrides=overrides)


def keygen_main(argv: list[str] | None = None) -> int:
    """``optimanode keygen [--key-file F]``: write a new access key, keeping the old one as F.previous."""
    p = _settings_parser("optimanode keygen", "Write a new node access key (the old one stays valid as "
                                              "<key file>.previous until you delete it).")
    p.add_argument("--key-file", help="default: listen.key_file, or <state_dir>/access.key")
    args = p.parse_args(argv)
    try:
        path = Path(args.key_file) if args.key_file else _settings(args).key_path
        had_one = path.exists()
        keys.keygen(path)
    except (ConfigError, OSError) as exc:
        print(f"optimanode keygen: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a new access key to {path} (mode 0600); copy this file to each Gateway.")
    if had_one and keys.previous_path(path).exists():
        print(f"the previous key is in {keys.previous_path(path)} and is still accepted; delete that file once "
              "every Gateway has the new key.")
    return 0


def fingerprint_main(argv: list[str] | None = None) -> int:
    """``optimanode fingerprint [--state-dir D]``: print the certificate fingerprint Gateways pin."""
    p = _settings_parser("optimanode fingerprint", "Print the fingerprint of the node's TLS certificate.")
    args = p.parse_args(argv)
    try:
        cert, _ = tls.cert_paths(_settings(args))
        print(tls.fingerprint_file(cert))
    except FileNotFoundError as exc:
        print(f"optimanode fingerprint: no certificate at {exc.filename}: the node creates one on its first start",
              file=sys.stderr)
        return 2
    except (ConfigError, OSError, ValueError) as exc:
        print(f"optimanode fingerprint: {exc}", file=sys.stderr)
        return 2
    return 0
