"""A live HLS source for the tests: ffmpeg writes 1 s segments of a test pattern into a
directory served over HTTP on loopback, optionally AES-128 encrypted, optionally with
its segments listed on another base URL (https, or an address that must be refused)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import threading

from demo.upstream import pattern_encoder_argv
from tests.helpers import wait_for


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        super().do_GET()


class HLSOrigin:
    def __init__(self, directory: str, *, encrypt: bool = False, segment_base: str | None = None):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=directory)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.paths = []
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        argv = [
            *pattern_encoder_argv(shutil.which("ffmpeg") or "ffmpeg"),
            "-f",
            "hls",
            "-hls_time",
            "1",
            "-hls_list_size",
            "6",
            "-hls_flags",
            "delete_segments",
        ]
        if encrypt:
            key = os.path.join(directory, "key.bin")
            with open(key, "wb") as handle:
                handle.write(os.urandom(16))
            info = os.path.join(directory, "key.info")
            with open(info, "w") as handle:
                handle.write(f"http://127.0.0.1:{self.port}/key.bin\n{key}\n")
            argv += ["-hls_key_info_file", info]
        if segment_base:
            argv += ["-hls_base_url", segment_base]
        argv.append(os.path.join(directory, "index.m3u8"))
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(self._ready, timeout=20, message="the HLS origin's playlist")

    def _ready(self) -> bool:
        try:
            with open(os.path.join(self.directory, "index.m3u8")) as handle:
                return handle.read().count("#EXTINF") >= 2
        except FileNotFoundError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/index.m3u8"

    @property
    def paths(self) -> list[str]:
        return list(self.server.paths)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.server.shutdown()
        self.server.server_close()
