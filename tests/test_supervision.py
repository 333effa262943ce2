"""Supervision (issue: supervision): watched streams survive Redis restarts and reaper passes,
crash loops end with a reason.  Real redis-server, nginx, launcher, FFmpeg, and FFmpeg as
the HLS client through nginx."""
import shutil
import signal
import tempfile
import time

import pytest
import redis

from demo.stack import LocalStack
from heartbeatd.logformat import viewer_hash
from streamstate import keys
from tests.helpers import add_channel, ffmpegs_writing, first_request, wait_for


@pytest.fixture
def own_stack():
    """A stack of its own: these tests restart its Redis and its launcher."""
    work = tempfile.mkdtemp(prefix="sk-supervision-")
    stack = LocalStack(work, {"hls_time": 1, "hls_init_time": 1}, heartbeatd=True).start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    yield stack
    stack.stop()
    shutil.rmtree(work, ignore_errors=True)


def restart_redis_empty(stack, already_down: bool = False):
    if not already_down:
        process = stack.processes["redis"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    stack._start_redis()                                   # same port, no data (--save "")
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
    wait_for(lambda: "redis unavailable" in stack.log("heartbeatd"), timeout=10,
             message="heartbeatd to notice the outage")
    # The launcher held back until heartbeatd has flushed into the empty Redis: the held
    # heartbeats find no stream:41:pid yet, and must not be lost for that.
    stack.processes["launcher"].send_signal(signal.SIGSTOP)
    try:
        restart_redis_empty(stack, already_down=True)
        wait_for(lambda: "redis is back" in stack.log("heartbeatd"), timeout=40,
                 message="heartbeatd's first flush after the restart")
    finally:
        stack.processes["launcher"].send_signal(signal.SIGCONT)
    wait_for(lambda: stack.redis.get(keys.pid_key(41)) == str(pid), timeout=15,
             message="the record written again")
    assert ffmpegs_writing(stack, 41) == [pid]
    assert "record lost with a Redis restart" in stack.log("launcher")
    outage_viewer = viewer_hash(b"t:during-outage")
    wait_for(lambda: stack.redis.zscore(keys.viewers_key(41), outage_viewer) is not None, timeout=40,
             message="the heartbeats held during the outage written once the record is back")
    # A viewer keeps watching: heartbeats reach the rewritten record.
    before = float(stack.redis.get(keys.last_access_key(41)))
    time.sleep(1.1)
    assert first_request(stack.playlist_url(41, "?token=w"))[0] == 200
    wait_for(lambda: float(stack.redis.get(keys.last_access_key(41))) > before, timeout=10,
             message="heartbeats after the restart")
    assert ffmpegs_writing(stack, 41) == [pid]
