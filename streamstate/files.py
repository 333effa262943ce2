"""A stream's files in hls_dir: the playlist, its segments and their temp files."""

from __future__ import annotations

import contextlib
import os
import re

from . import keys

# stream_<id>.m3u8 (the viewers' playlist), stream_<id>.ffmpeg.m3u8 (FFmpeg's own, never
# served) and stream_<id>_<n>.<ts|m4s|mp4|aac>, each also as a .tmp being written
_STREAM_FILE_RE = re.compile(
    r"stream_(%s)(?:\.m3u8|\.ffmpeg\.m3u8|_[0-9]+\.(?:ts|m4s|mp4|aac))(?:\.tmp)?" % keys.CHANNEL_ID_PATTERN, re.ASCII
)


def channel_of_file(name: str) -> str | None:
    """The channel a file name in hls_dir belongs to, or None if it is no stream's file."""
    match = _STREAM_FILE_RE.fullmatch(name)
    return match.group(1) if match else None


def playlist_path(hls_dir: str, channel_id: str) -> str:
    return os.path.join(hls_dir, f"stream_{keys.check_channel_id(channel_id)}.m3u8")


def ffmpeg_playlist_path(hls_dir: str, channel_id: str) -> str:
    """The playlist FFmpeg writes (never served: nginx serves only stream_<id>.m3u8, which
    the launcher publishes from this one; streamstate.hls)."""
    return os.path.join(hls_dir, f"stream_{keys.check_channel_id(channel_id)}.ffmpeg.m3u8")


def ffmpeg_outputs(hls_dir: str, channel_id: str) -> tuple[str, str]:
    """What a channel's FFmpeg may name as its output: its own playlist, or (an FFmpeg the
    old stream_api or an earlier streamkeeper started) the viewers' playlist itself."""
    return ffmpeg_playlist_path(hls_dir, channel_id), playlist_path(hls_dir, channel_id)


def segment_pattern(hls_dir: str, channel_id: str) -> str:
    """FFmpeg's -hls_segment_filename for the channel (the old host's names)."""
    return os.path.join(hls_dir, f"stream_{keys.check_channel_id(channel_id)}_%d.ts")


def stream_files(hls_dir: str, channel_id: str) -> list[str]:
    """stream_<id>.m3u8[.tmp] and stream_<id>_<n>.ts[.tmp]; never another channel's."""
    channel_id = keys.check_channel_id(channel_id)
    try:
        names = os.listdir(hls_dir)
    except FileNotFoundError:
        return []
    return [os.path.join(hls_dir, name) for name in sorted(names) if channel_of_file(name) == channel_id]


def delete_stream_files(hls_dir: str, channel_id: str) -> int:
    """The channel's files, whatever they are (an empty directory under a stream's name, put
    there by hand, goes too); what cannot be removed is left, never an error."""
    removed = 0
    for path in stream_files(hls_dir, channel_id):
        if remove_entry(path):
            removed += 1
    return removed


def remove_entry(path: str) -> bool:
    """Unlink a file, or rmdir an empty directory; False if it is gone or cannot go."""
    try:
        os.unlink(path)
        return True
    except IsADirectoryError:
        try:
            os.rmdir(path)
            return True
        except OSError:
            return False
    except OSError:
        return False


def count_listed_segments(playlist: str) -> int:
    """Segments a playlist lists (0 if it is missing or unreadable)."""
    try:
        with open(playlist, "rb") as handle:
            return handle.read().count(b"#EXTINF")
    except OSError:
        return 0


def free_mb(directory: str) -> int | None:
    """Megabytes free for an unprivileged writer in ``directory`` (None if unknown)."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize // (1024 * 1024)


def playlist_media(playlist: str) -> tuple[int, list[float]] | None:
    """(#EXT-X-MEDIA-SEQUENCE, the #EXTINF durations) of a playlist; None if unreadable."""
    try:
        with open(playlist, "rb") as handle:
            text = handle.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return None
    sequence, durations = 0, []
    for line in text.splitlines():
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            try:
                sequence = int(line.split(":", 1)[1])
            except ValueError:
                return None
        elif line.startswith("#EXTINF:"):
            try:
                durations.append(float(line[8:].split(",", 1)[0]))
            except ValueError:
                return None
    return sequence, durations


# FFmpeg's own output, one file per channel under log_dir, capped: past LOG_CAP bytes the
# last LOG_KEEP bytes move to <file>.1 and the file starts again (FFmpeg appends: O_APPEND).
LOG_CAP = 1024 * 1024
LOG_KEEP = 256 * 1024


def ffmpeg_log_path(log_dir: str, channel_id: str) -> str:
    return os.path.join(log_dir, f"stream_{keys.check_channel_id(channel_id)}.log")


def open_ffmpeg_log(log_dir: str, channel_id: str, header: str) -> int:
    """The channel's log, opened for FFmpeg's stderr (append), after a header line."""
    os.makedirs(log_dir, exist_ok=True)
    fd = os.open(ffmpeg_log_path(log_dir, channel_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    os.write(fd, (header.rstrip("\n") + "\n").encode("utf-8", "replace"))
    return fd


def cap_ffmpeg_log(log_dir: str, channel_id: str) -> bool:
    """Keep the channel's log under LOG_CAP; True if it was cut."""
    path = ffmpeg_log_path(log_dir, channel_id)
    try:
        if os.path.getsize(path) <= LOG_CAP:
            return False
        with open(path, "rb") as handle:
            handle.seek(-LOG_KEEP, os.SEEK_END)
            kept = handle.read()
        with open(path + ".1", "wb") as older:
            older.write(kept)
        os.truncate(path, 0)
        return True
    except OSError:
        return False


def log_tail(path: str, lines: int = 40, since: str | None = None) -> list[str]:
    """The last ``lines`` lines of a log (after the last line starting with ``since``)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    found = text.splitlines()
    if since is not None:
        starts = [n for n, line in enumerate(found) if line.startswith(since)]
        if starts:
            found = found[starts[-1] + 1 :]
    return found[-lines:]


def write_atomic(path: str, data: bytes, mode: int = 0o644, *, durable: bool = False, temp: str | None = None) -> None:
    """Write a whole file or nothing: a temp file beside it (``temp``, else the name with
    .tmp.<pid>), renamed over it.  ``durable``: fsync the file and the directory too (a
    checkpoint that must survive a power cut)."""
    directory = os.path.dirname(path) or "."
    temp = temp or f"{path}.tmp.{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    if durable:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
