"""What every doctor check shares: its one-line result, the deadlines, HTTP and /proc reads."""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request

from streamstate.process import process_cmdline

OK, WARN, FAIL = "ok", "warn", "FAIL"
TIMEOUT = 3.0  # seconds any one probe may take
PROBE_DEADLINE = 8.0  # seconds a source probe may take in all
REDIS_SLOW_MS = 50  # a PING slower than this is worth a warning
NEEDED_PROTOCOLS = ("http", "https", "tcp", "tls", "crypto", "httpproxy")


@dataclasses.dataclass
class Check:
    status: str
    check: str
    detail: str


def http_get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(
            urllib.request.Request(url, headers={"Accept": "application/json"}), timeout=TIMEOUT
        ) as response:
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode("utf-8", "replace")
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise TimeoutError(str(exc.reason)) from None
        raise OSError(str(exc.reason)) from None


def same_config(argv: list[str], config_path: str | None) -> bool:
    """A process started with another --config is another stack's (one started without
    one may be ours: the environment names its file)."""
    if "--config" not in argv or not config_path:
        return True
    index = argv.index("--config")
    return index + 1 < len(argv) and os.path.realpath(argv[index + 1]) == os.path.realpath(config_path)


def processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.listdir("/proc"):
        argv = process_cmdline(int(entry)) if entry.isdigit() else []
        if argv:
            # python -m heartbeatd: the module name is what counts
            found.append((int(entry), [os.path.basename(argv[0])] + argv[1:] if "-m" not in argv[:2] else argv[2:]))
    return found
