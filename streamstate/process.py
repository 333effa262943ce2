"""Process identity: a pid alone proves nothing (pids are reused); pid + start time does."""
from __future__ import annotations

import os
import signal


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if there is no such process."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as handle:
            stat = handle.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22).

    None for no such process, and for a zombie (it has exited; only its parent's
    wait is missing): it can no longer be stopped, only reaped.
    """
    fields = _stat_fields(pid)
    try:
        if fields is None or fields[0] == b"Z":
            return None
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
    """Signal the process group led by ``pid`` (or the process alone if it leads none),
    after proving it is still that process."""
    if not is_same_process(pid, start_time):
        return False
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def ffmpeg_writing(pid: int, playlist: str) -> bool:
    """Proof for a legacy record (no start time): the process is FFmpeg writing this playlist."""
    argv = process_cmdline(pid)
    return bool(argv) and "ffmpeg" in os.path.basename(argv[0]) and playlist in argv


def ffmpeg_processes_under(directory: str) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every FFmpeg whose command line writes into ``directory``."""
    prefix = directory.rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = process_cmdline(int(entry))
        if argv and "ffmpeg" in os.path.basename(argv[0]) and any(a.startswith(prefix) for a in argv[1:]):
            found.append((int(entry), argv))
    return found
