"""The reaper against a real redis-server, real processes and real FFmpeg writing HLS."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from streamstate import files, keys, runs
from streamstate.process import process_age, process_start_time
from streamstate.reaping import Reaper
from streamstate.settings import load_settings
from tests.conftest import REPO
from tests.helpers import wait_for

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
# A process that holds SIGTERM and SIGINT blocked: a signal sent to it stays pending, where
# /proc shows it at once (a negative check needs no sleep).
HOLD_SIGNALS = (
    "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}); time.sleep(300)"
)


def pattern_hls_argv(hls: str, channel, extra: list[str] = ()) -> list[str]:
    """An FFmpeg writing the channel's HLS from a test pattern, as the old launcher did."""
    encode = "ffmpeg -nostdin -re -f lavfi -i testsrc=size=96x64:rate=10 -c:v libx264 -preset ultrafast -g 10"
    segments = ["-f", "hls", "-hls_time", "1", "-hls_list_size", "3", "-hls_segment_filename"]
    return [*encode.split(), *extra, *segments, files.segment_pattern(hls, channel), files.playlist_path(hls, channel)]


def ignores_sigterm(pid: int) -> bool:
    """Its SIGTERM disposition is 'ignore' (/proc/<pid>/status SigIgn, bit 15)."""
    return _status_mask(pid, "SigIgn") & (1 << (signal.SIGTERM - 1)) != 0


def blocks_sigterm(pid: int) -> bool:
    return _status_mask(pid, "SigBlk") & (1 << (signal.SIGTERM - 1)) != 0


def pending_signals(pid: int) -> int:
    """Signals sent to it and not yet delivered (blocked ones stay here)."""
    return _status_mask(pid, "SigPnd") | _status_mask(pid, "ShdPnd")


def _status_mask(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            line = next(line for line in handle if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1], 16)


# A stream's FFmpeg that ignores SIGTERM: this Python, configured as `ffmpeg`, whose last
# argument is the channel's playlist (what the identity proof looks at).
AS_FFMPEG = {"ffmpeg": sys.executable}


@pytest.fixture
def env(tmp_path, redis_server, redis_client, monkeypatch):
    # The session's redis-server may be seconds old: orphans are judged at once here.
    monkeypatch.setattr("streamstate.reaping.ORPHAN_GRACE_AFTER_REDIS_START", 0)
    hls = tmp_path / "hls"
    hls.mkdir()
    processes = []

    def settings(**overrides):
        values = {
            "redis_url": redis_server.url,
            "hls_dir": str(hls),
            "idle_timeout": 30,
            "stop_grace": 2,
            "reaper_interval": 60,
            "host_id": "host-a",
            **overrides,
        }
        return load_settings(None, values, environ={})

    def spawn(argv, **kwargs):
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        processes.append(process)
        return process

    def ffmpeg(channel):
        process = spawn(pattern_hls_argv(str(hls), channel))
        wait_for(
            lambda: files.count_listed_segments(files.playlist_path(str(hls), channel)) >= 1,
            timeout=20,
            message="FFmpeg's first segment",
        )
        return process

    def stubborn(channel):
        process = spawn([sys.executable, "-c", IGNORE_TERM, files.playlist_path(str(hls), channel)])
        wait_for(lambda: process_start_time(process.pid) is not None)
        wait_for(lambda: ignores_sigterm(process.pid), message="its SIGTERM handler")
        return process

    class Env:
        pass

    e = Env()
    e.hls, e.redis, e.settings, e.spawn, e.ffmpeg = str(hls), redis_client, settings, spawn, ffmpeg
    e.stubborn = stubborn
    e.url = redis_server.url
    yield e
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def record(env, channel, process, *, last_access, host="host-a", pid_start="real"):
    start = process_start_time(process.pid) if pid_start == "real" else pid_start
    rec = runs.RunRecord(
        channel=str(channel),
        run_id=runs.new_run_id(),
        host=host,
        pid=process.pid,
        pid_start=start,
        started=last_access,
        state="running",
    )
    runs.record_run(env.redis, rec, now=last_access)
    return rec


def alive(process) -> bool:
    return process.poll() is None


def test_an_idle_stream_is_stopped_and_its_files_and_keys_are_gone(env):
    ff = env.ffmpeg(1)
    record(env, 1, ff, last_access=time.time() - 100)
    env.redis.zadd(keys.viewers_key(1), {"v": 1})
    summary = Reaper(env.settings()).run_pass()
    assert summary.stopped == 1
    assert ff.wait(timeout=10) is not None
    assert files.stream_files(env.hls, 1) == []
    assert env.redis.exists(*keys.stream_keys(1)) == 0
    assert env.redis.sismember(keys.ACTIVE_STREAMS_KEY, "1") == 0


def test_a_watched_stream_survives_ten_passes(env):
    ff = env.ffmpeg(2)
    record(env, 2, ff, last_access=time.time())
    reaper = Reaper(env.settings(idle_timeout=30))
    for _ in range(10):
        env.redis.set(keys.last_access_key(2), f"{time.time():.3f}")  # heartbeatd's job
        summary = reaper.run_pass()
        assert (summary.kept, summary.stopped, summary.stale) == (1, 0, 0)
    assert alive(ff) and env.redis.exists(keys.pid_key(2), keys.run_key(2)) == 2
    assert int(env.redis.hget(keys.reaper_last_pass_key("host-a"), "passes")) == 10


def test_a_pid_that_belongs_to_an_unrelated_process_is_never_signalled(env):
    sleeper = env.spawn([sys.executable, "-c", HOLD_SIGNALS])
    wait_for(lambda: blocks_sigterm(sleeper.pid), message="the sleeper to block SIGTERM")
    # A run record whose start time is not the sleeper's (the pid was reused).
    record(env, 3, sleeper, last_access=time.time() - 100, pid_start=process_start_time(sleeper.pid) - 5)
    # A legacy record pointing at it: its command line is not FFmpeg writing stream_4.m3u8.
    env.redis.set(keys.pid_key(4), sleeper.pid)
    env.redis.set(keys.last_access_key(4), "1000.0")
    summary = Reaper(env.settings()).run_pass()
    assert (summary.stale, summary.stopped) == (2, 0)
    assert pending_signals(sleeper.pid) == 0 and alive(sleeper)  # never signalled
    assert env.redis.exists(keys.pid_key(3), keys.pid_key(4), keys.run_key(3)) == 0


def test_a_start_between_the_decision_and_the_delete_keeps_its_keys(env):
    old = env.stubborn(5)
    record(env, 5, old, last_access=time.time() - 100)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(s=Reaper(env.settings(stop_grace=2, **AS_FFMPEG)).run_pass())
    )
    worker.start()
    wait_for(lambda: env.redis.hget(keys.run_key(5), "state") == "stopping", message="the stop decision")
    new_process = env.spawn(["sleep", "300"])
    new = record(env, 5, new_process, last_access=time.time())  # started again meanwhile
    worker.join(timeout=30)
    assert result["s"].stopped == 1
    assert old.wait(timeout=10) == -signal.SIGKILL  # ignored SIGTERM: killed after the grace
    assert env.redis.hget(keys.run_key(5), "run_id") == new.run_id
    assert env.redis.get(keys.pid_key(5)) == str(new_process.pid)
    assert alive(new_process)


def run_cli(env, *args, redis_url=None):
    config = os.path.join(env.hls, "..", "reaper.toml")
    with open(config, "w") as handle:
        handle.write(
            f'redis_url = "{redis_url or env.url}"\nhls_dir = "{env.hls}"\n'
            'idle_timeout = 30\nstop_grace = 2\nhost_id = "host-a"\n'
        )
    return subprocess.run(
        [sys.executable, "-m", "reaper", "--config", config, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dry_run_changes_nothing(env):
    ff = env.ffmpeg(6)
    rec = record(env, 6, ff, last_access=time.time() - 100)
    before = sorted(env.redis.keys("*")), files.stream_files(env.hls, 6)
    result = run_cli(env, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] and summary["stopped"] == 1
    assert "would stop" in result.stderr and "channel 6" in result.stderr
    assert alive(ff) and env.redis.hget(keys.run_key(6), "state") == "running"
    assert sorted(env.redis.keys("*")) == before[0]
    assert env.redis.hget(keys.run_key(6), "run_id") == rec.run_id


def test_redis_down_means_nothing_is_stopped(env, own_redis):
    ff = env.ffmpeg(7)
    record(env, 7, ff, last_access=time.time() - 100)
    result = run_cli(env, "--once", redis_url="redis://127.0.0.1:1/0")
    assert result.returncode == 1 and "nothing was stopped" in result.stderr
    assert alive(ff)


def test_redis_going_away_during_a_pass_stops_nothing(env, own_redis):
    client = own_redis.client()
    ff = env.ffmpeg(8)
    runs.record_run(
        client,
        runs.RunRecord(
            channel="8", run_id="r8", host="host-a", pid=ff.pid, pid_start=process_start_time(ff.pid), started=1000.0
        ),
        now=1000.0,
    )
    own_redis.stop()
    settings = env.settings(redis_url=own_redis.url)
    with pytest.raises(Exception, match="nothing was stopped"):
        Reaper(settings).run_pass()
    assert alive(ff)


def test_legacy_records_are_handled(env):
    ff = env.ffmpeg(9)
    env.redis.set(keys.pid_key(9), ff.pid)
    env.redis.set(keys.started_key(9), "1000.0")
    env.redis.set(keys.last_access_key(9), f"{time.time() - 100:.3f}")
    watched = env.ffmpeg(10)
    env.redis.set(keys.pid_key(10), watched.pid)
    env.redis.set(keys.last_access_key(10), f"{time.time():.3f}")
    summary = Reaper(env.settings()).run_pass()
    assert (summary.stopped, summary.kept) == (1, 1)
    assert ff.wait(timeout=10) is not None and alive(watched)
    assert env.redis.exists(keys.pid_key(9), keys.started_key(9), keys.last_access_key(9)) == 0
    assert files.stream_files(env.hls, 9) == [] and files.stream_files(env.hls, 10)


def test_orphan_files_and_processes_are_removed(env):
    old = time.time() - 10_000
    for name in ("stream_900.m3u8", "stream_900_1.ts", "stream_900_2.ts.tmp"):
        path = os.path.join(env.hls, name)
        open(path, "w").close()
        os.utime(path, (old, old))
    open(os.path.join(env.hls, "stream_901.m3u8"), "w").close()  # young: kept
    open(os.path.join(env.hls, "notes.txt"), "w").close()  # not a stream file: kept
    watched = env.ffmpeg(11)
    record(env, 11, watched, last_access=time.time())
    for path in files.stream_files(env.hls, 11):
        os.utime(path, (old, old))  # old, but its stream runs
    orphan = env.ffmpeg(12)  # no record knows it
    wait_for(lambda: (process_age(orphan.pid) or 0) >= 1, message="the orphan to be a second old")
    summary = Reaper(env.settings(orphan_age=60, start_timeout=1)).run_pass()
    assert summary.orphan_files == 3 and summary.orphan_processes == 1
    left = set(os.listdir(env.hls))
    assert {"notes.txt", "stream_901.m3u8"} <= left and files.stream_files(env.hls, 11)
    assert not [n for n in left if n.startswith(("stream_900", "stream_12"))]
    assert orphan.wait(timeout=10) is not None and alive(watched)


def test_two_reapers_at_once_do_not_double_stop(env):
    stubborn = env.stubborn(13)
    record(env, 13, stubborn, last_access=time.time() - 100)
    results = []

    def one_pass():
        results.append(Reaper(env.settings(stop_grace=1.5, **AS_FFMPEG)).run_pass())

    first = threading.Thread(target=one_pass)
    first.start()
    wait_for(lambda: env.redis.hget(keys.run_key(13), "state") == "stopping")
    one_pass()
    first.join(timeout=30)
    assert sorted((r.stopped, bool(r.skipped)) for r in results) == [(0, True), (1, False)]


def test_records_of_other_hosts(env):
    sleeper = env.spawn(["sleep", "300"])
    record(env, 14, sleeper, last_access=time.time() - 100, host="host-b")
    env.redis.set(keys.host_key("host-b"), "1", ex=60)
    summary = Reaper(env.settings()).run_pass()
    assert (summary.foreign, summary.stale, summary.stopped) == (1, 0, 0)
    env.redis.delete(keys.host_key("host-b"))  # host-b not seen any more
    summary = Reaper(env.settings()).run_pass()
    assert summary.stale == 1 and "host-b not seen" in summary.actions[0].why
    assert alive(sleeper) and env.redis.exists(keys.run_key(14)) == 0


def test_files_of_a_channel_another_host_runs_are_removed_at_once(env):
    """Attack finding (issue 18): this host's old files of a channel another host took over
    were kept (the channel counted as running), and nginx served the frozen playlist to the
    viewers the edge sent here instead of forwarding them."""
    sleeper = env.spawn(["sleep", "300"])
    record(env, 16, sleeper, last_access=time.time(), host="host-b")
    env.redis.set(keys.host_key("host-b"), "1", ex=60)
    for name in ("stream_16.m3u8", "stream_16_5.ts"):
        with open(os.path.join(env.hls, name), "w") as handle:
            handle.write("#EXTM3U\n")  # fresh: well under orphan_age
    summary = Reaper(env.settings()).run_pass()
    assert summary.foreign == 1 and summary.orphan_files == 2
    assert not [n for n in os.listdir(env.hls) if n.startswith("stream_16")]
    assert alive(sleeper) and env.redis.exists(keys.run_key(16)) == 1  # host-b's run is left alone


def test_service_mode_runs_passes_on_a_cadence_and_exits_on_sigterm(env, daemons):
    ff = env.ffmpeg(15)
    record(env, 15, ff, last_access=time.time())
    config = os.path.join(env.hls, "..", "svc.toml")
    with open(config, "w") as handle:
        handle.write(
            f'redis_url = "{env.url}"\nhls_dir = "{env.hls}"\nhost_id = "host-a"\n'
            "reaper_interval = 0.2\nidle_timeout = 60\n"
        )
    daemon = daemons("reaper", "--config", config)
    wait_for(
        lambda: int(env.redis.hget(keys.reaper_last_pass_key("host-a"), "passes") or 0) >= 10,
        timeout=30,
        message="ten passes",
    )
    assert alive(ff)
    assert env.redis.exists(keys.host_key("host-a")) == 1
    assert daemon.stop() == 0
    assert "SIGTERM received" in daemon.output()


def test_a_forged_record_with_a_real_start_time_signals_nothing(env):
    """A run record naming an unrelated process with its true start time: not the configured
    FFmpeg writing this channel's playlist, so stale, never signalled."""
    sleeper = env.spawn(["sleep", "300"])
    wait_for(lambda: process_start_time(sleeper.pid) is not None)
    record(env, 16, sleeper, last_access=time.time() - 100)  # pid_start: the real one
    summary = Reaper(env.settings()).run_pass()
    assert (summary.stale, summary.stopped) == (1, 0)
    assert alive(sleeper)


def test_a_legacy_record_is_proven_by_the_output_argument_not_any_argument(env):
    """Channel 53's FFmpeg mentions stream_51.m3u8 (in its metadata); a legacy record of 51
    pointing at it must not get channel 53 killed."""
    decoy = files.playlist_path(env.hls, 51)
    ff = env.spawn(pattern_hls_argv(env.hls, 53, extra=["-metadata", f"title={decoy}"]))
    wait_for(lambda: files.count_listed_segments(files.playlist_path(env.hls, 53)) >= 1, timeout=20)
    record(env, 53, ff, last_access=time.time())  # 53 is watched
    env.redis.set(keys.pid_key(51), ff.pid)
    env.redis.set(keys.last_access_key(51), "1000.0")
    summary = Reaper(env.settings()).run_pass()
    assert (summary.stale, summary.stopped, summary.kept) == (1, 0, 1)
    assert alive(ff) and env.redis.exists(keys.pid_key(51)) == 0


def test_a_process_is_held_by_pidfd_before_it_is_proven():
    """The proof and the signal reach the same process: a handle opens only on proof, and
    signals through its pidfd."""
    from streamstate.process import ProcessHandle, StreamProcess, resolve_executable

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/tmp/hls/stream_1.m3u8"])
    try:
        from streamstate.process import process_cmdline

        wait_for(lambda: process_cmdline(process.pid)[-1:] == ["/tmp/hls/stream_1.m3u8"], message="exec")
        start = process_start_time(process.pid)
        python = resolve_executable(sys.executable)
        assert ProcessHandle.open_proven(process.pid, StreamProcess(python, "/tmp/hls/stream_2.m3u8", start)) is None
        assert (
            ProcessHandle.open_proven(process.pid, StreamProcess(python, "/tmp/hls/stream_1.m3u8", start + 1)) is None
        )
        assert (
            ProcessHandle.open_proven(process.pid, StreamProcess("/usr/bin/ffmpeg", "/tmp/hls/stream_1.m3u8", start))
            is None
        )
        with ProcessHandle.open_proven(process.pid, StreamProcess(python, "/tmp/hls/stream_1.m3u8", start)) as handle:
            assert handle.signal(signal.SIGTERM)
            assert handle.exited(10)
    finally:
        process.kill()
        process.wait()


def test_a_channel_started_during_a_pass_is_not_taken_for_an_orphan(env):
    """The stop phase lasts stop_grace; a stream started (and recorded) meanwhile, or one
    younger than start_timeout with no record yet, is left alone."""
    stubborn = env.stubborn(17)
    record(env, 17, stubborn, last_access=time.time() - 100)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(s=Reaper(env.settings(stop_grace=3, start_timeout=1, **AS_FFMPEG)).run_pass())
    )
    worker.start()
    wait_for(lambda: env.redis.hget(keys.run_key(17), "state") == "stopping", message="the stop phase")
    recorded = env.spawn([sys.executable, "-c", "import time; time.sleep(60)", files.playlist_path(env.hls, 18)])
    unrecorded = env.spawn([sys.executable, "-c", "import time; time.sleep(60)", files.playlist_path(env.hls, 19)])
    wait_for(lambda: process_start_time(recorded.pid) and process_start_time(unrecorded.pid))
    record(env, 18, recorded, last_access=time.time())
    # Both older than start_timeout (1 s) by the end of the stop phase.
    wait_for(
        lambda: min(process_age(recorded.pid) or 0, process_age(unrecorded.pid) or 0) > 1.2,
        message="both processes older than start_timeout",
    )
    worker.join(timeout=30)
    assert result["s"].stopped == 1 and result["s"].orphan_processes == 1
    assert alive(recorded)  # recorded meanwhile: kept
    assert unrecorded.wait(timeout=10) is not None  # a true orphan by then


def test_an_orphan_younger_than_start_timeout_is_left_alone(env):
    young = env.spawn([sys.executable, "-c", "import time; time.sleep(60)", files.playlist_path(env.hls, 20)])
    wait_for(lambda: process_start_time(young.pid) is not None)
    summary = Reaper(env.settings(start_timeout=30, **AS_FFMPEG)).run_pass()
    assert summary.orphan_processes == 0 and alive(young)
