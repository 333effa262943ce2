"""Benchmark heartbeatd: throughput, Redis commands, memory, live latency; the old design beside it.

Generates a realistic access log (default 2M lines, 2,000 channels with skewed
popularity, ~10 % other URIs, some malformed lines), then against a
redis-server of its own:

* ``heartbeatd --once --from-start`` with viewer counting on (the default) and
  off (viewer_window = 0): lines/s, Redis commands per flush and per channel,
  peak RSS of the process;
* the old design on a slice: readline, regex, EXISTS + SET per matching line;
* pygtail alone reading a slice (the design card's candidate);
* live latency: a request appended to a followed log until it is in Redis.

Prints the figures and writes them to bench/RESULTS.md.  Loopback only; every
loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench.loggen import write_log
from bench.results import write_section
from bench.servers import BenchRedis
from streamstate import keys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SUMMARY_RE = re.compile(r"lines read (\d+).*flushes (\d+), channels written (\d+).*; ([0-9.]+) s, (\d+) lines/s")
OLD_DESIGN_RE = re.compile(rb'GET "/live/stream_(\d+)(?:\.m3u8|_\d+\.ts)')


def run_heartbeatd(redis_url: str, log_path: str, state_dir: str, viewer_window: float) -> dict:
    shutil.rmtree(state_dir, ignore_errors=True)
    argv = [
        sys.executable,
        "-m",
        "heartbeatd",
        "--once",
        "--from-start",
        "--log-file",
        log_path,
        "--redis-url",
        redis_url,
        "--state-dir",
        state_dir,
        "--viewer-window",
        str(viewer_window),
        "--log-level",
        "INFO",
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "STREAMKEEPER_CONFIG": os.devnull},
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    stderr = process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"heartbeatd failed:\n{stderr}")
    match = SUMMARY_RE.search(stderr)
    lines, flushes, channels, elapsed, rate = match.groups()
    return {
        "lines": int(lines),
        "flushes": int(flushes),
        "channels_written": int(channels),
        "elapsed": float(elapsed),
        "rate": int(rate),
        "wall": wall,
        "wall_rate": int(lines) / wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def old_design(client, log_path: str, max_lines: int, max_seconds: float) -> dict:
    """The host streamkeeper replaces: per line, a regex, EXISTS and SET."""
    lines = 0
    started = time.monotonic()
    with open(log_path, "rb") as handle:
        for line in iter(handle.readline, b""):
            lines += 1
            match = OLD_DESIGN_RE.search(line)
            if match and b'" 200 ' in line or match and b" 200 " in line:
                channel = match.group(1).decode()
                if client.exists(keys.pid_key(channel)):
                    client.set(keys.last_access_key(channel), str(time.time()))
            if lines >= max_lines or time.monotonic() - started > max_seconds:
                break
    elapsed = time.monotonic() - started
    return {"lines": lines, "elapsed": elapsed, "rate": lines / elapsed}


def pygtail_alone(log_path: str, max_lines: int, work_dir: str) -> dict:
    from pygtail import Pygtail

    offset_file = os.path.join(work_dir, "pygtail.offset")
    started = time.monotonic()
    lines = 0
    for _ in Pygtail(log_path, offset_file=offset_file, every_n=0):
        lines += 1
        if lines >= max_lines:
            break
    elapsed = time.monotonic() - started
    return {"lines": lines, "elapsed": elapsed, "rate": lines / elapsed}


def live_latency(redis: BenchRedis, work_dir: str, samples: int, flush_interval: float) -> dict:
    """Append a viewing line to a followed log; time until Redis holds its time."""
    log_path = os.path.join(work_dir, "live.log")
    open(log_path, "w").close()
    state = os.path.join(work_dir, "live-state")
    client = redis.client
    client.set(keys.pid_key(77), "1")
    argv = [
        sys.executable,
        "-m",
        "heartbeatd",
        "--log-file",
        log_path,
        "--redis-url",
        redis.url,
        "--state-dir",
        state,
        "--flush-interval",
        str(flush_interval),
    ]
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "STREAMKEEPER_CONFIG": os.devnull},
    )
    delays = []
    try:
        time.sleep(1.0)  # let it start following (startup is not what is measured)
        for n in range(samples):
            stamp = f"{time.time():.3f}"
            line = f'{stamp} 200 "GET /live/stream_77_{n}.ts HTTP/1.1" 127.0.0.1 "t{n}" "bench"\n'
            written = time.monotonic()
            with open(log_path, "a") as handle:
                handle.write(line)
            deadline = written + 10
            while client.get(keys.last_access_key(77)) != stamp and time.monotonic() < deadline:
                time.sleep(0.005)
            delays.append(time.monotonic() - written)
            time.sleep(0.137 * (n % 7))  # land at different points of the flush cycle
    finally:
        process.terminate()
        process.wait(timeout=10)
    delays.sort()
    return {"samples": samples, "p50": delays[len(delays) // 2], "max": delays[-1], "flush_interval": flush_interval}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--channels", type=int, default=2000)
    parser.add_argument("--dense-lines", type=int, default=500_000, help="lines of the all-inside-the-window log")
    parser.add_argument("--old-lines", type=int, default=60_000, help="slice for the old design")
    parser.add_argument("--latency-samples", type=int, default=15)
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="sk-bench-")
    redis = BenchRedis()
    try:
        log_path = os.path.join(work, "access.log")
        t0 = time.monotonic()
        size = write_log(log_path, args.lines, channels=args.channels, duration=900.0)
        print(f"generated {args.lines} lines ({size / 1e6:.0f} MB) in {time.monotonic() - t0:.1f} s")
        client = redis.client
        pipe = client.pipeline(transaction=False)
        for n in range(args.channels):
            pipe.set(keys.pid_key(1000 + n), "1")
            pipe.set(keys.last_access_key(1000 + n), "0")
        pipe.execute()

        results = {}
        for label, window in (("viewers on", 30.0), ("viewers off", 0.0)):
            for n in range(args.channels):  # every run starts from the same state
                pipe.set(keys.last_access_key(1000 + n), "0")
            pipe.delete(*(keys.viewers_key(1000 + n) for n in range(args.channels)))
            pipe.execute()
            before = redis.command_calls()
            run = run_heartbeatd(redis.url, log_path, os.path.join(work, "state"), window)
            run["commands"] = redis.command_calls() - before
            run["commands_per_flush"] = run["commands"] / max(run["flushes"], 1)
            run["commands_per_channel"] = run["commands"] / max(run["channels_written"], 1)
            results[label] = run
            print(
                f"heartbeatd ({label}): {run['rate']:,} lines/s processing "
                f"({run['wall_rate']:,.0f} lines/s wall incl. start-up), "
                f"{run['commands']} Redis commands in {run['flushes']} flushes "
                f"({run['commands_per_channel']:.2f} per channel written), "
                f"peak RSS {run['peak_rss_mb']:.0f} MB"
            )
        # Worst case for viewer counting: every line inside the viewer window.
        dense_path = os.path.join(work, "dense.log")
        write_log(dense_path, args.dense_lines, channels=args.channels, duration=20.0, seed=11)
        dense = run_heartbeatd(redis.url, dense_path, os.path.join(work, "state"), 30.0)
        results["dense"] = dense
        print(
            f"heartbeatd (viewers on, all {args.dense_lines} lines inside the window): "
            f"{dense['rate']:,} lines/s processing, peak RSS {dense['peak_rss_mb']:.0f} MB"
        )
        for n in range(args.channels):
            client.set(keys.last_access_key(1000 + n), "0")
        old = old_design(client, log_path, args.old_lines, 60)
        print(
            f"old design (readline, regex, EXISTS + SET per line): {old['rate']:,.0f} lines/s "
            f"on {old['lines']} lines"
        )
        pyg = pygtail_alone(log_path, min(args.lines, 500_000), work)
        print(f"pygtail alone (no parsing, no Redis): {pyg['rate']:,.0f} lines/s on {pyg['lines']} lines")
        latency = live_latency(redis, work, args.latency_samples, 1.0)
        print(
            f"live latency (log write -> Redis), flush_interval {latency['flush_interval']} s: "
            f"p50 {latency['p50']:.2f} s, max {latency['max']:.2f} s over {latency['samples']}"
        )
        write_results(args, results, old, pyg, latency)
        print(f"wrote {args.results}")
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_results(args, results, old, pyg, latency) -> None:
    on, off = results["viewers on"], results["viewers off"]
    ratio = on["rate"] / old["rate"]

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    text = f"""## heartbeatd (bench/heartbeat.py)

`make bench` (bench/heartbeat.py), {time.strftime('%Y-%m-%d')}, on this machine: {os.cpu_count()} cores,
Python {sys.version.split()[0]}, a local redis-server. Log: {args.lines:,} lines, {args.channels:,}
channels with Zipf popularity, 20,000 viewers, ~10 % other URIs, ~0.2 % malformed or binary lines,
streamkeeper log_format, request times spread over the 15 minutes up to now. Every channel is
marked running, so every flush writes every channel seen. heartbeatd runs with its defaults
(parse_workers = one per core).

| figure | result | target | |
| --- | --- | --- | --- |
| processing, viewer counting on (default) | {on['rate']:,} lines/s | ≥ 1,000,000 | {mark(on['rate'] >= 1_000_000)} |
| processing, viewer counting off | {off['rate']:,} lines/s | ≥ 1,500,000 | {mark(off['rate'] >= 1_500_000)} |
| processing, viewer counting on, every line inside the viewer window ({args.dense_lines:,} lines over 20 s) | {results['dense']['rate']:,} lines/s | | |
| same, wall clock incl. interpreter start-up (on / off) | {on['wall_rate']:,.0f} / {off['wall_rate']:,.0f} lines/s | | |
| old design (readline, regex, EXISTS + SET per line) | {old['rate']:,.0f} lines/s ({old['lines']:,} lines) | | |
| heartbeatd ÷ old design | {ratio:.1f}× | ≥ 35× | {mark(ratio >= 35)} |
| pygtail alone, no parsing or Redis | {pyg['rate']:,.0f} lines/s | | |
| Redis commands per channel written (on / off) | {on['commands_per_channel']:.2f} / {off['commands_per_channel']:.2f} | ≤ 3 | {mark(on['commands_per_channel'] <= 3)} |
| Redis commands per flush (on / off) | {on['commands_per_flush']:.0f} / {off['commands_per_flush']:.0f} ({on['flushes']} / {off['flushes']} flushes) | | |
| peak RSS of heartbeatd (on / off) | {on['peak_rss_mb']:.0f} / {off['peak_rss_mb']:.0f} MB | ≤ 80 MB | {mark(max(on['peak_rss_mb'], off['peak_rss_mb']) <= 80)} |
| live request → Redis, flush_interval {latency['flush_interval']:.0f} s | p50 {latency['p50']:.2f} s, max {latency['max']:.2f} s ({latency['samples']} samples) | ≤ flush_interval + 0.5 s | {mark(latency['max'] <= latency['flush_interval'] + 0.5)} |

"Processing" is heartbeatd's own figure (`--once` summary line): from start-up done to the
final flush acknowledged, lines read ÷ seconds. Redis commands are counted with INFO
commandstats (including the commands inside the Lua script and the EVALSHA itself).
"""
    write_section("heartbeat", text, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
