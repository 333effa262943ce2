"""Real players watching one channel, sampled four times a second: are they still playing?

hls.js and Shaka Player run in headless Chromium (tests/players/watch.mjs); VLC 3 runs
headless (decoding at real-time pace into its dummy outputs, as the user ``nobody``
when we are root: VLC refuses root) and is read through its own http interface.  Each
player's progress is the number of video frames it has shown (the browsers' decoded
frames, VLC's displayed pictures): a player whose count stops rising is frozen, whatever
its clock says (Shaka moves currentTime forward while it waits; VLC's time stays at 0
after a discontinuity).  Used by tests/test_continuity.py and bench/continuity.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

from demo.stack import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAYERS_DIR = os.path.join(REPO, "tests", "players")
SAMPLE_INTERVAL = 0.25  # seconds between samples of each player
REBUFFER_GAP = 1.0  # a stretch without a new frame this long counts as one rebuffer
VLC_PASSWORD = "streamkeeper"
HLSJS_SECONDS = 15  # run_hlsjs: video.currentTime must pass this


@dataclasses.dataclass
class Sample:
    t: float  # epoch seconds
    frames: int | None
    buffering: bool = False
    fatal: object = None


class Watchers:
    """``players`` (any of hlsjs, shaka, vlc) watching ``url`` until stop()."""

    def __init__(self, url: str, players=("hlsjs", "shaka", "vlc")):
        self.url = url
        self.players = tuple(players)
        self.samples: dict[str, list[Sample]] = {name: [] for name in self.players}
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._browser: subprocess.Popen | None = None
        self._vlc: subprocess.Popen | None = None
        self._vlc_home: str | None = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "Watchers":
        web = [name for name in self.players if name != "vlc"]
        if web:
            self._start_browser(web)
        if "vlc" in self.players:
            self._start_vlc()
        return self

    def stop(self) -> None:
        self._stop.set()
        for process in (self._browser, self._vlc):
            if process is not None and process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        for thread in self._threads:
            thread.join(10)
        if self._vlc_home:
            shutil.rmtree(self._vlc_home, ignore_errors=True)

    def _start_browser(self, players: list[str]) -> None:
        if not os.path.isdir(os.path.join(PLAYERS_DIR, "node_modules", "shaka-player")):
            raise RuntimeError("tests/players/node_modules is missing (make test runs npm ci there)")
        self._browser = subprocess.Popen(
            [
                "node",
                os.path.join(PLAYERS_DIR, "watch.mjs"),
                self.url,
                "--players",
                ",".join(players),
                "--interval",
                str(SAMPLE_INTERVAL),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self._spawn_thread(self._read_browser)

    def _read_browser(self) -> None:
        for line in self._browser.stdout:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if "event" in data:
                self.events.append(data)
            elif data.get("player") in self.samples:
                self.samples[data["player"]].append(
                    Sample(data["t"], data.get("frames"), bool(data.get("buffering")), data.get("fatal"))
                )

    def _start_vlc(self) -> None:
        vlc = shutil.which("cvlc")
        if vlc is None:
            raise RuntimeError("VLC is not installed (make test installs vlc-bin and vlc-plugin-base)")
        self._vlc_home = tempfile.mkdtemp(prefix="sk-vlc-")
        as_user = {}
        if os.geteuid() == 0:  # VLC refuses to run as root
            shutil.chown(self._vlc_home, "nobody", "nogroup")
            as_user = {"user": "nobody", "group": "nogroup", "extra_groups": []}
        self._vlc_port = free_port()
        self._vlc = subprocess.Popen(
            [
                vlc,
                "--vout",
                "vdummy",
                "--aout",
                "adummy",
                "--no-video-title-show",
                "-I",
                "http",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(self._vlc_port),
                "--http-password",
                VLC_PASSWORD,
                self.url,
            ],
            env={**os.environ, "HOME": self._vlc_home},
            cwd=self._vlc_home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **as_user,
        )
        self._spawn_thread(self._poll_vlc)

    def _poll_vlc(self) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self._vlc_port}/requests/status.json",
            headers={"Authorization": "Basic " + base64.b64encode(f":{VLC_PASSWORD}".encode()).decode()},
        )
        while not self._stop.wait(SAMPLE_INTERVAL):
            if self._vlc.poll() is not None:
                self.samples["vlc"].append(Sample(time.time(), None, fatal=f"VLC exited ({self._vlc.returncode})"))
                return
            try:
                with urllib.request.urlopen(request, timeout=2) as answer:
                    status = json.load(answer)
            except (OSError, ValueError):
                continue  # its interface is not up yet
            frames = (status.get("stats") or {}).get("displayedpictures")
            state = status.get("state")
            started = any(s.frames for s in self.samples["vlc"])
            self.samples["vlc"].append(
                Sample(time.time(), frames, fatal=f"VLC {state}" if started and state == "stopped" else None)
            )

    def _spawn_thread(self, target) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- what the tests and the benchmark read ------------------------------------------------
    def frames(self, player: str) -> int:
        """Frames shown so far (0 before the first)."""
        return max((s.frames or 0 for s in self.samples[player]), default=0)

    def fatal(self) -> dict[str, object]:
        """The first fatal error of each player that had one."""
        found = {}
        for player, samples in self.samples.items():
            for sample in samples:
                if sample.fatal:
                    found[player] = sample.fatal
                    break
        return found

    def playing(self, minimum_frames: int = 1) -> bool:
        return all(self.frames(p) >= minimum_frames for p in self.players)

    def freezes(self, since: float, until: float) -> dict[str, dict]:
        """Per player, between two epoch times: the longest stretch without a new frame, and
        how many such stretches were longer than REBUFFER_GAP (rebuffers)."""
        result = {}
        for player, samples in self.samples.items():
            rises, last = [], None
            for sample in samples:
                if sample.frames is None:
                    continue
                if last is not None and sample.frames > last and since <= sample.t <= until:
                    rises.append(sample.t)
                last = sample.frames if last is None else max(last, sample.frames)
            points = [since] + rises + [until]
            gaps = [b - a for a, b in zip(points, points[1:])]
            result[player] = {
                "longest_freeze": round(max(gaps, default=until - since), 2),
                "rebuffers": sum(1 for gap in gaps if gap > REBUFFER_GAP),
            }
        return result


def run_hlsjs(mode: str, *urls: str, screenshot: str | None = None, seconds: float = HLSJS_SECONDS):
    """hls.js in headless Chromium (tests/players/hlsjs_play.mjs): one JSON result per URL."""
    if not os.path.isdir(os.path.join(PLAYERS_DIR, "node_modules", "hls.js")):
        pytest.fail("tests/players/node_modules is missing (make test runs npm ci there)")
    argv = [
        "node",
        os.path.join(PLAYERS_DIR, "hlsjs_play.mjs"),
        mode,
        *urls,
        "--seconds",
        str(seconds),
        "--timeout",
        "60",
    ]
    if screenshot:
        argv += ["--screenshot", screenshot]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=90 * len(urls))
    assert result.returncode in (0, 1), result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
