"""Benchmark what max_streams' default rests on: how many streams of the default quality
(`medium`: 720p x264 veryfast, 2 Mb/s) this host encodes at real time.

N FFmpegs at once, each reading a live 720p25 source (lavfi testsrc2 paced by -re, so
decoding is not measured, only the encode a real 720p source costs at least) and writing
HLS with exactly the launcher's `medium` options; each one's speed over the last 10 s of a
20 s run is read from its own progress.  The host keeps up while the slowest stream stays
at 0.97x or better.  Writes its section of bench/RESULTS.md.  Local only; bounded in count
and time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

from bench.results import write_section
from streamstate.settings import DEFAULT_QUALITY_PROFILES, STREAMS_PER_CORE

HERE = os.path.dirname(os.path.abspath(__file__))

RUN_SECONDS = 20
_OUT_TIME = re.compile(r"out_time_us=(\d+)")


def encoder_argv(hls_dir: str, index: int) -> list[str]:
    profile = DEFAULT_QUALITY_PROFILES["medium"]
    return [
        "ffmpeg",
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-progress",
        "pipe:1",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=1280x720:rate=25",
        *profile["video"],
        "-force_key_frames",
        "expr:gte(t,n_forced*1)",
        "-sc_threshold",
        "0",
        "-f",
        "hls",
        "-hls_time",
        "4",
        "-hls_list_size",
        "6",
        "-hls_flags",
        "delete_segments",
        os.path.join(hls_dir, f"stream_{index}.m3u8"),
    ]


def slowest_speed(streams: int) -> float:
    """The slowest stream's media seconds per wall second over the run's second half."""
    with tempfile.TemporaryDirectory(prefix="sk-bench-capacity-") as hls_dir:
        processes = [
            subprocess.Popen(encoder_argv(hls_dir, n), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for n in range(streams)
        ]
        os.set_blocking(processes[0].stdout.fileno(), True)
        marks: dict[int, list[tuple[float, float]]] = {n: [] for n in range(streams)}
        started = time.monotonic()
        try:
            import selectors

            selector = selectors.DefaultSelector()
            for n, process in enumerate(processes):
                selector.register(process.stdout, selectors.EVENT_READ, n)
            while time.monotonic() - started < RUN_SECONDS:
                for key, _ in selector.select(timeout=0.5):
                    line = key.fileobj.readline()
                    match = _OUT_TIME.match(line)
                    if match:
                        marks[key.data].append((time.monotonic(), int(match.group(1)) / 1e6))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=10)
    speeds = []
    half = started + RUN_SECONDS / 2
    for samples in marks.values():
        late = [s for s in samples if s[0] >= half]
        if len(late) < 2:
            return 0.0
        (t0, m0), (t1, m1) = late[0], late[-1]
        speeds.append((m1 - m0) / (t1 - t0) if t1 > t0 else 0.0)
    return min(speeds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", type=int, default=4 * (os.cpu_count() or 1), help="most streams tried")
    args = parser.parse_args()
    rows, sustained = [], 0
    for streams in range(1, args.max + 1):
        speed = slowest_speed(streams)
        print(f"{streams} medium stream(s): slowest {speed:.2f}x real time", flush=True)
        rows.append(f"| {streams} | {speed:.2f}x |")
        if speed < 0.97:
            break
        sustained = streams
    cores = os.cpu_count() or 1
    print(
        f"sustained at real time: {sustained} on {cores} cores; max_streams default: "
        f"{STREAMS_PER_CORE} per core = {STREAMS_PER_CORE * cores}"
    )
    table = "\n".join(rows)
    write_section(
        "capacity",
        f"""## capacity (bench/capacity.py)

{time.strftime('%Y-%m-%d')}, {cores} cores. N FFmpegs at once, each encoding a live 720p25 source
with the `medium` profile (x264 veryfast, 2 Mb/s, keyframe a second) to HLS; the slowest
stream's speed over the second half of a {RUN_SECONDS} s run.

| streams | slowest |
| --- | --- |
{table}

Sustained at real time: **{sustained}** on {cores} cores. `max_streams` defaults to
{STREAMS_PER_CORE} per core ({STREAMS_PER_CORE * cores} here); `copy` streams cost about 1 % of a core each, so
a restream-only host can raise it many times over.
""",
    )
    print("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
