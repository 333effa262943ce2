"""Benchmark cold starts: a player's first request to a playable playlist, through nginx.

On the local live upstream (keyframe every second, a burst of the last two
seconds on connect, like the restream servers hosts pull from) and with
``hls_time = hls_init_time = 1``:

* bare FFmpeg with exactly the launcher's options: time to its first segment;
* the whole path, one cold channel at a time: player request -> nginx miss ->
  launcher -> FFmpeg -> X-Accel-Redirect -> nginx answers with the playlist;
* the same for 20 cold channels at once;
* real players on cold channels, from their first request to their first decoded
  picture: ffmpeg, VLC (headless cvlc) and hls.js in headless Chromium (`playing`).

Prints p50/p95 and the launcher's overhead over bare FFmpeg; writes its section
of bench/RESULTS.md.  Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

from bench.results import percentile, write_section
from demo.stack import LocalStack
from launcher.ffmpeg import build_argv
from streamstate import files, keys
from streamstate.channel_check import validate
from streamstate.channels import Channel
from streamstate.settings import Settings, load_settings

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE_TIMEOUT = 20.0


def keep_upstream_warm(url: str, stop: threading.Event) -> None:
    """One listener for the whole run: the encoder keeps running and its burst stays full."""
    with urllib.request.urlopen(url, timeout=10) as response:
        while not stop.is_set() and response.read(65536):
            pass


def bare_ffmpeg_first_segment(settings: Settings, source: str, work: str) -> float:
    hls = tempfile.mkdtemp(dir=work)
    bare = dataclasses.replace(settings, hls_dir=hls)
    channel = Channel(id="1", source_url=source, quality="copy")
    argv = build_argv(channel, bare, validate(channel, bare))
    playlist = files.playlist_path(hls, "1")
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while files.count_listed_segments(playlist) < 1:
            if time.monotonic() - started > SAMPLE_TIMEOUT or process.poll() is not None:
                raise RuntimeError("bare ffmpeg wrote no segment")
            time.sleep(0.005)
        return time.monotonic() - started
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(hls, ignore_errors=True)


def player_first_playlist(url: str) -> float:
    """Seconds from the player's first request until it holds a playlist listing a segment."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=SAMPLE_TIMEOUT + 10) as response:
        body = response.read()
    if response.status != 200 or b"#EXTINF" not in body:
        raise RuntimeError(f"{url}: {response.status}, no segment listed")
    return time.monotonic() - started


PLAYERS = os.path.join(os.path.dirname(HERE), "tests", "players")


def first_picture_from_stderr(argv: list[str], request_marker: str, picture_marker: str, **popen) -> float:
    """Run a player; seconds from the stderr line that says it sends its first request to the
    line that says it has decoded its first picture.  The player is stopped then."""
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen
    )
    requested = None
    deadline = time.monotonic() + SAMPLE_TIMEOUT + 10
    buffered = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stderr], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(process.stderr.fileno(), 65536)
            now = time.monotonic()
            if not chunk:
                break
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace")
                if requested is None and request_marker in text:
                    requested = now
                elif requested is not None and picture_marker in text:
                    return now - requested
        raise RuntimeError(f"{os.path.basename(argv[0])}: no first picture (request seen: {requested is not None})")
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ffmpeg_first_picture(url: str) -> float:
    """ffmpeg logs its HTTP request at debug level; -frames:v 1 ends once a picture is decoded
    (its final "frame=    1" status line)."""
    argv = [
        "ffmpeg",
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "debug",
        "-i",
        url,
        "-map",
        "0:v:0",
        "-frames:v",
        "1",
        "-f",
        "null",
        "-",
    ]
    return first_picture_from_stderr(argv, "request: GET", "Output stream #0:0 (video): 1 frame")


def vlc_popen_options() -> dict:
    """VLC refuses to run as root: as nobody, with a home of its own, when we are root."""
    home = tempfile.mkdtemp(prefix="sk-bench-vlc-")
    options = {"env": {**os.environ, "HOME": home}}
    if os.geteuid() == 0:
        shutil.chown(home, "nobody", "nogroup")
        options.update(user="nobody", group="nogroup", extra_groups=[])
    return options


def vlc_first_picture(url: str) -> float:
    argv = [
        shutil.which("cvlc") or "cvlc",
        "-I",
        "dummy",
        "--no-media-library",
        "-vv",
        "-V",
        "dummy",
        "-A",
        "dummy",
        url,
    ]
    options = vlc_popen_options()
    try:
        return first_picture_from_stderr(argv, "outgoing request", "Received first picture", **options)
    finally:
        shutil.rmtree(options["env"]["HOME"], ignore_errors=True)


def hlsjs_first_pictures(urls: list[str]) -> list[float]:
    """hls.js in headless Chromium: MANIFEST_LOADING to the video element's `playing`."""
    result = subprocess.run(
        [
            "node",
            os.path.join(PLAYERS, "hlsjs_play.mjs"),
            "play",
            *urls,
            "--seconds",
            "0",
            "--timeout",
            str(SAMPLE_TIMEOUT),
        ],
        capture_output=True,
        text=True,
        timeout=(SAMPLE_TIMEOUT + 20) * len(urls),
    )
    samples = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    failed = [s for s in samples if not s["ok"]]
    if result.returncode != 0 or failed or len(samples) != len(urls):
        raise RuntimeError(f"hls.js: {failed or result.stderr[-2000:]}")
    return [s["first_request_to_playing"] for s in samples]


def player_round(stack: LocalStack, client, source: str, base_id: int, trials: int) -> dict[str, list[float]]:
    """Each client opens `trials` cold channels, one at a time."""
    results: dict[str, list[float]] = {"ffmpeg": [], "VLC": [], "hls.js": []}
    for name, offset in (("ffmpeg", 0), ("VLC", 100)):
        measure = ffmpeg_first_picture if name == "ffmpeg" else vlc_first_picture
        for trial in range(trials):
            channel_id = base_id + offset + trial
            add_channels(stack, client, [channel_id], source)
            results[name].append(measure(stack.playlist_url(channel_id, "?token=bench")))
            stop_channels(stack, [channel_id])
    ids = [base_id + 200 + trial for trial in range(trials)]
    add_channels(stack, client, ids, source)
    results["hls.js"] = hlsjs_first_pictures([stack.playlist_url(c, "?token=bench") for c in ids])
    stop_channels(stack, ids)
    return results


def add_channels(stack: LocalStack, client, ids, source: str) -> None:
    for channel_id in ids:
        client.set(keys.channel_key(channel_id), json.dumps({"source_url": source, "quality": "copy"}))


def stop_channels(stack: LocalStack, ids) -> None:
    for channel_id in ids:
        stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def concurrent_round(stack: LocalStack, ids) -> list[float]:
    times: dict[int, float] = {}
    errors: list[str] = []
    barrier = threading.Barrier(len(ids))

    def player(channel_id):
        barrier.wait()
        try:
            times[channel_id] = player_first_playlist(stack.playlist_url(channel_id, "?token=bench"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{channel_id}: {exc}")

    threads = [threading.Thread(target=player, args=(c,)) for c in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SAMPLE_TIMEOUT + 20)
    if errors:
        raise RuntimeError("; ".join(errors))
    return list(times.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=15, help="single cold starts (and bare runs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 20 channels at once")
    parser.add_argument(
        "--player-trials", type=int, default=10, help="cold channels each real player (ffmpeg, VLC, hls.js) opens"
    )
    args = parser.parse_args()

    import redis

    work = tempfile.mkdtemp(prefix="sk-bench-cold-")
    stack = LocalStack(work, {"hls_time": 1, "hls_init_time": 1, "start_timeout": 15})
    stop = threading.Event()
    try:
        stack.start()
        client = redis.Redis(port=stack.redis_port)
        source = stack.upstream_url("bench")
        threading.Thread(target=keep_upstream_warm, args=(source, stop), daemon=True).start()
        time.sleep(2.5)  # the upstream's burst buffer fills
        settings = load_settings(stack.config_path)

        bare = [bare_ffmpeg_first_segment(settings, source, work) for _ in range(args.trials)]
        single = []
        for trial in range(args.trials):
            channel_id = 1000 + trial
            add_channels(stack, client, [channel_id], source)
            single.append(player_first_playlist(stack.playlist_url(channel_id, "?token=bench")))
            stop_channels(stack, [channel_id])
        many = []
        for round_number in range(args.rounds):
            ids = list(range(2000 + 100 * round_number, 2020 + 100 * round_number))
            add_channels(stack, client, ids, source)
            many += concurrent_round(stack, ids)
            stop_channels(stack, ids)
        players = player_round(stack, client, source, 3000, args.player_trials)
    finally:
        stop.set()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "bare": (percentile(bare, 0.5), percentile(bare, 0.95)),
        "single": (percentile(single, 0.5), percentile(single, 0.95)),
        "many": (percentile(many, 0.5), percentile(many, 0.95)),
    }
    overhead = (figures["single"][0] - figures["bare"][0], figures["single"][1] - figures["bare"][1])
    for name, label in (
        ("bare", "bare FFmpeg, first segment"),
        ("single", "1 cold channel via nginx"),
        ("many", "20 cold channels at once"),
    ):
        print(f"{label}: p50 {figures[name][0]:.3f} s, p95 {figures[name][1]:.3f} s")
    print(f"launcher overhead over bare FFmpeg: p50 {overhead[0]:.3f} s, p95 {overhead[1]:.3f} s")
    player_rows = []
    for name, times in players.items():
        p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
        print(f"{name}: first request to first decoded picture p50 {p50:.3f} s, p95 {p95:.3f} s")
        player_rows.append(f"| {name}, cold channel ({len(times)} runs) | {p50:.3f} s | {p95:.3f} s |")
    player_table = "\n".join(player_rows)

    with open(os.path.join(PLAYERS, "package-lock.json")) as handle:
        hlsjs_version = json.load(handle)["packages"]["node_modules/hls.js"]["version"]

    def mark(ok):
        return "met" if ok else "**not met**"

    write_section(
        "cold-start",
        f"""## cold start (bench/cold_start.py)

{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores. Source: the local live upstream (demo/upstream.py:
320x180 H.264 + AAC, keyframe every second, a 2 s burst from a keyframe on connect), quality
`copy`, `hls_time = hls_init_time = 1`, probe 1 s / 1 MB. Times from the player's first request
to holding a playlist that lists a segment (through nginx: miss, launcher, FFmpeg,
X-Accel-Redirect, the file as the answer to that same request).

| figure | p50 | p95 | target (p95) | |
| --- | --- | --- | --- | --- |
| bare FFmpeg with the launcher's options: first segment ({len(bare)} runs) | {figures['bare'][0]:.3f} s | {figures['bare'][1]:.3f} s | | |
| 1 cold channel through nginx ({len(single)} runs) | {figures['single'][0]:.3f} s | {figures['single'][1]:.3f} s | ≤ 1.0 s | {mark(figures['single'][1] <= 1.0)} |
| launcher overhead over bare FFmpeg (difference) | {overhead[0]:.3f} s | {overhead[1]:.3f} s | ≤ 0.3 s | {mark(overhead[1] <= 0.3)} |
| 20 cold channels at once, each ({len(many)} samples) | {figures['many'][0]:.3f} s | {figures['many'][1]:.3f} s | ≤ 2.5 s | {mark(figures['many'][1] <= 2.5)} |

Real players, each opening cold channels one at a time through nginx: from the player's first
request to its first decoded picture. ffmpeg: its `request: GET` debug line to the end of
`-frames:v 1`; VLC 3 (`cvlc -vv`, dummy outputs): its first `outgoing request` to `Received
first picture`; hls.js {hlsjs_version} in headless Chromium: `MANIFEST_LOADING` to the video
element's `playing` (which waits for hls.js's buffer, not only for a picture).

| client | p50 | p95 |
| --- | --- | --- |
{player_table}
""",
    )
    print("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
