"""Benchmark a reaper pass over 10,000 records, mostly stale, against a redis-server of its own.

Records: 9,970 stale (pids that do not exist; half run records, half legacy
pid-only records), 20 watched and 10 idle streams backed by real processes.
Prints the pass duration, Redis round trips and commands, and writes its section
of bench/RESULTS.md.  Loopback only; bounded.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import redis.connection

from bench.results import write_section
from bench.servers import BenchRedis
from streamstate import keys, runs
from streamstate.process import process_start_time
from streamstate.reaping import Reaper
from streamstate.settings import load_settings

HERE = os.path.dirname(os.path.abspath(__file__))

STALE, WATCHED, IDLE = 9970, 20, 10
DEAD_PID_BASE = 4_190_000  # near pid_max: no such processes


class RoundTrips:
    """Counts what redis-py sends: one count per round trip (a pipeline is one)."""

    def __init__(self):
        self.count = 0
        original = redis.connection.AbstractConnection.send_packed_command
        counter = self

        def counting(connection, command, check_health=True):
            counter.count += 1
            return original(connection, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = counting


def main() -> int:
    server = BenchRedis()
    hls = tempfile.mkdtemp(prefix="sk-bench-reaper-")
    processes = []
    try:
        client = server.client
        now = time.time()
        pipe = client.pipeline(transaction=False)
        for n in range(STALE):
            channel = str(100_000 + n)
            if n % 2:
                pipe.set(keys.pid_key(channel), DEAD_PID_BASE + n % 4000)
                pipe.set(keys.last_access_key(channel), f"{now - 50:.3f}")
            else:
                record = runs.RunRecord(
                    channel=channel,
                    run_id=f"r{n}",
                    host="bench",
                    pid=DEAD_PID_BASE + n % 4000,
                    pid_start=12345,
                    started=now - 50,
                    state="running",
                )
                pipe.hset(
                    keys.run_key(channel),
                    mapping={
                        "run_id": record.run_id,
                        "host": "bench",
                        "pid": record.pid,
                        "pid_start": 12345,
                        "started": record.started,
                        "state": "running",
                    },
                )
                pipe.set(keys.pid_key(channel), record.pid)
                pipe.sadd(keys.ACTIVE_STREAMS_KEY, channel)
        pipe.execute()
        for n in range(WATCHED + IDLE):
            process = subprocess.Popen(["sleep", "300"], start_new_session=True)
            processes.append(process)
            channel = str(200_000 + n)
            last = now if n < WATCHED else now - 1000
            runs.record_run(
                client,
                runs.RunRecord(
                    channel=channel,
                    run_id=f"live{n}",
                    host="bench",
                    pid=process.pid,
                    pid_start=process_start_time(process.pid),
                    started=last,
                    state="running",
                ),
                now=last,
            )
        settings = load_settings(
            None,
            {"redis_url": server.url, "hls_dir": hls, "host_id": "bench", "idle_timeout": 300, "stop_grace": 5},
            environ={},
        )
        trips = RoundTrips()
        before = server.command_calls()
        started = time.monotonic()
        summary = Reaper(settings).run_pass()
        first = {
            "duration": time.monotonic() - started,
            "round_trips": trips.count,
            "commands": server.command_calls() - before,
            "summary": summary,
        }
        trips.count = 0
        before = server.command_calls()
        started = time.monotonic()
        steady_summary = Reaper(settings).run_pass()
        steady = {
            "duration": time.monotonic() - started,
            "round_trips": trips.count,
            "commands": server.command_calls() - before,
            "summary": steady_summary,
        }
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        server.stop()
    s = first["summary"]
    print(
        f"first pass over {s.streams} records: {first['duration']:.3f} s, stopped {s.stopped}, "
        f"stale {s.stale}, kept {s.kept}; {first['round_trips']} Redis round trips, "
        f"{first['commands']} commands"
    )
    print(
        f"next pass over {steady['summary'].streams} records: {steady['duration']:.3f} s, "
        f"{steady['round_trips']} round trips"
    )
    batches = (s.streams + 499) // 500
    write_section(
        "reaper",
        f"""## reaper (bench/reaper.py)

{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, a local redis-server. {STALE + WATCHED + IDLE:,} records:
{STALE:,} stale (pids that do not exist; half run records, half legacy pid-only records),
{WATCHED} watched and {IDLE} idle streams backed by real processes (the idle ones exit on SIGTERM).

| figure | result | target | |
| --- | --- | --- | --- |
| first pass: {s.streams:,} records, {s.stale:,} stale cleared, {s.stopped} stopped, {s.kept} kept | {first['duration']:.3f} s | ≤ 1 s | {"met" if first['duration'] <= 1 else "**not met**"} |
| Redis round trips in that pass ({batches} batches of 500) | {first['round_trips']} ({first['round_trips'] / batches:.1f} per batch) | constant per batch | |
| Redis commands in that pass (INFO commandstats, Lua calls included) | {first['commands']:,} | | |
| next pass: {steady['summary'].streams} records | {steady['duration']:.3f} s, {steady['round_trips']} round trips | | |
""",
    )
    print("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
