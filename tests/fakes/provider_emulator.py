"""An IPTV provider for the tests: Xtream-Codes-style URLs, a per-account connection limit, violations counted.

``GET /live/<user>/<password>/<name>.ts`` streams the live test broadcast of
:mod:`demo.upstream` (one shared ffmpeg).  Any user whose password is ``pass`` is
valid unless an ``accounts`` dict is given; a wrong password gets 403.  Each account
may hold ``limit`` open connections at once; one more gets 403 and is recorded in
``.violations`` -- the way such providers refuse, and the thing our software promises
never to cause, not even for a moment while it switches a channel's source.

That promise is kept by closing the old connection (the ffmpeg exits) right before
opening the new one, so the emulator must count a connection as closed as soon as the
client has closed it, not when the server next fails a write.  Before it judges a new
request, it re-checks every connection the account holds (:func:`peer_has_closed`):

* our own handler has ended, or the transport is closing (asyncio's reader saw the EOF
  or an error first: aiohttp's ``eof_received`` returns None, so the transport closes
  itself and later closes the socket, whose ``fileno()`` becomes -1);
* otherwise the kernel is asked directly: a non-blocking ``recv(1, MSG_PEEK)`` on a dup
  of the socket returns b"" once the peer's FIN has arrived, raises ConnectionResetError
  once its RST has (a killed reader with unread data resets), and raises BlockingIOError
  while the peer is connected and silent.  Peeking consumes nothing, and an RST's error,
  if the peek takes it, leaves the socket at EOF for asyncio's reader.

So the answer does not depend on whether the event loop has got round to the old
socket yet: a client that has exited before its successor connects (its sockets are
closed by the kernel at exit, FIN or RST queued on loopback at once) is never counted.
All of this runs on the loop thread with no ``await`` between the check and the
registration, so two requests cannot both take the last slot.

In a synchronous test::

    with ProviderEmulator(limit=1) as provider:
        url = provider.url("alice", "pass", "1")
        ...
        assert provider.violations == []
        assert provider.max_concurrent.get("alice", 0) <= 1

Loopback only.  ``stop()`` ends the streams, the server and the broadcaster's ffmpeg.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web

from demo.upstream import Broadcaster, stream_broadcast

PASSWORD = "pass"


def peer_has_closed(transport, sock) -> str | None:
    """Why the client of this connection is gone ("transport_closing", "socket_closed",
    "peer_eof", "peer_reset"), or None while it is still connected.  Loop thread only:
    the loop is the one closer of the socket, so its fd cannot be reused under us."""
    if transport is None or transport.is_closing():
        return "transport_closing"
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return "socket_closed"
    try:
        # A dup of the fd: TransportSocket has no recv(), and closing the dup leaves ours open.
        with socket.fromfd(fd, sock.family, sock.type) as probe:
            probe.settimeout(0.0)  # never wait, even under socket.setdefaulttimeout()
            data = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None  # connected, nothing to read: the normal case
    except ConnectionResetError:
        return "peer_reset"
    except OSError:
        return "socket_closed"
    # b"": the peer's FIN.  Data: the client sent more than its request; it is still there.
    return "peer_eof" if data == b"" else None


@dataclass(eq=False)
class _Connection:
    id: int
    user: str
    path: str
    transport: object  # captured now: request.transport is None once lost
    sock: object  # asyncio's TransportSocket (never a bare fd number)
    opened: float = field(default_factory=time.monotonic)


class ProviderEmulator:
    """The provider, in a thread of its own with its own event loop; the accessors are
    thread-safe and return copies."""

    def __init__(
        self,
        limit: int,
        ffmpeg: str = "ffmpeg",
        accounts: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the provider emulator listens on loopback only")
        self.limit = limit
        self.accounts = accounts
        self.host = host
        self.port = port
        self._broadcaster = Broadcaster(ffmpeg)
        self._lock = threading.Lock()
        self._open: dict[str, dict[int, _Connection]] = collections.defaultdict(dict)
        self._ids = itertools.count(1)
        self._violations: list[dict] = []
        self._max: dict[str, int] = {}
        self._requests: list[tuple[str, str]] = []
        self._accepted: collections.Counter = collections.Counter()
        self._pruned: collections.Counter = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- life -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Self:
        """Start the thread; return once the server listens (``.port`` is then the real one)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="provider-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the provider emulator did not start listening")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError("the provider emulator failed to start") from self._error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """End every stream, close the server, stop (then if need be kill) the broadcaster's ffmpeg."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and event is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("the provider emulator did not stop")
        process = self._broadcaster.process
        if process is not None and process.returncode is None:  # last resort: by its pid
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def url(self, user: str, password: str = PASSWORD, name: str = "1") -> str:
        return f"http://{self.host}:{self.port}/live/{user}/{password}/{name}.ts"

    # -- what the tests read (any thread) ---------------------------------------------
    @property
    def violations(self) -> list[dict]:
        """One dict per refused-for-the-limit request: {user, open_before, at (monotonic)}."""
        with self._lock:
            return [dict(v) for v in self._violations]

    @property
    def max_concurrent(self) -> dict[str, int]:
        """Per account, the most connections it ever held at once (a refused one counted as open_before + 1)."""
        with self._lock:
            return dict(self._max)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(path, User-Agent) of every request, in arrival order, whatever its answer."""
        with self._lock:
            return list(self._requests)

    @property
    def accepted(self) -> dict[str, int]:
        """Per account, how many streams were granted."""
        with self._lock:
            return dict(self._accepted)

    @property
    def prune_reasons(self) -> dict[str, int]:
        """How closed connections were noticed (handler_done, transport_closing, socket_closed, peer_eof, peer_reset)."""
        with self._lock:
            return dict(self._pruned)

    def open_count(self, user: str, prune: bool = True) -> int:
        """Connections the account holds now.  With ``prune``, those whose client is gone
        are dropped first (on the loop thread), exactly as a new request would see it."""
        loop = self._loop
        if prune and loop is not None and loop.is_running():
            if threading.current_thread() is self._thread:
                return self._prune_and_count(user)
            with contextlib.suppress(RuntimeError):
                return asyncio.run_coroutine_threadsafe(self._async_count(user), loop).result(10)
        with self._lock:
            return len(self._open.get(user, ()))

    # -- the loop thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = self._error or exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/live/{user}/{password}/{name}.ts", self._live)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            self.port = runner.addresses[0][1]
        except Exception as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            await runner.cleanup()
            return
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            for queue in list(self._broadcaster.listeners):  # every stream ends now
                queue.put_nowait(None)
            self._broadcaster.listeners.clear()
            await runner.cleanup()
            await self._stop_broadcaster()

    async def _stop_broadcaster(self) -> None:
        broadcaster = self._broadcaster
        try:
            await asyncio.wait_for(broadcaster.stop(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                broadcaster.process.kill()
            await broadcaster.process.wait()

    @web.middleware
    async def _record(self, request: web.Request, handler):
        with self._lock:
            self._requests.append((request.path, request.headers.get("User-Agent", "")))
        return await handler(request)

    async def _async_count(self, user: str) -> int:
        return self._prune_and_count(user)

    def _prune_and_count(self, user: str) -> int:
        """Drop the account's connections whose client has gone; how many remain.  Loop thread."""
        with self._lock:
            held = list(self._open.get(user, {}).values())
        gone = [(conn, reason) for conn in held if (reason := peer_has_closed(conn.transport, conn.sock)) is not None]
        with self._lock:
            table = self._open.get(user, {})
            for conn, reason in gone:
                if table.pop(conn.id, None) is not None:
                    self._pruned[reason] += 1
            return len(table)

    def _authorised(self, user: str, password: str) -> bool:
        if self.accounts is None:
            return password == PASSWORD
        return self.accounts.get(user) == password

    async def _live(self, request: web.Request) -> web.StreamResponse:
        user, password = request.match_info["user"], request.match_info["password"]
        if not self._authorised(user, password):
            return self._refuse("bad credentials\n")
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or transport.is_closing():
            return self._refuse("gone\n")  # the asker itself left already; nothing to count
        # From here to the registration: no await, so no other request can interleave.
        open_before = self._prune_and_count(user)
        now = time.monotonic()
        with self._lock:
            if open_before >= self.limit:
                self._violations.append({"user": user, "open_before": open_before, "at": now})
                self._max[user] = max(self._max.get(user, 0), open_before + 1)
                refused = True
            else:
                conn = _Connection(next(self._ids), user, request.path, transport, sock, now)
                self._open[user][conn.id] = conn
                self._max[user] = max(self._max.get(user, 0), len(self._open[user]))
                self._accepted[user] += 1
                refused = False
        if refused:
            return self._refuse(f"max connections ({self.limit}) reached\n")
        try:
            return await self._stream(request)
        finally:
            with self._lock:
                if self._open[user].pop(conn.id, None) is not None:
                    self._pruned["handler_done"] += 1

    @staticmethod
    def _refuse(text: str) -> web.Response:
        response = web.Response(status=403, text=text)
        response.force_close()  # like the providers: answer, then hang up
        return response

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """demo.upstream's live stream: a burst from the last keyframe, then the live edge."""
        return await stream_broadcast(request, self._broadcaster)
