"""``optimanode openai``: an OpenAI-compatible HTTP front on a fleet of nodes (the reference Gateway).

It is a Gateway like any other: it reaches nodes only through ``optimanode.client`` (``NodeClient``,
``NodePool``) and speaks only ``optimanode.protocol``; it never imports the node (an import-linter
contract in pyproject.toml says so). docs/openai.md is the operator's page.

How it works:

* **Configuration** (``load_config``): a TOML file naming the listen address (default
  ``127.0.0.1:8080``), a file of bearer tokens (one per line, mode 0600, never on the command line)
  and one ``[[nodes]]`` table per node: its ``url``, its access ``key_file`` and its certificate
  ``fingerprint``. Relative paths are read from the TOML file's folder. Every mistake is a
  ``ConfigError`` naming the file, the key and what was expected.
* **The fleet** (``Fleet``): one task per node keeps a ``NodeClient`` connected (reconnecting with
  backoff, 0.5 s doubling to 30 s) and subscribed to metrics, and keeps it in one ``NodePool``,
  which picks the node for each request (most free slots first) and moves a request that a node
  refused before its first frame (overloaded, not running there, connection lost) to the next one.
* **HTTP** (Starlette on uvicorn): ``GET /v1/models`` (the union of the models that some connected
  node runs now), ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``. A body
  is decoded by msgspec into the OpenAI request's shape (so an error names the field, ``$.messages[0]
  .role``), mapped to a protocol request, and sent through the pool. Before any byte of a reply goes
  out the front waits for the node's first frame, so a request the node refuses gets its HTTP status
  (``STATUS_BY_CODE``) even when it asked to stream. Streams are server-sent events in OpenAI's chunk
  format ending with ``data: [DONE]``; an error after the first chunk is one ``data: {"error": ...}``
  event, which the OpenAI SDK raises.
* **Cancelling**: while a request runs the front also waits for the client's ``http.disconnect``; a
  client that leaves cancels the work, whose node stream closes and so sends ``CancelInfer``: the
  node stops decoding for nobody.
* **Auth**: ``Authorization: Bearer <token>``, compared in constant time with every token of the
  tokens file, re-read when the file changes (rotation without a restart).

Why Starlette and uvicorn: both are the mainstream, long-maintained ASGI pieces of Python (Encode's;
FastAPI is built on the first and served by the second), small, typed, asyncio-native like the rest of
this package, and Starlette's ``Request.stream`` and raw ASGI ``send``/``receive`` give exactly what
an SSE front needs (bounded body reads, a disconnect to cancel on) without a framework's models
(msgspec already validates). They are the ``openai`` extra: ``pip install 'optimanode[openai]'``.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from optimanode.client import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    NodeClient,
    NodePool,
    NoNodeAvailable,
    RemoteError,
    normalize_fingerprint,
)
from optimanode.errors import ConfigError, RequestError
from optimanode.protocol import (
    EMBED_INPUTS_MAX,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbedRequest,
    Infer,
    InferDone,
    InferenceRequest,
    NamedToolChoice,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    Tool,
    ToolCall,
    encode_link,
)

try:
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
except ImportError as _exc:  # pragma: no cover - shown by `optimanode openai` without the extra
    raise ImportError("`optimanode openai` needs the openai extra: pip install 'optimanode[openai]'") from _exc

log = logging.getLogger("optimanode.openai")

DEFAULT_LISTEN = "127.0.0.1:8080"
# A body larger than this is refused (413) before it is read whole; a node refuses frames over its
# max_frame_bytes (1 MiB by default) anyway, and the front checks that too (``_check_frame``).
MAX_BODY_BYTES = 16 << 20
MIN_TOKEN_CHARS = 16

# The node's error codes (docs/protocol.md) as HTTP statuses. overloaded is 429 because it means
# "the queue is full, come back shortly", which is what clients back off on; unauthorized is the
# *front's* key being refused by a node, a fault of this Gateway and not of its caller: 502, like
# every other failure of an upstream node.
STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "context_overflow": 400,
    "unknown_model": 404,
    "overloaded": 429,
    "model_not_running": 503,
    "shutting_down": 503,
    "cancelled": 503,
    "deadline_exceeded": 504,
    "worker_crashed": 502,
    "unauthorized": 502,
    "internal": 502,
}
# OpenAI's error "type" for each status (its SDK reads the status; the type is for people and logs).
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


# ---------------------------------------------------------------------------------------------
# Configuration


class _NodeEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str
    key_file: str
    fingerprint: str | None = None
    # ws:// without TLS: only for development (NodeClient's flag of the same name).
    insecure_plaintext_for_development: bool = False


class _FrontFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tokens_file: str
    nodes: Annotated[list[_NodeEntry], msgspec.Meta(min_length=1)]
    listen: str = DEFAULT_LISTEN
    gateway_id: str = ""
    metrics_interval_s: Annotated[float, msgspec.Meta(ge=0.25, le=3600)] = 1.0
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0


@dataclass(frozen=True)
class NodeTarget:
    url: str
    key: bytes = field(repr=False)
    fingerprint: str | None
    plaintext: bool = False


@dataclass(frozen=True)
class FrontConfig:
    host: str
    port: int
    tokens_file: Path
    nodes: list[NodeTarget]
    gateway_id: str
    metrics_interval_s: float = 1.0
    connect_timeout_s: float = 10.0


def _private_text(path: Path, source: str, key: str, what: str) -> str:
    """A secret file's text; refused when group or others may read or write it."""
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(source, key, f"{what} only its owner can read (chmod 600 {path})")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, key, f"an existing {what}", str(path)) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(source, key, f"a readable UTF-8 {what}", str(path)) from None


def read_key_file(path: Path, source: str, key: str) -> bytes:
    """A node access key file: one line of 64 hex digits (docs/protocol.md, "The access key")."""
    text = _private_text(path, source, key, "access key file").strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        # The content is a secret: never echoed, not even in part.
        raise ConfigError(source, key, f"a key file holding 64 hex digits (the node's `optimanode keygen` output); "
                                       f"{path} does not")
    return raw


def read_tokens(path: Path, source: str = "", key: str = "tokens_file", *, allow_empty: bool = False) -> list[bytes]:
    """Bearer tokens, one per line (blank lines and ``#`` comments skipped); ``allow_empty``: a file
    without one gives none (a reload that revokes them all) instead of an error."""
    text = _private_text(path, source or str(path), key, "tokens file")
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not tokens and not allow_empty:
        raise ConfigError(source or str(path), key, "a tokens file with at least one token (one per line)")
    for n, t in enumerate(tokens, 1):
        if len(t) < MIN_TOKEN_CHARS or any(c.isspace() for c in t):
            raise ConfigError(source or str(path), key,
                              f"tokens of at least {MIN_TOKEN_CHARS} characters without spaces (token {n} of "
                              f"{path} is not; make one with: python3 -c 'import secrets; "
                              f"print(secrets.token_urlsafe(32))')")
    return [t.encode() for t in tokens]


def parse_listen(text: str, source: str = "", key: str = "listen") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; port 0 asks the system for a free one."""
    host, sep, port_s = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
        if ":" in host:
            ipaddress.ip_address(host)
        ok = bool(sep and host) and 0 <= port <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(source, key, "HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080", text)
    return host, port


def load_config(path: str | os.PathLike[str]) -> FrontConfig:
    """Read and check the front's TOML file (see the module docstring); ConfigError on any mistake."""
    p = Path(path)
    src = str(p)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(src, "(file)", "an existing TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(src, "(file)", f"a readable UTF-8 TOML file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(src, "(file)", f"valid TOML ({exc})") from None
    try:
        raw = msgspec.convert(data, _FrontFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(src, _param_of(exc) or "(file)", str(exc).partition(" - at ")[0]) from None
    base = p.parent
    host, port = parse_listen(raw.listen, src)
    tokens_file = base / raw.tokens_file
    read_tokens(tokens_file, src)
    nodes = []
    for i, n in enumerate(raw.nodes):
        where = f"nodes[{i}]"
        if n.url.startswith("wss://"):
            if not n.fingerprint:
                raise ConfigError(src, f"{where}.fingerprint", "the node certificate's fingerprint, sha256:AB:CD:... "
                                                               "(`optimanode fingerprint` on the node prints it)")
            try:
                normalize_fingerprint(n.fingerprint)
            except ValueError as exc:
                raise ConfigError(src, f"{where}.fingerprint", f"sha256:<64 hex digits> ({exc})", n.fingerprint) from None
        elif not (n.url.startswith("ws://") and n.insecure_plaintext_for_development):
            raise ConfigError(src, f"{where}.url", "a node URL wss://HOST:PORT (ws:// only with "
                                                   "insecure_plaintext_for_development = true)", n.url)
        key = read_key_file(base / n.key_file, src, f"{where}.key_file")
        nodes.append(NodeTarget(url=n.url, key=key, fingerprint=n.fingerprint, plaintext=n.url.startswith("ws://")))
    urls = [n.url for n in nodes]
    if len(set(urls)) != len(urls):
        raise ConfigError(src, "nodes", "each node once (a url is listed twice)")
    return FrontConfig(host=host, port=port, tokens_file=tokens_file, nodes=nodes,
                       gateway_id=(raw.gateway_id or f"openai-front@{socket.gethostname()}")[:128],
                       metrics_interval_s=raw.metrics_interval_s, connect_timeout_s=raw.connect_timeout_s)


class Tokens:
    """The accepted bearer tokens, re-read when the file changes.

    A file emptied of tokens, or removed, revokes them all (every request gets 401 until it holds
    one again): an operator who deletes the last token means no one. A file that is broken (a short
    token, loose permissions) keeps those of the previous tokens that it still holds, since that is
    a mistake on the way to new ones, but never one it no longer holds: a rotation that writes the
    new file with loose permissions and renames it over the old must not leave the old token valid.
    The file counts as changed when its mtime, size, ctime, inode or mode does (a ``chmod 600``
    after such a rotation, or a rename, changes the ctime or the inode, not the mtime).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens = read_tokens(path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = self.path.stat()
            return st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino, st.st_mode
        except OSError:
            return None

    def _still_listed(self) -> list[bytes]:
        """The previous tokens that the (broken) file still holds, read without its checks."""
        try:
            words = {w.encode() for w in self.path.read_text(encoding="utf-8", errors="replace").split()}
        except OSError:
            return []
        return [t for t in self._tokens if t in words]

    def check(self, header: str | None) -> bool:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._tokens = [] if stamp is None else read_tokens(self.path, allow_empty=True)
            except ConfigError as exc:
                kept = self._still_listed()
                log.error("kept %d of the %d previous bearer tokens (those the file still holds): %s",
                          len(kept), len(self._tokens), exc)
                self._tokens = kept
            else:
                if not self._tokens:
                    log.error("%s holds no bearer token (or is gone): every request is refused until it holds one",
                              self.path)
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        g = given.strip().encode()
        ok = False
        for t in self._tokens:  # every token compared, in constant time each
            ok |= hmac.compare_digest(g, t)
        return ok


# ---------------------------------------------------------------------------------------------
# The fleet: nodes kept connected, in one pool


# Reconnecting to a node: the first delay, the cap it doubles up to, and how long a session must
# have stayed up for the next reconnect to start from the first delay again (a node that completes
# the handshake and closes at once must not be reconnected several times a second for ever).
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 30.0
STABLE_SESSION_S = 30.0


class Fleet:
    """One keeper task per node: connect, subscribe to metrics, sit in the pool until the link drops."""

    def __init__(self, cfg: FrontConfig) -> None:
        self.cfg = cfg
        self.pool = NodePool([])
        self._tasks: list[asyncio.Task[None]] = []
        self.state: dict[str, str] = {t.url: "connecting" for t in cfg.nodes}
        # The model ids of each node's last metrics report before its link dropped: while it
        # reconnects, its models are "not running" (503, retried), not unknown (404, final).
        self.last_models: dict[str, set[str]] = {}

    async def start(self) -> None:
        """Start the keepers and wait (bounded) until each node connected or failed once."""
        firsts = []
        for t in self.cfg.nodes:
            first = asyncio.Event()
            firsts.append(first)
            self._tasks.append(asyncio.create_task(self._keep(t, first), name=f"keep {t.url}"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * self.cfg.connect_timeout_s + 1):
                await asyncio.gather(*(f.wait() for f in firsts))

    async def _keep(self, t: NodeTarget, first: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        delay = RECONNECT_FIRST_S
        while True:
            try:
                c = await NodeClient.connect(t.url, t.key, fingerprint=t.fingerprint, gateway_id=self.cfg.gateway_id,
                                             open_timeout=self.cfg.connect_timeout_s,
                                             insecure_plaintext_for_development=t.plaintext)
            except (ConnectionFailed, OSError, ValueError) as exc:
                self.state[t.url] = f"unreachable: {exc}"
                log.warning("node %s: %s (next try in %.1f s)", t.url, exc, delay)
                first.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            up_since = loop.time()
            try:
                with contextlib.suppress(ClientError, RequestError, TimeoutError):
                    await c.subscribe(self.cfg.metrics_interval_s)
                    await c.wait_metrics(self.cfg.connect_timeout_s)
                self.pool.add(c)
                self.state[t.url] = f"connected ({c.node_id})"
                log.info("node %s connected: %s (protocol %d.%d)", t.url, c.node_id, c.version, c.minor)
                first.set()
                while not c.closed:  # NodeClient has no close event of its own; a bounded poll suffices
                    await asyncio.sleep(0.25)
                if loop.time() - up_since >= STABLE_SESSION_S:
                    delay = RECONNECT_FIRST_S  # a session that stayed up: start the backoff again
                log.warning("node %s (%s): connection lost; reconnecting in %.1f s", t.url, c.node_id, delay)
            finally:
                if c.latest_metrics is not None:
                    self.last_models[t.url] = {e.id for e in c.latest_metrics.executors}
                with contextlib.suppress(ValueError):
                    self.pool.clients.remove(c)
                if not c.closed:
                    with contextlib.suppress(Exception):
                        await c.close()
            self.state[t.url] = "reconnecting"
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def connected(self) -> list[NodeClient]:
        return [c for c in self.pool.clients if not c.closed]

    def on_a_lost_node(self, model: str) -> bool:
        """Whether a node that is not connected now had ``model`` when its link dropped."""
        return any(model in ids for url, ids in self.last_models.items()
                   if not self.state.get(url, "").startswith("connected"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = _TYPE_BY_STATUS.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return _json(self.body(), status=self.status, headers=self.headers)


def api_error(exc: BaseException, fleet: Fleet | None = None, model: str = "") -> ApiError:
    """The HTTP error for what the pool raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RemoteError):
        status = STATUS_BY_CODE.get(exc.code, 502)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return ApiError(status, exc.message, code=exc.code, headers=headers)
    if isinstance(exc, NoNodeAvailable):
        if fleet is not None and not fleet.connected():
            return ApiError(503, "no node is connected to this front now", code="no_node_available",
                            headers={"Retry-After": "1"})
        known = fleet is not None and any(
            any(e.id == model for e in c.latest_metrics.executors)
            for c in fleet.connected() if c.latest_metrics is not None)
        if known:
            return ApiError(503, f"model {model!r} is not running on any connected node", code="model_not_running",
                            headers={"Retry-After": "1"})
        if fleet is not None and fleet.on_a_lost_node(model):
            # A node restart or upgrade: the SDK retries a 503, it gives up on a 404.
            return ApiError(503, f"model {model!r} is on a node that is reconnecting", code="model_not_running",
                            headers={"Retry-After": "1"})
        return ApiError(404, f"no connected node has a model {model!r} (GET /v1/models lists them)",
                        code="unknown_model", param="model")
    if isinstance(exc, ConnectionLost):
        return ApiError(502, f"the node's connection closed during the request: {exc}", code="connection_lost")
    if isinstance(exc, (ClientError, RequestError)):
        return ApiError(502, str(exc), code="node_error")
    return ApiError(500, f"{type(exc).__name__}: {exc}", code="internal")


# ---------------------------------------------------------------------------------------------
# OpenAI request bodies (the fields this front reads; other fields are ignored, as OpenAI's SDKs
# and LangChain send some that mean nothing here, e.g. "user")


class _Function(msgspec.Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = "{}"


class _ToolCallIn(msgspec.Struct, kw_only=True):
    id: str
    function: _Function
    type: str = "function"


class _Part(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class _MessageIn(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[_Part] | None = None
    tool_calls: list[_ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class _FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class _ToolIn(msgspec.Struct, kw_only=True):
    function: _FunctionDef
    type: Literal["function"] = "function"


class _Named(msgspec.Struct, kw_only=True):
    name: str


class _ToolChoiceIn(msgspec.Struct, kw_only=True):
    function: _Named
    type: Literal["function"] = "function"


class _JsonSchemaSpec(msgspec.Struct, kw_only=True):
    schema: dict[str, Any] = {}
    name: str = ""
    strict: bool | None = None


class _ResponseFormatIn(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaSpec | None = None


class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    # null allowed, as OpenAI's spec does (clients generated from it send it): null is the default.
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    response_format: _ResponseFormatIn | None = None
    # Not OpenAI's: llama-server's sampler extensions, passed through.
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None


class ChatBody(_Common, kw_only=True):
    messages: list[_MessageIn]
    max_completion_tokens: int | None = None
    tools: list[_ToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | _ToolChoiceIn | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(_Common, kw_only=True):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None


def _param_of(exc: msgspec.ValidationError) -> str | None:
    """The field an error is about, in OpenAI's ``param`` form (``messages[0].role``)."""
    text = str(exc)
    where = text.rpartition(" - at `$")[2].rstrip("`").lstrip(".") if " - at `$" in text else ""
    missing = re.match(r"Object (?:missing required|contains unknown) field `([^`]+)`", text)
    if missing:
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return where or None


def _sampling(body: _Common, **extra: Any) -> SamplingParams:
    """The protocol's sampling fields for an OpenAI body; what the body leaves out keeps the node's default."""
    if body.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported: send n requests", param="n")
    fields: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "top_k",
                 "min_p", "repeat_penalty"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    fields.update({k: v for k, v in extra.items() if v is not None})
    if fields.get("top_p") == 0:
        # OpenAI allows top_p 0: only the likeliest token, which is greedy decoding (the link
        # wants top_p > 0).
        del fields["top_p"]
        fields["temperature"] = 0.0
    if body.stop is not None:
        fields["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.logit_bias:
        bias: dict[int, float] = {}
        for k, v in body.logit_bias.items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise ApiError(400, f"logit_bias keys are token ids (integers as strings), not {k!r}",
                               param="logit_bias") from None
        fields["logit_bias"] = bias
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or not rf.json_schema.schema:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        fields["response_format"] = {"type": "json_schema", "schema": rf.json_schema.schema}
    try:
        return msgspec.convert(fields, SamplingParams)
    except msgspec.ValidationError as exc:
        raise ApiError(400, str(exc).partition(" - at ")[0] + (f" ({_param_of(exc)})" if _param_of(exc) else ""),
                       param=_param_of(exc)) from None


def _content(m: _MessageIn, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"only text content parts are supported, not {part.type!r}",
                           param=f"messages[{i}].content")
        texts.append(part.text)
    return "".join(texts)


def chat_request(body: ChatBody) -> ChatRequest:
    """The protocol's ChatRequest for an OpenAI chat body."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params = _sampling(body, max_tokens=body.max_completion_tokens,
                       logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    if not body.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    names: dict[str, str] = {}  # tool call id -> function name, for tool turns (templates may show it)
    messages = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        calls = []
        for tc in m.tool_calls or []:
            args = tc.function.arguments
            calls.append(ToolCall(id=tc.id, name=tc.function.name,
                                  arguments=args if isinstance(args, str) else msgspec.json.encode(args).decode()))
            names[tc.id] = tc.function.name
        name = m.name
        if role == "tool" and name is None and m.tool_call_id is not None:
            name = names.get(m.tool_call_id)
        messages.append(ChatMessage(role=role, content=_content(m, i), tool_calls=calls, tool_call_id=m.tool_call_id,
                                    name=name))
    tools = [Tool(name=t.function.name, description=t.function.description, parameters=t.function.parameters)
             for t in body.tools or []]
    choice: Any = "auto"
    if isinstance(body.tool_choice, _ToolChoiceIn):
        choice = NamedToolChoice(name=body.tool_choice.function.name)
    elif body.tool_choice is not None:
        choice = body.tool_choice
    return _checked(ChatRequest(messages=messages, params=params, tools=tools, tool_choice=choice))


def completion_request(body: CompletionBody) -> CompletionRequest:
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise ApiError(400, "best_of > 1 is not supported", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request (a list of several is not supported)", param="prompt")
        prompt = prompt[0]
    return _checked(CompletionRequest(prompt=prompt, params=_sampling(body, logprobs=body.logprobs)))


# OpenAI's own limit on one embeddings request; the link takes EMBED_INPUTS_MAX (256) a request,
# so a longer list goes to the nodes as several requests (embed_requests).
OPENAI_EMBED_INPUTS_MAX = 2048


def embed_requests(body: EmbeddingBody) -> list[EmbedRequest]:
    """The node requests for ``body``'s inputs, in order, at most EMBED_INPUTS_MAX inputs each."""
    if body.dimensions is not None:
        raise ApiError(400, "dimensions is not supported (the model's own size is returned)", param="dimensions")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if len(inputs) > OPENAI_EMBED_INPUTS_MAX:
        raise ApiError(400, f"input: at most {OPENAI_EMBED_INPUTS_MAX} inputs in one request", param="input")
    if not inputs:
        return [_checked(EmbedRequest(input=inputs))]  # refused with the link's own message
    return [_checked(EmbedRequest(input=inputs[i:i + EMBED_INPUTS_MAX]))
            for i in range(0, len(inputs), EMBED_INPUTS_MAX)]


def merge_embeddings(dones: list[InferDone]) -> InferDone:
    """One reply for the node replies of one body's requests, in order: vectors joined, tokens summed."""
    if len(dones) == 1:
        return dones[0]
    if any(d.embeddings is msgspec.UNSET for d in dones):
        return next(d for d in dones if d.embeddings is msgspec.UNSET)  # embeddings_response says why
    vectors = [v for d in dones for v in d.embeddings]  # type: ignore[union-attr]
    usage = msgspec.structs.replace(dones[0].usage, prompt_tokens=sum(d.usage.prompt_tokens for d in dones))
    return msgspec.structs.replace(dones[0], embeddings=vectors, usage=usage)


NESTED_TOO_DEEPLY = "the body is nested too deeply (JSON of about 1,000 levels or more)"


def _checked(req: Any) -> Any:
    """The request re-decoded as the link will decode it: a limit it breaks is a 400 here, naming the field."""
    try:
        return msgspec.json.decode(msgspec.json.encode(req), type=type(req))
    except msgspec.ValidationError as exc:
        raise ApiError(400, str(exc), param=_param_of(exc)) from None
    except RecursionError:
        raise ApiError(400, NESTED_TOO_DEEPLY) from None


# ---------------------------------------------------------------------------------------------
# Replies in OpenAI's shape


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # msgspec, not json.dumps: faster on long vectors, and a non-finite float becomes null, not a 500.
    return Response(msgspec.json.encode(obj), status_code=status, headers=headers, media_type="application/json")


def _now() -> int:
    return int(time.time())


def _usage(done: InferDone) -> dict[str, Any]:
    u = done.usage
    # prompt_tokens_details.cached_tokens: OpenAI's name for the prompt tokens served from a cache.
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _finish(done: InferDone) -> str:
    # "cancelled" reaches a client only if the node cut the stream short without an error: it ended early.
    return "stop" if done.finish_reason == "cancelled" else done.finish_reason


def _tool_call(tc: ToolCall, index: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
    if index is not None:
        d = {"index": index, **d}
    return d


def _chat_logprobs(lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
             "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top]}
            for t in lps]


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{a.text: a.logprob for a in t.top} for t in lps], "text_offset": offsets}


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class _Reply:
    """One request's reply state: the OpenAI id, model and timestamps every chunk repeats."""

    kind: Literal["chat", "completion"]
    model: str
    include_usage: bool = False
    want_logprobs: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = _now()

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def chat_response(r: _Reply, chunks: list[TokenChunk], done: InferDone) -> dict[str, Any]:
    text = "".join(c.text for c in chunks)
    calls = done.tool_calls if done.tool_calls is not msgspec.UNSET else []
    message: dict[str, Any] = {"role": "assistant", "content": None if calls and not text.strip() else text}
    if calls:
        message["tool_calls"] = [_tool_call(tc) for tc in calls]
    logprobs = None
    if r.want_logprobs:
        logprobs = {"content": _chat_logprobs([t for c in chunks if c.logprobs is not msgspec.UNSET
                                              for t in c.logprobs])}
    return {**r.envelope("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": _finish(done)}],
            "usage": _usage(done)}


def completion_response(r: _Reply, chunks: list[TokenChunk], done: InferDone) -> dict[str, Any]:
    logprobs = None
    if r.want_logprobs:
        logprobs = _completion_logprobs([t for c in chunks if c.logprobs is not msgspec.UNSET for t in c.logprobs], 0)
    return {**r.envelope("text_completion"),
            "choices": [{"index": 0, "text": "".join(c.text for c in chunks), "logprobs": logprobs,
                         "finish_reason": _finish(done)}],
            "usage": _usage(done)}


async def chat_events(r: _Reply, first: TokenChunk | InferDone,
                      stream: AsyncIterator[TokenChunk | InferDone]) -> AsyncIterator[bytes]:
    """OpenAI's chat.completion.chunk events: the role, content and tool-call deltas, the finish, [DONE]."""
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        return _sse({**r.envelope("chat.completion.chunk"),
                     "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    sent: dict[str, int] = {}  # tool call id -> its index in the reply
    msg = first
    while True:
        if isinstance(msg, TokenChunk):
            delta: dict[str, Any] = {}
            if msg.text:
                delta["content"] = msg.text
            if msg.tool_calls is not msgspec.UNSET and msg.tool_calls:
                new = [tc for tc in msg.tool_calls if tc.id not in sent]
                for tc in new:
                    sent[tc.id] = len(sent)
                if new:
                    delta["tool_calls"] = [_tool_call(tc, sent[tc.id]) for tc in new]
            lp = None
            if r.want_logprobs and msg.logprobs is not msgspec.UNSET:
                lp = {"content": _chat_logprobs(msg.logprobs)}
            if delta or lp:
                yield chunk(delta, logprobs=lp)
        else:
            # Calls the node reported only in Done (none should be missing; this keeps them whole).
            rest = [tc for tc in (msg.tool_calls if msg.tool_calls is not msgspec.UNSET else []) if tc.id not in sent]
            for tc in rest:
                sent[tc.id] = len(sent)
            if rest:
                yield chunk({"tool_calls": [_tool_call(tc, sent[tc.id]) for tc in rest]})
            yield chunk({}, _finish(msg))
            if r.include_usage:
                yield _sse({**r.envelope("chat.completion.chunk"), "choices": [], "usage": _usage(msg)})
            yield _SSE_DONE
            return
        msg = await anext(stream)


async def completion_events(r: _Reply, first: TokenChunk | InferDone,
                            stream: AsyncIterator[TokenChunk | InferDone]) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        return _sse({**r.envelope("text_completion"),
                     "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    offset = 0
    msg = first
    while True:
        if isinstance(msg, TokenChunk):
            lp = None
            if r.want_logprobs and msg.logprobs is not msgspec.UNSET:
                lp = _completion_logprobs(msg.logprobs, offset)
            offset += len(msg.text)
            yield chunk(msg.text, logprobs=lp)
        else:
            yield chunk("", _finish(msg))
            if r.include_usage:
                yield _sse({**r.envelope("text_completion"), "choices": [], "usage": _usage(msg)})
            yield _SSE_DONE
            return
        msg = await anext(stream)


def embeddings_response(model: str, done: InferDone, encoding: str) -> dict[str, Any]:
    if done.embeddings is msgspec.UNSET:
        raise ApiError(502, "the node answered without embeddings (does it speak protocol minor 2?)",
                       code="node_error")
    data = []
    for i, vec in enumerate(done.embeddings):
        value: Any = vec
        if encoding == "base64":  # little-endian float32, as OpenAI's
            a = array.array("f", vec)
            if sys.byteorder != "little":
                a.byteswap()
            value = base64.b64encode(a.tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    prompt = done.usage.prompt_tokens
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


# ---------------------------------------------------------------------------------------------
# Running a request while watching the client


class ClientGone(Exception):
    """The HTTP client disconnected; its node request was cancelled."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and ClientGone raised.

    Cancelling ``work`` closes the node stream it iterates, which sends CancelInfer to the node.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch
    if task.cancelled():
        raise ClientGone()
    return task.result()


class _EventStream(Response):
    """A ``text/event-stream`` reply whose production is cancelled when the client leaves."""

    def __init__(self, events: AsyncIterator[bytes], on_end: Callable[[], Awaitable[None]]) -> None:
        # Not Response.__init__: it would announce the empty body's "content-length: 0".
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events, self.on_end = events, on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(receive, pump())
        except (ClientGone, OSError):
            log.info("client left during a stream; the node request was cancelled")
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            await self.on_end()


# ---------------------------------------------------------------------------------------------
# The application


class Front:
    """The HTTP endpoints over one Fleet."""

    def __init__(self, fleet: Fleet, tokens: Tokens) -> None:
        self.fleet, self.tokens = fleet, tokens

    def app(self) -> Starlette:
        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/embeddings", self.embeddings, methods=["POST"])]

        async def on_api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return exc.response()

        async def on_http(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 500)
            text = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
            return ApiError(status, text.get(status, str(getattr(exc, "detail", exc)))).response()

        return Starlette(routes=routes, exception_handlers={ApiError: on_api_error, 404: on_http, 405: on_http})

    def _auth(self, request: Request) -> None:
        if not self.tokens.check(request.headers.get("authorization")):
            raise ApiError(401, "a valid bearer token is needed (Authorization: Bearer <token>)",
                           code="invalid_api_key")

    async def _body(self, request: Request, shape: type[Any]) -> Any:
        self._auth(request)
        parts, size = [], 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > MAX_BODY_BYTES:
                    raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
                parts.append(part)
        except ClientDisconnect:
            # Gone before its body arrived: nothing to serve or answer (not a traceback in the log).
            raise ApiError(400, "the client disconnected before its body arrived", code="client_disconnected") from None
        try:
            return msgspec.json.decode(b"".join(parts), type=shape)
        except msgspec.ValidationError as exc:
            raise ApiError(400, str(exc), param=_param_of(exc)) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None
        except RecursionError:
            # ~1,000 levels (a tool's parameters, a schema): a bad request, not a 500 the SDK retries.
            raise ApiError(400, NESTED_TOO_DEEPLY) from None

    def _check_frame(self, model: str, req: InferenceRequest) -> None:
        """A node closes a connection that sends a frame over its limit, cutting every request on it:
        one too large for some connected node is refused here instead."""
        clients = self.fleet.connected()
        if not clients:
            return
        size = len(encode_link(Infer(id="r" * 16, model=model, request=req)))
        limit = min(c.max_frame_bytes for c in clients)
        if size > limit:
            raise ApiError(413, f"the request is {size} bytes as a frame; the nodes take at most {limit}",
                           code="request_too_large")

    async def _open(self, model: str, req: InferenceRequest
                    ) -> tuple[TokenChunk | InferDone, AsyncIterator[TokenChunk | InferDone]]:
        """The pool's stream and its first frame (so a refusal is an HTTP status, not a broken stream)."""
        self._check_frame(model, req)
        stream = self.fleet.pool.infer(model, req)
        try:
            first = await anext(stream)
        except BaseException as exc:
            await stream.aclose()  # type: ignore[attr-defined]
            if isinstance(exc, Exception):
                raise api_error(exc, self.fleet, model) from None
            raise
        return first, stream

    async def _collect(self, model: str, req: InferenceRequest) -> tuple[list[TokenChunk], InferDone]:
        first, stream = await self._open(model, req)
        chunks: list[TokenChunk] = []
        try:
            msg = first
            while isinstance(msg, TokenChunk):
                chunks.append(msg)
                msg = await anext(stream)
            return chunks, msg
        except Exception as exc:
            raise api_error(exc, self.fleet, model) from None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _run(self, request: Request, model: str, req: InferenceRequest, reply: _Reply, stream: bool,
                   events: Callable[..., AsyncIterator[bytes]],
                   whole: Callable[[_Reply, list[TokenChunk], InferDone], dict[str, Any]]) -> Response:
        try:
            if not stream:
                chunks, done = await until_disconnect(request.receive, self._collect(model, req))
                return _json(whole(reply, chunks, done))
            first, node_stream = await until_disconnect(request.receive, self._open(model, req))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the node request is already cancelled

        async def guarded() -> AsyncIterator[bytes]:
            try:
                async with contextlib.aclosing(events(reply, first, node_stream)) as produced:
                    async for data in produced:
                        yield data
            except Exception as exc:  # after the 200: one error event, which the SDKs raise
                err = api_error(exc, self.fleet, model)
                log.warning("stream of %s ended with %s: %s", model, err.code, err.message)
                yield _sse(err.body())

        return _EventStream(guarded(), node_stream.aclose)  # type: ignore[attr-defined]

    async def chat(self, request: Request) -> Response:
        body: ChatBody = await self._body(request, ChatBody)
        req = chat_request(body)
        include = bool(body.stream_options and body.stream_options.include_usage)
        reply = _Reply("chat", body.model, include_usage=include, want_logprobs=bool(body.logprobs))
        return await self._run(request, body.model, req, reply, bool(body.stream), chat_events, chat_response)

    async def completions(self, request: Request) -> Response:
        body: CompletionBody = await self._body(request, CompletionBody)
        req = completion_request(body)
        include = bool(body.stream_options and body.stream_options.include_usage)
        reply = _Reply("completion", body.model, include_usage=include, want_logprobs=body.logprobs is not None)
        return await self._run(request, body.model, req, reply, bool(body.stream), completion_events, completion_response)

    async def embeddings(self, request: Request) -> Response:
        body: EmbeddingBody = await self._body(request, EmbeddingBody)
        reqs = embed_requests(body)

        async def all_of() -> tuple[None, InferDone]:
            # Side by side (the pool may place them on different nodes); one failing ends the rest.
            tasks = [asyncio.ensure_future(self._collect(body.model, r)) for r in reqs]
            try:
                replies = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            return None, merge_embeddings([done for _, done in replies])

        try:
            _, done = await until_disconnect(request.receive, all_of())
        except ClientGone:
            return Response(status_code=499)
        return _json(embeddings_response(body.model, done, body.encoding_format or "float"))

    async def _running(self) -> dict[str, dict[str, Any]]:
        """Models some connected node runs now: ListModels on each (a bounded wait each), less what the
        node's latest metrics do not show running yet, since the pool routes by those (a model listed
        here is one a request can reach)."""
        clients = self.fleet.connected()

        async def one(c: NodeClient) -> Any:
            async with asyncio.timeout(10):
                return await c.models()

        found: dict[str, dict[str, Any]] = {}
        for c, res in zip(clients, await asyncio.gather(*(one(c) for c in clients), return_exceptions=True)):
            if isinstance(res, BaseException):
                log.warning("node %s did not list its models: %s", c.node_id, res)
                continue
            report = c.latest_metrics
            routed = None if report is None else {e.id for e in report.executors if e.state == "running"}
            for st in res:
                if st.state == "running" and (routed is None or st.id in routed):
                    entry = found.setdefault(st.id, {"id": st.id, "object": "model",
                                                     "created": st.info.mtime_ns // 1_000_000_000,
                                                     "owned_by": "optimanode", "nodes": 0})
                    entry["nodes"] += 1
        return found

    async def models(self, request: Request) -> Response:
        self._auth(request)
        found = await self._running()
        return _json({"object": "list", "data": [found[k] for k in sorted(found)]})

    async def model(self, request: Request) -> Response:
        self._auth(request)
        model = request.path_params["model"]
        found = await self._running()
        if model not in found:
            raise ApiError(404, f"no connected node runs a model {model!r}", code="model_not_found", param="model")
        return _json(found[model])


# ---------------------------------------------------------------------------------------------
# Serving


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopping on SIGINT/SIGTERM without re-raising the signal afterwards (as
        uvicorn does), which would end the process before the node connections are closed."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop_on, sig)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        def stop_on(self, sig: int) -> None:
            log.info("signal %d: stopping", sig)
            self.force_exit = self.should_exit and sig == signal.SIGINT  # a second Ctrl-C: now
            self.should_exit = True

    return Server


async def serve(cfg: FrontConfig, announce: Callable[[str], None] = print) -> int:
    """Connect to the nodes, then serve HTTP until SIGINT or SIGTERM; 0 after a clean stop."""
    import uvicorn

    fleet = Fleet(cfg)
    await fleet.start()
    for url, st in fleet.state.items():
        log.info("node %s: %s", url, st)
    try:
        front = Front(fleet, Tokens(cfg.tokens_file))
        server = _server_class()(uvicorn.Config(front.app(), host=cfg.host, port=cfg.port, lifespan="off",
                                               log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    await task
                    return 3  # could not bind: uvicorn said why on stderr
                await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        connected = sum(1 for s in fleet.state.values() if s.startswith("connected"))
        announce(f"optimanode openai: listening on http://{host}:{port}/v1 ({connected} of {len(cfg.nodes)} nodes "
                 f"connected)")
        await task
        return 0
    finally:
        await fleet.close()


def main(argv: list[str] | None = None) -> int:
    """``optimanode openai --config FILE``; returns the exit status (2: bad configuration)."""
    import argparse

    p = argparse.ArgumentParser(prog="optimanode openai",
                                description="An OpenAI-compatible HTTP front on a fleet of nodes (docs/openai.md).")
    p.add_argument("--config", required=True, help="the front's TOML file (listen, tokens_file, [[nodes]])")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"optimanode openai: bad configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rc = asyncio.run(serve(cfg, lambda line: print(line, flush=True)))
    log.info("stopped")
    return rc
