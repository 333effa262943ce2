"""Fencing (issue 18): a host that cannot renew its Redis lease stops pulling before the lease
could expire anywhere, and does not start again on its own when the partition heals.  A
real egress relay reaches a real redis-server through a forwarder the test cuts; a provider
emulator counts the account's connections."""

from __future__ import annotations

import base64
import http.client
import os
import subprocess
import sys
import urllib.error

import pytest
import redis

from demo.stack import LocalStack, toml_value
from streamstate import egress, keys, runs
from tests.conftest import REPO, stop_by_pid
from tests.fakes.listeners import KeepAliveOrigin
from tests.fakes.provider_emulator import ProviderEmulator
from tests.fakes.tcp_forwarder import TcpForwarder
from tests.helpers import add_channel, ffmpegs_writing, first_request, free_port, wait_for

HOST_TIMEOUT = 4  # the lease expires 4 s after its last renewal; the host is fenced after 2


@pytest.fixture
def provider():
    with ProviderEmulator(limit=1) as emulator:
        yield emulator


@pytest.fixture
def partitioned_relay(tmp_path, redis_server, redis_client):
    """hostB's egress relay, its Redis connection through a forwarder (started after
    redis_client's FLUSHALL, which would take its lease away)."""
    forwarder = TcpForwarder(redis_server.port)
    port = free_port()
    config = tmp_path / "hostB.toml"
    values = {
        "redis_url": f"redis://127.0.0.1:{forwarder.port}/0",
        "host_id": "hostB",
        "host_timeout": HOST_TIMEOUT,
        "hosts": ["127.0.0.1:1", "127.0.0.1:2"],  # a multi-host set-up: fencing on
        "state_dir": str(tmp_path / "state"),
        "egress_listen": f"127.0.0.1:{port}",
        "upstream_allow": ["127.0.0.0/8"],
    }
    config.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    log_path = tmp_path / "egress.log"
    relay = {"port": port, "forwarder": forwarder, "state_dir": values["state_dir"], "log": log_path, "config": config}
    relay["process"] = start_relay(relay)
    yield relay
    stop_by_pid(relay["process"])
    forwarder.close()


def start_relay(relay: dict) -> subprocess.Popen:
    """The relay of ``relay``'s config, its log appended to; returns once it listens."""
    already = relay["log"].read_bytes().count(b"listening on") if relay["log"].exists() else 0
    with open(relay["log"], "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "egress", "--config", str(relay["config"])], cwd=REPO, stdout=log, stderr=log
        )
    wait_for(lambda: relay["log"].read_bytes().count(b"listening on") > already, 20, message="the relay")
    return process


def open_stream_through(relay, url: str) -> http.client.HTTPConnection:
    """A channel's upstream connection through the relay, its answer's head read."""
    token = egress.write_ticket(relay["state_dir"], "9001", None)
    connection = http.client.HTTPConnection("127.0.0.1", relay["port"], timeout=20)
    auth = "Basic " + base64.b64encode(f"9001:{token}".encode()).decode()
    connection.request("GET", url, headers={"Proxy-Authorization": auth})
    answer = connection.getresponse()
    assert answer.status == 200
    return connection


def _request_with_ticket(relay, channel: str, token: str, url: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", relay["port"], timeout=20)
    auth = "Basic " + base64.b64encode(f"{channel}:{token}".encode()).decode()
    connection.request("GET", url, headers={"Proxy-Authorization": auth})
    return connection.getresponse()


def test_a_partitioned_host_cuts_its_provider_connections_before_its_lease_expires(
    partitioned_relay, provider, redis_client
):
    relay = partitioned_relay
    wait_for(lambda: redis_client.exists(keys.host_key("hostB")), message="hostB's lease in Redis")
    # A relay starts fenced; it says when it holds the lease (the line follows the change).
    wait_for(lambda: b"no longer fenced" in relay["log"].read_bytes(), message="the relay to hold the lease")
    connection = open_stream_through(relay, provider.url("alice"))
    wait_for(lambda: provider.open_count("alice") == 1, message="the stream's connection at the provider")

    relay["forwarder"].cut()  # hostB loses Redis; the provider is still reachable
    closed_while_leased = []

    def closed() -> bool:
        if provider.open_count("alice") == 0:
            closed_while_leased.append(bool(redis_client.exists(keys.host_key("hostB"))))
            return True
        return False

    wait_for(closed, timeout=3 * HOST_TIMEOUT, message="hostB's provider connection to close")
    # Closed while its lease still stood: no other host could have taken its slot yet.
    assert closed_while_leased == [True]
    wait_for(lambda: not redis_client.exists(keys.host_key("hostB")), timeout=2 * HOST_TIMEOUT, message="the lease")
    assert b"fenced: this host's Redis lease was not renewed" in relay["log"].read_bytes()
    # While fenced, a new connection is refused, and says why.
    token = egress.write_ticket(relay["state_dir"], "9002", None)
    refused = http.client.HTTPConnection("127.0.0.1", relay["port"], timeout=20)
    refused.request(
        "GET",
        provider.url("bob"),
        headers={"Proxy-Authorization": "Basic " + base64.b64encode(f"9002:{token}".encode()).decode()},
    )
    answer = refused.getresponse()
    assert answer.status == 503 and answer.getheader("X-Streamkeeper-Refused") == "fenced"

    unfenced = relay["log"].read_bytes().count(b"no longer fenced")
    relay["forwarder"].heal()
    wait_for(
        lambda: relay["log"].read_bytes().count(b"no longer fenced") > unfenced,
        timeout=3 * HOST_TIMEOUT,
        message="unfenced",
    )
    wait_for(lambda: redis_client.exists(keys.host_key("hostB")), message="hostB's lease renewed")
    # Healed, it pulls nothing of its own accord: the cut stream stays closed, and its ticket,
    # written before the lease lapsed, is void (an FFmpeg left from before cannot pull again).
    assert provider.open_count("alice") == 0 and provider.max_concurrent.get("alice", 0) == 1
    stale = _request_with_ticket(
        relay, "9001", egress.read_ticket(relay["state_dir"], "9001")["token"], provider.url("alice")
    )
    assert stale.status == 503 and stale.getheader("X-Streamkeeper-Refused") == "fenced"
    # A stream started anew (a new ticket, written by a launcher that still holds it) pulls.
    fresh = _request_with_ticket(
        relay, "9003", egress.write_ticket(relay["state_dir"], "9003", None), provider.url("carol")
    )
    assert fresh.status == 200
    assert provider.violations == []
    connection.close()
    refused.close()


@pytest.fixture
def partitioned_host(tmp_path):
    """A whole host (relay, launcher, nginx, upstream) of a multi-host set-up, its Redis
    reached through a forwarder the test cuts."""
    forwarder = TcpForwarder(0)
    stack = LocalStack(
        str(tmp_path / "hostB"),
        {
            "redis_url": f"redis://127.0.0.1:{forwarder.port}/0",
            "host_id": "hostB",
            "host_timeout": HOST_TIMEOUT,
            "hosts": ["127.0.0.1:1", "127.0.0.1:2"],
        },
    )
    forwarder.target = ("127.0.0.1", stack.redis_port)
    stack.start()
    stack.redis = redis.Redis(port=stack.redis_port, decode_responses=True)
    yield stack, forwarder
    forwarder.heal()
    stack.stop()
    forwarder.close()


def test_a_partitioned_launcher_ends_its_streams_takes_no_start_and_restarts_nothing_when_healed(
    partitioned_host, channel_id
):
    stack, forwarder = partitioned_host
    for part in ("launcher", "egress"):  # a service starts fenced, until its lease is held
        wait_for(lambda: "no longer fenced" in stack.log(part), message=f"{part} to hold the lease")
    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    assert len(ffmpegs_writing(stack, channel_id)) == 1
    forwarder.cut()
    ended_while_leased = []

    def ended() -> bool:
        if ffmpegs_writing(stack, channel_id):
            return False
        ended_while_leased.append(bool(stack.redis.exists(keys.host_key("hostB"))))
        return True

    wait_for(ended, timeout=3 * HOST_TIMEOUT, message="the fenced host's FFmpeg to end")
    assert ended_while_leased == [True]
    playlist = os.path.join(stack.hls_dir, f"stream_{channel_id}.m3u8")
    wait_for(lambda: not os.path.exists(playlist), message="the fenced stream's files to go")
    assert "fenced: this host's Redis lease was not renewed" in stack.log("launcher")
    # A start asked of the launcher: refused, 421 (this host cannot answer), with the reason.
    status, answer = stack.launcher_json(f"/channel/{channel_id}/start")
    assert status == 421 and "host fenced" in str(answer)
    # Through this host's nginx: no answer at all, so an edge would try the next host.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        first_request(stack.playlist_url(channel_id))
    unfenced = {part: stack.log(part).count("no longer fenced") for part in ("launcher", "egress")}
    forwarder.heal()
    for part in ("launcher", "egress"):
        wait_for(
            lambda: stack.log(part).count("no longer fenced") > unfenced[part],
            timeout=3 * HOST_TIMEOUT,
            message=f"{part} unfenced",
        )
    # Nothing of the fenced host's own accord: the stream it ended is not started again.
    assert ffmpegs_writing(stack, channel_id) == []
    answer = first_request(stack.playlist_url(channel_id))
    assert answer[0] == 200, (answer, stack.log("launcher")[-2500:])  # a viewer's request starts it


def test_a_connection_being_set_up_when_the_fence_comes_is_cut_and_refused(tmp_path):
    """Attack finding: the relay checked the fence before connecting and counted the
    connection only after, so one that was connecting when the fence came slipped through."""
    import asyncio

    from egress.relay import EgressRelay
    from streamstate.settings import load_settings

    config = tmp_path / "relay.toml"
    values = {"state_dir": str(tmp_path), "upstream_allow": ["127.0.0.0/8"], "hosts": ["127.0.0.1:1", "127.0.0.1:2"]}
    config.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    settings = load_settings(str(config), environ={})

    async def scenario():
        async def origin(reader, writer):  # sends for as long as it is connected
            try:
                while True:
                    writer.write(b"x" * 100)
                    await writer.drain()
                    await asyncio.sleep(0.05)
            except (ConnectionError, OSError):
                pass

        origin_server = await asyncio.start_server(origin, "127.0.0.1", 0)
        relay = EgressRelay(settings)
        relay.unfence(began=0.0)  # a lease is held
        connecting, go_on = asyncio.Event(), asyncio.Event()
        real_connect = relay.dialer.connect

        async def slow_connect(*args, **kwargs):  # DNS, TCP, a proxy's handshake taking a while
            connecting.set()
            await go_on.wait()
            return await real_connect(*args, **kwargs)

        relay.dialer.connect = slow_connect
        relay_server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
        token = egress.write_ticket(str(tmp_path), "77", None)
        auth = base64.b64encode(f"77:{token}".encode()).decode()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_server.sockets[0].getsockname()[1])
        target = f"127.0.0.1:{origin_server.sockets[0].getsockname()[1]}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        await asyncio.wait_for(connecting.wait(), 10)
        relay.fence()  # the lease lapses while the connection is being set up
        go_on.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        relay_server.close()
        origin_server.close()
        return head, dict(relay.open), len(relay.upstreams)

    head, open_counts, upstreams = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 503") and b"X-Streamkeeper-Refused: fenced" in head
    assert open_counts == {} and upstreams == 0


def test_a_lapse_voids_the_tickets_from_before_it_even_across_a_relay_restart(partitioned_relay, redis_client):
    """Attack findings: a lease lost while the relay held it went unnoticed, and a relay
    restarted after a lapse took the old tickets again when another service had recreated the
    lease first.  A ticket is good only if written within the lease held now."""
    relay = partitioned_relay
    wait_for(lambda: b"no longer fenced" in relay["log"].read_bytes(), message="the relay to hold the lease")
    old_token = egress.write_ticket(relay["state_dir"], "9010", None)
    origin = KeepAliveOrigin(b"ok\n")
    url = f"http://127.0.0.1:{origin.port}/a.ts"
    try:
        assert _request_with_ticket(relay, "9010", old_token, url).status == 200
        # The key is lost (a promoted replica that lacked it, a flush): a new lease begins.
        anew = relay["log"].read_bytes().count(b"held anew")  # once already: its first lease
        redis_client.delete(keys.host_key("hostB"))
        wait_for(lambda: relay["log"].read_bytes().count(b"held anew") > anew, message="the relay to see the new lease")
        refused = _request_with_ticket(relay, "9010", old_token, url)
        assert refused.status == 503 and refused.getheader("X-Streamkeeper-Refused") == "fenced"
        # Restarted after another lapse, with the lease recreated by another service first.
        stop_by_pid(relay["process"])
        unfenced = relay["log"].read_bytes().count(b"no longer fenced")
        newer_token = egress.write_ticket(relay["state_dir"], "9011", None)
        redis_client.delete(keys.host_key("hostB"))
        runs.refresh_host(redis_client, "hostB", HOST_TIMEOUT)  # heartbeatd, say
        relay["process"] = start_relay(relay)
        wait_for(
            lambda: relay["log"].read_bytes().count(b"no longer fenced") > unfenced, message="the new relay to hold it"
        )
        stale = _request_with_ticket(relay, "9011", newer_token, url)
        assert stale.status == 503 and stale.getheader("X-Streamkeeper-Refused") == "fenced"
        fresh = _request_with_ticket(relay, "9012", egress.write_ticket(relay["state_dir"], "9012", None), url)
        assert fresh.status == 200
    finally:
        origin.close()
