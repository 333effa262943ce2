"""Redis as a multi-host set-up runs it: Debian's redis-server as one master and one replica,
and three of Debian's redis-sentinel watching them, each on a free loopback port, in a temp
dir, stopped by pid.  Timings are short (the master is judged down after 1 s)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import redis

from tests.conftest import RedisServer, free_port, stop_by_pid
from tests.helpers import wait_for

MASTER_NAME = "streamkeeper"
DOWN_AFTER_MS = 1000  # sentinels judge the master down after this long without an answer
FAILOVER_TIMEOUT_MS = 5000


class Sentinel:
    def __init__(self, directory: str, master_port: int):
        self.port = free_port()
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.config = os.path.join(directory, "sentinel.conf")  # the sentinel rewrites it
        with open(self.config, "w") as handle:
            handle.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory}/sentinel.log\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
        binary = shutil.which("redis-sentinel")
        if binary is None:
            pytest.fail("redis-sentinel is not installed (make test installs it)")
        self.process = subprocess.Popen([binary, self.config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

        def answers() -> bool:
            assert self.process.poll() is None, "redis-sentinel exited"
            try:
                return bool(self.client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, timeout=10, message="redis-sentinel to answer PING")

    def master_port(self) -> int | None:
        try:
            address = self.client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def stop(self) -> None:
        stop_by_pid(self.process)


class SentinelCluster:
    """One master, one replica, three sentinels.  ``addresses``: what redis_sentinels takes."""

    def __init__(self, directory: str):
        self.directory = directory
        self.master = RedisServer(self._dir("master"))
        self.master.start()
        self.replica = RedisServer(self._dir("replica"), ("--replicaof", "127.0.0.1", str(self.master.port)))
        self.replica.start()
        wait_for(self._replica_in_sync, timeout=20, message="the replica to sync with the master")
        self.sentinels = [Sentinel(self._dir(f"sentinel{i}"), self.master.port) for i in range(3)]
        wait_for(self._sentinels_see_everyone, timeout=30, message="the sentinels to find each other and the replica")

    def _dir(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def _replica_in_sync(self) -> bool:
        info = self.replica.client().info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_see_everyone(self) -> bool:
        for sentinel in self.sentinels:
            try:
                master = sentinel.client.execute_command("SENTINEL", "master", MASTER_NAME)
            except redis.RedisError:
                return False
            fields = dict(zip(master[::2], master[1::2])) if isinstance(master, list) else master
            if int(fields.get("num-other-sentinels", 0)) < 2 or int(fields.get("num-slaves", 0)) < 1:
                return False
        return True

    def master_port(self) -> int | None:
        """The master the sentinels agree on (None while they do not)."""
        ports = {s.master_port() for s in self.sentinels}
        return ports.pop() if len(ports) == 1 else None

    def kill_master(self) -> RedisServer:
        """SIGKILL to the master; returns the server that was the master."""
        old = self.master if self.master.port == self.master_port() else self.replica
        stop_by_pid(old.process, sig=9)
        return old

    def wait_failover(self, old_port: int, timeout: float = 30) -> RedisServer:
        """Until the sentinels agree on a new master, and it takes writes; returns it."""

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port:
                return False
            try:
                return redis.Redis(port=port, socket_timeout=1).info("replication").get("role") == "master"
            except redis.RedisError:
                return False

        wait_for(promoted, timeout=timeout, message="the sentinels to promote the replica")
        return self.replica if self.replica.port != old_port else self.master

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.master.stop()
