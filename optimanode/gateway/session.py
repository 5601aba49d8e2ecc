"""One authenticated Gateway connection: frames in, calls on the Node, frames out.

How it works:

* **Reading.** ``run`` reads frames until the connection closes and handles each one without
  waiting on the node, so a Cancel is seen while inferences stream. A frame that does not decode
  (text, not MessagePack, unknown ``type``, a field of the wrong type or out of its range) is
  answered with ``Error(code="bad_request")`` whose ``details.field`` names what was wrong (and
  whose ``id`` is the frame's ``id`` when one can be read from it); the session goes on.
* **Inference.** Each ``Infer`` runs as its own task: ``node.infer_to`` under a node-wide request
  id (``<session>/<gateway id>``, so two Gateways may use the same ids), each ``Chunk`` sent as a
  ``TokenChunk`` straight from the worker pipe's read callback (no task wakes per token), then
  exactly one terminal frame, ``InferDone`` or ``Error``.
* **Cancel.** ``CancelInfer(id)`` asks the node to stop decoding (the worker ends the request with
  ``finish_reason="cancelled"`` → ``InferDone``). A request not yet at the worker (still waiting
  for admission) has its task cancelled instead and ends with ``Error(code="cancelled")``.
  Either way there is no separate acknowledgement: the stream's terminal frame is the answer.
* **Control.** ListModels, GetModel, Enable, Disable, Configure, Rescan and ReadEvents go through
  one queue served in arrival order by one task (an Enable then a Disable land in that order);
  the Node journals every change before it returns, so the reply is sent only after that.
* **Metrics.** ``Subscribe`` starts a task that sends ``Metrics`` at once and then every
  ``interval_s`` on a fixed schedule (no drift); a new Subscribe replaces it, ``Unsubscribe`` ends it.
* **Sending.** ``send`` encodes a frame, puts the WebSocket header on it (a server's binary
  frame: two to ten bytes, no mask) and hands it to the connection's transport at once: no
  queue, no writer task, no lock and no ``await drain()`` per frame, which is what
  ``await ws.send`` costs and what a token stream would pay per token (those hops were a third
  of the node's CPU per streamed token). Token chunks are held until the end of the worker pipe
  read that brought them (``flush``): the chunks of one decode step, one per stream, leave in one
  TLS record and one socket write. Nothing that produces frames ever waits on this
  Gateway's socket, so a slow Gateway cannot hold a worker slot that other Gateways need, and
  frames leave in the order they were sent. What the socket has not taken yet waits in the
  transport's buffer, which is bounded: metrics are dropped (they are snapshots) once it holds
  half of ``send_buffer_bytes``; past the whole, the Gateway is not reading, and the session is
  closed with 4009 and its requests cancelled.
* **Ending.** When the connection closes, for whatever reason, every request of this session is
  cancelled (the node then sends Cancel to the worker, which frees its slot within a token).
  ``shutdown`` (node stopping) ends each running request with ``Error(code="shutting_down")`` and
  closes with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from optimanode.errors import RequestError
from optimanode.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_SLOW,
    Ack,
    CancelInfer,
    Chunk,
    Configure,
    Disable,
    Enable,
    Error,
    EventRecord,
    Events,
    GatewayToNode,
    GetModel,
    Hello,
    Infer,
    InferDone,
    ListModels,
    Metrics,
    MetricsReport,
    Models,
    ModelSettings,
    ModelStatus,
    NodeToGateway,
    ReadEvents,
    Rescan,
    Subscribe,
    TokenChunk,
    Unsubscribe,
    decode_from_gateway,
    encode_link,
)

if TYPE_CHECKING:
    from optimanode.node import Node

log = logging.getLogger(__name__)

# Requests one session may have running or queued at once; past it, new ones get `overloaded`.
MAX_IN_FLIGHT = 1024
# How long closing from our side may wait for the closing handshake before the TCP connection is cut.
CLOSE_TIMEOUT_S = 2.0
# Control calls waiting for the control task; past it, new ones get `overloaded`.
MAX_CONTROL_QUEUE = 256
_SETTINGS_FIELDS = frozenset(f.name for f in msgspec.structs.fields(ModelSettings))
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`")


_SHORT_HEADERS = [bytes((0x82, n)) for n in range(126)]


def binary_frame_header(n: int) -> bytes:
    """RFC 6455 header of an unfragmented, unmasked binary frame of ``n`` payload bytes."""
    if n < 126:
        return _SHORT_HEADERS[n]
    if n < 1 << 16:
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


@dataclass(eq=False)
class _Request:
    id: str
    node_rid: str
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    shutting_down: bool = False


@dataclass(eq=False)
class Session:
    ws: ServerConnection
    node: Node
    gateway_id: str
    sample: Callable[[], MetricsReport]
    send_buffer_bytes: int = 4 << 20
    sid: str = field(default_factory=lambda: secrets.token_hex(4))
    closing: bool = False
    shutting_down: bool = False
    metrics_dropped: int = 0

    def __post_init__(self) -> None:
        self.by = f"gateway:{self.gateway_id}"
        self._control: asyncio.Queue[GatewayToNode] = asyncio.Queue(maxsize=MAX_CONTROL_QUEUE)
        self._requests: dict[str, _Request] = {}
        self._metrics_task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []  # framed, not yet written (see flush)

    # -- the connection's life -------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; then cancel everything this Gateway started."""
        control = asyncio.create_task(self._control_loop(), name=f"gateway-control-{self.sid}")
        try:
            while True:
                try:
                    data = await self.ws.recv()
                except ConnectionClosed:
                    break
                self._on_frame(data)
        finally:
            self.closing = True
            tasks = [r.task for r in self._requests.values() if r.task is not None]
            tasks += [t for t in (self._metrics_task, control) if t is not None]
            for t in tasks:
                t.cancel()
            # Bounded: a cancelled request's cleanup only sends Cancel down a pipe.
            await asyncio.wait(tasks, timeout=10)

    def abort(self, code: int, reason: str) -> None:
        """Close from our side now: requests cancelled at once, not after the closing handshake."""
        if self.closing:
            return
        self.closing = True
        for r in self._requests.values():
            if r.task is not None:
                r.task.cancel()
        self._closer = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        # A Gateway that does not read never takes the close frame either (websockets' close waits
        # on the transport's drain without a deadline): past CLOSE_TIMEOUT_S the connection is cut.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    async def shutdown(self, timeout: float = 3.0) -> None:
        """The node is stopping: running requests end with ``shutting_down``, then close 1001."""
        self.shutting_down = True
        running = [r for r in self._requests.values() if r.task is not None]
        for r in running:
            r.shutting_down = True
            r.task.cancel()  # type: ignore[union-attr]
        if running:
            await asyncio.wait([r.task for r in running], timeout=timeout)  # type: ignore[misc]
        # The terminal frames are already in the transport, ahead of the close frame.
        await self._close(CLOSE_GOING_AWAY, "node shutting down")

    # -- sending ---------------------------------------------------------------------------

    def send(self, msg: NodeToGateway, *, droppable: bool = False) -> None:
        """Write one frame now; never waits (see the module docstring for what a full buffer means)."""
        if self.closing:
            return
        if droppable and self.ws.transport.get_write_buffer_size() * 2 >= self.send_buffer_bytes:
            self.metrics_dropped += 1
            return
        self._hold(msg)
        self.flush()

    def _hold(self, msg: NodeToGateway) -> None:
        """Frame one message into the pending list; ``flush`` writes it."""
        if not self.closing:
            payload = encode_link(msg)
            self._pending += (binary_frame_header(len(payload)), payload)

    def flush(self) -> None:
        """Write the pending frames with one transport write (one TLS record, one socket send).

        Frames are built here rather than by websockets (``Connection.send`` is a coroutine with a
        lock and a drain per frame; ``send_data`` writes each frame on its own). Only while the
        connection is OPEN: once websockets has sent or received a close frame, nothing more goes
        out from here. websockets' own control frames (pongs, the close) are written by websockets
        between whole frames, so the two never interleave inside a frame.
        """
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self.closing or self.ws.protocol.state is not State.OPEN:
            return  # the connection is ending: these frames have nowhere to go
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size()
        if buffered >= self.send_buffer_bytes:
            log.warning("gateway %s does not read its frames (%d bytes waiting); closing its session",
                        self.gateway_id, buffered)
            self.abort(CLOSE_TOO_SLOW, "send buffer overflow: the gateway does not read its frames")
            return
        transport.write(b"".join(pending))

    # -- receiving -------------------------------------------------------------------------

    def _on_frame(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.send(Error(code="bad_request", details={"field": "frame"},
                            message="text frames are not part of the protocol: send MessagePack in binary frames"))
            return
        try:
            msg = decode_from_gateway(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            where = _field_of(exc)
            self.send(Error(id=_peek_id(data), code="bad_request", message=f"frame does not decode: {exc}",
                            details={"field": where} if where else {}))
            return
        if isinstance(msg, Hello):
            self.send(Error(code="bad_request", message="already authenticated", details={"field": "type"}))
        elif isinstance(msg, Infer):
            self._start_infer(msg)
        elif isinstance(msg, CancelInfer):
            self._cancel(msg.id)
        elif isinstance(msg, Subscribe):
            self._subscribe(msg)
        elif isinstance(msg, Unsubscribe):
            self._stop_metrics()
            self.send(Ack(id=msg.id))
        else:
            if isinstance(msg, Configure):
                unknown = _unknown_settings(data)
                if unknown:
                    self.send(Error(id=msg.id, code="bad_request", details={"field": f"settings.{unknown}"},
                                    message=f"settings.{unknown}: not a model setting "
                                            f"(known: {', '.join(sorted(_SETTINGS_FIELDS))})"))
                    return
            if self.shutting_down:
                self.send(Error(id=msg.id, code="shutting_down", message="the node is shutting down"))
                return
            try:
                self._control.put_nowait(msg)
            except asyncio.QueueFull:
                self.send(Error(id=msg.id, code="overloaded",
                                message=f"more than {MAX_CONTROL_QUEUE} control calls are waiting"))

    # -- inference -------------------------------------------------------------------------

    def _start_infer(self, msg: Infer) -> None:
        if self.shutting_down:
            self.send(Error(id=msg.id, code="shutting_down", message="the node is shutting down"))
            return
        if msg.id in self._requests:
            # id "": this refusal must not read as the end of the stream that owns the id.
            self.send(Error(id="", code="bad_request", details={"field": "id", "duplicate_id": msg.id},
                            message=f"request id {msg.id!r} is already in flight on this connection"))
            return
        if len(self._requests) >= MAX_IN_FLIGHT:
            self.send(Error(id=msg.id, code="overloaded",
                            message=f"this connection already has {MAX_IN_FLIGHT} requests in flight"))
            return
        req = _Request(id=msg.id, node_rid=f"{self.sid}/{msg.id}")
        self._requests[msg.id] = req
        req.task = asyncio.create_task(self._infer(req, msg), name=f"gateway-infer-{req.node_rid}")

    async def _infer(self, req: _Request, msg: Infer) -> None:
        gateway_id, hold = msg.id, self._hold

        def on_chunk(out: Chunk) -> None:
            # Held until the flush after the worker's pipe read: one decode step of a batch is
            # one chunk per stream, and they leave as one TLS record and one socket write.
            hold(TokenChunk(id=gateway_id, text=out.text, tokens=out.tokens))

        try:
            done = await self.node.infer_to(msg.model, msg.request, on_chunk, self.flush, request_id=req.node_rid,
                                            by=self.by)
            self._forget(req)
            self.send(InferDone(id=msg.id, finish_reason=done.finish_reason, usage=done.usage, timings=done.timings))
        except RequestError as exc:
            self._forget(req)
            self.send(error_frame(msg.id, exc))
        except asyncio.CancelledError:
            self._forget(req)
            if req.shutting_down:
                self.send(Error(id=msg.id, code="shutting_down", message="the node is shutting down"))
                return
            if req.cancel_requested and not self.closing:
                # We cancelled it ourselves (it had not reached the worker): the cancel is the answer.
                self.send(Error(id=msg.id, code="cancelled", message="cancelled before it started"))
                return
            raise
        except Exception as exc:  # noqa: BLE001 - one request's bug must not end the session
            log.exception("request %s failed", req.node_rid)
            self._forget(req)
            self.send(Error(id=msg.id, code="internal", message=f"{type(exc).__name__}: {exc}"))
        finally:
            self._forget(req)

    def _forget(self, req: _Request) -> None:
        # Before the terminal frame is queued, so the Gateway may reuse the id as soon as it sees it.
        if self._requests.get(req.id) is req:
            del self._requests[req.id]

    def _cancel(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None or req.cancel_requested:
            return  # finished already (its terminal frame is on its way), or unknown: nothing to do
        req.cancel_requested = True
        if not self.node.cancel(req.node_rid) and req.task is not None:
            req.task.cancel()

    # -- metrics ---------------------------------------------------------------------------

    def _subscribe(self, msg: Subscribe) -> None:
        self._stop_metrics()
        self.send(Ack(id=msg.id))
        self._metrics_task = asyncio.create_task(self._push_metrics(msg.id, msg.interval_s),
                                                 name=f"gateway-metrics-{self.sid}")

    def _stop_metrics(self) -> None:
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            self._metrics_task = None

    async def _push_metrics(self, sub_id: str, interval: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        failing = False
        while True:
            try:
                report = self.sample()
            except Exception as exc:  # noqa: BLE001 - a sampler bug must not end the subscription
                if not failing:
                    log.exception("metrics sampling failed")
                failing = True
                self.send(Error(id=sub_id, code="internal", message=f"metrics sampling failed: {exc}"),
                          droppable=True)
            else:
                failing = False
                self.send(Metrics(id=sub_id, report=report), droppable=True)
            due += interval
            now = loop.time()
            if due < now:
                due = now  # fell behind (a busy loop): carry on from now rather than burst
            await asyncio.sleep(due - now)

    # -- control ---------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            msg = await self._control.get()
            try:
                reply = await self._control_call(msg)
            except RequestError as exc:
                reply = error_frame(msg.id, exc)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - answer the Gateway, keep the session
                log.exception("control call %s failed", type(msg).__name__)
                reply = Error(id=msg.id, code="internal", message=f"{type(exc).__name__}: {exc}")  # type: ignore[union-attr]
            self.send(reply)

    async def _control_call(self, msg: GatewayToNode) -> NodeToGateway:
        node = self.node
        if isinstance(msg, ListModels):
            return Models(id=msg.id, models=node.list())
        if isinstance(msg, GetModel):
            return ModelStatus(id=msg.id, status=node.status(msg.model))
        if isinstance(msg, Enable):
            return ModelStatus(id=msg.id, status=await node.enable(msg.model, by=self.by))
        if isinstance(msg, Disable):
            return ModelStatus(id=msg.id, status=await node.disable(msg.model, by=self.by))
        if isinstance(msg, Configure):
            return ModelStatus(id=msg.id, status=await node.configure(msg.model, msg.settings, by=self.by))
        if isinstance(msg, Rescan):
            await node.rescan()
            return Models(id=msg.id, models=node.list())
        if isinstance(msg, ReadEvents):
            events = await node.events(msg.model, limit=msg.limit)
            return Events(id=msg.id, events=[event_record(e) for e in events])
        raise AssertionError(f"not a control call: {type(msg).__name__}")


def event_record(event: Any) -> EventRecord:
    """A journal Event as the wire's EventRecord: the body's fields as a plain map."""
    data = msgspec.to_builtins(event.body)
    data.pop("type", None)
    return EventRecord(seq=event.seq, ts=event.ts, stream=event.stream, version=event.version, type=event.type,
                       data=data)


def error_frame(request_id: str, exc: RequestError) -> Error:
    """A RequestError as the wire's Error: details kept when they are strings or integers."""
    details: dict[str, str | int] = {}
    for k, v in exc.details.items():
        if v is None:
            continue
        if isinstance(v, bool):
            details[k] = int(v)
        elif isinstance(v, (int, str)):
            details[k] = v
        else:
            details[k] = str(v)
    return Error(id=request_id, code=exc.code, message=exc.message, details=details)


def _field_of(exc: Exception) -> str:
    """The dotted path of what was wrong, from msgspec's message; "frame" for the frame as a whole."""
    if not isinstance(exc, msgspec.ValidationError):  # (a ValidationError is also a DecodeError)
        return "frame"
    text = str(exc)
    at = _AT_PATH.search(text)
    path = at.group(1) if at else ""
    named = _NAMED_FIELD.search(text)
    if named:
        return f"{path}.{named.group(1)}" if path else named.group(1)
    return path or "frame"


def _peek_id(data: bytes) -> str:
    """The frame's ``id`` when it is a map with a string id, so the error reaches the right request."""
    try:
        raw = msgspec.msgpack.decode(data)
    except Exception:  # noqa: BLE001 - any garbage: there is no id
        return ""
    rid = raw.get("id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else ""


def _unknown_settings(data: bytes) -> str:
    """The first key of a Configure's settings that is not a model setting (a typo would be ignored)."""
    with contextlib.suppress(Exception):
        raw = msgspec.msgpack.decode(data)
        settings = raw.get("settings") if isinstance(raw, dict) else None
        if isinstance(settings, dict):
            for key in settings:
                if key not in _SETTINGS_FIELDS:
                    return str(key)
    return ""
