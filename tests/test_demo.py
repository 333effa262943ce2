"""`make demo` runs demo.run: it brings the stack up, prints a playable URL, and leaves nothing behind."""
import os
import re
import subprocess
import sys
import time

from tests.conftest import REPO


def test_demo_serves_a_channel_and_stops_cleanly():
    process = subprocess.Popen([sys.executable, "-m", "demo.run", "--port", "0", "--seconds", "10"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    url = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"^\s+(http://127\.0\.0\.1:\d+/live/stream_1\.m3u8\S*)", line)
        if match:
            url = match.group(1)
            break
    assert url, "".join(lines)
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0", url],
                           capture_output=True, text=True, timeout=60)
    assert sorted(set(probe.stdout.split())) == ["audio", "video"], probe.stderr
    output = process.stdout.read()          # what readline buffered too (communicate would skip it)
    process.wait(timeout=90)
    assert process.returncode == 0
    assert "ch 1: running" in output and "nothing left running" in output
    assert re.search(r"point streamctl at this demo:  \S+streamctl --config \S+ status", output)
    assert "stream-reaper" in "".join(lines)              # the demo shows idle channels being stopped
    workdir = re.search(r"in (/\S+streamkeeper-demo-\S+) \.\.\.", "".join(lines)).group(1)
    assert not os.path.exists(workdir)
