"""The continuity rules without processes: the publisher on files FFmpeg would write, the
next step after an FFmpeg ends, the reaper's view of a restarting run, the strict check."""

import os
import time

import pytest

from launcher.publisher import BURST_SETTLE, PlaylistPublisher
from streamstate import hls, runs, stream_end
from streamstate.stream_end import Cause, Next
from tests import hls_check

pytestmark = pytest.mark.unit

CHANNEL = "7"


class Clock:
    """The publisher's clock, moved by the test (FFmpeg makes a segment in its duration)."""

    def __init__(self):
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr("launcher.publisher.time", fake)
    return fake


class FakeFFmpeg:
    """Writes what FFmpeg's hls muxer writes: segments, then its own playlist, one segment per
    its duration of the clock."""

    def __init__(self, directory, start: int, list_size: int = 6, clock: Clock | None = None):
        self.directory, self.next, self.list_size = str(directory), start, list_size
        self.listed: list[tuple[str, float]] = []
        self.clock = clock

    def segment(self, duration: float = 1.0, packets: int = 10, cut: int = 0, advance: bool = True) -> str:
        name = f"stream_{CHANNEL}_{self.next}.ts"
        data = (b"\x47" + b"\0" * 187) * packets
        if self.clock is not None and advance:
            self.clock.now += duration
        path = os.path.join(self.directory, name)
        with open(path, "wb") as handle:
            handle.write(data[: len(data) - cut])
        if self.clock is not None:
            os.utime(path, (self.clock.now, self.clock.now))
        self.next += 1
        self.listed = (self.listed + [(name, duration)])[-self.list_size :]
        first = int(self.listed[0][0].rsplit("_", 1)[1][:-3])
        text = f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:{first}\n" + "".join(
            f"#EXTINF:{d:f},\n{n}\n" for n, d in self.listed
        )
        playlist = os.path.join(self.directory, f"stream_{CHANNEL}.ffmpeg.m3u8")
        with open(playlist, "w") as handle:
            handle.write(text)
        if self.clock is not None:  # written, and still for as long as a burst takes
            still = self.clock.now - 2 * BURST_SETTLE
            os.utime(playlist, (still, still))
        return name


def published(directory) -> str:
    with open(os.path.join(str(directory), f"stream_{CHANNEL}.m3u8")) as handle:
        return handle.read()


def publisher(directory, **kwargs) -> PlaylistPublisher:
    return PlaylistPublisher(
        str(directory), CHANNEL, target_duration=kwargs.pop("target", 2), list_size=kwargs.pop("list_size", 4)
    )


def test_a_replacement_continues_the_playlist_by_the_rules(tmp_path, clock):
    pub = publisher(tmp_path)
    versions = []
    first = pub.begin_run()
    assert first == hls.session_base(clock.now)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=first)
    for _ in range(8):
        ffmpeg.segment()
        assert pub.publish() == 1
        versions.append(published(tmp_path))
    # FFmpeg dies; the next one continues the numbering after what was listed.
    second = pub.begin_run()
    assert second == first + 8
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=second)
    for _ in range(10):
        ffmpeg.segment()
        pub.publish()
        versions.append(published(tmp_path))
    assert hls_check.check(versions) == []
    tagged = [v for v in versions if "#EXT-X-DISCONTINUITY\n" in v]
    assert tagged and [s.uri for s in hls.parse(tagged[0]).segments if s.discontinuity] == [f"stream_7_{second}.ts"]
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:1" in versions[-1]  # the tag slid out
    assert all("#EXT-X-TARGETDURATION:2\n" in v for v in versions)
    final = hls.parse(versions[-1])
    assert final.media_sequence == hls.segment_number(final.segments[0].uri, CHANNEL)
    assert final.duration >= 3 * final.target_duration and len(final.segments) >= 4
    # Dated: within a run each segment follows the one before it exactly; the replacement's
    # first is dated by the clock.
    dates = [(s.discontinuity, s.program_date_time, s.duration) for s in final.segments]
    for (_, before, length), (gap, after, _) in zip(dates, dates[1:]):
        assert gap or after == pytest.approx(before + length, abs=0.002)
    assert all(abs(date - clock.now) < 60 for _, date, _ in dates)


def test_an_incomplete_segment_is_never_listed(tmp_path, clock):
    pub = publisher(tmp_path)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    ffmpeg.segment()
    pub.publish()
    cut = ffmpeg.segment(cut=100)  # a full disk cut it short
    assert pub.publish() == 0 and pub.rejected == 1
    after = ffmpeg.segment()
    assert pub.publish() == 1
    text = published(tmp_path)
    assert cut not in text
    assert [s.uri for s in hls.parse(text).segments if s.discontinuity] == [after]  # the gap is marked
    assert hls_check.check([text]) == []


def test_the_session_resumes_from_disk_and_restarts_above_every_number(tmp_path, clock):
    pub = publisher(tmp_path)
    first = pub.begin_run()
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=first)
    for _ in range(3):
        ffmpeg.segment()
        pub.publish()
    before = published(tmp_path)
    # A launcher restarted: a new publisher adopts the running FFmpeg.
    again = publisher(tmp_path, target=9)
    again.adopt_run(first, writes_public=False)
    assert again.target_duration == 2  # the session's, from the file
    ffmpeg.segment()
    assert again.publish() == 1
    assert hls_check.check([before, published(tmp_path)]) == []
    assert "#EXT-X-DISCONTINUITY" not in published(tmp_path)  # the same FFmpeg: no gap
    # The session ends (files gone); a new one numbers above every number used before.
    again.end_session()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("stream_7")]
    assert again.begin_run() > ffmpeg.next


def test_earlier_runs_segments_go_a_window_after_they_left(tmp_path, clock):
    pub = publisher(tmp_path, list_size=2, target=1)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    old = [ffmpeg.segment() for _ in range(3)]
    pub.publish()
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    for _ in range(12):
        ffmpeg.segment()
        pub.publish()
        listed = hls.parse(published(tmp_path)).segments
        for name in old:
            if name in {s.uri for s in listed}:
                assert os.path.exists(tmp_path / name)  # never deleted while listed
    assert not any(os.path.exists(tmp_path / name) for name in old)


def test_a_burst_is_listed_whole_and_dated_as_the_past_it_is(tmp_path, clock):
    """A new FFmpeg writes the source's burst (its last seconds) as three segments at once:
    they are listed together, a cold start's as well as a replacement's, dated back from the
    newest (which ends when FFmpeg finished it), so no date is ahead of the clock."""
    pub = publisher(tmp_path)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    for _ in range(3):
        ffmpeg.segment(advance=False)
    assert pub.publish() == 3  # the cold start's burst, at once
    clock.now += 3.0
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    for _ in range(3):
        ffmpeg.segment(advance=False)
    assert pub.publish() == 3
    listing = hls.parse(published(tmp_path)).segments
    replacement = [s for s in listing if hls.segment_number(s.uri, CHANNEL) >= pub.run_first]
    assert len(replacement) == 3 and replacement[0].discontinuity
    assert replacement[-1].program_date_time + replacement[-1].duration == pytest.approx(clock.now)
    for before, after in zip(replacement, replacement[1:]):
        assert after.program_date_time == pytest.approx(before.program_date_time + before.duration)
    assert all(s.program_date_time + s.duration <= clock.now + 1e-6 for s in listing)


def test_a_playlist_that_cannot_be_written_changes_nothing(tmp_path, clock, monkeypatch):
    """Found by an attack: a full disk failed the publisher's own write and ended the stream.
    Now nothing is taken as listed, the error is kept for the supervisor (a full disk is
    waited out), and the next write lists the segment."""
    import errno

    from streamstate import files

    pub = publisher(tmp_path)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    ffmpeg.segment()
    assert pub.publish() == 1
    before = published(tmp_path)
    ffmpeg.segment()
    real_write = files.write_atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_atomic", full)
    assert pub.publish() == 0 and pub.write_error.errno == errno.ENOSPC
    assert published(tmp_path) == before and len(pub.playlist.segments) == 1
    monkeypatch.setattr(files, "write_atomic", real_write)
    assert pub.publish() == 1 and pub.write_error is None
    assert len(hls.parse(published(tmp_path)).segments) == 2


def test_the_leftovers_of_a_dead_ffmpeg_go_before_the_next_starts(tmp_path, clock):
    pub = publisher(tmp_path)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run())
    ffmpeg.segment()
    pub.publish()
    partial = tmp_path / f"stream_7_{ffmpeg.next}.ts.tmp"
    partial.write_bytes(b"\x47" * 10)
    pub.begin_run()
    assert not partial.exists() and not (tmp_path / "stream_7.ffmpeg.m3u8").exists()
    assert (tmp_path / "stream_7.m3u8").exists()


def test_a_cut_or_hostile_playlist_yields_only_whole_entries():
    text = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\nstream_7_1.ts\n#EXTINF:1.0,\nstream_7_2"
    assert [s.uri for s in hls.parse(text).segments] == ["stream_7_1.ts"]
    hostile = "#EXTM3U\n#EXTINF:1.0,\n../../etc/passwd\n#EXTINF:1.0,\nstream_7_3.ts\n"
    assert hls.parse(hostile).segments == []
    assert hls.parse("#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:-1\n") is None
    assert hls.parse("<html>") is None
    assert hls.segment_number("stream_8_5.ts", "7") is None


@pytest.mark.parametrize(
    "cause, playable, wanted, recent, expected, delay",
    [
        (Cause.EXITED, True, True, 0, Next.RESTART, 0.0),  # the first restart is immediate
        (Cause.STALLED, True, True, 1, Next.RESTART, 1.0),
        (Cause.EXITED, True, True, 3, Next.RESTART, 4.0),
        (Cause.EXITED, True, True, 5, Next.FAIL, 0.0),  # max_restarts reached
        (Cause.SOURCE, False, True, 0, Next.FAIL, 0.0),  # never playable
        (Cause.RELAY_DOWN, True, True, 4, Next.WAIT, 0.0),  # the host's problem: no restart spent
        (Cause.DISK_FULL, True, True, 0, Next.WAIT, 0.0),
        (Cause.FENCED, False, True, 0, Next.WAIT, 0.0),  # the host is fenced: the source is not to blame
        (Cause.EXITED, True, False, 0, Next.STOP, 0.0),  # nobody wants it
    ],
)
def test_what_follows_an_ffmpeg_that_ended(cause, playable, wanted, recent, expected, delay):
    step = stream_end.after_exit(
        cause, ever_playable=playable, wanted=wanted, restarts_in_window=recent, max_restarts=5, restart_window=300
    )
    assert (step.next, step.delay) == (expected, delay)


def test_a_run_is_vouched_for_only_within_its_launcher_s_promise():
    now = time.time()
    record = runs.RunRecord(
        channel="7", run_id="r", host="h", pid=1, pid_start=1, started=now, state="backoff", until=now + 5
    )
    assert record.vouched(now)
    assert not record.vouched(now + 6)
    assert runs.RunRecord(**{**record.__dict__, "state": "running"}).vouched(now)
    assert not runs.RunRecord(**{**record.__dict__, "state": "stopping"}).vouched(now)
    assert not runs.RunRecord(**{**record.__dict__, "until": None}).vouched(now)
    assert not runs.RunRecord(**{**record.__dict__, "until": now + 1e6}).vouched(now)  # junk


def test_the_strict_check_catches_what_ffmpeg_append_list_writes():
    """What FFmpeg 5.1 wrote with -hls_flags append_list after a replacement (README,
    Continuity): the discontinuity tag slid out and EXT-X-DISCONTINUITY-SEQUENCE never came;
    the target duration went from 1 to 2."""
    before = (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:3\n"
        "#EXTINF:1.0,\ns3.ts\n#EXTINF:1.0,\ns4.ts\n#EXT-X-DISCONTINUITY\n#EXTINF:1.0,\ns5.ts\n"
    )
    after = (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:5\n"
        "#EXTINF:2.0,\ns5.ts\n#EXTINF:2.0,\ns6.ts\n"
    )
    problems = hls_check.check([before, after])
    assert any("TARGETDURATION changed" in p for p in problems)
    assert any("media sequence 5 was s5.ts (discontinuity sequence 1), now s5.ts (0)" in p for p in problems)
    reused = "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:1.0,\ns3.ts\n"
    assert any("reused" in p for p in hls_check.check([before, reused]))
    assert any("went down" in p for p in hls_check.check([before, reused]))


def test_segments_gone_before_they_were_listed_leave_a_marked_gap(tmp_path, clock):
    """The launcher away longer than FFmpeg keeps its segments (seen: a 41 s outage): the
    numbers it never listed are gone.  The next listed segment carries a discontinuity and
    is dated by the clock, so neither the media nor the dates run on as if nothing was lost."""
    pub = publisher(tmp_path)
    ffmpeg = FakeFFmpeg(tmp_path, clock=clock, start=pub.begin_run(), list_size=3)
    for _ in range(3):
        ffmpeg.segment()
        pub.publish()
    before = published(tmp_path)
    again = publisher(tmp_path)  # a new launcher, 10 segments later
    again.adopt_run(pub.run_first, writes_public=False)
    for _ in range(10):
        ffmpeg.segment()
    for name in os.listdir(tmp_path):  # FFmpeg deleted what left its list
        number = hls.segment_number(name, CHANNEL)
        if number is not None and name not in {n for n, _ in ffmpeg.listed} and name not in before:
            os.unlink(tmp_path / name)
    assert again.publish() == 3
    after = hls.parse(published(tmp_path))
    resumed = [s for s in after.segments if s.uri not in before]
    assert resumed[0].discontinuity and not resumed[1].discontinuity
    assert resumed[0].program_date_time == pytest.approx(clock.now - 2 - 1.0, abs=0.01)
    assert hls_check.check([before, published(tmp_path)]) == []


def test_what_a_crash_or_a_hand_leaves_in_hls_dir_is_cleaned_never_an_error(tmp_path):
    """Found by an attack: a directory named stream_<id>.ffmpeg.m3u8 failed every start and
    every reaper pass, and the publisher's temp file had a name no cleanup knew."""
    from streamstate import files

    (tmp_path / "stream_7.ffmpeg.m3u8").mkdir()
    (tmp_path / "stream_7_5.ts").mkdir()
    (tmp_path / "stream_7_6.ts").joinpath("inside").mkdir(parents=True)  # not empty: left
    (tmp_path / "stream_7.m3u8.tmp").write_text("#EXTM3U\n")  # a write cut short
    assert files.channel_of_file("stream_7.m3u8.tmp") == "7"
    assert files.delete_stream_files(str(tmp_path), "7") == 3
    assert os.listdir(tmp_path) == ["stream_7_6.ts"]
