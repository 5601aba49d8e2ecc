"""Two ends of a Gateway link in one event loop, without a socket: the node's LinkProtocol and the client's.

``MemoryTransport`` stands in for the TCP/TLS transport only: what one end writes is handed to
the other end's ``data_received`` on the next loop turn, in order. Everything above it is the
real code (``optimanode.link`` on both ends, the node's ``Session``, ``NodeClient``). A reader can
be paused (``hold``): what is written to it then stays in the writer's buffer, which
``get_write_buffer_size`` reports, as a socket whose peer does not read would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from optimanode.link import Link, LinkProtocol


class MemoryTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: asyncio.Protocol | None = None  # the protocol at the other end
        self.own: asyncio.Protocol | None = None  # the protocol this transport writes for
        self.held = False
        self.buffer: list[bytes] = []
        self.written: list[bytes] = []  # every write, as it was made (one entry per transport.write)
        self.closing = False
        self._lost = False

    # -- writing -----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return
        data = bytes(data)
        self.written.append(data)
        self.buffer.append(data)
        if not self.held:
            self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        if self.held or self.peer is None or self._lost:
            return
        data, self.buffer = b"".join(self.buffer), []
        if data:
            self.peer.data_received(data)

    def hold(self) -> None:
        """The peer stops reading: writes pile up here."""
        self.held = True

    def release(self) -> None:
        self.held = False
        self.loop.call_soon(self._deliver)

    def get_write_buffer_size(self) -> int:
        return sum(len(b) for b in self.buffer)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.loop.call_soon(self._eof)

    def _eof(self) -> None:
        self._deliver()
        if self.peer is not None and not self._lost:
            self.peer.eof_received()
        self.close()

    # -- ending ------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.buffer = []
        self.close()

    def _lose(self) -> None:
        if self._lost:
            return
        self._deliver()
        self._lost = True
        for proto in (self.own, self.peer):
            if proto is not None:
                other = getattr(proto, "transport", None)
                if isinstance(other, MemoryTransport):
                    other.closing = True
                    other._lost = True
                if not getattr(proto, "_memlost", False):
                    proto._memlost = True  # type: ignore[attr-defined]
                    proto.connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def open_pair(server: LinkProtocol, client: LinkProtocol) -> tuple[MemoryTransport, MemoryTransport]:
    """Wire ``server`` (a node end) to ``client`` (a Gateway end) and run the HTTP upgrade."""
    loop = asyncio.get_running_loop()
    to_client, to_server = MemoryTransport(loop), MemoryTransport(loop)
    to_client.own, to_client.peer = server, client
    to_server.own, to_server.peer = client, server
    server.attach(to_client)
    opened = loop.create_future()
    base_on_open = server.on_open

    def on_open() -> None:
        base_on_open()
        if not opened.done():
            opened.set_result(None)

    server.on_open = on_open  # type: ignore[method-assign]
    client.connection_made(to_server)  # the client writes its upgrade request at once
    if not hasattr(client, "opened"):  # a plain LinkProtocol: attach and upgrade here
        client.attach(to_server)
        client.link.upgrade()
        client.flush()
    async with asyncio.timeout(5):
        await opened
    return to_client, to_server


def server_end() -> LinkProtocol:
    return LinkProtocol(Link.server(ping_interval_s=None, ping_timeout_s=None))
