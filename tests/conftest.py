"""Fixtures start their own servers on free loopback ports in temp dirs and stop them by pid."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import redis

from demo.stack import LocalStack, json_request, port_open, redis_server_argv, toml_value, write_nginx_conf
from streamstate.nginx_config import log_format_directive
from tests.helpers import ffmpeg_processes, free_port, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Test tiers (markers in setup.cfg): a module marks itself `unit` (pure logic) or `e2e` (a
# whole stack of its own); any other test is `e2e` if it uses the shared stack, else
# `integration` (a redis-server, nginx, FFmpeg or subprocess of its own).  `make test-fast`
# runs the unit tier.
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(
                pytest.mark.e2e if "stack" in getattr(item, "fixturenames", ()) else pytest.mark.integration
            )


def stop_by_pid(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """The fixtures' one stop rule: ``sig``, wait ``timeout``, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """A redis-server of our own: start, stop (by pid), start again on the same port."""

    def __init__(self, directory: str, extra_args: tuple[str, ...] = ()):
        self.directory = directory
        self.port = free_port()
        self.extra_args = extra_args  # more of redis-server's options (a replica's replicaof)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.process = subprocess.Popen(
            [*redis_server_argv(self.port, self.directory), "--loglevel", "warning", *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def answers():
            try:
                return client.ping()
            except redis.RedisError:
                assert self.process.poll() is None, "redis-server exited"
                return False

        wait_for(answers, timeout=10, message="redis-server to answer PING")

    def stop(self) -> None:
        stop_by_pid(self.process)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


# Channel ids handed to tests: fresh for each test, never one a test spells by hand (those
# stay below this), so tests sharing one stack never meet on a channel.
FIRST_FIXTURE_CHANNEL_ID = 500_000
_channel_ids = itertools.count(FIRST_FIXTURE_CHANNEL_ID)


@pytest.fixture
def channel_id() -> str:
    """A channel id no other test of this session uses."""
    return str(next(_channel_ids))


@pytest.fixture
def channel_ids():
    """For a test of several channels: each call, a channel id no other test uses."""
    return lambda: str(next(_channel_ids))


@pytest.fixture(scope="session")
def redis_server():
    directory = tempfile.mkdtemp(prefix="sk-redis-")
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server for one test (tests that stop and restart it)."""
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


class Daemon:
    """A service run as a real subprocess (``python -m <module>``), stopped by pid."""

    def __init__(self, module: str, args: list[str], env: dict | None = None):
        self._log = tempfile.NamedTemporaryFile(prefix=f"sk-{module}-", suffix=".log", delete=False)
        self.log_path = self._log.name
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        stop_by_pid(self.process, sig, timeout)
        self._log.close()
        return self.process.returncode


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(module: str, *args: str, env: dict | None = None) -> Daemon:
        daemon = Daemon(module, list(args), env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL)
        try:
            os.unlink(daemon.log_path)
        except OSError:
            pass


class NginxServer:
    """A real nginx on a free loopback port, its config (pid, logs, temp files) in
    ``directory``, stopped by pid.  ``http_body`` goes in its http {} block."""

    def __init__(self, directory: str, http_body: str, port: int):
        self.directory, self.port = directory, port
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            pytest.fail("nginx is not installed (make test installs it)")
        conf = write_nginx_conf(directory, http_body)
        self.process = subprocess.Popen(
            [binary, "-p", directory, "-c", conf, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def listening():
            assert self.process.poll() is None, self.process.stderr.read().decode()
            return port_open(self.port)

        wait_for(listening, timeout=10, message="nginx to listen")

    @classmethod
    def with_server_block(cls, directory: str, server_block: str) -> "NginxServer":
        """Our log format and one server {} of the test's."""
        port = free_port()
        return cls(
            directory,
            f"""{log_format_directive()}
    server {{
        listen 127.0.0.1:{port};
        {server_block}
    }}""",
            port,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        stop_by_pid(self.process, signal.SIGQUIT)  # nginx: graceful shutdown


@pytest.fixture
def nginx_factory(tmp_path):
    servers: list[NginxServer] = []

    def start(server_block: str) -> NginxServer:
        directory = tmp_path / f"nginx{len(servers)}"
        directory.mkdir()
        server = NginxServer.with_server_block(str(directory), server_block)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def stack():
    """The whole stack (redis-server, live upstream, launcher, nginx with the rendered
    snippet), shared by the end-to-end tests; each test uses channel ids of its own."""
    work = tempfile.mkdtemp(prefix="sk-stack-")
    stack = LocalStack(work).start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    yield stack
    stack.stop()
    assert not [p for p in ffmpeg_processes() if work in " ".join(p[1])], "FFmpeg left running"
    shutil.rmtree(work, ignore_errors=True)


class RenderedNginx(NginxServer):
    """nginx running exactly what `streamctl nginx-config` renders for ``settings``."""

    def __init__(self, directory: str, settings: dict):
        port = free_port()
        values = {
            "hls_dir": os.path.join(directory, "hls"),
            "access_log": os.path.join(directory, "logs", "streams_access.log"),
            "nginx_listen": f"127.0.0.1:{port}",
            **settings,
        }
        os.makedirs(values["hls_dir"], exist_ok=True)
        os.makedirs(os.path.dirname(values["access_log"]), exist_ok=True)
        config = os.path.join(directory, "streamkeeper.toml")
        with open(config, "w") as handle:
            handle.writelines(f"{key} = {toml_value(value)}\n" for key, value in values.items())
        snippet = os.path.join(directory, "streamkeeper.conf")
        subprocess.run(
            [sys.executable, "-m", "streamctl", "nginx-config", "--config", config, "--output", snippet],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        super().__init__(directory, f"include {snippet};", port)


@pytest.fixture
def rendered_nginx(tmp_path):
    servers: list[RenderedNginx] = []

    def start(settings: dict) -> RenderedNginx:
        directory = tmp_path / f"rendered{len(servers)}"
        directory.mkdir()
        server = RenderedNginx(str(directory), settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class ExtraLauncher:
    """A second stream-launcher on the stack's Redis, with settings of the test's own
    (max_streams, profiles, hls_dir ...), reached directly on its own port."""

    def __init__(self, stack, directory: str, overrides: dict):
        self.port = free_port()
        # A host of its own (a launcher adopts its host's runs: the stack's are not its own).
        values = {
            **stack.settings,
            "launcher_listen": f"127.0.0.1:{self.port}",
            "host_id": f"extra-{self.port}",
            **overrides,
        }
        self.settings = values
        self.hls_dir = values["hls_dir"]
        os.makedirs(self.hls_dir, exist_ok=True)
        config = self.config_path = os.path.join(directory, "launcher.toml")
        with open(config, "w") as handle:
            handle.writelines(f"{key} = {toml_value(value)}\n" for key, value in values.items())
        self.log_path = os.path.join(directory, "launcher.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "launcher", "--config", config], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(
            lambda: self.process.poll() is None and port_open(self.port),
            timeout=20,
            message="the extra launcher to listen",
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def json(self, path: str, method: str = "GET", body: dict | None = None):
        return json_request(self.url(path), method, body)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.json("/streams/stop", "POST")  # streams outlive the launcher
            except OSError:
                pass
            stop_by_pid(self.process, signal.SIGTERM, 30)


@pytest.fixture
def extra_launcher(stack, tmp_path):
    started: list[ExtraLauncher] = []

    def start(**overrides) -> ExtraLauncher:
        directory = tmp_path / f"launcher{len(started)}"
        directory.mkdir()
        launcher = ExtraLauncher(stack, str(directory), overrides)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.stop()
