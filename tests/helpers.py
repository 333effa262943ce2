"""Small helpers shared by the tests: polling with a deadline, log lines, free ports."""
from __future__ import annotations

import os
import time

from demo.stack import free_port  # noqa: F401 - one definition, used by the tests


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


def sk_line(ts: float, uri: str, status: int = 200, addr: str = "127.0.0.1",
            token: str = "-", agent: str = "VLC/3.0.20", method: str = "GET") -> str:
    """A line in the streamkeeper log_format."""
    query = f"?token={token}" if token != "-" else ""
    return f'{ts:.3f} {status} "{method} {uri}{query} HTTP/1.1" {addr} "{token}" "{agent}"\n'


LEGACY_FORMAT = ('$remote_addr - [$time_local] "$request" $status $body_bytes_sent '
                 '"$http_referer" "$http_user_agent" $request_time')


def legacy_line(ts: float, uri: str, status: int = 200, addr: str = "127.0.0.1",
                agent: str = "VLC/3.0.20") -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ts))
    return f'{addr} - [{stamp}] "GET {uri} HTTP/1.1" {status} 1880 "-" "{agent}" 0.001\n'


def append(path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
