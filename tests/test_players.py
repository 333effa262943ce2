"""The first viewer plays on real players nobody here wrote: VLC, hls.js in Chromium, FFmpeg.

Each test opens a *cold* channel (no FFmpeg, no playlist) through nginx running the
snippet `streamctl nginx-config` renders, so the player's first request is the one that
starts the channel.  `make test` installs VLC, Chromium and the npm packages.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from streamstate import files, keys
from tests.conftest import REPO
from tests.helpers import add_channel, decode, ffmpegs_writing
from tests.viewing import HLSJS_SECONDS, run_hlsjs

pytestmark = pytest.mark.e2e

ARTIFACTS = os.environ.get("STREAMKEEPER_TEST_ARTIFACTS", os.path.join(REPO, "test-artifacts"))
VLC_SECONDS = 22  # VLC dumps this long; at least 20 s of media must come out


@pytest.fixture(autouse=True)
def channels_stopped(stack):
    """Each test's channels stop after it, and their failures' cooldowns go: the session's
    stack is shared, and a channel left running or cooling down would answer another test's
    first request."""
    yield
    stack.launcher_json("/streams/stop", "POST")
    for key in stack.redis.scan_iter(match=keys.FAILED_KEY_PATTERN):
        stack.redis.delete(key)


def assert_cold(stack, channel_id):
    assert not os.path.exists(files.playlist_path(stack.hls_dir, channel_id))
    assert not ffmpegs_writing(stack, channel_id)
    assert not stack.redis.exists(keys.run_key(channel_id))


def unprivileged():
    """VLC refuses to run as root: run it as nobody (with a home of its own) when we are root."""
    if os.geteuid() != 0:
        return {}, None
    home = tempfile.mkdtemp(prefix="sk-vlc-")
    shutil.chown(home, "nobody", "nogroup")
    os.chmod(home, 0o755)
    return {"user": "nobody", "group": "nogroup", "extra_groups": []}, home


def probe_media(path: str) -> dict:
    """Duration, stream types and decoded video frames, as ffprobe sees them."""
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "format=duration:stream=codec_type,nb_read_frames",
            "-of",
            "json",
            path,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_vlc_plays_a_cold_channel(stack):
    channel_id = 701
    add_channel(stack, channel_id)
    assert_cold(stack, channel_id)
    vlc = shutil.which("cvlc")
    assert vlc, "VLC is not installed (make test installs vlc-bin and vlc-plugin-base)"
    as_user, home = unprivileged()
    work = home or tempfile.mkdtemp(prefix="sk-vlc-")
    dump = os.path.join(work, "dump.ts")
    try:
        result = subprocess.run(
            [
                vlc,
                "-I",
                "dummy",
                "--no-media-library",
                stack.playlist_url(channel_id, "?token=vlc"),
                f"--sout=#std{{access=file,mux=ts,dst={dump}}}",
                f"--run-time={VLC_SECONDS}",
                "vlc://quit",
            ],
            env={**os.environ, "HOME": work},
            capture_output=True,
            text=True,
            timeout=VLC_SECONDS + 60,
            **as_user,
        )
        assert "redirection loop" not in result.stderr
        assert os.path.exists(dump), f"VLC wrote nothing:\n{result.stderr[-3000:]}"
        media = probe_media(dump)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert float(media["format"]["duration"]) >= 20, media
    kinds = {s["codec_type"] for s in media["streams"]}
    assert kinds == {"audio", "video"}, media
    frames = max(int(s.get("nb_read_frames") or 0) for s in media["streams"] if s["codec_type"] == "video")
    assert frames >= 20 * 25 * 0.9, media  # the source is 25 fps: 20 s of decodable pictures


def test_hlsjs_in_chromium_plays_a_cold_channel_from_another_origin(stack):
    channel_id = 702
    add_channel(stack, channel_id)
    assert_cold(stack, channel_id)
    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, "hlsjs-cold-start.png")
    [result] = run_hlsjs("play", stack.playlist_url(channel_id, "?token=web"), screenshot=screenshot)
    assert result["supported"], "this Chromium has no MSE with H.264/AAC"
    assert result["fatal"] is None, result
    assert result["current_time"] >= HLSJS_SECONDS, result
    assert result["ok"]
    assert os.path.getsize(screenshot) > 0


def test_a_web_player_reads_why_a_channel_failed(stack):
    """404, 422 and 503 reach a page of another origin with their reason (CORS on errors)."""
    add_channel(stack, 703, source_url=f"http://127.0.0.1:{stack.upstream_port}/forbidden/x.ts")
    add_channel(stack, 704, source_url="file:///etc/passwd")
    results = run_hlsjs("fetch", stack.playlist_url(799999), stack.playlist_url(703), stack.playlist_url(704))
    seen = {r["url"]: r for r in results}
    missing, refused, unusable = (seen[stack.playlist_url(c)] for c in (799999, 703, 704))
    assert missing["ok"] and missing["status"] == 404 and "channel 799999: no such channel" in missing["body"]
    assert refused["ok"] and refused["status"] == 503 and "upstream refused: HTTP 403" in refused["body"]
    assert refused["retry_after"]
    assert unusable["ok"] and unusable["status"] == 422 and "channel 704" in unusable["body"]


def test_ffmpeg_plays_a_cold_channel(stack):
    channel_id = 705
    add_channel(stack, channel_id)
    assert_cold(stack, channel_id)
    result = decode(stack.playlist_url(channel_id, "?token=ff"), 5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "time=00:00:05" in result.stderr or "time=00:00:04.9" in result.stderr
