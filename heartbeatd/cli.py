"""``heartbeatd``: follow nginx's access log, turn viewing requests into last_access."""

from __future__ import annotations

from streamstate import early_signals  # noqa: F401 - first: signals from the first instant

# isort: split

import logging

import click

from streamstate.cli_options import EXIT_BAD_SETTINGS, log_level_option, settings_options
from streamstate.daemon import configure_logging
from streamstate.logformat import LogFormatError

log = logging.getLogger("streamkeeper.heartbeatd")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@settings_options
@click.option("--log-file", metavar="PATH", help="Access log to follow (overrides access_log).")
@click.option(
    "--log-format", metavar="FORMAT", help="'streamkeeper' or a full nginx log_format string (overrides log_format)."
)
@click.option("--state-dir", metavar="DIR", help="Where the checkpoint lives (overrides state_dir).")
@click.option(
    "--flush-interval", type=float, metavar="SECONDS", help="Seconds between Redis writes (overrides flush_interval)."
)
@click.option(
    "--viewer-window",
    type=float,
    metavar="SECONDS",
    help="Seconds a viewer counts after its last request; 0 turns viewer counting off.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Read to the end of the log, flush, write the checkpoint and exit "
    "(0 on success, 1 if Redis could not be written).",
)
@click.option(
    "--from-start", is_flag=True, help="With no checkpoint, start at the beginning of the log instead of its end."
)
@log_level_option
def main(settings_loader, log_file, log_format, state_dir, flush_interval, viewer_window, once, from_start, log_level):
    """Follow the nginx access log and keep stream:<id>:last_access current.

    Every 2xx/304 request for /live/stream_<id>.m3u8 or a segment of it moves
    the running channel's last_access to the request's own time (never
    backwards) and counts its viewer.  Channels that are not running are never
    written.  SIGTERM/SIGINT flush, save the checkpoint and exit 0.

    Exit codes: 0 done, 1 Redis unreachable with --once, 2 bad settings or log_format.
    """
    settings = settings_loader(
        access_log=log_file,
        log_format=log_format,
        state_dir=state_dir,
        flush_interval=flush_interval,
        viewer_window=viewer_window,
    )
    configure_logging(log_level.upper())
    from .loop import HeartbeatService

    try:
        service = HeartbeatService(settings, log_file=log_file, from_start=from_start, once=once)
    except LogFormatError as exc:
        click.echo(f"error: setting log_format: {exc}", err=True)
        raise SystemExit(EXIT_BAD_SETTINGS) from None
    raise SystemExit(service.run())
