"""`streamctl doctor` finds each failure of the old host by itself (issue: shipping): every
broken setup is built for real (the stack's redis-server, nginx config, launcher, relay,
FFmpeg) and doctor must name it, with exit 1; the healthy stack passes those checks."""

import json
import os
import subprocess
import sys
import time

import pytest

from demo.stack import toml_value
from streamstate import keys, runs
from tests.conftest import REPO
from tests.helpers import add_channel

pytestmark = pytest.mark.e2e


def doctor(stack, tmp_path, *args, settings: dict | None = None, nginx_text: str | None = None):
    """doctor --json against the stack, with settings and the nginx config changed as asked."""
    config = tmp_path / "doctor.toml"
    text = open(stack.config_path).read()
    for key, value in (settings or {}).items():
        text = (
            "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))
            + f"\n{key} = {toml_value(value)}\n"
        )
    config.write_text(text)
    conf = os.path.join(stack.work, "nginx", "nginx.conf")
    if nginx_text is not None:
        conf = str(tmp_path / "nginx-broken.conf")
        with open(conf, "w") as handle:
            handle.write(nginx_text)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "doctor", "--json", "--config", str(config), "--nginx-conf", conf, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr
    checks = json.loads(result.stdout)
    return result.returncode, checks, time.monotonic() - started


def failed(checks, name):
    return [c["detail"] for c in checks if c["check"] == name and c["status"] == "FAIL"]


def rendered_snippet(stack) -> str:
    """The stack's nginx config with its include expanded (what nginx -T would show)."""
    with open(os.path.join(stack.work, "nginx", "streamkeeper.conf")) as handle:
        snippet = handle.read()
    with open(os.path.join(stack.work, "nginx", "nginx.conf")) as handle:
        main = handle.read()
    return main.replace(f"include {os.path.join(stack.work, 'nginx', 'streamkeeper.conf')};", snippet)


def test_the_healthy_stack_passes_the_host_checks(stack, tmp_path):
    _, checks, _ = doctor(stack, tmp_path)
    by_name = {c["check"]: c for c in checks}
    for name in (
        "nginx answers",
        "nginx fallback",
        "nginx access log",
        "launcher",
        "launcher start route",
        "egress relay",
        "ffmpeg",
    ):
        assert by_name[name]["status"] == "ok", by_name[name]


def test_a_wrong_port_in_nginx_s_fallback_is_named_with_both_ports(stack, tmp_path):
    text = rendered_snippet(stack).replace(f"server {stack.settings['launcher_listen']};", "server 127.0.0.1:5999;")
    code, checks, _ = doctor(stack, tmp_path, nginx_text=text)
    [detail] = failed(checks, "nginx fallback")
    assert code == 1 and "127.0.0.1:5999" in detail and stack.settings["launcher_listen"] in detail


def test_access_log_off_where_streams_are_served(stack, tmp_path):
    text = rendered_snippet(stack).replace(
        f"access_log {stack.settings['access_log']} streamkeeper buffer=32k flush=1s;", "access_log off;"
    )
    code, checks, _ = doctor(stack, tmp_path, nginx_text=text)
    assert code == 1 and any("access_log off" in d for d in failed(checks, "nginx access log"))


def test_a_log_heartbeatd_does_not_follow_or_parse(stack, tmp_path):
    code, checks, _ = doctor(stack, tmp_path, settings={"access_log": str(tmp_path / "other.log")})
    assert code == 1 and any("heartbeatd follows" in d for d in failed(checks, "nginx access log"))
    code, checks, _ = doctor(stack, tmp_path, settings={"log_format": '$remote_addr [$time_local] "$request" $status'})
    assert code == 1 and any("not the one heartbeatd parses" in d for d in failed(checks, "nginx access log"))


def test_a_dead_pid_record_and_an_empty_playlist_are_named(stack, tmp_path):
    record = runs.RunRecord(
        channel="790",
        run_id=runs.new_run_id(),
        host=stack.settings.get("host_id") or __import__("socket").gethostname(),
        pid=os.getpid(),
        pid_start=None,
        started=time.time(),
    )
    runs.record_run(stack.redis, record)  # pytest's own pid: alive, not that channel's FFmpeg
    with open(os.path.join(stack.hls_dir, "stream_791.m3u8"), "w") as handle:
        handle.write("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n")
    try:
        code, checks, _ = doctor(stack, tmp_path)
        assert code == 1
        assert any("stale record" in d for d in failed(checks, "channel 790"))
        assert any("lists no segment" in d for d in failed(checks, "channel 791"))
    finally:
        runs.delete_run_if(stack.redis, "790", record.run_id)
        os.unlink(os.path.join(stack.hls_dir, "stream_791.m3u8"))


def test_the_launcher_stopped_and_redis_stopped(stack, tmp_path):
    from tests.helpers import free_port

    code, checks, _ = doctor(stack, tmp_path, settings={"launcher_listen": f"127.0.0.1:{free_port()}"})
    assert code == 1 and any("nothing answers" in d for d in failed(checks, "launcher"))
    code, checks, took = doctor(stack, tmp_path, settings={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert code == 1 and any("does not answer" in d for d in failed(checks, "redis"))


def test_channel_shows_what_its_source_answers_with_and_without_its_proxy(stack, tmp_path):
    from tests.fakes.socks5_server import Socks5Server

    socks = Socks5Server()
    try:
        add_channel(
            stack,
            792,
            source_url=f"http://127.0.0.1:{stack.upstream_port}/forbidden/792.ts",
            proxy=f"socks5h://127.0.0.1:{socks.port}",
        )
        add_channel(stack, 793)
        code, checks, _ = doctor(stack, tmp_path, "--channel", "793")
        assert [c["detail"] for c in checks if c["check"] == "channel 793 source"][0].endswith("200 without proxy")
        code, checks, _ = doctor(stack, tmp_path, "--channel", "792")
        [detail] = failed(checks, "channel 792 source")
        assert "403 without proxy, 403 through socks5h://127.0.0.1:" in detail
        assert any(r["port"] == stack.upstream_port for r in socks.requests)
    finally:
        socks.close()


def test_junk_in_redis_is_named_never_a_traceback(stack, tmp_path, channel_id):
    stack.redis.set(keys.pid_key(channel_id), "²")
    stack.redis.sadd(keys.ACTIVE_STREAMS_KEY, channel_id, "not-an-id")
    host = __import__("socket").gethostname()
    saved = stack.redis.hgetall(keys.reaper_last_pass_key(host))
    stack.redis.delete(keys.reaper_last_pass_key(host))
    stack.redis.set(keys.reaper_last_pass_key(host), "junk")
    try:
        code, checks, _ = doctor(stack, tmp_path)
        assert code == 1
        assert any("stale record" in d for d in failed(checks, f"channel {channel_id}"))
        assert any("not-an-id" in d for d in failed(checks, "streams:active"))
        assert failed(checks, "reaper")
    finally:
        stack.redis.delete(keys.pid_key(channel_id), keys.reaper_last_pass_key(host))
        stack.redis.srem(keys.ACTIVE_STREAMS_KEY, channel_id, "not-an-id")
        if saved:
            stack.redis.hset(keys.reaper_last_pass_key(host), mapping=saved)


def test_a_source_that_never_finishes_its_headers_has_a_deadline_and_a_validator_down_is_named(
    stack, channel_id, tmp_path
):
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def trickle():
        connection, _ = server.accept()
        connection.sendall(b"HTTP/1.1 200 OK\r\nX-A: ")
        for _ in range(30):
            time.sleep(1)
            try:
                connection.sendall(b"a")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        add_channel(stack, channel_id, source_url=f"http://127.0.0.1:{port}/x.ts")
        from tests.helpers import free_port

        code, checks, _ = doctor(
            stack,
            tmp_path,
            "--channel",
            channel_id,
            settings={"auth_url": f"http://127.0.0.1:{free_port()}/validate"},
        )
        assert any("no answer within" in d for d in failed(checks, f"channel {channel_id} source"))
        assert any("every playlist request gets 500" in d for d in failed(checks, "viewer validator"))
    finally:
        server.close()


def test_a_source_on_a_denied_address_is_not_asked(stack, channel_id, tmp_path):
    add_channel(stack, channel_id, source_url="http://169.254.169.254/latest/meta-data/")
    code, checks, _ = doctor(stack, tmp_path, "--channel", channel_id)
    assert any(
        "not asked (169.254.169.254:80 is in upstream_deny" in d for d in failed(checks, f"channel {channel_id} source")
    )


def test_a_default_server_in_front_of_ours_is_named(stack, tmp_path):
    """Debian's sites-enabled/default on the same port: nginx sends /live/ there."""
    port = stack.settings["nginx_listen"].rpartition(":")[2]
    text = rendered_snippet(stack).replace(
        "http {", "http {\n    server { listen %s default_server; server_name _; root /var/www/html; }" % port, 1
    )
    code, checks, _ = doctor(stack, tmp_path, nginx_text=text)
    assert code == 1 and any(f"default_server on port {port}" in d for d in failed(checks, "nginx server"))


def test_the_old_host_s_stale_keys_are_named_each_with_its_channel(stack, tmp_path):
    """The seed report's state: five streams in Redis as the old launcher left them (pid,
    started and last_access keys, no run record), one FFmpeg running.  doctor names the four
    whose pid is no FFmpeg of theirs, by channel, and leaves the live one alone; and a provider
    slot that no running stream holds."""
    import shutil

    now = time.time()
    live = subprocess.Popen(
        [
            shutil.which("ffmpeg"),
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=64x64:rate=5",
            "-f",
            "hls",
            "-hls_time",
            "1",
            os.path.join(stack.hls_dir, "stream_781.m3u8"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    legacy = {"781": live.pid, "782": dead.pid, "783": os.getpid(), "784": 1, "785": 999_999_999}
    try:
        for channel, pid in legacy.items():
            stack.redis.set(keys.pid_key(channel), pid)
            stack.redis.set(keys.started_key(channel), f"{now - 3600:.3f}")
            stack.redis.set(keys.last_access_key(channel), f"{now:.3f}")
        stack.redis.hset(
            keys.provider_slots_key("oldacct"),
            "782",
            json.dumps({"run_id": "gone", "host": "old-host", "at": now - 3600}),
        )
        code, checks, _ = doctor(
            stack, tmp_path, settings={"providers": {"oldacct": {"match": "http://127.0.0.1:9/", "max_streams": 1}}}
        )
        assert code == 1
        for channel in ("782", "783", "784", "785"):
            [detail] = failed(checks, f"channel {channel}")
            assert "stale record (the old host's keys (no run record))" in detail and "streamctl reap" in detail
        assert not [c for c in checks if c["check"] == "channel 781"]
        [slots] = [c for c in checks if c["check"] == "provider oldacct"]
        assert slots["status"] == "warn" and "782" in slots["detail"]
    finally:
        live.terminate()
        live.wait(10)
        for channel in legacy:
            stack.redis.delete(keys.pid_key(channel), keys.started_key(channel), keys.last_access_key(channel))
        stack.redis.delete(keys.provider_slots_key("oldacct"))
        for name in os.listdir(stack.hls_dir):
            if name.startswith("stream_781"):
                os.unlink(os.path.join(stack.hls_dir, name))


def test_a_running_stream_whose_channel_record_is_gone_is_named(stack, channel_id, tmp_path):
    """A Redis restarted without its data keeps the streams (their records are written again)
    but not the catalogue: doctor says such a stream will not be restarted."""
    add_channel(stack, channel_id)
    from tests.helpers import first_request

    assert first_request(stack.playlist_url(channel_id))[0] == 200
    stack.redis.delete(keys.channel_key(channel_id))
    try:
        _, checks, _ = doctor(stack, tmp_path)
        [warning] = [c for c in checks if c["check"] == f"channel {channel_id}"]
        assert warning["status"] == "warn" and f"channel record (channel:{channel_id}) is gone" in warning["detail"]
    finally:
        stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def test_nothing_answering_on_nginx_listen_is_named(stack, tmp_path):
    """Finding (operator, issue 16): doctor read nginx's config but never asked nginx itself;
    with nginx stopped (here: nginx_listen on a port nothing listens on) every check passed."""
    from tests.helpers import free_port

    code, checks, _ = doctor(stack, tmp_path, settings={"nginx_listen": f"127.0.0.1:{free_port()}"})
    [detail] = failed(checks, "nginx answers")
    assert code == 1 and "nothing answers on 127.0.0.1:" in detail and "viewers reach nothing" in detail


def test_this_host_s_streams_waiting_to_restart_or_failed_are_named_with_their_last_error(stack, tmp_path, channel_id):
    """Finding (operator, issue 16): a stream in back-off (its viewers see nothing) and a
    channel that failed here passed doctor silently.  Now each is a FAIL with its last error."""
    from streamstate.settings import load_settings

    host = load_settings(stack.config_path, environ={}).host_id
    record = runs.RunRecord(
        channel="796",
        run_id="doctor-796",
        host=host,
        pid=0,
        pid_start=None,
        started=time.time(),
        state="backoff",
        last_error="upstream unreachable: Connection refused",
        restarts=3,
        until=time.time() + 120,
    )
    runs.record_run(stack.redis, record)
    runs.mark_failed(stack.redis, channel_id, "upstream refused: HTTP 403", host, 120)
    try:
        code, checks, _ = doctor(stack, tmp_path)
    finally:
        runs.delete_run_if(stack.redis, "796", "doctor-796")
        stack.redis.delete(keys.failed_key(channel_id))
    [waiting] = failed(checks, "channel 796")
    assert "waiting to restart FFmpeg (restart 3)" in waiting and "upstream unreachable: Connection refused" in waiting
    [failure] = failed(checks, f"channel {channel_id}")
    assert failure.startswith("failed: upstream refused: HTTP 403; starts answer 503")
    assert code == 1
