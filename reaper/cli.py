"""``stream-reaper``: stop idle streams, clear stale keys, files and processes."""

from __future__ import annotations

from streamstate import early_signals  # first: signals from the first instant

# isort: split

import logging
import threading
import time

import click

from streamstate.cli_options import log_level_option, settings_options
from streamstate.daemon import StopSignals, configure_logging, sd_notify, watchdog_interval
from streamstate.reaping import Reaper, run_one

log = logging.getLogger("streamkeeper.reaper")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@settings_options
@click.option("--once", is_flag=True, help="Run one pass and exit (what a systemd timer or cron calls).")
@click.option("--dry-run", is_flag=True, help="Print what a pass would do; change nothing (implies --once).")
@click.option("--json", "as_json", is_flag=True, help="Print each pass's summary as JSON on standard output.")
@click.option("--interval", type=float, metavar="SECONDS", help="Seconds between passes (overrides reaper_interval).")
@log_level_option
def main(settings_loader, once, dry_run, as_json, interval, log_level):
    """Every reaper_interval seconds, stop streams idle past idle_timeout and clear stale
    records, orphan files and orphan FFmpeg processes of this host.

    Nothing is signalled without proof that the pid is still that stream's FFmpeg, and
    keys are deleted only while they still belong to the run stopped. If Redis cannot be
    read, nothing is stopped.

    Exit codes: 0 done, 1 Redis unreachable or the pass failed (--once), 2 bad settings.
    """
    settings = settings_loader(reaper_interval=interval)
    configure_logging(log_level.upper())
    reaper = Reaper(settings, dry_run=dry_run)
    if early_signals.received():  # asked to stop while starting: no pass
        log.info("%s during start-up: exiting", early_signals.received())
        raise SystemExit(0)
    if once or dry_run:
        raise SystemExit(run_one(reaper, as_json))
    raise SystemExit(run_forever(reaper, settings.reaper_interval, as_json))


def run_forever(reaper: Reaper, interval: float, as_json: bool) -> int:
    """Passes on a fixed cadence of the monotonic clock; signals only set a flag."""
    wake = threading.Event()
    signals = StopSignals(wake)
    signals.install()
    sd_notify("READY=1\nSTATUS=first pass")
    ping_every = watchdog_interval()
    next_pass = time.monotonic()
    log.info("reaping every %g s", interval)
    while not signals.stop.is_set():
        if time.monotonic() >= next_pass:
            status = run_one(reaper, as_json)
            sd_notify("STATUS=" + ("redis unavailable; nothing stopped" if status else "last pass ok"))
            next_pass += interval
            if next_pass <= time.monotonic():  # a pass longer than the interval: skip ticks
                next_pass = time.monotonic() + interval - ((time.monotonic() - next_pass) % interval)
        if ping_every is not None:
            sd_notify("WATCHDOG=1")
        wake.wait(max(0.0, min(next_pass - time.monotonic(), ping_every or interval)))
    log.info("%s received: exiting", signals.signal_name)
    sd_notify("STOPPING=1")
    return 0
