"""What every long-running service shares: logging for journalctl, sd_notify, signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from . import early_signals


def configure_logging(level: str = "INFO") -> None:
    """One line per event; no timestamps of our own under systemd (journald adds them)."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("streamkeeper")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def sd_notify(message: str) -> bool:
    """Send a state line to systemd ($NOTIFY_SOCKET); False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.1)
    except ValueError:
        return None


STATUS_EVERY = 5.0  # seconds between STATUS= lines when systemd's watchdog is off


async def notify_until_stopped(stop, status) -> None:
    """An asyncio service's main loop after READY=1: WATCHDOG=1 (when systemd asks for it)
    and STATUS=<status()> on a cadence, until ``stop`` (an asyncio.Event) is set."""
    import asyncio

    ping_every = watchdog_interval()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=ping_every or STATUS_EVERY)
        except asyncio.TimeoutError:
            pass
        if ping_every is not None:
            sd_notify("WATCHDOG=1")
        sd_notify("STATUS=" + status())


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP only set a flag and wake the main loop, which does the
    work (a clean stop; SIGHUP too: reloading settings under a running service is not
    worth its risks, and systemd restarts it with the new ones)."""

    def __init__(self, wake: threading.Event):
        self.stop = threading.Event()
        self.signal_name: str | None = None
        self._wake = wake

    def install(self) -> None:
        for signum in early_signals.STOP_SIGNALS:
            signal.signal(signum, self._handle)
        if early_signals.received():  # it came during start-up: stop now
            self.signal_name = early_signals.received()
            self.stop.set()
            self._wake.set()

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stop.set()
        self._wake.set()
