"""A transparent HTTP proxy in front of nginx that keeps every playlist a player fetched.

Players are pointed at it instead of nginx; it forwards each request as it came (method,
path, query, headers), answers with nginx's status, headers and body, and records the
body of every ``.m3u8`` answer with the time it was fetched, for the strict HLS check
(tests/hls_check.py).  Loopback only; runs in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
from aiohttp import web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}


class RecordingProxy:
    def __init__(self, upstream_port: int):
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.fetched: list[tuple[float, str, int, str]] = []  # (time, path?query, status, body)
        self.statuses: list[tuple[float, str, int]] = []  # every answer: (time, path?query, status)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "RecordingProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the recording proxy did not start")
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def playlists(self, path_qs: str) -> list[str]:
        """Every body of ``path_qs`` (one player's playlist URL) answered 200, in fetch order."""
        return [body for _, fetched, status, body in list(self.fetched) if fetched == path_qs and status == 200]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._session.close())

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(
            request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers, allow_redirects=False
        ) as answer:
            body = await answer.read()
        now = time.time()
        self.statuses.append((now, request.path_qs, answer.status))
        if request.path.endswith(".m3u8"):
            self.fetched.append((now, request.path_qs, answer.status, body.decode("ascii", "replace")))
        out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return web.Response(status=answer.status, headers=out, body=body)
