"""A stream's files in hls_dir: the playlist, its segments and their temp files."""
from __future__ import annotations

import os

from . import keys


def playlist_path(hls_dir: str, channel_id: str) -> str:
    return os.path.join(hls_dir, f"stream_{keys.check_channel_id(channel_id)}.m3u8")


def segment_pattern(hls_dir: str, channel_id: str) -> str:
    """FFmpeg's -hls_segment_filename for the channel (the old host's names)."""
    return os.path.join(hls_dir, f"stream_{keys.check_channel_id(channel_id)}_%d.ts")


def stream_files(hls_dir: str, channel_id: str) -> list[str]:
    """stream_<id>.m3u8[.tmp] and stream_<id>_<n>.ts[.tmp]; never another channel's."""
    channel_id = keys.check_channel_id(channel_id)
    playlist = f"stream_{channel_id}.m3u8"
    prefix = f"stream_{channel_id}_"
    found = []
    try:
        names = os.listdir(hls_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if name in (playlist, playlist + ".tmp"):
            found.append(name)
        elif name.startswith(prefix):
            rest = name[len(prefix):]
            number, _, suffix = rest.partition(".")
            if number.isdigit() and suffix in ("ts", "ts.tmp", "m4s", "m4s.tmp"):
                found.append(name)
    return [os.path.join(hls_dir, name) for name in sorted(found)]


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
