"""Several streaming hosts on loopback, as issue 18's proof runs them: each host a LocalStack
of its own (hls_dir, launcher, relay, nginx, heartbeatd, reaper, host_id), all sharing one
Redis (through Sentinel, or a plain URL per host so a test can put a forwarder in one
host's way), and an edge nginx rendered by `streamctl nginx-config --edge` in front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from demo.stack import LocalStack, toml_value
from tests.conftest import REPO, NginxServer, stop_by_pid
from tests.helpers import children_of, ffmpeg_processes, free_port, wait_for

HOST_TIMEOUT = 10  # above twice a failover here (down-after 1 s, then the election)

# Short timings for every host (as the shared stack's), a reaper every second.
HOST_SETTINGS = {
    "host_timeout": HOST_TIMEOUT,
    "reaper_interval": 1,
    "idle_timeout": 120,
    "edge_from": ["127.0.0.1/32"],
}


class Cluster:
    """``shared``: settings of every host and the edge (the shared Redis: redis_sentinels, or
    redis_url; providers); ``redis_for_host``: a host's own redis_url (a forwarder), by index."""

    def __init__(self, work: str, count: int, shared: dict, redis_for_host: dict[int, str] | None = None):
        self.work = work
        # The channels' live source, of no host's: a host that dies takes none with it.
        self.upstream_port = free_port()
        self.upstream = subprocess.Popen(
            [sys.executable, "-m", "demo.upstream", "--port", str(self.upstream_port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ports = [free_port() for _ in range(count)]
        self.addresses = [f"127.0.0.1:{port}" for port in ports]
        self.hosts: list[LocalStack] = []
        try:
            for index, port in enumerate(ports):
                settings = {**HOST_SETTINGS, **shared, "host_id": f"host{index}", "hosts": self.addresses}
                if redis_for_host and index in redis_for_host:
                    settings["redis_url"] = redis_for_host[index]
                host = LocalStack(
                    os.path.join(work, f"host{index}"),
                    settings,
                    heartbeatd=True,
                    reaper=True,
                    nginx_port=port,
                    own_redis=False,
                )
                self.hosts.append(host.start())
            for host in self.hosts:  # a service starts fenced, until it holds the lease
                for part in ("launcher", "egress"):
                    wait_for(lambda: "no longer fenced" in host.log(part), timeout=30, message=f"{part} lease")
            self.edge = self._start_edge(shared)
        except BaseException:
            self.stop()
            raise

    def _start_edge(self, shared: dict) -> NginxServer:
        directory = os.path.join(self.work, "edge")
        os.makedirs(directory, exist_ok=True)
        port = free_port()
        values = {**shared, "hosts": self.addresses, "nginx_listen": f"127.0.0.1:{port}", "host_timeout": HOST_TIMEOUT}
        config = os.path.join(directory, "streamkeeper.toml")
        with open(config, "w") as handle:
            handle.writelines(f"{key} = {toml_value(value)}\n" for key, value in values.items())
        snippet = os.path.join(directory, "edge.conf")
        subprocess.run(
            [sys.executable, "-m", "streamctl", "nginx-config", "--edge", "--config", config, "-o", snippet],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        return NginxServer(directory, f"include {snippet};", port)

    def source(self, name: str) -> str:
        return f"http://127.0.0.1:{self.upstream_port}/live/{name}.ts"

    def url(self, channel_id, query: str = "") -> str:
        return self.edge.url(f"/live/stream_{channel_id}.m3u8{query}")

    def ffmpegs_of(self, channel_id) -> list[int]:
        """The pids of every FFmpeg writing the channel, on any host."""
        outputs = {
            os.path.join(host.hls_dir, f"stream_{channel_id}{suffix}")
            for host in self.hosts
            for suffix in (".ffmpeg.m3u8", ".m3u8")
        }
        return sorted(pid for pid, argv in ffmpeg_processes() if argv and argv[-1] in outputs)

    def host_running(self, channel_id) -> int | None:
        """The index of the host whose FFmpeg writes the channel (None: none does)."""
        for index, host in enumerate(self.hosts):
            if any(
                argv and argv[-1].startswith(os.path.join(host.hls_dir, f"stream_{channel_id}."))
                for _, argv in ffmpeg_processes()
            ):
                return index
        return None

    def kill_host(self, index: int) -> None:
        """The host dies: every process of it at once (SIGKILL), its FFmpegs too."""
        host = self.hosts[index]
        doomed = []
        for process in host.processes.values():
            if process.poll() is None:
                doomed += [process.pid, *children_of(process.pid)]  # nginx's workers outlive their master
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, argv in ffmpeg_processes():
            if argv and argv[-1].startswith(host.hls_dir):
                os.kill(pid, signal.SIGKILL)
        for process in host.processes.values():
            process.wait(timeout=10)

    def stop(self) -> None:
        edge = getattr(self, "edge", None)
        if edge is not None:
            edge.stop()
        for host in self.hosts:
            host.stop()
        stop_by_pid(self.upstream)
