"""Process identity: a pid alone proves nothing (pids are reused); pid + start time does."""
from __future__ import annotations

import os
import signal


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as handle:
            stat = handle.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            return [part.decode("utf-8", "replace") for part in handle.read().split(b"\0") if part]
    except (OSError, ValueError):
        return []


def is_same_process(pid: int, start_time: int | None) -> bool:
    """True only if ``pid`` is alive and is the process that started at ``start_time``."""
    if not pid or start_time is None:
        return False
    return process_start_time(pid) == int(start_time)


def signal_process_group(pid: int, start_time: int, signum: int = signal.SIGTERM) -> bool:
    """Signal the process group led by ``pid``, after proving it is still that process."""
    if not is_same_process(pid, start_time):
        return False
    try:
        os.killpg(pid, signum)
        return True
    except ProcessLookupError:
        return False
