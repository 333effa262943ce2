"""A viewer never stops watching (issue: continuity).  Real players nobody here wrote (hls.js
and Shaka Player in Chromium, VLC) watch one channel through nginx running the rendered
snippet while the host lives through what hosts live with; every playlist they fetched
passes a strict RFC 8216 check; a viewer zaps through a one-connection account; the reaper
races a restarting stream."""

import json
import os
import shutil
import signal
import tempfile
import time

import pytest
import redis

from demo.stack import LocalStack
from streamstate import keys
from streamstate.urls import ACCEL_PREFIX
from tests import hls_check
from tests.fakes.provider_emulator import ProviderEmulator
from tests.fakes.recording_proxy import RecordingProxy
from tests.faults import FAULTS, add_watched_channel
from tests.helpers import ffmpegs_writing, first_request, wait_for
from tests.viewing import Watchers

pytestmark = pytest.mark.e2e

CHANNEL = 1501
FPS = 25  # the demo upstream's frame rate
PLAYED_AFTER_FAULT = 10.0  # seconds of pictures each player must show after each fault
FAULT_DEADLINE = 60.0  # ... within this long
SETTINGS = {
    "hls_time": 1,
    "hls_init_time": 1,
    "hls_list_size": 4,
    "stop_grace": 2,
    "start_timeout": 10,
    "reaper_interval": 1,
    "idle_timeout": 120,
    "max_restarts": 10,
    "restart_window": 3,
    "flush_interval": 0.5,
}


@pytest.fixture(scope="module")
def watched():
    """A stack of its own (reaper every second, heartbeatd) and one channel with a fallback,
    watched by hls.js, Shaka and VLC through a recording proxy in front of nginx."""
    work = tempfile.mkdtemp(prefix="sk-continuity-")
    stack = LocalStack(work, SETTINGS, heartbeatd=True, reaper=True).start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    add_watched_channel(stack, CHANNEL)
    proxy = RecordingProxy(stack.nginx_port).start()
    path = f"/live/stream_{CHANNEL}.m3u8"
    watchers = Watchers(proxy.url(path + "?token=viewers")).start()
    try:
        wait_for(
            lambda: watchers.playing(FPS * 3) or watchers.fatal(),
            timeout=60,
            interval=0.25,
            message="every player to show 3 s of pictures",
        )
        assert watchers.fatal() == {}, (
            watchers.fatal(),
            watchers.events[:10],
            [s for s in proxy.statuses if s[2] != 200][:10],
            stack.log("launcher")[-2000:],
        )
        yield stack, proxy, watchers, path + "?token=viewers"
    finally:
        watchers.stop()
        proxy.stop()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_every_player_keeps_playing_through_every_fault(watched):
    stack, proxy, watchers, url = watched
    warm = time.time()
    for name, (inject, _) in FAULTS.items():
        before = {p: watchers.frames(p) for p in watchers.players}
        inject(stack, CHANNEL)
        played = {}

        def played_on():
            assert watchers.fatal() == {}, f"after {name}: {watchers.fatal()}"
            played.update({p: watchers.frames(p) - before[p] for p in watchers.players})
            return all(frames >= PLAYED_AFTER_FAULT * FPS for frames in played.values())

        try:
            wait_for(played_on, timeout=FAULT_DEADLINE, interval=0.25)
        except AssertionError:
            raise AssertionError(
                f"after {name}, frames shown in {FAULT_DEADLINE:g} s: {played}; "
                f"events: {watchers.events[-10:]}\n{stack.log('launcher')[-3000:]}"
            ) from None
    # Each fault was what it says: the replacements and the failover happened.
    log = stack.log("launcher")
    assert "source 1/2" in log and "failed" in log and "trying the next" in log
    assert "record lost with a Redis restart" in log and "adopted pid" in log
    assert "stalled" in log
    assert f"channel {CHANNEL}: cleared stale record" not in stack.log("reaper")
    assert "orphan FFmpeg" not in stack.log("reaper")
    # Never a 404, never the cold-start path once playing.
    assert not [s for s in proxy.statuses if s[2] >= 400], [s for s in proxy.statuses if s[2] >= 400][:5]
    with open(stack.settings["access_log"], errors="replace") as handle:
        cold = [line for line in handle if ACCEL_PREFIX in line and float(line.split(" ", 1)[0]) > warm]
    assert cold == []
    # Every playlist the players fetched keeps RFC 8216's rules, across all of it.
    versions = proxy.playlists(url)
    assert len(versions) > 100
    assert hls_check.check(versions) == []
    assert any("#EXT-X-DISCONTINUITY\n" in v for v in versions)
    assert any("#EXT-X-DISCONTINUITY-SEQUENCE:" in v for v in versions)


def test_a_restarting_stream_outlives_reaper_passes_every_second(watched):
    """The back-off race: the reaper passes every second (and, from here, back to back) while
    the watched stream's FFmpeg is killed 20 times; each time it is started again (the reaper
    never clears a run its launcher vouches for: watching it, or between two FFmpegs)."""
    import threading

    from streamstate.reaping import Reaper
    from streamstate.settings import load_settings

    stack, proxy, watchers, url = watched
    run_id = stack.redis.hget(keys.run_key(CHANNEL), "run_id")
    stop = threading.Event()
    passes = []

    def reap_back_to_back():
        reaper = Reaper(load_settings(stack.config_path))
        while not stop.is_set():
            passes.append(reaper.run_pass())

    racer = threading.Thread(target=reap_back_to_back, daemon=True)
    racer.start()
    try:
        for attempt in range(20):
            [pid] = wait_for(lambda: ffmpegs_writing(stack, CHANNEL), timeout=30, message="its FFmpeg")
            wait_for(
                lambda: stack.redis.hget(keys.run_key(CHANNEL), "state") == "running",
                timeout=30,
                message=f"running again ({attempt})",
            )
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: ffmpegs_writing(stack, CHANNEL) not in ([], [pid]),
                timeout=30,
                message=f"restarted after kill {attempt + 1}: " + stack.log("launcher")[-1500:],
            )
    finally:
        stop.set()
        racer.join(30)
    wait_for(
        lambda: stack.redis.hget(keys.run_key(CHANNEL), "state") == "running", timeout=30, message="running at the end"
    )
    assert len(passes) > 20
    assert not [a for p in passes for a in p.actions if a.channel == str(CHANNEL) and a.kind == "stale"]
    assert stack.redis.hget(keys.run_key(CHANNEL), "run_id") == run_id  # the same run
    assert "no longer wanted" not in stack.log("launcher")
    assert watchers.fatal() == {}


@pytest.fixture(scope="module")
def one_connection(tmp_path_factory):
    """A provider account that allows one connection, and a stack of our own using it."""
    emulator = ProviderEmulator(limit=1).start()
    match = f"http://127.0.0.1:{emulator.port}/live/acct/"
    stack = LocalStack(
        str(tmp_path_factory.mktemp("zap")),
        {
            "providers": {"acme": {"match": match, "max_streams": 1}},
            "preempt_idle": 60,
            "viewer_window": 30,
            "flush_interval": 0.5,
            "hls_time": 1,
            "hls_init_time": 1,
        },
        heartbeatd=True,
    ).start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    for channel in range(1601, 1611):
        stack.redis.set(
            keys.channel_key(channel),
            json.dumps({"source_url": emulator.url("acct", name=str(channel)), "quality": "copy"}),
        )
    yield stack, emulator
    stack.stop()
    emulator.stop()


def test_a_viewer_zapping_through_a_one_connection_account_is_never_refused(one_connection):
    """Ten channels, half a second each, one viewer (its token): each start takes the
    connection the viewer's previous channel gives up at once (the launcher knows who
    asked; heartbeatd's view lags a second or two), and the provider never sees two."""
    from tests.viewing import run_hlsjs

    stack, emulator = one_connection
    urls = [stack.playlist_url(channel, "?token=zapper") for channel in range(1601, 1611)]
    results = run_hlsjs("play", *urls, seconds=0.5)
    assert [r["ok"] for r in results] == [True] * 10, [(r["url"], r["fatal"], r["errors"][:2]) for r in results]
    assert emulator.violations == [] and emulator.max_concurrent["acct"] == 1
    assert stack.log("launcher").count("preempted (its only viewer changed channel)") == 9
    assert "all 1 connections are in use" not in stack.log("launcher")


def test_adoption_frees_the_slots_of_the_streams_it_clears(one_connection):
    """The launcher and its FFmpegs killed -9, and the launcher back after its promise for
    the run has run out (a long outage; a short one resumes the run, below): the next
    launcher clears the record and frees its provider slot, so the next start is not
    refused for a connection nobody holds."""
    stack, emulator = one_connection
    stack.launcher_json("/streams/stop", "POST")  # the zapper's last channel
    assert first_request(stack.playlist_url(1601, "?token=a"))[0] == 200
    [pid] = ffmpegs_writing(stack, 1601)
    stack.processes["launcher"].send_signal(signal.SIGKILL)
    stack.processes["launcher"].wait(timeout=10)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: emulator.open_count("acct") == 0, timeout=10, message="the connection closed")
    stack.redis.hset(keys.run_key(1601), "until", f"{time.time() - 1:.3f}")  # the promise ran out
    stack.restart_launcher(signal.SIGKILL)
    wait_for(
        lambda: "cleared the record of pid" in stack.log("launcher"),
        timeout=20,
        message="adoption to clear the dead stream",
    )
    assert "freed its slot of provider acme" in stack.log("launcher")
    assert stack.redis.hlen(keys.provider_slots_key("acme")) == 0
    assert first_request(stack.playlist_url(1602, "?token=b"))[0] == 200
    assert emulator.violations == []
    stack.launcher_json("/streams/stop", "POST")


def test_a_launcher_killed_between_two_ffmpegs_keeps_the_run(one_connection):
    """Found by an attack: a launcher killed in the instant after its stream's FFmpeg died
    (the next one started but not yet recorded, or not yet started) left the next launcher
    to clear the run and free its slot while an FFmpeg still pulled: two connections on a
    one-connection account, and a cold start for the viewer.  Now the next launcher adopts
    the unrecorded FFmpeg or starts the run's next one: one FFmpeg, the same run, its
    playlist going on."""
    import random

    stack, emulator = one_connection
    stack.launcher_json("/streams/stop", "POST")
    assert first_request(stack.playlist_url(1605, "?token=k"))[0] == 200
    run_id = stack.redis.hget(keys.run_key(1605), "run_id")
    rng = random.Random(15)
    for attempt in range(6):
        [pid] = wait_for(lambda: ffmpegs_writing(stack, 1605), timeout=30, message="its FFmpeg")
        os.kill(pid, signal.SIGKILL)
        time.sleep(rng.uniform(0, 0.05))  # the moment the launcher dies: swept on purpose
        stack.restart_launcher(signal.SIGKILL)
        wait_for(
            lambda: len(ffmpegs_writing(stack, 1605)) == 1
            and stack.redis.hget(keys.run_key(1605), "state") == "running",
            timeout=30,
            message=f"one FFmpeg running again ({attempt}): " + stack.log("launcher")[-2000:],
        )
        assert stack.redis.hget(keys.run_key(1605), "run_id") == run_id
        assert first_request(stack.playlist_url(1605, "?token=k"))[0] == 200
    assert emulator.violations == [] and emulator.max_concurrent["acct"] == 1
    stack.launcher_json("/streams/stop", "POST")
