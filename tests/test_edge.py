"""The edge (issue 18): a real nginx running what `streamctl nginx-config --edge` renders, in
front of real nginx "hosts" that say who they are.  Each channel's playlist and segments
reach one host; a host lost moves only its own channels; a host that closes without an
answer (fenced) is passed over for the next one on the ring."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from demo.stack import toml_value
from tests.conftest import REPO, NginxServer
from tests.helpers import free_port

CHANNELS = range(500, 560)


def host_block(name: str) -> str:
    """A stand-in host: answers every /live/ request with its name, the URI and the
    X-Forwarded-For it was sent."""
    return f'location /live/ {{ default_type text/plain; return 200 "{name} $request_uri $http_x_forwarded_for\\n"; }}'


def start_edge(tmp_path, hosts: list[str]) -> NginxServer:
    directory = tmp_path / "edge"
    directory.mkdir()
    port = free_port()
    config = directory / "streamkeeper.toml"
    values = {"hosts": hosts, "nginx_listen": f"127.0.0.1:{port}", "host_timeout": 10}
    config.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    snippet = directory / "edge.conf"
    subprocess.run(
        [sys.executable, "-m", "streamctl", "nginx-config", "--edge", "--config", str(config), "-o", str(snippet)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return NginxServer(str(directory), f"include {snippet};", port)


def answer(edge: NginxServer, path: str) -> str:
    with urllib.request.urlopen(edge.url(path), timeout=20) as response:
        assert response.status == 200
        return response.read().decode()


def host_of(edge: NginxServer, path: str) -> str:
    return answer(edge, path).split()[0]


def test_each_channel_goes_to_one_host_and_a_lost_host_moves_only_its_own(tmp_path, nginx_factory):
    hosts = [nginx_factory(host_block(f"host{i}")) for i in range(3)]
    edge = start_edge(tmp_path, [f"127.0.0.1:{h.port}" for h in hosts])
    try:
        first = {c: host_of(edge, f"/live/stream_{c}.m3u8?token=t") for c in CHANNELS}
        assert set(first.values()) == {"host0", "host1", "host2"}  # spread over the ring
        for channel in list(CHANNELS)[:15]:  # a channel's segments follow its playlist
            assert host_of(edge, f"/live/stream_{channel}_{channel % 7}.ts") == first[channel]
        # The viewer's query string (its token) and address reach the host.
        assert answer(edge, "/live/stream_500.m3u8?token=abc").split()[1:] == [
            "/live/stream_500.m3u8?token=abc",
            "127.0.0.1",
        ]
        hosts[0].stop()
        after = {c: host_of(edge, f"/live/stream_{c}.m3u8") for c in CHANNELS}
        moved = {c for c in CHANNELS if after[c] != first[c]}
        assert moved == {c for c in CHANNELS if first[c] == "host0"}  # only the lost host's
        assert "host0" not in after.values()
    finally:
        edge.stop()


def test_a_host_that_closes_without_an_answer_is_passed_over(tmp_path, nginx_factory):
    fenced = nginx_factory("location /live/ { return 444; }")  # what a fenced host's nginx does
    hosts = [nginx_factory(host_block(f"host{i}")) for i in range(2)]
    edge = start_edge(tmp_path, [f"127.0.0.1:{h.port}" for h in (fenced, *hosts)])
    try:
        answered = {host_of(edge, f"/live/stream_{c}.m3u8") for c in CHANNELS}
        assert answered == {"host0", "host1"}  # every request answered, none by the fenced host
    finally:
        edge.stop()


def test_the_edge_logs_nothing(tmp_path, nginx_factory):
    host = nginx_factory(host_block("host0"))
    edge = start_edge(tmp_path, [f"127.0.0.1:{host.port}"])
    try:
        host_of(edge, "/live/stream_501.m3u8?token=secret")
        rendered = (tmp_path / "edge" / "edge.conf").read_text()
        assert "access_log off;" in rendered and "secret" not in (tmp_path / "edge" / "error.log").read_text()
    finally:
        edge.stop()
