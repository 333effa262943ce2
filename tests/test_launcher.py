"""The launcher end to end: real nginx (rendered config), launcher, FFmpeg, a live upstream,
and FFmpeg/ffprobe as the HLS client through nginx."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from demo.stack import LocalStack
from streamstate import files, keys
from tests.conftest import REPO
from tests.helpers import add_channel, decode, ffmpeg_processes, ffmpegs_writing, first_request, streamctl, wait_for

pytestmark = pytest.mark.e2e


def test_cold_channel_plays_through_nginx(stack, channel_id):
    add_channel(stack, channel_id)
    status, headers, body = first_request(stack.playlist_url(channel_id, "?token=abc"))
    # The first viewer gets the playlist itself: no redirect, a segment listed.
    assert status == 200 and "Location" not in headers and b"#EXTINF" in body
    # A real HLS client through nginx: decodes at least 5 s of it.
    result = decode(stack.playlist_url(channel_id, "?token=abc"), 5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "time=00:00:05" in result.stderr or "time=00:00:04.9" in result.stderr
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type",
            "-of",
            "csv=p=0",
            stack.playlist_url(channel_id),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sorted(set(probe.stdout.split())) == ["audio", "video"]
    assert len(ffmpegs_writing(stack, channel_id)) == 1


def test_transcoding_profile_keeps_audio_and_video(stack, channel_id):
    add_channel(stack, channel_id, quality="low")
    status, _, _ = first_request(stack.playlist_url(channel_id))
    assert status == 200
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,height",
            "-of",
            "json",
            stack.playlist_url(channel_id),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    streams = json.loads(probe.stdout)["streams"]
    assert {s["codec_type"] for s in streams} == {"audio", "video"}
    assert [s["height"] for s in streams if s["codec_type"] == "video"] == [480]


def test_a_hundred_simultaneous_first_requests_make_one_ffmpeg(stack, channel_id):
    add_channel(stack, channel_id)
    statuses = []
    barrier = threading.Barrier(100)

    def player():
        barrier.wait()
        statuses.append(first_request(stack.playlist_url(channel_id))[0])

    threads = [threading.Thread(target=player) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert len(statuses) == 100 and set(statuses) == {200}
    assert len(ffmpegs_writing(stack, channel_id)) == 1
    _, body = stack.launcher_json("/streams")
    assert [s["state"] for s in body["streams"] if s["id"] == channel_id] == ["running"]


def test_twenty_channels_started_at_once_all_play(stack):
    ids = list(range(120, 140))
    for channel_id in ids:
        add_channel(stack, channel_id)
    results = {}

    def player(channel_id):
        results[channel_id] = first_request(stack.playlist_url(channel_id))[0]

    threads = [threading.Thread(target=player, args=(c,)) for c in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert results == {c: 200 for c in ids}
    for channel_id in ids:
        status, _, body = first_request(stack.playlist_url(channel_id))
        assert status == 200 and b"#EXTINF" in body
        assert len(ffmpegs_writing(stack, channel_id)) == 1
    for channel_id in ids:
        assert stack.launcher_json(f"/channel/{channel_id}/stop", "POST")[1]["status"] == "stopped"


def test_upstream_403_is_a_503_with_the_reason_and_no_playlist(stack):
    add_channel(stack, 104, source_url=f"http://127.0.0.1:{stack.upstream_port}/forbidden/x.ts?token=secret")
    status, headers, body = first_request(stack.playlist_url(104))
    assert status == 503
    assert headers.get("Retry-After")
    assert body == b"channel 104: upstream refused: HTTP 403\n"
    assert not os.path.exists(files.playlist_path(stack.hls_dir, 104))
    assert files.stream_files(stack.hls_dir, 104) == []
    assert stack.redis.exists(keys.pid_key(104), keys.run_key(104)) == 0
    assert "secret" not in stack.log("launcher")


@pytest.mark.parametrize(
    "source",
    [
        "file:///etc/passwd",
        "concat:/etc/passwd|/etc/hosts",
        "/etc/passwd",
        "data:video/mp2t;base64,AAAA",
        "ftp://127.0.0.1/x.ts",
        "rtmp://127.0.0.1/live/x",
    ],
)
def test_non_http_sources_never_reach_ffmpeg(stack, channel_id, source):
    add_channel(stack, channel_id, source_url=source)
    before = len(ffmpeg_processes())
    status, _, body = first_request(stack.playlist_url(channel_id))
    assert status == 422
    assert b"only http:// and https://" in body
    assert len(ffmpeg_processes()) <= before
    assert not os.path.exists(files.playlist_path(stack.hls_dir, channel_id))


def test_bad_channel_records_are_clear_errors(stack):
    stack.redis.set(keys.channel_key(106), "{not json")
    status, body = stack.launcher_json("/channel/106/start", "POST")
    assert status == 422 and "channel 106" in body["error"] and "JSON" in body["error"]
    stack.redis.set(keys.channel_key(107), json.dumps({"quality": "copy"}))
    status, body = stack.launcher_json("/channel/107/start", "POST")
    assert status == 422 and "source_url" in body["error"]
    stack.redis.set(
        keys.channel_key(108), json.dumps({"source_url": stack.upstream_url(), "proxy": "socks4://127.0.0.1:1080"})
    )
    status, body = stack.launcher_json("/channel/108/start", "POST")
    assert status == 422 and "proxy refused" in body["error"] and "socks5h://" in body["error"]
    assert stack.launcher_json("/healthz")[0] == 200


@pytest.mark.parametrize("odd_id", ["abc", "-1", "1234567890123456789", "1.5", "%20", "0x10"])
def test_odd_ids_get_400(stack, odd_id):
    status, body = stack.launcher_json(f"/channel/{odd_id}/start", "POST")
    assert status == 400 and "invalid channel id" in body["error"]


def test_unknown_channel_is_404(stack):
    status, body = stack.launcher_json("/channel/999999/start", "POST")
    assert status == 404 and "no such channel" in body["error"]
    assert first_request(stack.playlist_url(999998))[0] == 404


def test_json_callers_get_started_then_already_running(stack, channel_id):
    add_channel(stack, channel_id)
    status, body = stack.launcher_json(f"/channel/{channel_id}/start", "POST")
    assert (status, body["status"]) == (200, "started")
    status, body = stack.launcher_json(f"/channel/{channel_id}/start", "POST")
    assert (status, body["status"]) == (200, "already_running")
    _, streams = stack.launcher_json("/streams")
    entry = next(s for s in streams["streams"] if s["id"] == channel_id)
    assert entry["state"] == "running" and entry["pid"] in ffmpegs_writing(stack, channel_id)
    assert stack.redis.get(keys.pid_key(channel_id)) == str(entry["pid"])
    assert float(stack.redis.get(keys.last_access_key(channel_id))) > 0
    assert stack.launcher_json(f"/channel/{channel_id}/stop", "POST")[1]["status"] == "stopped"
    assert files.stream_files(stack.hls_dir, channel_id) == []
    assert stack.redis.exists(keys.pid_key(channel_id), keys.run_key(channel_id)) == 0


def test_legacy_routes_keep_working(stack):
    status, body = stack.launcher_json(
        "/api/stream/start",
        "POST",
        {"channel_id": "110", "source_url": stack.upstream_url("legacy"), "quality": "copy"},
    )
    assert status == 200 and body["status"] == "started"
    assert json.loads(stack.redis.get(keys.channel_key(110)))["source_url"] == stack.upstream_url("legacy")
    status, body = stack.launcher_json("/api/streams/active")
    assert status == 200 and "110" in body["active_streams"]
    status, body = stack.launcher_json("/api/stream/stop", "POST", {"channel_id": "110"})
    assert status == 200 and body["status"] == "stopped"
    assert not ffmpegs_writing(stack, 110)
    status, body = stack.launcher_json(
        "/api/stream/start", "POST", {"channel_id": "110", "source_url": "file:///etc/passwd"}
    )
    assert status == 422


def test_a_killed_ffmpeg_is_restarted_while_wanted(stack, channel_id):
    add_channel(stack, channel_id)
    assert stack.launcher_json(f"/channel/{channel_id}/start", "POST")[0] == 200
    [pid] = ffmpegs_writing(stack, channel_id)
    os.kill(pid, 9)
    wait_for(lambda: ffmpegs_writing(stack, channel_id) not in ([], [pid]), timeout=30, message="a new FFmpeg")
    wait_for(lambda: first_request(stack.playlist_url(channel_id))[0] == 200, timeout=30, message="playable again")
    _, streams = stack.launcher_json("/streams")
    assert next(s for s in streams["streams"] if s["id"] == channel_id)["restarts"] == 1
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def test_metrics_and_healthz(stack):
    status, body = stack.launcher_json("/healthz")
    assert status == 200 and body["redis"] == "ok"
    with urllib.request.urlopen(stack.launcher_url("/metrics"), timeout=10) as response:
        text = response.read().decode()
    assert "streamkeeper_launcher_starts_total" in text


def test_the_reaper_stops_an_idle_launcher_stream_and_the_launcher_does_not_restart_it(stack, channel_id):
    add_channel(stack, channel_id)
    assert stack.launcher_json(f"/channel/{channel_id}/start", "POST")[0] == 200
    [pid] = ffmpegs_writing(stack, channel_id)
    stack.redis.set(keys.last_access_key(channel_id), "1000.0")  # nobody watched for ages
    result = subprocess.run(
        [sys.executable, "-m", "reaper", "--once", "--config", stack.config_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"channel {channel_id}: stopped" in result.stderr
    wait_for(lambda: not ffmpegs_writing(stack, channel_id), timeout=15, message="FFmpeg gone")
    wait_for(
        lambda: all(s["id"] != channel_id for s in stack.launcher_json("/streams")[1]["streams"]),
        timeout=15,
        message="the launcher to let it go",
    )
    assert not ffmpegs_writing(stack, channel_id)  # not restarted
    assert files.stream_files(stack.hls_dir, channel_id) == []
    assert stack.redis.exists(keys.pid_key(channel_id), keys.run_key(channel_id)) == 0
    # The next player starts it again, as a new run.
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    assert ffmpegs_writing(stack, channel_id) not in ([], [pid])


def test_streamctl_start_status_stop_and_reap(stack, channel_id):
    add_channel(stack, channel_id)
    started = streamctl(stack, "start", channel_id)
    assert started.returncode == 0, started.stderr
    assert f"channel {channel_id}: started" in started.stdout
    assert "already_running" in streamctl(stack, "start", channel_id).stdout
    status = json.loads(streamctl(stack, "status", "--json").stdout)
    entry = next(s for s in status["streams"] if s["id"] == channel_id)
    assert entry["state"] == "running" and entry["pid"] in ffmpegs_writing(stack, channel_id)
    assert streamctl(stack, "start", "777777").returncode == 3
    assert streamctl(stack, "start", "abc").returncode == 2
    dry = streamctl(stack, "reap", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["dry_run"] is True
    stopped = streamctl(stack, "stop", channel_id)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not ffmpegs_writing(stack, channel_id)


def test_temp_files_are_never_served(stack, channel_id):
    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    tmp = files.playlist_path(stack.hls_dir, channel_id) + ".tmp"
    with open(tmp, "w") as handle:
        handle.write("#EXTM3U\n")
    for path in (f"/live/stream_{channel_id}.m3u8.tmp", f"/live/stream_{channel_id}_1.ts.tmp", "/live/other.txt"):
        assert first_request(stack.nginx_url(path))[0] == 404
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def test_twenty_concurrent_starts_run_one_ffmpeg(stack, channel_id):
    """Concurrent first requests for one channel: one FFmpeg, every answer started or
    already_running."""
    add_channel(stack, channel_id)
    answers = []

    def start():
        request = urllib.request.Request(
            stack.launcher_url(f"/channel/{channel_id}/start"),
            data=b"",
            method="POST",
            headers={"Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append(json.loads(response.read())["status"])

    threads = [threading.Thread(target=start) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 20 and set(answers) <= {"started", "already_running"}
    assert len(ffmpegs_writing(stack, channel_id)) == 1
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")
    assert not ffmpegs_writing(stack, channel_id)


def test_a_second_launcher_on_the_same_hls_dir_refuses_to_run(stack, tmp_path):
    """Found by an attack: a second launcher on the host's hls_dir adopted the first one's
    live stream and ran a second FFmpeg on it.  One launcher per hls_dir: the second exits 1
    with one line, the first runs on."""
    from tests.helpers import free_port

    port = free_port()
    config = tmp_path / "second.toml"
    text = open(stack.config_path).read().replace(f"127.0.0.1:{stack.launcher_port}", f"127.0.0.1:{port}")
    config.write_text(text)
    second = subprocess.run(
        [sys.executable, "-m", "launcher", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"another stream-launcher already runs on hls_dir {stack.hls_dir}" in second.stderr
    assert "Traceback" not in second.stderr
    assert stack.launcher_json("/healthz")[0] == 200


def test_launcher_with_redis_unreachable_answers_503(tmp_path):
    from tests.helpers import free_port

    port = free_port()
    config = tmp_path / "noredis.toml"
    config.write_text(
        f'redis_url = "redis://127.0.0.1:1/0"\nlauncher_listen = "127.0.0.1:{port}"\n'
        f'hls_dir = "{tmp_path / "hls"}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import socket

        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, timeout=20, message="the launcher")
        fake = LocalStack.__new__(LocalStack)
        fake.launcher_port = port
        status, body = LocalStack.launcher_json(fake, "/channel/5/start", "POST")
        assert status == 503 and "redis unreachable" in body["error"]
        assert LocalStack.launcher_json(fake, "/healthz")[0] == 503
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "Traceback" not in output


def test_a_launcher_that_cannot_listen_adopts_nothing(stack, channel_id, tmp_path):
    """A launcher on a port in use exits 1 before it looks at the running streams (its own
    hls_dir: on the stack's, the directory's lock turns it away even sooner)."""
    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "--config", stack.config_path, "--hls-dir", str(tmp_path / "hls")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot listen" in result.stderr
    assert "adopted" not in result.stderr
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")
