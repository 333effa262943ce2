"""Bounds on the launcher's HTTP connections (aiohttp has no request-head timeout).

nginx is the launcher's client: it sends a whole request head at once and keeps a few
idle connections open.  Anything else on the host (the launcher listens on loopback)
could hold connections open for nothing, one byte at a time; so each connection is
wrapped: its first request head must arrive within HEAD_TIMEOUT, an idle keep-alive
connection is closed after KEEPALIVE_TIMEOUT (aiohttp's own timer, which also ends a
later head sent too slowly), and beyond MAX_CONNECTIONS new connections are closed at once.
"""
from __future__ import annotations

import asyncio

# Seconds a connection has to send its first request head (nginx sends it in one write).
HEAD_TIMEOUT = 5.0
# Seconds an idle keep-alive connection stays open: above nginx's upstream keepalive_timeout
# (60 s), so nginx is the one that closes it (a request never meets a connection we close).
KEEPALIVE_TIMEOUT = 75.0
# Open connections at most (nginx keeps 16 idle ones, and holds one per waiting cold start).
MAX_CONNECTIONS = 2048
HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024           # bytes looked at for the end of the head (aiohttp refuses more)


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the bounds above."""

    def __init__(self, inner: asyncio.Protocol, open_connections: set):
        self._inner = inner
        self._open = open_connections
        self._head = b""
        self._deadline: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        if len(self._open) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self._open.add(self)
        self._deadline = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.abort)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            self._head = (self._head + data)[-MAX_HEAD:]
            if HEAD_END in self._head:
                self._deadline.cancel()
                self._deadline, self._head = None, b""
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self in self._open:
            self._open.discard(self)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


async def listen(server, host: str, port: int, backlog: int) -> asyncio.base_events.Server:
    """Listen for aiohttp's ``server`` (a web.Server: one protocol per connection) with the
    bounds above."""
    open_connections: set = set()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: GuardedProtocol(server(), open_connections), host, port,
                                    backlog=backlog)
