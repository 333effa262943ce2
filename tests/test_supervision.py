"""Supervision (issue: supervision): watched streams survive Redis restarts and reaper passes,
crash loops end with a reason.  Real redis-server, nginx, launcher, FFmpeg, and FFmpeg as
the HLS client through nginx."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import redis

from demo.stack import LocalStack
from streamstate import files, hls, keys, runs
from streamstate.logformat import viewer_hash
from tests.conftest import REPO
from tests.helpers import add_channel, ffmpeg_processes, ffmpegs_writing, first_request, free_port, streamctl, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_stack():
    """A stack of its own: these tests restart its Redis and its launcher."""
    work = tempfile.mkdtemp(prefix="sk-supervision-")
    stack = LocalStack(work, {"hls_time": 1, "hls_init_time": 1, "stop_grace": 3}, heartbeatd=True).start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    yield stack
    stack.stop()
    shutil.rmtree(work, ignore_errors=True)


def restart_redis_empty(stack, already_down: bool = False):
    if not already_down:
        process = stack.processes["redis"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    stack._start_redis()  # same port, no data (--save "")
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)


def test_a_redis_restart_that_loses_everything_stops_no_watched_stream(own_stack):
    stack = own_stack
    add_channel(stack, 41)
    assert first_request(stack.playlist_url(41, "?token=w"))[0] == 200
    [pid] = ffmpegs_writing(stack, 41)
    process = stack.processes["redis"]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    # Watched during the outage: heartbeatd holds these heartbeats.
    assert first_request(stack.playlist_url(41, "?token=during-outage"))[0] == 200
    wait_for(
        lambda: "redis unavailable" in stack.log("heartbeatd"), timeout=10, message="heartbeatd to notice the outage"
    )
    # The launcher held back until heartbeatd has flushed into the empty Redis: the held
    # heartbeats find no stream:41:pid yet, and must not be lost for that.
    stack.processes["launcher"].send_signal(signal.SIGSTOP)
    try:
        restart_redis_empty(stack, already_down=True)
        wait_for(
            lambda: "redis is back" in stack.log("heartbeatd"),
            timeout=40,
            message="heartbeatd's first flush after the restart",
        )
    finally:
        stack.processes["launcher"].send_signal(signal.SIGCONT)
    wait_for(lambda: stack.redis.get(keys.pid_key(41)) == str(pid), timeout=15, message="the record written again")
    assert ffmpegs_writing(stack, 41) == [pid]
    # The line comes right after the write the condition above saw.
    wait_for(
        lambda: "record lost with a Redis restart" in stack.log("launcher"),
        timeout=10,
        message="the launcher to say why it wrote the record again",
    )
    outage_viewer = viewer_hash(b"t:during-outage")
    wait_for(
        lambda: stack.redis.zscore(keys.viewers_key(41), outage_viewer) is not None,
        timeout=40,
        message="the heartbeats held during the outage written once the record is back",
    )
    # A viewer keeps watching: heartbeats reach the rewritten record.
    before = float(stack.redis.get(keys.last_access_key(41)))
    wait_for(lambda: time.time() > before + 0.1, message="the clock past the last request")  # a later $msec
    assert first_request(stack.playlist_url(41, "?token=w"))[0] == 200
    wait_for(
        lambda: float(stack.redis.get(keys.last_access_key(41))) > before,
        timeout=10,
        message="heartbeats after the restart",
    )
    assert ffmpegs_writing(stack, 41) == [pid]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_streams_outlive_a_launcher_restart_and_are_adopted(own_stack, signum):
    stack = own_stack
    for channel in (42, 43):
        add_channel(stack, channel)
        assert first_request(stack.playlist_url(channel))[0] == 200
    pids = {c: ffmpegs_writing(stack, c) for c in (42, 43)}
    stack.restart_launcher(signum)
    assert {c: ffmpegs_writing(stack, c) for c in (42, 43)} == pids  # the same FFmpegs run on
    status, body = stack.launcher_json("/streams")
    listed = {s["id"]: s for s in body["streams"]}
    assert [listed["42"]["pid"]] == pids[42] and listed["42"]["state"] == "running"
    wait_for(lambda: "adopted pid" in stack.log("launcher"), timeout=10, message="the adoption's log line")
    # An adopted stream that dies is restarted at once, and never served frozen meanwhile.
    os.kill(pids[42][0], signal.SIGKILL)
    wait_for(lambda: ffmpegs_writing(stack, 42) not in ([], pids[42]), timeout=20, message="a new FFmpeg")
    wait_for(lambda: first_request(stack.playlist_url(42))[0] == 200, timeout=20, message="playable again")
    playlist = files.playlist_path(stack.hls_dir, 42)
    assert time.time() - os.stat(playlist).st_mtime < 5
    assert ffmpegs_writing(stack, 43) == pids[43]


def test_an_upstream_that_always_refuses_fails_once_then_cools_down(own_stack):
    """403 every time: one FFmpeg, the reason, 503 with it during failed_cooldown, and a
    bounded number of upstream requests."""
    stack = own_stack
    hits = []
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def refuse():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            hits.append(1)
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            connection.close()

    threading.Thread(target=refuse, daemon=True).start()
    try:
        add_channel(stack, 44, source_url=f"http://127.0.0.1:{port}/live/44.ts")
        answers = [first_request(stack.playlist_url(44)) for _ in range(8)]
        assert {a[0] for a in answers} == {503}
        assert {a[2] for a in answers} == {b"channel 44: upstream refused: HTTP 403\n"}
        assert len(hits) <= 2  # one FFmpeg start, whatever the requests
        assert json.loads(stack.redis.get(keys.failed_key(44)))["reason"] == "upstream refused: HTTP 403"
        assert stack.redis.pttl(keys.failed_key(44)) > 0
        # Finding (operator, issue 16): Retry-After said 5 s with most of the cooldown to run,
        # and `streamctl start` repeated the old error without saying starts are refused.
        left = stack.redis.pttl(keys.failed_key(44)) / 1000
        retry_after = int(answers[-1][1]["Retry-After"])
        assert 5 < retry_after and retry_after >= left - 5, (retry_after, left)
        result = subprocess.run(
            [sys.executable, "-m", "streamctl", "start", "44", "--config", stack.config_path],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "starts are refused for" in result.stderr, result.stderr
        assert "failed_cooldown" in result.stderr and "upstream refused: HTTP 403" in result.stderr
    finally:
        server.close()


def test_a_stream_that_keeps_dying_fails_after_max_restarts(stack, channel_id, extra_launcher, tmp_path):
    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"), max_restarts=2, restart_window=120)
    add_channel(stack, channel_id)
    assert launcher.json(f"/channel/{channel_id}/start", "POST")[0] == 200
    playlist = files.ffmpeg_playlist_path(launcher.hls_dir, channel_id)
    killed = set()
    in_backoff = []  # the run record while it waits (1 s before restart 2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "failed" not in launcher.log():
        for pid, argv in ffmpeg_processes():
            if argv[-1] == playlist and pid not in killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
        record = stack.redis.hgetall(keys.run_key(channel_id))
        if record.get("state") == "backoff":
            in_backoff.append((int(record["restarts"]), record["last_error"]))
        time.sleep(0.1)
    wait_for(lambda: f"channel {channel_id}: failed" in launcher.log(), timeout=30, message="the failure")
    assert len(killed) == 3  # the first run, then max_restarts restarts
    # Finding (operator, issue 16): the record said restarts 1 while it waited for restart 2.
    assert (2, "FFmpeg was killed by SIGKILL") in in_backoff, in_backoff
    assert "2 restarts in 120 s" in launcher.log()
    status, body = launcher.json(f"/channel/{channel_id}/start", "POST")
    assert status == 503 and body["error"] == f"channel {channel_id}: FFmpeg was killed by SIGKILL"
    assert not [a for _, a in ffmpeg_processes() if a[-1] == playlist]


def test_streamctl_logs_status_and_stop_all(stack, extra_launcher, tmp_path, channel_ids):
    first, second = channel_ids(), channel_ids()
    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"), log_dir=str(tmp_path / "ffmpeg-logs"))

    def ctl(*args):
        return streamctl(launcher, *args)  # this launcher's config

    for channel in (first, second):
        add_channel(stack, channel)
        assert launcher.json(f"/channel/{channel}/start", "POST")[0] == 200
    logs = ctl("logs", first, "-n", "5")
    assert logs.returncode == 0 and "--- streamkeeper: " in logs.stdout
    assert ctl("logs", "999").returncode == 1
    status = json.loads(ctl("status", first, "--json").stdout)
    assert [s["id"] for s in status["streams"]] == [first] and status["streams"][0]["uptime_seconds"] >= 0
    stopped = ctl("stop", "--all")
    assert stopped.returncode == 0 and "stopped 2 stream(s)" in stopped.stdout
    assert not [a for _, a in ffmpeg_processes() if a[-1].startswith(launcher.hls_dir)]
    assert ctl("stop").returncode == 2
    # The launcher stopped alone first (its streams outlive it), then everything is stopped
    # (systemctl stop streamkeeper.target): --all stops this host's streams itself.
    for channel in (first, second):
        assert launcher.json(f"/channel/{channel}/start", "POST")[0] == 200
    launcher.process.send_signal(signal.SIGTERM)
    launcher.process.wait(timeout=30)
    assert [a for _, a in ffmpeg_processes() if a[-1].startswith(launcher.hls_dir)]
    stopped = ctl("stop", "--all")
    assert stopped.returncode == 0 and "stopping this host's streams directly" in stopped.stderr
    assert f"stopped 2 stream(s): {first}, {second}" in stopped.stdout
    assert not [a for _, a in ffmpeg_processes() if a[-1].startswith(launcher.hls_dir)]
    assert not stack.redis.exists(keys.run_key(first)) and not stack.redis.exists(keys.run_key(second))
    assert not os.listdir(launcher.hls_dir)


@pytest.mark.parametrize("module", ["heartbeatd", "launcher", "reaper"])
def test_sigint_at_any_moment_of_start_up_exits_promptly(tmp_path, redis_server, module):
    """Every service honours SIGINT from its first instant: exit within 2 s, no traceback."""
    log_file = tmp_path / "access.log"
    log_file.write_text("")
    config = tmp_path / "sk.toml"
    config.write_text(
        f'redis_url = "{redis_server.url}"\naccess_log = "{log_file}"\n'
        f'state_dir = "{tmp_path}/state"\nhls_dir = "{tmp_path}/hls"\n'
        f'log_dir = "{tmp_path}/logs"\nlauncher_listen = "127.0.0.1:{free_port()}"\n'
        "reaper_interval = 1\n"
    )
    for delay in (0.0, 0.05, 0.15, 0.3, 0.6):
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"{module} ignored a SIGINT {delay} s after it started:\n{stderr[-2000:]}")
        if delay >= 0.1:  # before Python has run a line of ours, its own KeyboardInterrupt
            assert "Traceback" not in stderr, stderr[-2000:]


def test_make_demo_leaves_nothing_running_when_its_terminal_closes():
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.run", "--port", str(free_port())],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "demo is up" in line:
            break
    work = next(line.split(" in ")[1].split(" ...")[0] for line in lines if " in /" in line)
    process.send_signal(signal.SIGHUP)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "nothing left running" in output
    left = [p for p in os.listdir("/proc") if p.isdigit() and work in _cmdline(p)]
    assert not left, left


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_stalled_upstream_is_replaced_and_no_frozen_playlist_is_served(own_stack):
    """The upstream goes silent with its connection open: FFmpeg is replaced while the
    viewers' playlist stays served (never a 404), and it is never older than the freeze
    limit; the replacement continues it."""
    stack = own_stack
    add_channel(stack, 48, source_url=f"http://127.0.0.1:{stack.upstream_port}/stall/3/ch48.ts")
    assert first_request(stack.playlist_url(48))[0] == 200
    [first_pid] = ffmpegs_writing(stack, 48)
    limit = hls.freeze_limit(1.0, 15.0)
    oldest_served = 0.0
    statuses = set()
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        path = files.playlist_path(stack.hls_dir, 48)
        status, headers, body = first_request(stack.playlist_url(48))
        statuses.add(status)
        if status == 200 and os.path.exists(path):
            oldest_served = max(oldest_served, time.time() - os.stat(path).st_mtime)
        if (
            ffmpegs_writing(stack, 48) not in ([], [first_pid])
            and "stalled" in stack.log("launcher")
            and b"#EXT-X-DISCONTINUITY" in body
        ):
            break
        time.sleep(0.2)
    assert "stalled" in stack.log("launcher")
    assert ffmpegs_writing(stack, 48) not in ([], [first_pid])
    assert statuses == {200}
    assert b"#EXT-X-DISCONTINUITY" in body  # the replacement continues the playlist
    assert oldest_served <= limit, oldest_served


def test_doctor_says_when_redis_does_not_persist(tmp_path):
    """The channel catalogue lives only in Redis: doctor fails without AOF or snapshots, and
    is content with appendonly yes."""
    from tests.conftest import RedisServer

    server = RedisServer(str(tmp_path))
    server.start()  # --save "" --appendonly no
    try:
        env = {**os.environ, "STREAMKEEPER_CONFIG": os.devnull, "STREAMKEEPER_REDIS_URL": server.url}
        result = subprocess.run(
            [sys.executable, "-m", "streamctl", "doctor", "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        checks = {c["check"]: c for c in json.loads(result.stdout)}
        assert result.returncode == 1 and checks["redis persistence"]["status"] == "FAIL"
        server.client().config_set("appendonly", "yes")
        result = subprocess.run(
            [sys.executable, "-m", "streamctl", "doctor"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
        )
        assert "ok    redis persistence: appendonly yes (AOF)" in result.stdout
    finally:
        server.stop()


def test_stop_without_the_launcher_works_inside_the_streams_unit_sandbox(stack, extra_launcher, tmp_path):
    """The streams unit's ExecStop (`streamctl stop --all`), and `streamctl stop ID`, with the
    launcher down, run under the unit's own sandbox (ProtectSystem=strict but its
    ReadWritePaths): each proven stream is stopped, its files and keys go, exit 0."""
    if os.geteuid() != 0:
        pytest.skip("a mount namespace needs root")
    from streamctl.install import render_unit
    from tests.unit_sandbox import run_sandboxed

    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"))
    state_dir = launcher.settings["state_dir"]  # the stack's relay reads its tickets there
    unit = render_unit(
        "streamkeeper-streams.service",
        {
            "bin_dir": "/unused",
            "config_path": launcher.config_path,
            "user": "root",
            "group": "root",
            "hls_dir": launcher.hls_dir,
            "state_dir": state_dir,
            "log_dir": str(tmp_path / "logs"),
        },
    )
    for channel in (57, 58):
        add_channel(stack, channel)
        assert launcher.json(f"/channel/{channel}/start", "POST")[0] == 200
    launcher.process.send_signal(signal.SIGTERM)  # the launcher alone: streams run on
    launcher.process.wait(timeout=30)

    def streamctl(*args):
        return run_sandboxed(
            unit,
            [sys.executable, "-m", "streamctl", *args, "--config", launcher.config_path],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    one = streamctl("stop", "57")
    assert one.returncode == 0 and "channel 57: stopped" in one.stdout, one.stderr
    rest = streamctl("stop", "--all")
    assert rest.returncode == 0 and "stopped 1 stream(s): 58" in rest.stdout, rest.stderr
    assert "Traceback" not in one.stderr + rest.stderr
    assert not ffmpegs_writing(launcher, 57) and not ffmpegs_writing(launcher, 58)
    assert not os.listdir(launcher.hls_dir)
    for channel in (57, 58):
        assert not [k for k in keys.stream_keys(channel) if stack.redis.exists(k)]
    assert not [n for n in os.listdir(os.path.join(state_dir, "egress")) if n.startswith(("57.", "58."))]


def test_a_watched_stream_is_replaced_even_when_every_source_is_cooling_down(stack, channel_ids):
    """Finding (operator, issue 16): an FFmpeg of a channel with fallbacks died while every
    source was in its cooldown (each had failed a moment before): the replacement tried none
    and waited, its viewers with nothing, until the cooldown ran out.  Now a replacement tries
    the sources anyway (the back-off spaces the tries); a cold start still answers 503 at once."""
    watched, cold_channel = channel_ids(), channel_ids()
    from streamstate import providers

    sources = [stack.upstream_url(f"cool{watched}a"), stack.upstream_url(f"cool{watched}b")]
    cold = [stack.upstream_url(f"cool{cold_channel}a"), stack.upstream_url(f"cool{cold_channel}b")]
    add_channel(stack, watched, source_url=sources[0], fallback_urls=sources[1:])
    try:
        assert first_request(stack.playlist_url(watched))[0] == 200
        wait_for(lambda: ffmpegs_writing(stack, watched), 30, message=f"channel {watched}'s FFmpeg")
        for url in sources:
            providers.mark_source_failed(stack.redis, url, "upstream unreachable", 600)
        first_pids = ffmpegs_writing(stack, watched)
        for pid in first_pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: set(ffmpegs_writing(stack, watched)) - set(first_pids), 30, message="a replacement FFmpeg")
        assert "every source failed within source_cooldown; trying source 1/2 again" in stack.log("launcher")
        # A cold start of another channel whose sources are all cooling: 503 at once, no FFmpeg.
        add_channel(stack, cold_channel, source_url=cold[0], fallback_urls=cold[1:])
        for url in cold:
            providers.mark_source_failed(stack.redis, url, "upstream unreachable", 600)
        status, _, body = first_request(stack.playlist_url(cold_channel))
        assert status == 503 and b"all 2 sources failed within source_cooldown" in body, body
    finally:
        stack.launcher_json(f"/channel/{watched}/stop", "POST")
        stack.redis.delete(*(keys.source_failed_key(url) for url in sources + cold), keys.failed_key(cold_channel))


def test_a_stream_stopped_during_a_long_back_off_ends_then_not_when_the_back_off_is_over(
    stack, channel_id, extra_launcher, tmp_path
):
    """Finding (operator, issue 16): a failing stream nobody watched was reaped during its
    back-off, yet the launcher kept it in `backoff` (its status, the demo's line) until the
    back-off ran out, up to a minute.  Now it looks at its record through the back-off."""
    from launcher.run_record import STATE_SLACK
    from tests.faults import upstream_control

    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"), max_restarts=50, restart_window=600)
    add_channel(stack, channel_id, source_url=stack.upstream_url(f"backoff{channel_id}"))
    try:
        assert launcher.json(f"/channel/{channel_id}/start", "POST")[0] == 200
        upstream_control(stack, "fail", f"?name=backoff{channel_id}.ts")  # every restart now fails
        for pid in [pid for pid, argv in ffmpeg_processes() if argv and argv[-1].startswith(launcher.hls_dir)]:
            os.kill(pid, signal.SIGKILL)

        def long_back_off():
            record = stack.redis.hgetall(keys.run_key(channel_id))
            return record.get("state") == "backoff" and float(record.get("until") or 0) - time.time() > STATE_SLACK + 6

        wait_for(long_back_off, timeout=60, message="a back-off of more than 6 s")
        until = float(stack.redis.hget(keys.run_key(channel_id), "until"))
        run_id = stack.redis.hget(keys.run_key(channel_id), "run_id")
        assert runs.delete_run_if(stack.redis, channel_id, run_id)  # as the reaper's stop does
        wait_for(
            lambda: channel_id not in {s["id"] for s in launcher.json("/streams")[1]["streams"]},
            timeout=30,
            message="the launcher to let the stream go",
        )
        assert time.time() < until - STATE_SLACK, "the launcher held the stream to the end of its back-off"
        assert f"channel {channel_id}: no longer wanted during its back-off" in launcher.log()
    finally:
        upstream_control(stack, "heal", f"?name=backoff{channel_id}.ts")
        launcher.json(f"/channel/{channel_id}/stop", "POST")


def test_a_slot_lost_with_redis_and_taken_by_another_host_is_given_up(tmp_path):
    """Issue 18: a failover (here, a Redis restart that loses everything) may lose a slot;
    if another host's stream took it meanwhile, the stream that lost it ends once it notices,
    rather than hold a second connection on a one-connection account."""
    from tests.fakes.provider_emulator import ProviderEmulator

    with ProviderEmulator(limit=1) as provider:
        match = f"http://127.0.0.1:{provider.port}/live/acct/"
        stack = LocalStack(
            str(tmp_path / "host"), {"providers": {"acme": {"match": match, "max_streams": 1}}, "stop_grace": 3}
        ).start()
        try:
            stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
            add_channel(stack, 4101, source_url=provider.url("acct", name="a"), provider="acme")
            assert first_request(stack.playlist_url(4101))[0] == 200
            wait_for(lambda: provider.open_count("acct") == 1, message="the stream's provider connection")
            stack.processes["launcher"].send_signal(signal.SIGSTOP)
            try:
                restart_redis_empty(stack)
                # Another host's stream holds the account's only slot in the new Redis.
                runs.refresh_host(stack.redis, "hostA", 60)
                runs.record_run(
                    stack.redis,
                    runs.RunRecord(
                        channel="4102", run_id="r-a", host="hostA", pid=1, pid_start=None, started=time.time()
                    ),
                )
                stack.redis.hset(
                    keys.provider_slots_key("acme"),
                    "4102",
                    json.dumps({"run_id": "r-a", "host": "hostA", "at": time.time()}),
                )
            finally:
                stack.processes["launcher"].send_signal(signal.SIGCONT)
            wait_for(lambda: ffmpegs_writing(stack, 4101) == [], timeout=30, message="the stream to give its slot up")
            assert "was lost with Redis and another stream holds it" in stack.log("launcher")
            wait_for(lambda: provider.open_count("acct") == 0, message="its provider connection to close")
            assert provider.violations == []
            assert json.loads(stack.redis.hget(keys.provider_slots_key("acme"), "4102"))["run_id"] == "r-a"
        finally:
            stack.stop()
