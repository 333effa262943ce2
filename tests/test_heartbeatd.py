"""heartbeatd end to end: the real console module, a real redis-server, real files."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from streamstate import keys
from streamstate.checkpoint import checkpoint_path
from tests.conftest import REPO
from tests.helpers import LEGACY_FORMAT, append, legacy_line, sk_line, wait_for


@pytest.fixture
def setup(tmp_path, redis_server, redis_client):
    log = tmp_path / "logs" / "streams_access.log"
    log.parent.mkdir()
    log.touch()
    state = tmp_path / "state"
    config = tmp_path / "sk.toml"
    config.write_text(
        f'redis_url = "{redis_server.url}"\naccess_log = "{log}"\nstate_dir = "{state}"\nflush_interval = 0.2\n'
    )
    return {"log": log, "state": state, "config": str(config), "redis": redis_client, "tmp": tmp_path}


def run_once(setup, *args, config=None):
    return subprocess.run(
        [sys.executable, "-m", "heartbeatd", "--config", config or setup["config"], "--once", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_stream(client, channel, last_access=None):
    client.set(keys.pid_key(channel), "4242")
    client.set(keys.started_key(channel), "1000.0")
    if last_access is not None:
        client.set(keys.last_access_key(channel), f"{last_access:.3f}")


def test_running_channels_get_the_newest_request_time(setup):
    now = time.time()
    r = setup["redis"]
    start_stream(r, 7, last_access=now - 100)
    start_stream(r, 8, last_access=now - 100)
    append(
        setup["log"],
        "".join(
            [
                sk_line(now - 50, "/live/stream_7.m3u8"),
                sk_line(now - 10, "/live/stream_7_3.ts"),
                sk_line(now - 30, "/live/stream_7_2.ts"),  # older, later in the file
                sk_line(now - 5, "/live/stream_8.m3u8", status=404),
                sk_line(now - 5, "/api/v1/stream_8/status"),
                sk_line(now - 4, "/live/stream_9.m3u8"),  # not running
            ]
        ),
    )
    result = run_once(setup, "--from-start")
    assert result.returncode == 0, result.stderr
    assert float(r.get(keys.last_access_key(7))) == pytest.approx(now - 10, abs=0.001)
    assert float(r.get(keys.last_access_key(8))) == pytest.approx(now - 100, abs=0.001)
    assert r.exists(keys.last_access_key(9), keys.viewers_key(9), keys.pid_key(9)) == 0
    assert "viewing 4" in result.stderr and "other 2" in result.stderr


def test_an_older_line_never_lowers_last_access(setup):
    now = time.time()
    r = setup["redis"]
    start_stream(r, 3, last_access=now - 1)
    append(setup["log"], sk_line(now - 200, "/live/stream_3.m3u8"))
    assert run_once(setup, "--from-start").returncode == 0
    assert float(r.get(keys.last_access_key(3))) == pytest.approx(now - 1, abs=0.001)


def test_a_legacy_stream_with_only_a_pid_key_is_kept_alive(setup):
    now = time.time()
    r = setup["redis"]
    r.set(keys.pid_key(11), "999")
    append(setup["log"], sk_line(now - 2, "/live/stream_11.m3u8"))
    assert run_once(setup, "--from-start").returncode == 0
    assert float(r.get(keys.last_access_key(11))) == pytest.approx(now - 2, abs=0.001)


def test_a_hundred_thousand_made_up_channels_create_no_key(setup):
    now = time.time()
    r = setup["redis"]
    start_stream(r, 1, last_access=now - 100)
    before = sorted(r.keys("*"))
    with open(setup["log"], "a") as handle:
        for n in range(100_000):
            handle.write(sk_line(now - 1, f"/live/stream_{10_000_000 + n * 7919}.m3u8", token=f"scan{n}"))
    result = run_once(setup, "--from-start")
    assert result.returncode == 0, result.stderr
    assert "viewing 100000" in result.stderr
    assert sorted(r.keys("*")) == before
    assert float(r.get(keys.last_access_key(1))) == pytest.approx(now - 100, abs=0.001)


def test_viewers_are_counted_and_tokens_never_stored(setup):
    now = time.time()
    r = setup["redis"]
    start_stream(r, 5, last_access=now - 60)
    append(
        setup["log"],
        "".join(
            [
                sk_line(now - 3, "/live/stream_5.m3u8", token="secret-token-A", addr="10.1.1.1"),
                sk_line(now - 2, "/live/stream_5_1.ts", token="secret-token-A", addr="10.1.1.9"),
                sk_line(now - 2, "/live/stream_5.m3u8", token="secret-token-B", addr="10.1.1.2"),
                sk_line(now - 1, "/live/stream_5.m3u8", addr="10.1.1.3", agent="VLC"),
                sk_line(now - 1, "/live/stream_5_2.ts", addr="10.1.1.3", agent="VLC"),
                sk_line(now - 1, "/live/stream_5_2.ts", addr="10.1.1.4", agent="VLC"),  # segment only: no viewer
                sk_line(now - 300, "/live/stream_5_0.ts", token="long-gone"),  # outside the window
            ]
        ),
    )
    result = run_once(setup, "--from-start")
    assert result.returncode == 0, result.stderr
    members = r.zrange(keys.viewers_key(5), 0, -1, withscores=True)
    assert len(members) == 3
    assert r.zcount(keys.viewers_key(5), now - 30, "+inf") == 3
    dump = repr(members) + result.stderr
    assert "secret-token" not in dump and "10.1.1." not in dump


def test_old_host_log_format(setup):
    now = time.time()
    r = setup["redis"]
    start_stream(r, 12, last_access=now - 100)
    config = setup["tmp"] / "legacy.toml"
    config.write_text(open(setup["config"]).read() + f"log_format = '{LEGACY_FORMAT}'\n")
    append(
        setup["log"],
        legacy_line(now - 3, "/live/stream_12_9.ts") + legacy_line(now - 2, "/live/stream_12.m3u8", status=404),
    )
    result = run_once(setup, "--from-start", config=str(config))
    assert result.returncode == 0, result.stderr
    assert float(r.get(keys.last_access_key(12))) == pytest.approx(int(now - 3), abs=0.001)


def test_a_format_without_time_is_refused_with_exit_2(setup):
    config = setup["tmp"] / "bad.toml"
    config.write_text(open(setup["config"]).read() + "log_format = '$remote_addr \"$request\" $status'\n")
    result = run_once(setup, config=str(config))
    assert result.returncode == 2
    assert "log_format" in result.stderr and "time" in result.stderr


def test_restart_resumes_from_the_checkpoint(setup):
    now = time.time()
    r = setup["redis"]
    start_stream(r, 4, last_access=now - 100)
    append(setup["log"], "".join(sk_line(now - 50 + n, "/live/stream_4.m3u8") for n in range(10)))
    first = run_once(setup, "--from-start")
    assert "lines read 10," in first.stderr
    assert os.path.exists(checkpoint_path(str(setup["state"]), str(setup["log"])))
    append(setup["log"], "".join(sk_line(now - 20 + n, "/live/stream_4_1.ts") for n in range(5)))
    second = run_once(setup)
    assert "resuming" in second.stderr and "lines read 5," in second.stderr
    assert float(r.get(keys.last_access_key(4))) == pytest.approx(now - 16, abs=0.001)


def test_redis_unreachable_with_once_exits_1_and_keeps_the_checkpoint(setup, tmp_path):
    append(setup["log"], sk_line(time.time(), "/live/stream_4.m3u8"))
    result = run_once(setup, "--from-start", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert "redis" in result.stderr.lower()
    assert not os.path.exists(checkpoint_path(str(setup["state"]), str(setup["log"])))


def live_config(setup, redis_url):
    config = setup["tmp"] / "live.toml"
    config.write_text(
        f'redis_url = "{redis_url}"\naccess_log = "{setup["log"]}"\n'
        f'state_dir = "{setup["state"]}"\nflush_interval = 0.2\n'
    )
    return str(config)


def test_live_request_reaches_redis_and_sigterm_exits_cleanly(setup, daemons, redis_server):
    r = setup["redis"]
    start_stream(r, 21, last_access=time.time() - 100)
    daemon = daemons("heartbeatd", "--config", live_config(setup, redis_server.url))
    wait_for(lambda: "starting at offset" in daemon.output(), message="heartbeatd to start")
    stamp = time.time()
    append(setup["log"], sk_line(stamp, "/live/stream_21.m3u8", token="t1"))
    wait_for(
        lambda: float(r.get(keys.last_access_key(21))) == pytest.approx(stamp, abs=0.001),
        message="last_access to follow the request",
    )
    wait_for(
        lambda: r.exists(keys.host_key(socket.gethostname())) == 1,  # this host is alive
        message="heartbeatd to refresh its host key after the flush",
    )
    assert daemon.stop(signal.SIGTERM) == 0
    assert "SIGTERM received" in daemon.output()
    assert os.path.exists(checkpoint_path(str(setup["state"]), str(setup["log"])))


def test_live_rotation_keeps_heartbeats_flowing(setup, daemons, redis_server):
    r = setup["redis"]
    start_stream(r, 22, last_access=time.time() - 100)
    daemon = daemons("heartbeatd", "--config", live_config(setup, redis_server.url))
    wait_for(lambda: "starting at offset" in daemon.output(), message="heartbeatd to start")
    append(setup["log"], sk_line(time.time() - 5, "/live/stream_22.m3u8"))
    os.rename(setup["log"], str(setup["log"]) + ".1")
    append(str(setup["log"]) + ".1", sk_line(time.time() - 4, "/live/stream_22_1.ts"))  # late write
    stamp = time.time()
    append(setup["log"], sk_line(stamp, "/live/stream_22_2.ts"))
    wait_for(
        lambda: float(r.get(keys.last_access_key(22))) == pytest.approx(stamp, abs=0.001),
        message="the new file's request to reach redis",
    )
    wait_for(lambda: "rotated" in daemon.output(), message="the rotation to be logged")
    assert daemon.stop() == 0
    assert "lines read 3," in daemon.output()


def test_redis_restarted_mid_run_loses_no_heartbeat(setup, daemons, own_redis):
    r = own_redis.client()
    start_stream(r, 31, last_access=time.time() - 100)
    daemon = daemons("heartbeatd", "--config", live_config(setup, own_redis.url))
    wait_for(lambda: "starting at offset" in daemon.output(), message="heartbeatd to start")
    append(setup["log"], sk_line(time.time() - 10, "/live/stream_31.m3u8"))
    wait_for(lambda: float(r.get(keys.last_access_key(31))) > time.time() - 50, message="first write")
    # Redis goes away (its data with it: no persistence), then comes back.
    own_redis.stop()
    stamp = time.time()
    append(setup["log"], sk_line(stamp, "/live/stream_31_4.ts"))
    wait_for(lambda: "redis unavailable" in daemon.output(), message="the outage to be logged")
    own_redis.start()
    r = own_redis.client()
    start_stream(r, 31, last_access=time.time() - 100)  # the launcher's record, restored
    wait_for(
        lambda: (r.get(keys.last_access_key(31)) or "0")
        and float(r.get(keys.last_access_key(31))) == pytest.approx(stamp, abs=0.001),
        timeout=40,
        message="the held heartbeat to be written after Redis came back",
    )
    wait_for(lambda: "redis is back" in daemon.output(), message="the recovery to be logged")
    assert daemon.output().count("redis unavailable") == 1
    assert daemon.stop() == 0


def test_real_nginx_requests_become_heartbeats(setup, daemons, redis_server, nginx_factory):
    """A real nginx logs with the shipped log_format; heartbeatd turns its lines into last_access."""
    r = setup["redis"]
    hls = setup["tmp"] / "hls"
    hls.mkdir()
    (hls / "stream_41.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n")
    (hls / "stream_41_0.ts").write_bytes(b"\x47" * 188)
    start_stream(r, 41, last_access=time.time() - 100)
    nginx = nginx_factory(f"""
        location /live/ {{
            alias {hls}/;
            access_log {setup['log']} streamkeeper buffer=4k flush=1s;
        }}""")
    daemon = daemons("heartbeatd", "--config", live_config(setup, redis_server.url))
    wait_for(lambda: "starting at offset" in daemon.output(), message="heartbeatd to start")
    import urllib.error
    import urllib.request

    before = time.time()
    for path in ("/live/stream_41.m3u8?token=sekrit", "/live/stream_41_0.ts", "/live/stream_99.m3u8"):
        try:
            urllib.request.urlopen(nginx.url(path), timeout=5).read()
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and "99" in path
    wait_for(
        lambda: float(r.get(keys.last_access_key(41))) >= before - 0.01,
        timeout=15,
        message="nginx's log line to reach redis",
    )
    urllib.request.urlopen(nginx.url("/live/stream_41.m3u8"), timeout=5).read()  # a token-less player
    wait_for(lambda: r.zcard(keys.viewers_key(41)) == 2, message="two viewers (token, address+agent)")
    assert r.exists(keys.last_access_key(99)) == 0
    assert "sekrit" not in repr(r.zrange(keys.viewers_key(41), 0, -1))
    assert daemon.stop() == 0


def test_viewers_outside_the_window_are_trimmed(setup, daemons, redis_server):
    r = setup["redis"]
    start_stream(r, 23, last_access=time.time() - 100)
    config = live_config(setup, redis_server.url)
    with open(config, "a") as handle:
        handle.write("viewer_window = 1\n")
    daemon = daemons("heartbeatd", "--config", config)
    wait_for(lambda: "starting at offset" in daemon.output(), message="heartbeatd to start")
    append(setup["log"], sk_line(time.time(), "/live/stream_23.m3u8", token="first"))
    wait_for(lambda: r.zcard(keys.viewers_key(23)) == 1, message="the first viewer")
    first = r.zrange(keys.viewers_key(23), 0, -1)

    def only_the_second_viewer_left():
        append(setup["log"], sk_line(time.time(), "/live/stream_23.m3u8", token="second"))
        members = r.zrange(keys.viewers_key(23), 0, -1)
        return len(members) == 1 and members != first

    wait_for(
        only_the_second_viewer_left,
        timeout=15,
        interval=0.3,
        message="the first viewer to be trimmed once outside the window",
    )
    assert daemon.stop() == 0


def test_sd_notify_ready_status_and_prometheus_metrics(setup, daemons, redis_server):
    import socket
    import urllib.request

    from tests.helpers import free_port

    notify_path = str(setup["tmp"] / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(10)
    port = free_port()
    config = live_config(setup, redis_server.url)
    with open(config, "a") as handle:
        handle.write(f'metrics_listen = "127.0.0.1:{port}"\n')
    start_stream(setup["redis"], 24, last_access=time.time() - 100)
    daemon = daemons("heartbeatd", "--config", config, env={"NOTIFY_SOCKET": notify_path, "JOURNAL_STREAM": "8:1234"})
    messages = []
    wait_for(
        lambda: messages.append(listener.recv(4096).decode()) or any("READY=1" in m for m in messages),
        message="READY=1",
    )
    append(setup["log"], sk_line(time.time(), "/live/stream_24.m3u8") + "garbage\n")
    wait_for(
        lambda: messages.append(listener.recv(4096).decode())
        or any(m.startswith("STATUS=") and "lines/s" in m for m in messages),
        message="STATUS=",
    )

    def scraped():
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return (
            'streamkeeper_heartbeat_lines_skipped_total{reason="malformed"} 1.0' in body
            and "streamkeeper_heartbeat_lines_matched_total 1.0" in body
        )

    wait_for(scraped, message="the metrics to count the lines")
    assert daemon.stop() == 0
    listener.close()
    # Under systemd (JOURNAL_STREAM set) log lines carry no timestamp of our own.
    assert daemon.output().startswith("INFO streamkeeper.heartbeatd:")
