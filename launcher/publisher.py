"""The viewers' playlist of one channel, published from its FFmpeg's, across FFmpeg runs.

FFmpeg writes ``stream_<id>.ffmpeg.m3u8`` and its segments; the publisher copies each
new, complete segment into ``stream_<id>.m3u8`` (what nginx serves) and keeps the
promises of streamstate.hls: one session per channel, whatever replaces the FFmpeg
behind it.  Why not FFmpeg's own ``append_list``: FFmpeg 5.1 never writes
EXT-X-DISCONTINUITY-SEQUENCE, recomputes EXT-X-TARGETDURATION from the segments it
lists, and drops hls_init_time in that mode (README, "Continuity").

Who deletes what: FFmpeg deletes the segments of its own run (``delete_segments``,
long after they left the viewers' playlist), so the disk stays bounded even while
no launcher runs; the publisher deletes the earlier runs' segments once they have
left the playlist and a window more has passed (RFC 8216 6.2.2).
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import time

from streamstate import files, hls

log = logging.getLogger("streamkeeper.launcher")

# A new FFmpeg's first segments are listed once its playlist has been still this long: the
# source's burst, written in a moment, is listed (and dated) whole.
BURST_SETTLE = 0.1


class PlaylistPublisher:
    def __init__(self, hls_dir: str, channel_id: str, *, target_duration: int, list_size: int):
        self.hls_dir = hls_dir
        self.id = channel_id
        self.public_path = files.playlist_path(hls_dir, channel_id)
        self.ffmpeg_path = files.ffmpeg_playlist_path(hls_dir, channel_id)
        self.target_duration = target_duration
        self.list_size = list_size
        self.playlist: hls.MediaPlaylist | None = None  # as published; None: no session
        self.run_first: int | None = None  # the current FFmpeg's first segment number
        self.run_published = 0  # its segments published so far
        self.passive = False  # an FFmpeg that writes the viewers' playlist itself
        self.write_error: OSError | None = None  # the last write of the playlist that failed
        self.last_growth = time.monotonic()  # when the viewers' playlist last gained a segment
        self.published = 0  # segments published by this publisher
        self.rejected = 0  # incomplete segments never listed
        self._considered = -1  # the highest segment number looked at
        self._pending_discontinuity = False
        self._seen: tuple | None = None  # FFmpeg's playlist as last read (mtime, size, inode)
        # Earlier runs' segments out of the playlist: (self.published when removed, path).
        self._retired: collections.deque[tuple[int, str]] = collections.deque()
        self._warned_long = False
        self.closed = False  # the stream is being stopped: nothing is written

    # -- the session ---------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue the session whose playlist is on disk (a launcher restarted, or an
        FFmpeg of an earlier version wrote it): True if there is one."""
        playlist = hls.read(self.public_path)
        if playlist is None or not playlist.segments or playlist.target_duration < 1:
            return False
        playlist.ended = False
        self.playlist = playlist
        self.target_duration = playlist.target_duration  # never changes in a session
        self._considered = self.last_number or -1
        try:
            age = time.time() - os.stat(self.public_path).st_mtime
        except OSError:
            age = 0.0
        self.last_growth = time.monotonic() - max(0.0, age)
        return True

    @property
    def last_number(self) -> int | None:
        """The number of the last segment listed."""
        if not self.playlist or not self.playlist.segments:
            return None
        return hls.segment_number(self.playlist.segments[-1].uri, self.id)

    def begin_run(self) -> int:
        """The next FFmpeg's first segment number (its ``-start_number``); its first
        published segment carries EXT-X-DISCONTINUITY.  Call once the previous FFmpeg
        has exited: its last segments are published first, its leftovers go."""
        self.publish()
        self.passive = False
        if self.playlist is None or self.last_number is None:
            self.end_session()
            start = hls.session_base(time.time())
        else:
            start = max(self.last_number, self._considered) + 1
            self._pending_discontinuity = True
            self._sweep(start, ffmpeg_running=False)
        self._start_run(start)
        return start

    def adopt_run(self, first_number: int | None, *, writes_public: bool) -> None:
        """An FFmpeg already running (a previous launcher started it) with -start_number
        ``first_number``; ``writes_public``: it writes the viewers' playlist itself (an
        earlier version started it), and this publisher only watches."""
        self.passive = writes_public
        if writes_public:
            return
        resumed = self.resume()
        first = first_number if first_number is not None else (self.last_number or 0) + 1
        self._start_run(first)
        if resumed and self.playlist is not None:
            listed = [hls.segment_number(s.uri, self.id) or 0 for s in self.playlist.segments]
            self.run_published = sum(1 for n in listed if n >= first)
            self._pending_discontinuity = self.run_published == 0
            self._sweep(first, ffmpeg_running=True)

    def _start_run(self, first: int) -> None:
        self.run_first = first
        self.run_published = 0
        self._considered = max(self._considered, first - 1)
        self._seen = None

    def close(self) -> None:
        """The stream is being stopped: nothing more is published (its files are going)."""
        self.closed = True
        self.playlist = None

    def end_session(self) -> None:
        """Every file of the channel goes; the next run starts a new session."""
        files.delete_stream_files(self.hls_dir, self.id)
        self.playlist = None
        self._considered = -1
        self._retired.clear()
        self._pending_discontinuity = False

    # -- publishing -------------------------------------------------------------------------
    def publish(self) -> int:
        """Copy FFmpeg's new complete segments into the viewers' playlist; how many."""
        if self.closed:
            return 0
        if self.passive:
            return self._watch_passive()
        segments = self._ffmpeg_segments()
        if segments is None:
            return 0
        previous = self.playlist.segments[-1] if self.playlist and self.playlist.segments else None
        fresh, made, considered, pending = self._new_whole_segments(segments, previous)
        if fresh:
            self._date(fresh, made, previous)
            try:
                self._append(fresh)
            except OSError as exc:  # a full disk: nothing is taken as listed, FFmpeg's end is near
                self.write_error = exc
                self._seen = None
                log.warning("channel %s: cannot write its playlist (%s)", self.id, exc)
                return 0
        self.write_error = None
        self._considered, self._pending_discontinuity = considered, pending
        return len(fresh)

    def _ffmpeg_segments(self) -> list[hls.Segment] | None:
        """The segments of FFmpeg's playlist when it changed since the last look (None: it
        did not, or cannot be read, or a new FFmpeg is still writing its first burst)."""
        if self.run_first is None:
            return None
        try:
            info = os.stat(self.ffmpeg_path)
        except OSError:
            return None
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._seen:
            return None
        if self.run_published == 0 and time.time() - info.st_mtime < BURST_SETTLE:
            return None  # a new FFmpeg is writing its burst: list it whole, a moment later
        self._seen = stamp
        source = hls.read(self.ffmpeg_path)
        if source is None:
            return None
        # The segment FFmpeg closed because it was exiting (EXT-X-ENDLIST follows it) is cut
        # short, its audio often shorter than its video: never listed, so the next run's
        # first segment meets whole ones at the discontinuity.
        return source.segments[:-1] if source.ended else source.segments

    def _new_whole_segments(
        self, segments: list[hls.Segment], previous: hls.Segment | None
    ) -> tuple[list[hls.Segment], list[float], int, bool]:
        """Of FFmpeg's segments, those of this run not considered yet and whole on disk, each
        marked with a discontinuity after a gap (an incomplete or deleted segment); with
        when FFmpeg finished each, the last number considered and whether a gap is pending."""
        assert self.run_first is not None
        considered, pending = self._considered, self._pending_discontinuity
        fresh: list[hls.Segment] = []
        made: list[float] = []  # when FFmpeg finished each (its mtime)
        for segment in segments:
            number = hls.segment_number(segment.uri, self.id)
            if number is None or number < self.run_first or number <= considered:
                continue
            path = os.path.join(self.hls_dir, segment.uri)
            considered = number
            finished = _mtime(path)
            if finished is None or not hls.complete_ts(path):
                self.rejected += 1
                pending = True  # a gap in the media: say so
                log.warning(
                    "channel %s: segment %s is incomplete on disk (a full disk?); not listed", self.id, segment.uri
                )
                continue
            last = fresh[-1] if fresh else previous
            # A number skipped since the last segment listed: FFmpeg deleted segments before
            # they could be listed (no launcher published them for longer than FFmpeg keeps
            # them): a gap in the media, marked, and dated anew.
            skipped = (
                last is not None
                and number > self.run_first
                and number != (hls.segment_number(last.uri, self.id) or -2) + 1
            )
            if skipped:
                log.warning(
                    "channel %s: segments before %s were gone before they could be listed (the "
                    "launcher was away too long); the playlist goes on after a discontinuity",
                    self.id,
                    segment.uri,
                )
            fresh.append(
                hls.Segment(segment.uri, segment.duration, discontinuity=(pending or skipped) and last is not None)
            )
            made.append(finished)
            pending = False
        return fresh, made, considered, pending

    @staticmethod
    def _date(fresh: list[hls.Segment], made: list[float], previous: hls.Segment | None) -> None:
        """EXT-X-PROGRAM-DATE-TIME of the segments about to be listed.  A segment follows the
        one before it; a run (or a gap) begins a new stretch of dates, reckoned back from
        its newest segment, which ends when FFmpeg finished it: a new FFmpeg writes the
        source's burst (a restream server's last seconds, an HLS source's last segments) as
        several segments in a moment, and they are dated as the past they are.  So no date
        runs ahead of the clock (a player that places live segments on the clock, Shaka,
        would wait for them) and a replacement's gap shows where it was."""
        start = 0
        while start < len(fresh):
            chained = previous if start == 0 else fresh[start - 1]
            if (
                start == 0
                and chained is not None
                and not fresh[0].discontinuity
                and chained.program_date_time is not None
            ):
                fresh[0].program_date_time = chained.program_date_time + chained.duration
                end = start + 1
            else:  # a stretch of its own: back from its newest
                end = next((k for k in range(start + 1, len(fresh)) if fresh[k].discontinuity), len(fresh))
                moment = made[end - 1]
                for k in range(end - 1, start - 1, -1):
                    moment -= fresh[k].duration
                    fresh[k].program_date_time = moment
                start = end
                continue
            while end < len(fresh) and not fresh[end].discontinuity:
                before = fresh[end - 1].program_date_time
                assert before is not None  # dated just above
                fresh[end].program_date_time = before + fresh[end - 1].duration
                end += 1
            start = end

    def _append(self, fresh: list[hls.Segment]) -> None:
        """The segments listed, the playlist written; nothing changes if the write fails."""
        playlist = (
            copy.deepcopy(self.playlist)
            if self.playlist is not None
            else hls.MediaPlaylist(
                target_duration=self.target_duration, media_sequence=hls.segment_number(fresh[0].uri, self.id) or 0
            )
        )
        playlist.segments += fresh
        retired = self._trim(playlist)
        # The temp name is one the channel's cleanup knows (one publisher per hls_dir).
        files.write_atomic(self.public_path, playlist.render().encode("ascii"), 0o644, temp=self.public_path + ".tmp")
        self.playlist = playlist
        for segment in fresh:
            if round(segment.duration) > self.target_duration and not self._warned_long:
                self._warned_long = True
                log.warning(
                    "channel %s: a segment of %.2f s exceeds the target duration %d s (the "
                    "source's keyframes are further apart than hls_time allows; raise hls_time "
                    "or use a quality that encodes video)",
                    self.id,
                    segment.duration,
                    self.target_duration,
                )
        self._retired.extend((self.published, path) for path in retired)
        self.published += len(fresh)
        self.run_published += len(fresh)
        self.last_growth = time.monotonic()
        self._delete_retired()

    def _trim(self, playlist: hls.MediaPlaylist) -> list[str]:
        """Drop the oldest segments beyond hls_list_size, keeping three target durations;
        the paths of earlier runs' segments dropped (retired: deleted a window later)."""
        retired = []
        while (
            len(playlist.segments) > self.list_size
            and playlist.duration - playlist.segments[0].duration >= 3 * playlist.target_duration
        ):
            removed = playlist.segments.pop(0)
            playlist.media_sequence += 1
            if removed.discontinuity:
                playlist.discontinuity_sequence += 1
            number = hls.segment_number(removed.uri, self.id)
            if number is not None and self.run_first is not None and number < self.run_first:
                retired.append(os.path.join(self.hls_dir, removed.uri))
        return retired

    def _delete_retired(self) -> None:
        keep = len(self.playlist.segments) + hls.KEEP_AFTER_REMOVAL if self.playlist else 0
        while self._retired and self.published - self._retired[0][0] >= keep:
            _unlink(self._retired.popleft()[1])

    def _sweep(self, current_first: int, *, ffmpeg_running: bool) -> None:
        """Files of earlier runs: what was never listed goes now (FFmpeg's own playlist, a
        segment it was writing when it died, one refused as incomplete); what left the
        playlist is retired (deleted a window later).  The running FFmpeg's files (numbers
        from ``current_first`` on) are its own."""
        listed = {s.uri for s in self.playlist.segments} if self.playlist else set()
        first_listed = (
            hls.segment_number(self.playlist.segments[0].uri, self.id) if self.playlist is not None and listed else None
        )
        retired = {path for _, path in self._retired}
        for path in files.stream_files(self.hls_dir, self.id):
            name = os.path.basename(path)
            if path == self.public_path or name in listed or path in retired:
                continue
            number = hls.segment_number(name.removesuffix(".tmp"), self.id)
            if ffmpeg_running and (number is None or number >= current_first):
                continue  # the running FFmpeg's
            if number is not None and not name.endswith(".tmp") and first_listed is not None and number < first_listed:
                self._retired.append((self.published, path))
            else:
                _unlink(path)

    def _watch_passive(self) -> int:
        """An FFmpeg writing the viewers' playlist itself: its growth, for the stall check."""
        try:
            mtime = os.stat(self.public_path).st_mtime
        except OSError:
            return 0
        seen = time.monotonic() - max(0.0, time.time() - mtime)
        grew = seen > self.last_growth + 1e-3
        self.last_growth = max(self.last_growth, seen)
        return int(grew)

    # -- what the supervisor asks -----------------------------------------------------------
    def unchanged_for(self) -> float:
        """Seconds since the viewers' playlist last gained a segment."""
        return time.monotonic() - self.last_growth

    def end_if_frozen(self, limit: float) -> None:
        """No viewers' playlist is served unchanged past the freeze limit: the session ends
        and its files go (a player's next request starts the channel again)."""
        if self.playlist is not None and self.unchanged_for() > limit:
            log.warning(
                "channel %s: its playlist did not change for %.0f s (freeze limit %g s); its "
                "files are removed, the next request starts it again",
                self.id,
                self.unchanged_for(),
                limit,
            )
            self.end_session()

    def media(self) -> tuple[int, list[float]] | None:
        """(media sequence, durations) as published: the pace meter's input."""
        if self.passive:
            return files.playlist_media(self.public_path)
        if self.playlist is None:
            return None
        return self.playlist.media_sequence, [s.duration for s in self.playlist.segments]


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _unlink(path: str) -> None:
    files.remove_entry(path)
