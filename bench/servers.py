"""A redis-server of the benchmark's own, on a free loopback port, stopped by pid."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time

import redis

from demo.stack import free_port, redis_server_argv


class BenchRedis:
    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="sk-bench-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            redis_server_argv(self.port, self.directory),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def command_calls(self) -> int:
        """Commands executed so far (INFO commandstats), not counting INFO itself."""
        stats = self.client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)
