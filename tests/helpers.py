"""Small helpers shared by the tests: polling with a deadline, log lines, free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from demo.stack import free_port  # noqa: F401 - one definition, used by the tests
from streamstate import files, keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05, message: str = ""):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or condition}")
        time.sleep(interval)


def sk_line(
    ts: float,
    uri: str,
    status: int = 200,
    addr: str = "127.0.0.1",
    token: str = "-",
    agent: str = "VLC/3.0.20",
    method: str = "GET",
) -> str:
    """A line in the streamkeeper log_format ($uri: the path only, no query)."""
    return f'{ts:.3f} {status} {method} "{uri}" {addr} "{token}" "{agent}"\n'


LEGACY_FORMAT = (
    '$remote_addr - [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent" $request_time'
)


def legacy_line(ts: float, uri: str, status: int = 200, addr: str = "127.0.0.1", agent: str = "VLC/3.0.20") -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ts))
    return f'{addr} - [{stamp}] "GET {uri} HTTP/1.1" {status} 1880 "-" "{agent}" 0.001\n'


def append(path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# -- the launcher's end-to-end tests (the `stack` fixture) ------------------------------
def ffmpeg_processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every ffmpeg on the machine."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == "ffmpeg":
                found.append((int(entry), argv))
    return found


def ffmpegs_writing(stack, channel_id) -> list[int]:
    """FFmpegs whose output is the channel's playlist (its own, or the viewers' for an
    FFmpeg started the old way)."""
    outputs = files.ffmpeg_outputs(stack.hls_dir, channel_id)
    return [pid for pid, argv in ffmpeg_processes() if argv and argv[-1] in outputs]


def add_channel(stack, channel_id, source_url=None, quality="copy", **extra) -> None:
    record = {"source_url": source_url or stack.upstream_url(f"ch{channel_id}"), "quality": quality, **extra}
    stack.redis.set(keys.channel_key(channel_id), json.dumps(record))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def first_request(url: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body) of one request, redirects not followed."""
    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/<pid>/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def streamctl(stack, *args: str) -> subprocess.CompletedProcess:
    """`streamctl ARGS --config <the stack's>`, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "streamctl", *args, "--config", stack.config_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )


def decode(url: str, seconds: float) -> subprocess.CompletedProcess:
    """ffmpeg decodes ``seconds`` of the HLS stream at ``url`` (a real HLS client)."""
    return subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-i", url, "-t", f"{seconds:g}", "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
