"""Benchmark continuity: what a watching viewer sees of each fault a host lives with.

One channel (the local live upstream, ``copy``, ``hls_time`` 2 s as the issue measured it,
a fallback source) is watched through nginx by hls.js and Shaka Player in headless
Chromium and by VLC, while tests/faults.py injects, one after the other: kill -9 of
FFmpeg, a stalled upstream, the upstream closing every connection, the upstream back
with its timestamps restarted, failover to the fallback source, a launcher SIGKILL, a
Redis restart that loses its data; the reaper passes every second throughout.

Per fault and per player, over OBSERVE seconds from the fault: the longest freeze (wall
time in which the player showed no new video frame) and the rebuffers (freezes over
1 s), beside a baseline window with no fault (what sampling every 0.25 s and each
player's own cadence show when nothing happens).  Goals: an FFmpeg crash or an upstream
drop freezes no player more than 2 x hls_time; a launcher or Redis restart freezes none
(no more than the baseline).  Prints the table and writes its section of
bench/RESULTS.md.  Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import redis

from bench.results import write_section
from demo.stack import LocalStack
from tests.faults import FAULTS, add_watched_channel
from tests.helpers import wait_for
from tests.viewing import Watchers

HERE = os.path.dirname(os.path.abspath(__file__))

CHANNEL = 1
PLAYERS = ("hlsjs", "shaka", "vlc")
WARMUP = 10.0  # seconds after the first pictures before anything is measured
BASELINE = 20.0  # seconds watched with no fault, for each player's own cadence


def settings(hls_time: float) -> dict:
    return {
        "hls_time": hls_time,
        "hls_init_time": 1,
        "hls_list_size": 6,
        "stop_grace": 2,
        "start_timeout": 10,
        "reaper_interval": 1,
        "idle_timeout": 300,
        "max_restarts": 10,
        "restart_window": 3,
        "flush_interval": 0.5,
    }


def watch_faults(hls_time: float, observe: float) -> tuple[dict, dict[str, dict]]:
    work = tempfile.mkdtemp(prefix="sk-bench-continuity-")
    stack = LocalStack(work, settings(hls_time), heartbeatd=True, reaper=True).start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    watchers = None
    try:
        add_watched_channel(stack, CHANNEL)
        watchers = Watchers(stack.playlist_url(CHANNEL, "?token=bench"), PLAYERS).start()
        wait_for(lambda: watchers.playing(75), timeout=90, interval=0.25, message="every player to play")
        time.sleep(WARMUP)
        began = time.time()
        time.sleep(BASELINE)
        baseline = watchers.freezes(began, time.time())
        results = {}
        for name, (inject, _) in FAULTS.items():
            at = time.time()
            inject(stack, CHANNEL)
            time.sleep(max(0.0, at + observe - time.time()))
            results[name] = watchers.freezes(at, at + observe)
            results[name]["fatal"] = watchers.fatal()
            print(
                f"{name}: "
                + ", ".join(
                    f"{p} {r['longest_freeze']:.2f} s / {r['rebuffers']}"
                    for p, r in results[name].items()
                    if p in PLAYERS
                ),
                flush=True,
            )
        return baseline, results
    finally:
        if watchers is not None:
            watchers.stop()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(hls_time: float, observe: float, baseline: dict, results: dict[str, dict]) -> str:
    goal = 2 * hls_time
    lines = [
        f"`bench/continuity.py`: one `copy` channel, `hls_time` {hls_time:g} s (so the goal for "
        f"an FFmpeg crash or an upstream drop is a longest freeze of at most {goal:g} s), watched "
        f"through nginx by {', '.join(PLAYERS)}; each fault observed {observe:g} s.  Cells: longest "
        "freeze (s, no new video frame) / rebuffers (freezes over 1 s).  Baseline: the same "
        "measure with no fault (sampling every 0.25 s and each player's own cadence).",
        "",
        "| fault | goal | " + " | ".join(PLAYERS) + " | met |",
        "| --- | --- | " + " | ".join("---" for _ in PLAYERS) + " | --- |",
        "| (no fault: baseline) | | "
        + " | ".join(f"{baseline[p]['longest_freeze']:.2f} / {baseline[p]['rebuffers']}" for p in PLAYERS)
        + " | |",
    ]
    for name, (_, kind) in FAULTS.items():
        row = results[name]
        if kind == "replacement":
            wanted, met = f"≤ {goal:g} s", all(row[p]["longest_freeze"] <= goal for p in PLAYERS)
        elif kind == "restart":
            wanted = "none"
            met = all(row[p]["longest_freeze"] <= baseline[p]["longest_freeze"] + 0.25 for p in PLAYERS)
        else:
            wanted, met = "(the source itself)", None
        fatal = row.get("fatal") or {}
        cells = [
            f"{row[p]['longest_freeze']:.2f} / {row[p]['rebuffers']}" + (" FATAL" if p in fatal else "")
            for p in PLAYERS
        ]
        lines.append(
            f"| {name} | {wanted} | "
            + " | ".join(cells)
            + " | "
            + ("" if met is None else "yes" if met else "**no**")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hls-time", type=float, default=2.0)
    parser.add_argument("--observe", type=float, default=30.0, help="seconds watched after each fault")
    args = parser.parse_args()
    baseline, results = watch_faults(args.hls_time, args.observe)
    text = report(args.hls_time, args.observe, baseline, results)
    print(text)
    write_section("continuity", "## Continuity\n\n" + text)


if __name__ == "__main__":
    main()
