"""``stream-launcher``: the HTTP endpoint nginx calls when a playlist is missing."""

from __future__ import annotations

from streamstate import early_signals  # first: signals from the first instant

# isort: split

import asyncio
import logging

import click

from streamstate.cli_options import log_level_option, settings_options
from streamstate.daemon import configure_logging, notify_until_stopped, sd_notify

log = logging.getLogger("streamkeeper.launcher")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@settings_options
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on (overrides launcher_listen).")
@click.option("--hls-dir", metavar="DIR", help="Where playlists and segments go (overrides hls_dir).")
@log_level_option
def main(settings_loader, listen, hls_dir, log_level):
    """Start FFmpeg on demand for nginx and hand the first player a playable playlist.

    GET|POST /channel/<id>/start starts the channel (or joins the start under
    way), waits until its playlist lists min_segments segments, then answers
    nginx with X-Accel-Redirect (nginx serves the playlist to the player as the
    answer to its own request) or a script with JSON. Also: POST
    /channel/<id>/stop, GET /streams, /healthz, /metrics, and the old host's
    /api/stream/start, /api/stream/stop, /api/streams/active.

    Streams outlive the launcher: SIGTERM, SIGINT and SIGHUP make it exit 0 and leave every
    FFmpeg running (the next launcher adopts them after proving each process). To stop
    them all: POST /streams/stop, or `streamctl stop --all`.
    Exit codes: 0 stopped, 1 cannot listen, 2 bad settings.
    """
    settings = settings_loader(launcher_listen=listen, hls_dir=hls_dir)
    configure_logging(log_level.upper())
    raise SystemExit(asyncio.run(serve(settings)))


def _lock_hls_dir(hls_dir: str) -> int | None:
    """One launcher per hls_dir: it adopts and publishes every stream whose files are there,
    and a second would adopt the first one's streams (two FFmpegs on one channel).  The lock
    (flock on the directory, held until the process ends, never inherited by FFmpeg) says
    so; None, after one log line, when another launcher holds it."""
    import fcntl
    import os

    fd = os.open(hls_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        log.error(
            "another stream-launcher already runs on hls_dir %s: one launcher per hls_dir "
            "(it adopts and publishes that directory's streams); exiting",
            hls_dir,
        )
        return None
    return fd


async def serve(settings) -> int:
    import os

    from aiohttp import web

    from . import http_guard
    from .app import adopt_at_start_up, make_app

    os.makedirs(settings.hls_dir, exist_ok=True)
    hls_dir_lock = _lock_hls_dir(settings.hls_dir)
    if hls_dir_lock is None:
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in early_signals.STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)  # only a flag; the work is below
    if early_signals.received():  # it came during start-up
        log.info("%s during start-up: exiting", early_signals.received())
        return 0
    runner = web.AppRunner(
        make_app(settings), handle_signals=False, access_log=None, keepalive_timeout=http_guard.KEEPALIVE_TIMEOUT
    )
    await runner.setup()
    host, _, port = settings.launcher_listen.rpartition(":")
    try:
        listener = await http_guard.listen(runner.server, host.strip("[]"), int(port), backlog=1024)
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.launcher_listen, exc)
        await runner.cleanup()
        return 1
    log.info("listening on http://%s (hls_dir %s)", settings.launcher_listen, settings.hls_dir)
    launcher = runner.app["launcher"]
    await adopt_at_start_up(launcher)  # listening first: a launcher that cannot, adopts nothing
    sd_notify("READY=1\nSTATUS=listening on " + settings.launcher_listen)
    await notify_until_stopped(stop, launcher.status_line)
    log.info("exiting: %d stream(s) keep running for the next launcher to adopt", len(launcher.live_supervisors()))
    sd_notify("STOPPING=1")
    listener.close()
    await runner.cleanup()
    return 0
