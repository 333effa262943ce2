"""Benchmark the multi-host set-up (issue 18), on loopback:

* channels per host before it saturates: `copy` channels of the local live upstream started
  on one host in steps; after each step every stream's pace (media seconds its viewers'
  playlist gained per wall second, over PACE_SECONDS) is read from its playlist; the host
  keeps up while the slowest stream stays at 0.97x or better and every start succeeds;
* the edge's added latency: a cold start (first request to a playable playlist) and a
  segment fetch, straight to the host's nginx and through the edge rendered by
  `streamctl nginx-config --edge`;
* the time from a Redis master's death to the first successful cold start after the
  sentinels' failover (Debian's redis-server and redis-sentinel, down-after 1 s).

Prints the figures and writes its section of bench/RESULTS.md.  Loopback only; every loop
is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import redis

from bench.results import percentile, write_section
from demo.stack import LocalStack
from streamstate import files, keys
from tests.conftest import NginxServer
from tests.helpers import free_port
from tests.sentinels import DOWN_AFTER_MS, MASTER_NAME, SentinelCluster

STEPS = (10, 20, 40, 60, 80, 100, 120)  # channels on the host, step by step (bounded)
PACE_SECONDS = 10.0  # wall seconds over which each stream's pace is read
SETTLE_SECONDS = 5.0  # after a step's starts, before its pace is read
REAL_TIME = 0.97  # the slowest stream's pace at or above this: the host keeps up
STEP_DEADLINE = 120.0  # seconds a step's starts may take at most
COLD_STARTS = 10  # cold starts timed each way
SEGMENT_FETCHES = 200  # segment fetches timed each way
FAILOVERS = 3  # failovers timed (a fresh Redis set-up each)
FAILOVER_DEADLINE = 60.0  # seconds a start after a failover may take at most


def fetch(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def add_copy_channel(client, channel: str, source: str) -> None:
    client.set(keys.channel_key(channel), json.dumps({"source_url": source, "quality": "copy"}))


def paces(stack: LocalStack, channels: list[str]) -> list[float]:
    """Each stream's pace: segments its playlist gained over PACE_SECONDS, in media seconds
    (hls_time each) per wall second."""
    hls_time = float(stack.settings["hls_time"])
    before = {c: files.playlist_media(files.playlist_path(stack.hls_dir, c)) for c in channels}
    started = time.monotonic()
    time.sleep(PACE_SECONDS)  # the measurement window itself
    wall = time.monotonic() - started
    result = []
    for channel in channels:
        after = files.playlist_media(files.playlist_path(stack.hls_dir, channel))
        if before[channel] is None or after is None:
            result.append(0.0)
            continue
        gained = (after[0] + len(after[1])) - (before[channel][0] + len(before[channel][1]))
        result.append(gained * hls_time / wall)
    return result


def channels_per_host(work: str) -> tuple[list[tuple[int, float, int]], int]:
    """(channels, slowest pace, failed starts) per step, and the most channels sustained."""
    stack = LocalStack(os.path.join(work, "capacity"), {"max_streams": max(STEPS) + 8, "idle_timeout": 900}).start()
    client = redis.Redis(port=stack.redis_port, decode_responses=True)
    rows, sustained, running = [], 0, []
    try:
        for target in STEPS:
            failed = 0
            deadline = time.monotonic() + STEP_DEADLINE
            while len(running) < target and time.monotonic() < deadline:
                channel = str(9000 + len(running))
                add_copy_channel(client, channel, stack.upstream_url(f"cap{channel}"))
                status, _ = fetch(stack.playlist_url(channel))
                failed += status != 200
                running.append(channel)
            time.sleep(SETTLE_SECONDS)  # the last starts' bursts settle before the pace is read
            slowest = min(paces(stack, running))
            rows.append((len(running), slowest, failed))
            print(f"{len(running)} copy channel(s): slowest {slowest:.2f}x, failed starts {failed}", flush=True)
            if slowest < REAL_TIME or failed:
                break
            sustained = len(running)
    finally:
        stack.stop()
    return rows, sustained


def edge_latency(work: str) -> dict[str, dict[str, float]]:
    """p50/p95 milliseconds of cold starts and segment fetches, direct and through the edge."""
    port = free_port()
    # One host behind the edge (its `hosts` left empty: no lease, which is not measured here).
    stack = LocalStack(os.path.join(work, "edge-host"), nginx_port=port).start()
    edge_dir = os.path.join(work, "edge")
    os.makedirs(edge_dir, exist_ok=True)
    edge_port = free_port()
    config = os.path.join(edge_dir, "streamkeeper.toml")
    with open(config, "w") as handle:
        handle.write(f'hosts = ["127.0.0.1:{port}"]\nnginx_listen = "127.0.0.1:{edge_port}"\n')
    snippet = os.path.join(edge_dir, "edge.conf")
    subprocess.run(
        [sys.executable, "-m", "streamctl", "nginx-config", "--edge", "--config", config, "-o", snippet], check=True
    )
    edge = NginxServer(edge_dir, f"include {snippet};", edge_port)
    client = redis.Redis(port=stack.redis_port, decode_responses=True)
    figures: dict[str, dict[str, float]] = {}
    try:
        for way, base in (("direct", f"http://127.0.0.1:{port}"), ("edge", f"http://127.0.0.1:{edge_port}")):
            cold = []
            for index in range(COLD_STARTS):
                channel = str((9500 if way == "direct" else 9600) + index)
                add_copy_channel(client, channel, stack.upstream_url(f"edge{channel}"))
                began = time.monotonic()
                status, _ = fetch(f"{base}/live/stream_{channel}.m3u8")
                if status == 200:
                    cold.append((time.monotonic() - began) * 1000)
            figures[f"cold start, {way}"] = {"p50": percentile(cold, 0.5), "p95": percentile(cold, 0.95)}
        segment = sorted(n for n in os.listdir(stack.hls_dir) if n.startswith("stream_9500_") and n.endswith(".ts"))[-2]
        for way, base in (("direct", f"http://127.0.0.1:{port}"), ("edge", f"http://127.0.0.1:{edge_port}")):
            took = []
            for _ in range(SEGMENT_FETCHES):
                began = time.monotonic()
                status, body = fetch(f"{base}/live/{segment}")
                if status == 200 and body:
                    took.append((time.monotonic() - began) * 1000)
            figures[f"segment, {way}"] = {"p50": percentile(took, 0.5), "p95": percentile(took, 0.95)}
    finally:
        edge.stop()
        stack.stop()
    return figures


def failover_to_first_start(work: str, run: int) -> float:
    """Seconds from the master's SIGKILL to the first cold start answered 200 after it."""
    directory = os.path.join(work, f"failover{run}")
    sentinels = SentinelCluster(os.path.join(directory, "redis"))
    stack = None
    try:
        settings = {"redis_sentinels": sentinels.addresses, "redis_master_name": MASTER_NAME}
        stack = LocalStack(os.path.join(directory, "host"), settings, own_redis=False).start()
        master = redis.Redis(port=sentinels.master_port(), decode_responses=True)
        for channel in ("9700", "9701"):
            add_copy_channel(master, channel, stack.upstream_url(f"fo{channel}"))
        master.wait(1, 5000)
        assert fetch(stack.playlist_url("9700"))[0] == 200
        killed = time.monotonic()
        sentinels.kill_master()
        while time.monotonic() - killed < FAILOVER_DEADLINE:
            if fetch(stack.playlist_url("9701"), timeout=10)[0] == 200:
                return time.monotonic() - killed
            time.sleep(0.1)  # a cold start's pace: a viewer retrying
        raise RuntimeError(f"no start within {FAILOVER_DEADLINE:g} s of the master's death")
    finally:
        if stack is not None:
            stack.stop()
        sentinels.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    work = tempfile.mkdtemp(prefix="sk-bench-scale-")
    try:
        rows, sustained = channels_per_host(work)
        latency = edge_latency(work)
        for name, figure in latency.items():
            print(f"{name}: p50 {figure['p50']:.1f} ms, p95 {figure['p95']:.1f} ms", flush=True)
        failovers = [failover_to_first_start(work, run) for run in range(FAILOVERS)]
        print("master's death to the first start: " + ", ".join(f"{s:.2f} s" for s in failovers), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count() or 1
    steps = "\n".join(f"| {n} | {pace:.2f}x | {failed} |" for n, pace, failed in rows)
    edge_rows = "\n".join(f"| {name} | {f['p50']:.1f} | {f['p95']:.1f} |" for name, f in latency.items())
    write_section(
        "scale",
        f"""## Several hosts (bench/scale.py)

{time.strftime('%Y-%m-%d')}, {cores} cores, everything on this one machine (the live upstream, Redis and
nginx share the cores with the FFmpegs).

Channels per host (`copy`, the local live upstream): the slowest stream's pace over
{PACE_SECONDS:g} s after each step.

| channels | slowest | failed starts |
| --- | --- | --- |
{steps}

Sustained at real time: **{sustained}** channels (steps stop at {max(STEPS)}).

The edge's added latency (milliseconds; {COLD_STARTS} cold starts, {SEGMENT_FETCHES} fetches of one segment each way):

| request | p50 | p95 |
| --- | --- | --- |
{edge_rows}

From a Redis master's SIGKILL to the first cold start answered 200 (sentinels' down-after
{DOWN_AFTER_MS} ms, {FAILOVERS} runs): {", ".join(f"{s:.2f} s" for s in failovers)}.
""",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
