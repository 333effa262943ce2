"""What a streaming host lives with, injected into a running stack (demo.stack.LocalStack):
used by tests/test_continuity.py and bench/continuity.py.  Each fault takes the stack and
the channel being watched; the upstream's faults are demo.upstream's /control routes."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import redis

from tests.helpers import ffmpegs_writing


def upstream_control(stack, action: str, query: str = "") -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.upstream_port}/control/{action}{query}", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def kill_ffmpeg(stack, channel) -> None:
    [pid] = ffmpegs_writing(stack, channel)
    os.kill(pid, signal.SIGKILL)


def restart_redis_empty(stack, channel=None) -> None:
    process = stack.processes["redis"]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    stack._start_redis()  # same port, no data
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)


def add_watched_channel(stack, channel) -> None:
    """The channel the faults are played on: the upstream's "primary", with "fallback" as
    its fallback source (the failover fault fails the primary for good)."""
    stack.redis.set(
        f"channel:{channel}",
        json.dumps(
            {
                "source_url": stack.upstream_url("primary"),
                "fallback_urls": [stack.upstream_url("fallback")],
                "quality": "copy",
            }
        ),
    )


# name -> (how it is injected, what it is for the goals: "replacement" (an FFmpeg crash or an
# upstream drop: the longest freeze at most 2 x hls_time), "restart" (ours: no freeze), or
# "source" (the source itself was silent or gone: no goal)).
FAULTS = {
    "kill -9 of FFmpeg": (kill_ffmpeg, "replacement"),
    "a stall (upstream silent 8 s, connections open)": (
        lambda s, c: upstream_control(s, "stall", "?seconds=8"),
        "source",
    ),
    "the upstream closing every connection": (lambda s, c: upstream_control(s, "drop"), "replacement"),
    "the upstream back with its timestamps restarted": (
        lambda s, c: upstream_control(s, "restart", "?drop=1"),
        "replacement",
    ),
    "failover to the fallback source": (lambda s, c: upstream_control(s, "fail", "?name=primary.ts"), "source"),
    "a launcher SIGKILL": (lambda s, c: s.restart_launcher(signal.SIGKILL), "restart"),
    "a Redis restart that loses its data": (restart_redis_empty, "restart"),
}
