"""A live upstream of our own: MPEG-TS made by ffmpeg, served over HTTP at real-time pace.

One ffmpeg encodes a test pattern and a tone (keyframe every second) to a pipe;
every client of ``/live/<anything>.ts`` gets the same live broadcast.  Like the
restream servers hosts pull from, a joining client first gets a burst of the
last couple of seconds, starting at a keyframe, then the live edge.  ``/forbidden/...`` answers 403
and ``/missing/...`` 404, and ``/stall/<s>/...`` goes silent after s seconds with its
connection open, for the failure paths.  ``/redirect/<name>?to=URL`` answers 302 to URL
(a hostile source), and ``/gate/<name>`` plays only for a browser-like session: a
request with Accept-Language gets a cookie and a redirect to itself, one with the cookie
gets the stream, anything else 403.  Loopback only.

Faults on demand, to watch what a viewer sees (the continuity tests, bench/continuity.py,
and an operator practising with ``make demo``), each a POST:

* ``/control/drop``: every client connection closes at once (a provider dropping us);
* ``/control/stall?seconds=N``: nothing is sent for N seconds, connections stay open;
* ``/control/restart[?drop=1]``: the encoder starts again, its timestamps from zero (with
  ``drop=1`` the connections close too: an upstream restarted);
* ``/control/fail?name=X`` / ``/control/heal?name=X``: ``/live/X`` answers 404 and its
  connections close (a source gone for good), until healed.

Run alone: ``python -m demo.upstream --port 8090`` (Ctrl-C stops it and ffmpeg).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import shutil
import signal
import time

from aiohttp import web

log = logging.getLogger("streamkeeper.demo.upstream")

TS_PACKET = 188
READ_PACKETS = 64  # 12 KiB per read from ffmpeg
CLIENT_QUEUE = 256  # chunks a slow client may lag before it is dropped
BURST_SECONDS = 2.0  # what a joining client gets at once
VIDEO_PID = 0x100  # ffmpeg's mpegts muxer: the first stream (video)


def random_access_offset(chunk: bytes) -> int | None:
    """Offset of the first TS packet flagged random-access (a keyframe starts), if any."""
    for offset in range(0, len(chunk) - TS_PACKET + 1, TS_PACKET):
        pid = ((chunk[offset + 1] & 0x1F) << 8) | chunk[offset + 2]
        starts_unit = chunk[offset + 1] & 0x40
        has_adaptation = (chunk[offset + 3] >> 4) & 2
        if pid == VIDEO_PID and starts_unit and has_adaptation and chunk[offset + 4] > 0 and chunk[offset + 5] & 0x40:
            return offset
    return None


def encoder_argv(ffmpeg: str = "ffmpeg", size: str = "320x180", rate: int = 25) -> list[str]:
    """The live test broadcast as MPEG-TS on standard output."""
    return [*pattern_encoder_argv(ffmpeg, size, rate), "-f", "mpegts", "-pat_period", "0.1", "pipe:1"]


def pattern_encoder_argv(ffmpeg: str = "ffmpeg", size: str = "320x180", rate: int = 25) -> list[str]:
    """FFmpeg encoding a test picture and tone in real time, one keyframe a second (H.264
    and AAC); the output format and file are the caller's."""
    return [
        ffmpeg,
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-re",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate={rate}",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-pix_fmt",
        "yuv420p",
        "-g",
        str(rate),
        "-keyint_min",
        str(rate),
        "-sc_threshold",
        "0",
        "-c:a",
        "aac",
        "-b:a",
        "64k",
    ]


class Broadcaster:
    """One ffmpeg, many listeners; started on the first listener."""

    def __init__(self, ffmpeg: str = "ffmpeg"):
        self.ffmpeg = shutil.which(ffmpeg) or ffmpeg
        self.listeners: dict[asyncio.Queue, str] = {}  # queue -> the name it asked for
        self.silent_until = 0.0  # monotonic: a stall until then
        # (monotonic time, chunk, offset of a keyframe start in it or None)
        self.backlog: collections.deque = collections.deque()
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None
        self._starting = asyncio.Lock()

    async def ensure_running(self) -> None:
        async with self._starting:  # first clients at once: still one ffmpeg
            await self._start_if_needed()

    async def _start_if_needed(self) -> None:
        if self.process is None or self.process.returncode is not None:
            self.process = await asyncio.create_subprocess_exec(
                *encoder_argv(self.ffmpeg),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            self._pump = asyncio.create_task(self._pump_output(self.process))

    async def _pump_output(self, process) -> None:
        try:
            while True:
                chunk = await process.stdout.readexactly(TS_PACKET * READ_PACKETS)
                now = time.monotonic()
                if now < self.silent_until:  # stalled: nothing goes out, nothing kept
                    self.backlog.clear()
                    continue
                self.backlog.append((now, chunk, random_access_offset(chunk)))
                while self.backlog and now - self.backlog[0][0] > BURST_SECONDS:
                    self.backlog.popleft()
                for queue in list(self.listeners):
                    if queue.qsize() >= CLIENT_QUEUE:
                        self.listeners.pop(queue, None)
                        queue.put_nowait(None)
                    else:
                        queue.put_nowait(chunk)
        except (asyncio.IncompleteReadError, asyncio.CancelledError):
            pass

    def burst(self) -> list[bytes]:
        """The backlog from its first keyframe on (empty if none yet)."""
        chunks = list(self.backlog)
        for index, (_, chunk, rap) in enumerate(chunks):
            if rap is not None:
                return [chunk[rap:]] + [c for _, c, _ in chunks[index + 1 :]]
        return []

    def drop(self, name: str | None = None) -> int:
        """Close every client connection (or those of ``name``) now; how many."""
        dropped = [q for q, asked in self.listeners.items() if name in (None, asked)]
        for queue in dropped:
            self.listeners.pop(queue, None)
            queue.put_nowait(None)
        return len(dropped)

    async def restart(self) -> None:
        """The encoder again from zero: its timestamps restart (connections stay open)."""
        async with self._starting:
            if self.process is not None and self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.terminate()
                await self.process.wait()
            if self._pump is not None:
                await asyncio.gather(self._pump, return_exceptions=True)
            self.backlog.clear()  # a joining client gets none of the old encoder
            await self._start_if_needed()

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            await self.process.wait()


async def stream_broadcast(
    request: web.Request, broadcaster: Broadcaster, stall_after: float = float("inf"), name: str = ""
) -> web.StreamResponse:
    """The live broadcast to one client: a burst from the last keyframe, then the live edge,
    until it leaves (or, after ``stall_after`` seconds, silence with the connection open).
    The connection closes when the stream ends."""
    await broadcaster.ensure_running()
    queue: asyncio.Queue = asyncio.Queue()
    for chunk in broadcaster.burst():
        queue.put_nowait(chunk)
    broadcaster.listeners[queue] = name
    response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
    response.force_close()
    stall_at = time.monotonic() + stall_after
    try:
        await response.prepare(request)
        while True:
            chunk = await queue.get()
            if chunk is None:  # stopped, or too slow a reader
                break
            if time.monotonic() >= stall_at:  # /stall/<s>/...: silence, connection open
                broadcaster.listeners.pop(queue, None)
                await asyncio.sleep(3600)
            await response.write(chunk)
    except (OSError, asyncio.CancelledError):  # the client is gone
        pass
    finally:
        broadcaster.listeners.pop(queue, None)
    return response


async def live(request: web.Request) -> web.StreamResponse:
    request.app["requests"].append((request.path, dict(request.headers)))
    name = request.match_info.get("name", "")
    if name in request.app["failed_names"]:
        return web.Response(status=404, text="gone\n")
    return await stream_broadcast(
        request, request.app["broadcaster"], float(request.match_info.get("seconds", "inf")), name
    )


async def control(request: web.Request) -> web.Response:
    """The faults on demand (module docstring); answers what it did, as JSON."""
    broadcaster: Broadcaster = request.app["broadcaster"]
    action, query = request.match_info["action"], request.query
    if action == "drop":
        return web.json_response({"dropped": broadcaster.drop()})
    if action == "stall":
        seconds = float(query.get("seconds", "10"))
        broadcaster.silent_until = time.monotonic() + seconds
        return web.json_response({"silent_for": seconds})
    if action == "restart":
        dropped = broadcaster.drop() if query.get("drop") == "1" else 0
        await broadcaster.restart()
        return web.json_response({"restarted": True, "dropped": dropped})
    if action in ("fail", "heal") and query.get("name"):
        name = query["name"]
        if action == "fail":
            request.app["failed_names"].add(name)
            return web.json_response({"failed": name, "dropped": broadcaster.drop(name)})
        request.app["failed_names"].discard(name)
        return web.json_response({"healed": name})
    return web.json_response({"error": "unknown control"}, status=404)


async def forbidden(request: web.Request) -> web.Response:
    request.app["requests"].append((request.path, dict(request.headers)))
    return web.Response(status=403, text="forbidden\n")


GATE_COOKIE = "sk_gate"


async def gate(request: web.Request) -> web.StreamResponse:
    if request.cookies.get(GATE_COOKIE) == "open":
        return await live(request)
    request.app["requests"].append((request.path, dict(request.headers)))
    if "Accept-Language" not in request.headers:
        return web.Response(status=403, text="browsers only\n")
    response = web.HTTPFound(request.path)
    response.set_cookie(GATE_COOKIE, "open", path="/")
    return response


async def redirect(request: web.Request) -> web.Response:
    request.app["requests"].append((request.path, dict(request.headers)))
    raise web.HTTPFound(request.query.get("to", "/"))


async def missing(request: web.Request) -> web.Response:
    return web.Response(status=404, text="no such stream\n")


def make_app(ffmpeg: str = "ffmpeg") -> web.Application:
    app = web.Application()
    app["broadcaster"] = Broadcaster(ffmpeg)
    app["requests"] = []  # (path, headers) of every request, for tests
    app["failed_names"] = set()  # /control/fail: names answering 404
    app.router.add_get("/live/{name}", live)
    app.router.add_post("/control/{action}", control)
    app.router.add_get("/stall/{seconds:[0-9]+}/{name}", live)
    app.router.add_get("/forbidden/{name}", forbidden)
    app.router.add_get("/missing/{name}", missing)
    app.router.add_get("/gate/{name}", gate)
    app.router.add_get("/redirect/{name}", redirect)

    async def on_cleanup(app):
        await app["broadcaster"].stop()

    app.on_cleanup.append(on_cleanup)
    return app


async def serve(host: str, port: int, stop: asyncio.Event, ffmpeg: str = "ffmpeg") -> None:
    runner = web.AppRunner(make_app(ffmpeg), handle_signals=False, shutdown_timeout=1.0)  # stalled clients
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("upstream on http://%s:%d/live/<name>.ts", host, port)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(args.host, args.port, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
