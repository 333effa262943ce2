"""Process identity and the one routine that stops a stream's FFmpeg.

A pid alone proves nothing: pids are reused, and Redis contents are hostile (a
record may name any pid, with that process's real start time).  A process is a
stream's FFmpeg only if

* its executable (``/proc/<pid>/exe``) is the configured FFmpeg,
* its output argument (the last one) is exactly this channel's FFmpeg playlist
  (``hls_dir/stream_<id>.ffmpeg.m3u8``; an FFmpeg of the old host or of an earlier
  streamkeeper: the viewers' ``hls_dir/stream_<id>.m3u8``),
* and its start time matches, where one is recorded.

The proof is made through a pidfd opened *before* it (``os.pidfd_open``), and
every signal goes through that pidfd (``signal.pidfd_send_signal``): if the pid
is reused after the proof, the signal reaches nobody instead of the stranger.
"""

from __future__ import annotations

import dataclasses
import os
import select
import shutil
import signal
import time

from . import files

DELETED_SUFFIX = " (deleted)"  # /proc/<pid>/exe of a binary replaced since (an upgrade)


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if there is no such process."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as handle:
            stat = handle.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(b")") + 2 :].split()


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


def process_age(pid: int) -> float | None:
    """Seconds since the process started (None if there is no such process)."""
    start = process_start_time(pid)
    if start is None:
        return None
    try:
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))


def process_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            return [part.decode("utf-8", "replace") for part in handle.read().split(b"\0") if part]
    except (OSError, ValueError):
        return []


def process_executable(pid: int) -> str | None:
    """The real path of the process's executable; None if unreadable (gone, a zombie, or
    another user's process: what cannot be read cannot be proven)."""
    try:
        path = os.readlink(f"/proc/{int(pid)}/exe")
    except (OSError, ValueError):
        return None
    return path[: -len(DELETED_SUFFIX)] if path.endswith(DELETED_SUFFIX) else path


def resolve_executable(command: str) -> str | None:
    """The real path a command name (the ffmpeg setting) runs, as /proc/<pid>/exe shows it."""
    found = shutil.which(command)
    return os.path.realpath(found) if found else None


@dataclasses.dataclass(frozen=True)
class StreamProcess:
    """What proves that a pid is one stream's FFmpeg (see the module docstring)."""

    executable: str | None  # resolve_executable(settings.ffmpeg)
    outputs: tuple[str, ...]  # the output arguments it may have (files.ffmpeg_outputs)
    start_time: int | None = None  # as recorded; None for a legacy record

    @classmethod
    def of_channel(
        cls, executable: str | None, hls_dir: str, channel_id: str, start_time: int | None = None
    ) -> "StreamProcess":
        return cls(executable, files.ffmpeg_outputs(hls_dir, channel_id), start_time)

    def proven_by(self, pid: int) -> bool:
        if not pid or pid <= 0 or self.executable is None:
            return False
        start = process_start_time(pid)
        if start is None or (self.start_time is not None and start != int(self.start_time)):
            return False
        if process_executable(pid) != self.executable:
            return False
        argv = process_cmdline(pid)
        return len(argv) > 1 and argv[-1] in self.outputs


class ProcessHandle:
    """A proven process, held by a pidfd: signals and waits reach exactly it."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._pidfd = pidfd

    @classmethod
    def open_proven(cls, pid: int, proof: StreamProcess) -> "ProcessHandle | None":
        """The pidfd first, then the proof; None (and nothing held) if not proven."""
        try:
            pidfd = os.pidfd_open(int(pid))
        except (OSError, ValueError, OverflowError):
            return None
        if not proof.proven_by(pid):
            os.close(pidfd)
            return None
        return cls(int(pid), pidfd)

    def fileno(self) -> int:
        return self._pidfd

    def signal(self, signum: int) -> bool:
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
            return True
        except ProcessLookupError:
            return False

    def exited(self, timeout: float = 0.0) -> bool:
        """True once the process has exited (its pidfd turns readable)."""
        readable, _, _ = select.select([self._pidfd], [], [], max(0.0, timeout))
        return bool(readable)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __enter__(self) -> "ProcessHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stop_processes(handles: list[ProcessHandle], grace: float) -> list[ProcessHandle]:
    """The stop routine: SIGTERM to each, wait up to ``grace`` for all, SIGKILL what is left.
    Returns the handles that needed SIGKILL."""
    for handle in handles:
        handle.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(handles)
    while alive and time.monotonic() < deadline:
        readable, _, _ = select.select(alive, [], [], max(0.0, deadline - time.monotonic()))
        alive = [h for h in alive if h not in readable]
    for handle in alive:
        handle.signal(signal.SIGKILL)
    for handle in alive:
        handle.exited(5.0)
    return alive


def stream_ffmpegs_under(directory: str, executable: str | None) -> list[tuple[int, str]]:
    """(pid, playlist) of every process of the configured FFmpeg whose output argument is a
    playlist directly in ``directory`` (the reaper's orphan search)."""
    if executable is None:
        return []
    directory = directory.rstrip("/") or "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if process_executable(pid) != executable:
            continue
        argv = process_cmdline(pid)
        if len(argv) > 1 and os.path.dirname(argv[-1]) == directory and argv[-1].endswith(".m3u8"):
            found.append((pid, argv[-1]))
    return found
