"""Generate a realistic nginx access log for benchmarks (and large tests).

Channels have skewed (Zipf-like) popularity, most requests are segments, a
playlist every few segments, about 10 % of lines are other URIs (API calls,
favicon, 404s, scanners), and a few lines are malformed or binary garbage.
Times run up to "now" with nginx's multi-worker jitter (a line may be a few
milliseconds older than the one before it).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
import time

OTHER_URIS = (
    "/api/streams/active",
    "/favicon.ico",
    "/",
    "/api/stream/start",
    "/live/stream_12.m3u8.bak",
    "/api/v1/stream_5/status",
    "/wp-login.php",
    "/live/../etc/passwd",
    "/live/stream_abc.m3u8",
)
AGENTS = (
    "VLC/3.0.20 LibVLC/3.0.20",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Lavf/59.27.100",
    "ExoPlayerLib/2.19.1",
    "AppleCoreMedia/1.0.0.21A329 (iPhone; U; CPU OS 17_0 like Mac OS X)",
)


def streamkeeper_line(msec: float, status: int, uri: str, addr: str, token: str, agent: str) -> str:
    return f'{msec:.3f} {status} GET "{uri}" {addr} "{token}" "{agent}"\n'


def legacy_line(msec: float, status: int, uri: str, addr: str, token: str, agent: str) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(msec))
    query = f"?token={token}" if token != "-" else ""
    return f'{addr} - [{stamp}] "GET {uri}{query} HTTP/1.1" {status} 1880 "-" "{agent}" 0.001\n'


def generate_lines(
    count: int,
    *,
    channels: int = 2000,
    viewers: int = 20000,
    end_time: float | None = None,
    duration: float = 600.0,
    seed: int = 7,
    fmt: str = "streamkeeper",
    other_share: float = 0.10,
    malformed_share: float = 0.002,
):
    """Yield ``count`` log lines (str, ending in newline)."""
    rng = random.Random(seed)
    end_time = time.time() if end_time is None else end_time
    start = end_time - duration
    weights = [1.0 / (rank + 1) for rank in range(channels)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    channel_ids = [1000 + n for n in range(channels)]
    render = streamkeeper_line if fmt == "streamkeeper" else legacy_line
    # Each viewer watches one channel, picked by popularity.
    viewer_table = [
        (
            f"10.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}",
            f"tok{v:06d}" if v % 3 else "-",
            AGENTS[v % len(AGENTS)],
            channel_ids[bisect.bisect_left(cumulative, rng.random() * total)],
        )
        for v in range(viewers)
    ]
    sequence = 0
    for n in range(count):
        msec = start + duration * n / count - rng.random() * 0.004
        roll = rng.random()
        if roll < malformed_share:
            if rng.random() < 0.5:
                yield "garbage \x00\x01 line without a format\n"
            else:
                yield "\ufffd\ufffd" + "".join(chr(rng.randrange(0x21, 0x7E)) for _ in range(40)) + "\n"
            continue
        addr, token, agent, channel = viewer_table[rng.randrange(viewers)]
        if roll < malformed_share + other_share:
            uri = OTHER_URIS[rng.randrange(len(OTHER_URIS))]
            status = 404 if rng.random() < 0.5 else 200
        else:
            sequence += 1
            if sequence % 5 == 0:
                uri = f"/live/stream_{channel}.m3u8"
            else:
                uri = f"/live/stream_{channel}_{sequence % 1000}.ts"
            status = 200 if rng.random() > 0.01 else 404
        yield render(msec, status, uri, addr, token, agent)


def write_log(path: str, count: int, **kwargs) -> int:
    """Write ``count`` lines to ``path``; return the number of bytes written."""
    written = 0
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
        batch = []
        for line in generate_lines(count, **kwargs):
            batch.append(line)
            if len(batch) >= 10000:
                written += handle.write("".join(batch))
                batch = []
        written += handle.write("".join(batch))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=2000)
    parser.add_argument("--format", choices=("streamkeeper", "legacy"), default="streamkeeper")
    args = parser.parse_args()
    write_log(args.path, args.lines, channels=args.channels, fmt=args.format)


if __name__ == "__main__":
    main()
