"""The whole stack on loopback, for ``make demo``, the end-to-end tests and the benchmarks.

Everything runs from a work directory of its own (no root-owned paths) on free
loopback ports: a redis-server, the live upstream (demo.upstream), the egress
relay, the launcher, nginx with the config ``streamctl nginx-config`` renders, and
optionally heartbeatd.  Each is started as a child process and stopped by pid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Ports for the stack's listeners come from below the kernel's ephemeral range (32768 and
# up on Linux): an outgoing connection (FFmpeg to the relay, a player to nginx) never takes
# one in the moment between choosing it and binding it.
LISTEN_PORTS = range(20000, 32000)


def free_port(preferred: int | None = None) -> int:
    """A port free to listen on: ``preferred`` if it is (as nginx binds it: one whose last
    connections wait in TIME_WAIT is free), else one of LISTEN_PORTS."""
    candidates = ([preferred] if preferred else []) + random.sample(LISTEN_PORTS, 200)
    for port in candidates:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition, timeout: float, what: str, process: subprocess.Popen | None = None, log_path: str | None = None
):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = open(log_path, errors="replace").read()[-2000:] if log_path else ""
            raise RuntimeError(f"{what}: the process exited ({process.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_nginx_conf(directory: str, http_body: str) -> str:
    """A main nginx.conf that keeps everything (pid, logs, temp files) inside ``directory``."""
    conf = os.path.join(directory, "nginx.conf")
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read our temp dirs
    with open(conf, "w") as handle:
        handle.write(f"""{user}pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
worker_processes 1;
events {{ worker_connections 2048; }}
http {{
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    access_log off;
    {http_body}
}}
""")
    return conf


def redis_server_argv(port: int, directory: str, *, persistent: bool = False) -> list[str]:
    """A redis-server of the tests, the demo and the benchmarks: loopback, its files in
    ``directory``; ``persistent``: an append-only file, as a host's must keep."""
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent else ["--save", "", "--appendonly", "no"]
    )
    return [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        directory,
        *persistence,
    ]


class LocalStack:
    """``own_sessions``: each part in a session of its own, so a terminal's Ctrl-C (SIGINT to
    the whole foreground process group) reaches only whoever runs the stack, which then
    stops every stream and every part in order (the demo).  ``persistent_redis``: Redis
    keeps an append-only file in the work directory (as a host's must).  ``own_redis`` False:
    the settings name a Redis the stack does not start (several hosts share one)."""

    PARTS = ("redis", "upstream", "egress", "launcher", "nginx", "heartbeatd", "reaper")

    def __init__(
        self,
        work_dir: str,
        settings: dict | None = None,
        *,
        heartbeatd: bool = False,
        reaper: bool = False,
        nginx_port: int | None = None,
        own_sessions: bool = False,
        persistent_redis: bool = False,
        own_redis: bool = True,
    ):
        self.work = os.path.abspath(work_dir)
        os.makedirs(self.work, exist_ok=True)
        self.hls_dir = os.path.join(self.work, "hls")
        os.makedirs(self.hls_dir, exist_ok=True)
        self.redis_port = free_port()
        self.upstream_port = free_port()
        self.launcher_port = free_port()
        self.egress_port = free_port()
        self.nginx_port = free_port(nginx_port)
        self.with_heartbeatd = heartbeatd
        self.with_reaper = reaper
        self.own_sessions = own_sessions
        self.persistent_redis = persistent_redis
        # False: the settings name a Redis of someone else's (shared by several hosts, or
        # reached through sentinels); this stack starts none.
        self.own_redis = own_redis
        self.processes: dict[str, subprocess.Popen] = {}
        self.settings = {
            "redis_url": f"redis://127.0.0.1:{self.redis_port}/0",
            "hls_dir": self.hls_dir,
            "access_log": os.path.join(self.work, "logs", "streams_access.log"),
            "state_dir": os.path.join(self.work, "state"),
            "log_dir": os.path.join(self.work, "logs", "ffmpeg"),
            "launcher_listen": f"127.0.0.1:{self.launcher_port}",
            "egress_listen": f"127.0.0.1:{self.egress_port}",
            # The upstreams here are on loopback, which upstream_deny refuses by default
            # (Redis and our own services stay refused whatever this says).
            "upstream_allow": ["127.0.0.0/8"],
            "nginx_listen": f"127.0.0.1:{self.nginx_port}",
            "hls_time": 1,
            "hls_init_time": 1,
            "hls_list_size": 4,
            "start_timeout": 15,
            "flush_interval": 0.5,
            # The tests and benchmarks start dozens of `copy` streams of a 320x180 source
            # (about 1 % of a core each), far under what max_streams' default is sized for.
            "max_streams": 64,
            # ... and fire a hundred first requests at once from one address.
            "start_rate_limit": 0,
            **(settings or {}),
        }
        os.makedirs(os.path.dirname(self.settings["access_log"]), exist_ok=True)
        self.config_path = os.path.join(self.work, "streamkeeper.toml")
        with open(self.config_path, "w") as handle:
            for key, value in self.settings.items():
                handle.write(f"{key} = {toml_value(value)}\n")

    # -- urls ------------------------------------------------------------------------
    def upstream_url(self, name: str = "demo") -> str:
        return f"http://127.0.0.1:{self.upstream_port}/live/{name}.ts"

    def nginx_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.nginx_port}{path}"

    def launcher_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.launcher_port}{path}"

    def playlist_url(self, channel_id, query: str = "") -> str:
        return self.nginx_url(f"/live/stream_{channel_id}.m3u8{query}")

    # -- life cycle --------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = os.path.join(self.work, f"{name}.log")
        log = open(log_path, "ab")
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=self.own_sessions,
            env={**os.environ, "STREAMKEEPER_CONFIG": self.config_path},
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        with open(os.path.join(self.work, f"{name}.log"), errors="replace") as handle:
            return handle.read()

    def start(self) -> "LocalStack":
        """Every part: Redis first (the others need it), then the rest at once, nginx last,
        and then each of them listening."""
        try:
            parts = self.parts()
            if self.own_redis:
                self.start_part("redis")
            for name in parts:
                if name not in ("redis", "nginx"):
                    self.start_part(name, wait=False)
            self.start_part("nginx")
            for name in ("upstream", "egress", "launcher"):
                self._wait_listening(name)
        except BaseException:
            self.stop()
            raise
        return self

    def parts(self) -> list[str]:
        """The parts this stack runs, in the order they start."""
        return [
            name
            for name in self.PARTS
            if (name != "heartbeatd" or self.with_heartbeatd)
            and (name != "reaper" or self.with_reaper)
            and (name != "redis" or self.own_redis)
        ]

    def start_part(self, name: str, *, wait: bool = True) -> subprocess.Popen:
        """One part (again); with ``wait``, returns once it listens (those that listen)."""
        modules = {
            "upstream": ["demo.upstream", "--port", str(self.upstream_port)],
            "egress": ["egress", "--config", self.config_path],
            "launcher": ["launcher", "--config", self.config_path],
            "heartbeatd": ["heartbeatd", "--config", self.config_path],
            "reaper": ["reaper", "--config", self.config_path],
        }
        if name == "redis":
            return self._start_redis()
        if name == "nginx":
            return self._start_nginx()
        if name not in modules:
            raise ValueError(f"no part {name!r}")
        if name == "heartbeatd":
            open(self.settings["access_log"], "a").close()
        process = self._spawn(name, [sys.executable, "-m", *modules[name]])
        if wait:
            self._wait_listening(name)
        return process

    def _wait_listening(self, name: str) -> None:
        ports = {"upstream": self.upstream_port, "egress": self.egress_port, "launcher": self.launcher_port}
        if name in ports:
            wait_until(
                lambda: port_open(ports[name]),
                20,
                f"the {name}",
                self.processes[name],
                os.path.join(self.work, f"{name}.log"),
            )

    def _start_redis(self) -> subprocess.Popen:
        directory = os.path.join(self.work, "redis")
        os.makedirs(directory, exist_ok=True)
        process = self._spawn("redis", redis_server_argv(self.redis_port, directory, persistent=self.persistent_redis))
        wait_until(
            lambda: port_open(self.redis_port), 20, "redis-server", process, os.path.join(self.work, "redis.log")
        )
        return process

    def _start_nginx(self) -> subprocess.Popen:
        directory = os.path.join(self.work, "nginx")
        os.makedirs(directory, exist_ok=True)
        snippet = os.path.join(directory, "streamkeeper.conf")
        subprocess.run(
            [sys.executable, "-m", "streamctl", "nginx-config", "--config", self.config_path, "--output", snippet],
            cwd=REPO,
            check=True,
            capture_output=True,
            env={**os.environ, "STREAMKEEPER_CONFIG": self.config_path},
        )
        conf = write_nginx_conf(directory, f"include {snippet};")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        process = self._spawn("nginx", [nginx, "-p", directory, "-c", conf, "-g", "daemon off;"])
        wait_until(lambda: port_open(self.nginx_port), 20, "nginx", process, os.path.join(self.work, "nginx.log"))
        return process

    def stop(self) -> None:
        """Every stream first (they outlive the launcher), then each process by pid."""
        launcher = self.processes.get("launcher")
        if launcher is not None and launcher.poll() is None:
            try:
                self.launcher_json("/streams/stop", "POST")
            except OSError:
                pass
        for name in ["reaper", "heartbeatd", "nginx", "launcher", "egress", "upstream", "redis"]:
            if name in self.processes:
                self.stop_process(name)

    def start_egress(self) -> subprocess.Popen:
        return self.start_part("egress")

    def stop_process(self, name: str) -> None:
        """One of the stack's processes, stopped by its pid (SIGTERM, then SIGKILL)."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart_launcher(self, signum: int = signal.SIGTERM) -> subprocess.Popen:
        """The launcher stopped by ``signum`` and started again (its streams run on)."""
        process = self.processes["launcher"]
        process.send_signal(signum)
        process.wait(timeout=30)
        return self.start_part("launcher")

    @property
    def nginx_conf(self) -> str:
        """The main nginx.conf of the stack's nginx (`streamctl doctor --nginx-conf` reads it)."""
        return os.path.join(self.work, "nginx", "nginx.conf")

    def launcher_json(self, path: str, method: str = "GET", body: dict | None = None):
        return json_request(self.launcher_url(path), method, body)


def json_request(url: str, method: str = "GET", body: dict | None = None):
    """(status, decoded JSON or text) of one request that asks for JSON."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Accept": "application/json", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload)
        except ValueError:
            return exc.code, payload.decode(errors="replace")
