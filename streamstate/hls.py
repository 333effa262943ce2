"""The playlist viewers get, and the HLS rules (RFC 8216) it keeps whatever happens behind it.

FFmpeg writes its own playlist (``stream_<id>.ffmpeg.m3u8``, never served); the
launcher publishes the viewers' playlist (``stream_<id>.m3u8``) from it
(launcher.publisher).  One *session* of a channel is everything a viewer may hold
between a cold start and the stream's end; across every FFmpeg replaced within it
(a crash, a stall, a fallback source, a disk that filled) the published playlist:

* keeps ``EXT-X-TARGETDURATION`` constant (:func:`target_duration`);
* only raises ``EXT-X-MEDIA-SEQUENCE``, and numbers segment files by it, from a
  base taken from the clock at the session's start (:func:`session_base`), so no
  segment name is reused, not even by a later session of the channel;
* puts ``EXT-X-DISCONTINUITY`` before a replacement's first segment and raises
  ``EXT-X-DISCONTINUITY-SEQUENCE`` when such a segment leaves the window;
* lists a segment only once it is complete (:func:`complete_ts`);
* dates every segment (``EXT-X-PROGRAM-DATE-TIME``): a run's segments follow each other
  exactly, a replacement's first one carries the wall-clock time it was made, so a
  player that places live segments on the clock (Shaka) sees where the gap was instead
  of waiting forever for media at a time that never comes;
* never lists less than three target durations once it has that much
  (RFC 8216 6.2.2), nor fewer than ``hls_list_size`` segments;
* is never served unchanged for longer than :func:`freeze_limit`.

This module is pure: text in, text out, and the timing rules as functions of the
settings, so every service (and doctor) applies the same ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re

from . import keys

VERSION = 3  # float EXTINF durations (RFC 8216 7: version 3)
TS_PACKET = 188
TS_SYNC = 0x47
# Segment numbers of a fresh session start at the clock's tenths of a second: a session
# numbers at most one segment per hls_init_time (at least 0.5 s), so a later session
# always starts above every number an earlier one used.
SESSION_BASE_PER_SECOND = 10
# Segments kept on disk after they left the playlist: RFC 8216 6.2.2 keeps a removed
# segment available for its duration plus the playlist's; one window more covers both.
KEEP_AFTER_REMOVAL = 1


@dataclasses.dataclass
class Segment:
    uri: str
    duration: float
    discontinuity: bool = False  # EXT-X-DISCONTINUITY before it
    program_date_time: float | None = None  # epoch seconds of its first frame


@dataclasses.dataclass
class MediaPlaylist:
    target_duration: int
    media_sequence: int = 0
    discontinuity_sequence: int = 0
    segments: list[Segment] = dataclasses.field(default_factory=list)
    ended: bool = False  # EXT-X-ENDLIST (FFmpeg writes it when it exits cleanly)

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.segments)

    def render(self) -> str:
        lines = [
            "#EXTM3U",
            f"#EXT-X-VERSION:{VERSION}",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{self.media_sequence}",
        ]
        if self.discontinuity_sequence:
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{self.discontinuity_sequence}")
        for segment in self.segments:
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            if segment.program_date_time is not None:
                lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{format_date_time(segment.program_date_time)}")
            lines += [f"#EXTINF:{segment.duration:.6f},", segment.uri]
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"


_INT_TAGS = {
    "#EXT-X-TARGETDURATION": "target_duration",
    "#EXT-X-MEDIA-SEQUENCE": "media_sequence",
    "#EXT-X-DISCONTINUITY-SEQUENCE": "discontinuity_sequence",
}
_URI_RE = re.compile(r"[A-Za-z0-9._~-]{1,200}")


def parse(text: str) -> MediaPlaylist | None:
    """A media playlist from FFmpeg or from a previous publisher; None if it is not one.

    Hostile or cut short (a disk that filled while FFmpeg wrote it): only whole entries
    count, an EXTINF with its URI line ended by a newline; a URI that is not a plain
    file name (no path, no scheme, no query) is no segment of ours and ends the parse.
    """
    if not text.startswith("#EXTM3U"):
        return None
    playlist = MediaPlaylist(target_duration=0)
    duration: float | None = None
    discontinuity = False
    dated: float | None = None
    body = text if text.endswith("\n") else text[: text.rfind("\n") + 1]  # a last line cut short
    for line in body.splitlines():
        line = line.strip()
        if not line:
            continue
        tag, _, value = line.partition(":")
        if tag in _INT_TAGS:
            if not value.isdigit():
                return None
            setattr(playlist, _INT_TAGS[tag], int(value))
        elif tag == "#EXTINF":
            try:
                duration = float(value.split(",", 1)[0])
            except ValueError:
                return None
            if not (math.isfinite(duration) and duration >= 0):
                return None
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            dated = parse_date_time(value)
        elif line == "#EXT-X-ENDLIST":
            playlist.ended = True
        elif not line.startswith("#"):
            if duration is None or not _URI_RE.fullmatch(line):
                break
            playlist.segments.append(Segment(line, duration, discontinuity, dated))
            duration, discontinuity, dated = None, False, None
    return playlist


def format_date_time(epoch: float) -> str:
    """EXT-X-PROGRAM-DATE-TIME's value: ISO 8601, milliseconds, UTC."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_date_time(value: str) -> float | None:
    try:
        moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    epoch = moment.timestamp()
    return epoch if math.isfinite(epoch) else None


def read(path: str) -> MediaPlaylist | None:
    """The playlist at ``path`` (None: missing, unreadable or not a playlist)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return None
    return parse(text)


_SEGMENT_RE = re.compile(r"stream_(%s)_([0-9]{1,19})\.ts" % keys.CHANNEL_ID_PATTERN, re.ASCII)


def segment_number(uri: str, channel_id: str) -> int | None:
    """N of the channel's segment ``stream_<id>_<N>.ts`` (None for anything else)."""
    match = _SEGMENT_RE.fullmatch(uri)
    if match is None or match.group(1) != channel_id:
        return None
    return int(match.group(2))


def complete_ts(path: str) -> bool:
    """An MPEG-TS segment whole on disk: whole 188-byte packets, the first and the last
    starting with the sync byte.  A segment cut short (a full disk: FFmpeg 5.1 renames and
    lists it anyway) fails this check unless it was cut on a packet boundary."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size < TS_PACKET or size % TS_PACKET:
            return False
        return os.pread(fd, 1, 0) == bytes([TS_SYNC]) and os.pread(fd, 1, size - TS_PACKET) == bytes([TS_SYNC])
    except OSError:
        return False
    finally:
        os.close(fd)


# -- the timing rules ---------------------------------------------------------------------


def forces_keyframes(profile: dict) -> bool:
    """A profile that encodes video gets a keyframe every hls_init_time (launcher.ffmpeg), so
    its segments never exceed hls_time; one that copies video cuts at the source's own."""
    return "copy" not in profile.get("video", [])


def target_duration(hls_time: float, profile: dict) -> int:
    """EXT-X-TARGETDURATION for a whole session: at least every segment's rounded length.
    Encoded video is cut at hls_time exactly.  Copied video is cut at the first source
    keyframe after hls_time, so a segment may run a keyframe interval longer: the target
    allows a source keyframe every hls_time (sources with sparser keyframes exceed it,
    and the publisher says so)."""
    base = max(1, math.ceil(hls_time))
    return base if forces_keyframes(profile) else max(1, math.ceil(2 * hls_time))


def window_segments(list_size: int, target: int, shortest: float) -> int:
    """Segments the viewers' playlist may list at most: hls_list_size, or three target
    durations of the shortest segments (RFC 8216 6.2.2), whichever is more."""
    return max(list_size, math.ceil(3 * target / shortest) + 1)


def stall_after(hls_time: float) -> float:
    """No new segment for this long: FFmpeg is stalled and is replaced."""
    return max(3 * hls_time, 6.0)


def freeze_limit(hls_time: float, start_timeout: float) -> float:
    """The longest a viewers' playlist is served unchanged: the stall bound plus the time a
    replacement may take to start.  Past it the session ends and its files go, so nginx
    never serves a frozen playlist (a player's next request starts the channel again)."""
    return stall_after(hls_time) + start_timeout


def session_base(now: float) -> int:
    """The first segment number of a new session (see SESSION_BASE_PER_SECOND)."""
    return int(now * SESSION_BASE_PER_SECOND)
