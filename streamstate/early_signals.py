"""Signals from a service's first instant.

Imported first by each service's command module (heartbeatd, stream-launcher,
stream-reaper), before anything slow: SIGINT, SIGTERM and SIGHUP during start-up
only note the signal, and the service, once its own handlers are in place
(streamstate.daemon.StopSignals, the launcher's event loop), stops at once
instead of dying mid-start with a traceback or missing the signal.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def _note(signum, _frame) -> None:
    _received.append(signum)


def received() -> str | None:
    """The name of the first stop signal that came before the service's own handlers."""
    return signal.Signals(_received[0]).name if _received else None


for _signum in STOP_SIGNALS:
    signal.signal(_signum, _note)
