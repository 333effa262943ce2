"""Bounds on the launcher's HTTP connections (aiohttp has no request-head timeout).

nginx is the launcher's client: it sends a whole request head at once and keeps a few
idle connections open.  Anything else on the host (the launcher listens on loopback)
could hold connections open for nothing, one byte at a time; so each connection is
wrapped: its first request head must arrive within HEAD_TIMEOUT, an idle keep-alive
connection is closed after KEEPALIVE_TIMEOUT (aiohttp's own timer, which also ends a
later head sent too slowly).  At MAX_CONNECTIONS, a new connection takes the place of the
one idle the longest (no request being answered: nginx's idle keep-alive ones, or a head
still being sent); when every connection has a request in progress, the new one is closed.
So idle connections held open by anyone can never lock nginx out.
"""

from __future__ import annotations

import asyncio
import time

# Seconds a connection has to send its first request head (nginx sends it in one write).
HEAD_TIMEOUT = 5.0
# Seconds an idle keep-alive connection stays open: above nginx's upstream keepalive_timeout
# (60 s), so nginx is the one that closes it (a request never meets a connection we close).
KEEPALIVE_TIMEOUT = 75.0
# Open connections at most (nginx keeps 16 idle ones, and holds one per waiting cold start).
MAX_CONNECTIONS = 2048
HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024  # bytes looked at for the end of the head (aiohttp refuses more)


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the bounds above."""

    def __init__(self, inner: asyncio.Protocol, open_connections: set):
        self._inner = inner
        self._open = open_connections
        self._head = b""
        self._deadline: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.last_active = time.monotonic()

    @property
    def busy(self) -> bool:
        """A request is being answered on it (aiohttp's handler runs)."""
        return bool(getattr(self._inner, "_request_in_progress", False))

    def connection_made(self, transport) -> None:
        self._transport = transport
        if len(self._open) >= MAX_CONNECTIONS and not _evict_idlest(self._open):
            transport.abort()
            return
        self._open.add(self)
        self._deadline = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.abort)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._deadline is not None:
            # Empty lines before a request line are allowed (and ignored): they are no head.
            self._head = (self._head + data).lstrip(b"\r\n")[-MAX_HEAD:]
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

    def close(self) -> None:
        """Cut it (evicted): aiohttp hears the connection is lost."""
        if self._deadline is not None:
            self._deadline.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._inner.connection_lost(None)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _evict_idlest(open_connections: set) -> bool:
    """Close the connection idle the longest; False when every one is answering a request."""
    idle = [c for c in open_connections if not c.busy]
    if not idle:
        return False
    idlest = min(idle, key=lambda c: c.last_active)
    open_connections.discard(idlest)
    idlest.close()
    return True


async def listen(server, host: str, port: int, backlog: int) -> asyncio.base_events.Server:
    """Listen for aiohttp's ``server`` (a web.Server: one protocol per connection) with the
    bounds above."""
    open_connections: set = set()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: GuardedProtocol(server(), open_connections), host, port, backlog=backlog)
