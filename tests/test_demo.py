"""`make demo` runs demo.run: a place to practise.  It brings the stack up, prints a playable
URL and the doctor command (green on a fresh demo), brings back a part an operator stops,
and Ctrl-C to its whole process group (what a terminal sends) stops every stream and every
part before it says nothing is left running."""

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO
from tests.helpers import ffmpeg_processes, wait_for

pytestmark = pytest.mark.e2e


class DemoRun:
    """demo.run in a session of its own (as a terminal's foreground job), its output read."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "demo.run", "--port", "0", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def find(self, pattern: str, timeout: float = 60) -> re.Match:
        return wait_for(
            lambda: re.search(pattern, self.output, re.M),
            timeout=timeout,
            message=f"{pattern!r} in the demo's output:\n{self.output[-3000:]}",
        )

    def finish(self, timeout: float = 90) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(10)
        return code


def doctor(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command.split() + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_demo_serves_a_channel_and_stops_cleanly():
    demo = DemoRun("--seconds", "10")
    url = demo.find(r"^\s+(http://127\.0\.0\.1:\d+/live/stream_1\.m3u8\S*)").group(1)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sorted(set(probe.stdout.split())) == ["audio", "video"], probe.stderr
    assert demo.finish() == 0
    output = demo.output
    assert "ch 1: running" in output and "stopped; nothing left running." in output
    assert re.search(r"point streamctl at this demo:  \S+streamctl --config \S+ status", output)
    assert "stream-reaper" in output and "VLC refuses to run as root" in output
    workdir = re.search(r"in (/\S+streamkeeper-demo-\S+) \.\.\.", output).group(1)
    assert not os.path.exists(workdir)


def test_the_demo_is_a_practice_ground():
    """doctor is green on a fresh demo; a stopped part is named by doctor and brought back;
    Ctrl-C to the demo's process group leaves nothing running, streams included."""
    demo = DemoRun("--restart-after", "3")
    command = demo.find(r"check this host:\s+(\S+streamctl --config \S+ doctor --nginx-conf \S+)").group(1)
    pids = {
        name: int(pid)
        for name, pid in re.findall(r"^\s+(\w+)\s+pid (\d+)\s+log ", demo.find(r"^\s+reaper\s+pid \d+").string, re.M)
    }
    assert set(pids) == {"redis", "upstream", "egress", "launcher", "nginx", "heartbeatd", "reaper"}
    try:
        fresh = doctor(command)
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        os.kill(pids["launcher"], signal.SIGKILL)  # an operator stops one part
        demo.find(r"launcher was killed by SIGKILL; `streamctl doctor` names it now")
        broken = doctor(command)
        assert broken.returncode == 1 and '"launcher"' in broken.stdout and "nothing answers" in broken.stdout
        demo.find(r"launcher is back \(pid \d+\)")
        assert doctor(command).returncode == 0
        url = demo.find(r"^\s+(http://127\.0\.0\.1:\d+/live/stream_2\.m3u8\S*)").group(1)
        assert subprocess.run(["ffprobe", "-v", "error", url], capture_output=True, timeout=60).returncode == 0
        demo.find(r"ch 2: running")
        workdir = re.search(r"in (/\S+streamkeeper-demo-\S+) \.\.\.", demo.output).group(1)
        os.killpg(demo.process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert demo.finish() == 0, demo.output[-2000:]
    finally:
        if demo.process.poll() is None:
            os.killpg(demo.process.pid, signal.SIGKILL)
    assert "stopped; nothing left running." in demo.output and "Traceback" not in demo.output
    assert not [pid for pid, argv in ffmpeg_processes() if workdir in " ".join(argv)]
    for name, pid in pids.items():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", name
