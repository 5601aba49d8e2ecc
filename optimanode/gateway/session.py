"""One authenticated Gateway connection: frames in, calls on the Node, frames out.

How it works:

* **Reading.** The connection (gateway/server.py, over ``optimanode.link``) hands each complete
  message to ``on_frame`` from its read callback; ``on_frame`` never waits on the node, so a Cancel
  is seen while inferences stream. ``run`` lasts as long as the connection. A frame that does not decode
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
* **Sending.** ``send`` encodes a frame, has the link frame it (``Link.send``) and writes it to
  the connection's transport at once: no queue, no writer task,
  no lock and no ``await drain()`` per frame, which is what an awaited send costs and what a token
  stream would pay per token (those hops were a third of the node's CPU per streamed token).
  Token chunks are only framed (``_hold``) until the end of the worker pipe read that brought them
  (``flush``): the chunks of one decode step, one per stream, leave in one TLS record and one
  socket write. Nothing that produces frames ever waits on this Gateway's socket, so a slow
  Gateway cannot hold a worker slot that other Gateways need, and frames leave in the order they
  were sent. What the socket has not taken yet waits in the transport's buffer, which is bounded
  (the link's flow-control policy, ``Link.should_drop`` / ``Link.overflowed``): metrics are
  dropped (they are snapshots) once it holds half of ``send_buffer_bytes``; past the whole, the
  Gateway is not reading, and the session is closed with 4009 (the connection is cut 2 s later if
  the close frame is not taken either) and its requests cancelled.
* **Ending.** When the connection closes, for whatever reason, every request of this session is
  cancelled (the node then sends Cancel to the worker, which frees its slot within a token).
  ``shutdown`` (node stopping) ends each running request with ``Error(code="shutting_down")`` and
  closes with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from optimanode.constraints import explain
from optimanode.errors import RequestError
from optimanode.link import LinkProtocol
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
    peek_id_type,
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


@dataclass(eq=False)
class _Request:
    id: str
    node_rid: str
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    shutting_down: bool = False


@dataclass(eq=False)
class Session:
    conn: LinkProtocol
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
        self._link = self.conn.link
        self._link.send_buffer_bytes = self.send_buffer_bytes  # the bound the link's flow control applies
        self._frame = self._link.send  # frames a payload into the link; flush writes it

    # -- the connection's life -------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; then cancel everything this Gateway started."""
        control = asyncio.create_task(self._control_loop(), name=f"gateway-control-{self.sid}")
        try:
            await self.conn.wait_closed()  # frames arrive through on_frame meanwhile
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
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        # A Gateway that does not read never takes the close frame either: past CLOSE_TIMEOUT_S
        # the connection is cut.
        self.conn.close(code, reason, timeout=CLOSE_TIMEOUT_S)

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
        self._close(CLOSE_GOING_AWAY, "node shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                await self.conn.wait_closed()

    # -- sending ---------------------------------------------------------------------------

    def send(self, msg: NodeToGateway, *, droppable: bool = False) -> None:
        """Write one frame now; never waits (see the module docstring for what a full buffer means)."""
        if self.closing:
            return
        if droppable and self._link.should_drop(self.conn.transport.get_write_buffer_size()):  # type: ignore[union-attr]
            self.metrics_dropped += 1
            return
        self._hold(msg)
        self.flush()

    def _hold(self, msg: NodeToGateway) -> None:
        """Frame one message in the link (nothing is written yet); ``flush`` writes it."""
        if not self.closing:
            self._frame(encode_link(msg))  # False once the link is not open: nowhere to go

    def flush(self) -> None:
        """Write the frames held since the last flush with one transport write (one TLS record,
        one socket send), unless the Gateway has stopped reading (then: close 4009).

        ``Link.send`` only appends a frame to ``Link.framed``; ``data_to_send`` returns those and
        then websockets' own frames (pongs, the close), all whole, and the connection writes the
        list joined. Once a close frame is sent or received the link frames nothing more.
        """
        link = self._link
        if not link.framed:
            return  # nothing held (websockets' own frames are written by the connection itself)
        data = link.data_to_send()
        conn = self.conn
        transport = conn.transport
        if transport is None:
            return
        buffered = transport.get_write_buffer_size()
        if link.overflowed(buffered) and not self.closing:
            log.warning("gateway %s does not read its frames (%d bytes waiting); closing its session",
                        self.gateway_id, buffered)
            # The frames held for it are dropped, not queued behind the rest.
            self.abort(CLOSE_TOO_SLOW, "send buffer overflow: the gateway does not read its frames")
            return
        conn.write(data)

    # -- receiving -------------------------------------------------------------------------

    def on_frame(self, data: str | bytes) -> None:
        """One complete message from the Gateway (called from the connection's read callback)."""
        if isinstance(data, str):
            self.send(Error(code="bad_request", details={"field": "frame"},
                            message="text frames are not part of the protocol: send MessagePack in binary frames"))
            return
        try:
            msg = decode_from_gateway(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            where, expected = _field_of(exc)
            message = f"{where}: expected {expected}" if where != "frame" else f"frame does not decode: {exc}"
            self.send(Error(id=peek_id_type(data)[0], code="bad_request", message=message, details={"field": where}))
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
        req.task.add_done_callback(functools.partial(self._infer_ended, req))

    def _infer_ended(self, req: _Request, task: asyncio.Task[None]) -> None:
        """The answer for a request whose task was cancelled: the one place for it, since a task
        cancelled before it first ran (an Infer and its CancelInfer in one read, a caller cancelled
        right after sending) never enters its body, whose branches would otherwise answer. Runs
        before anyone awaiting the task resumes (registered first), so the frame precedes a close."""
        if not task.cancelled():
            return  # the body answered (and forgot the id)
        self._forget(req)
        if req.shutting_down:
            self.send(Error(id=req.id, code="shutting_down", message="the node is shutting down"))
        elif req.cancel_requested and not self.closing:
            # We cancelled it ourselves (it had not reached the worker): the cancel is the answer.
            self.send(Error(id=req.id, code="cancelled", message="cancelled before it started"))

    async def _infer(self, req: _Request, msg: Infer) -> None:
        gateway_id, hold = msg.id, self._hold

        def on_chunk(out: Chunk) -> None:
            # Held until the flush after the worker's pipe read: one decode step of a batch is
            # one chunk per stream, and they leave as one TLS record and one socket write.
            hold(TokenChunk(id=gateway_id, text=out.text, tokens=out.tokens, logprobs=out.logprobs,
                            tool_calls=out.tool_calls))

        try:
            done = await self.node.infer_to(msg.model, msg.request, on_chunk, self.flush, request_id=req.node_rid,
                                            by=self.by)
            self._forget(req)
            self.send(InferDone(id=msg.id, finish_reason=done.finish_reason, usage=done.usage, timings=done.timings,
                                tool_calls=done.tool_calls, embeddings=done.embeddings))
        except RequestError as exc:
            self._forget(req)
            self.send(error_frame(msg.id, exc))
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
            try:
                self.send(reply)
            except (msgspec.EncodeError, OverflowError, UnicodeError, TypeError, ValueError) as exc:
                # A value the link cannot carry (an integer past 64 bits from a model's header, a
                # path that is not UTF-8): the call gets an error and this loop goes on serving
                # the session's other control calls.
                log.exception("the reply to control call %s could not be encoded", type(msg).__name__)
                self.send(Error(id=msg.id, code="internal",  # type: ignore[union-attr]
                                message=f"the reply could not be encoded: {type(exc).__name__}: {exc}"))

    async def _control_call(self, msg: GatewayToNode) -> NodeToGateway:
        node = self.node
        if isinstance(msg, ListModels):
            return Models(id=msg.id, models=node.list())
        if isinstance(msg, GetModel):
            return ModelStatus(id=msg.id, status=node.status(msg.model))
        if isinstance(msg, Enable):
            return ModelStatus(id=msg.id, status=await node.enable(msg.model, by=self.by))
        if isinstance(msg, Disable):
            return ModelStatus(id=msg.id, status=await node.disable(msg.model, by=self.by, now=msg.now))
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


def _field_of(exc: Exception) -> tuple[str, str]:
    """(the dotted path of what was wrong, what was expected there); "frame" for the frame as a whole."""
    if not isinstance(exc, msgspec.ValidationError):  # (a ValidationError is also a DecodeError)
        return "frame", "a MessagePack map"
    path, expected = explain(exc, GatewayToNode)
    return path or "frame", expected


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
