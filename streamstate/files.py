"""A stream's files in hls_dir: the playlist, its segments and their temp files."""
from __future__ import annotations

import os
import re

from . import keys

# stream_<id>.m3u8 and stream_<id>_<n>.<ts|m4s|mp4|aac>, each also as FFmpeg's .tmp
_STREAM_FILE_RE = re.compile(r"stream_(%s)(?:\.m3u8|_[0-9]+\.(?:ts|m4s|mp4|aac))(?:\.tmp)?"
                             % keys.CHANNEL_ID_PATTERN, re.ASCII)


def channel_of_file(name: str) -> str | None:
    """The channel a file name in hls_dir belongs to, or None if it is no stream's file."""
    match = _STREAM_FILE_RE.fullmatch(name)
    return match.group(1) if match else None


def playlist_path(hls_dir: str, channel_id: str) -> str:
    return os.path.join(hls_dir, f"stream_{keys.check_channel_id(channel_id)}.m3u8")


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
    removed = 0
    for path in stream_files(hls_dir, channel_id):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


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
