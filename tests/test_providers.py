"""Provider accounts (issue: upstreams): a provider emulator on loopback allows 2 connections
per account and counts every violation; a stack of our own (redis-server, nginx, heartbeatd,
the relay, the launcher) with ``[providers.acme]`` max_streams = 2 must never cause one,
while viewers watch, change channel, and leave."""

import json
import os
import threading
import time

import pytest
import redis

from demo.stack import LocalStack
from streamstate import keys
from tests.fakes.provider_emulator import ProviderEmulator
from tests.helpers import ffmpegs_writing, first_request, wait_for

pytestmark = pytest.mark.e2e

LIMIT = 2
PREEMPT_IDLE = 4


class Viewer:
    """A player's playlist requests every half second, with its token, until stopped."""

    def __init__(self, stack, channel, token):
        self.url = stack.playlist_url(channel, f"?token={token}")
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.statuses.append(first_request(self.url)[0])
            self._stop.wait(0.5)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture(scope="module")
def provider():
    emulator = ProviderEmulator(limit=LIMIT).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def acme(provider, tmp_path_factory):
    match = f"http://127.0.0.1:{provider.port}/live/acct/"
    stack = LocalStack(
        str(tmp_path_factory.mktemp("providers")),
        {
            "providers": {"acme": {"match": match, "max_streams": LIMIT}},
            "preempt_idle": PREEMPT_IDLE,
            "viewer_window": 30,
            "flush_interval": 0.2,
        },
        heartbeatd=True,
    ).start()
    stack.redis = redis.Redis(port=stack.redis_port)
    yield stack
    stack.stop()


def add(stack, provider, channel):
    stack.redis.set(
        keys.channel_key(channel),
        json.dumps({"source_url": provider.url("acct", "pass", str(channel)), "quality": "copy"}),
    )


def provider_entry(stack):
    return {p["provider"]: p for p in stack.launcher_json("/streams")[1]["providers"]}["acme"]


def viewers_of(stack, channel) -> int:
    return stack.redis.zcard(keys.viewers_key(channel))


def test_the_account_never_sees_more_than_its_limit(acme, provider):
    for channel in (801, 802, 803, 804):
        add(acme, provider, channel)
    alice, bob = Viewer(acme, 801, "alice"), Viewer(acme, 802, "bob")
    try:
        wait_for(lambda: viewers_of(acme, 801) and viewers_of(acme, 802), 30, message="two watched channels")
        assert provider_entry(acme) == {"provider": "acme", "limit": LIMIT, "channels": ["801", "802"]}

        # Both connections are watched by others: carol's start is refused, nothing stopped.
        status, headers, body = first_request(acme.playlist_url(803, "?token=carol"))
        assert status == 503 and "Retry-After" in headers
        assert body == b"channel 803: provider acme: all 2 connections are in use by watched channels\n"
        assert ffmpegs_writing(acme, 801) and ffmpegs_writing(acme, 802)

        # Alice changes channel: the stream only she watched gives its connection up at once
        # (not after preempt_idle), and she gets the new channel after one cold start.
        alice.stop()
        assert first_request(acme.playlist_url(803, "?token=alice"))[0] == 200
        assert not ffmpegs_writing(acme, 801)
        assert "channel 801: preempted (its only viewer changed channel)" in acme.log("launcher")
        alice = Viewer(acme, 803, "alice")

        # Bob leaves; once his channel has had no request for preempt_idle, dave's start
        # takes its connection.
        bob.stop()
        wait_for(
            lambda: time.time() - float(acme.redis.get(keys.last_access_key(802))) > PREEMPT_IDLE + 0.5,
            30,
            message="channel 802 idle",
        )
        assert first_request(acme.playlist_url(804, "?token=dave"))[0] == 200
        assert "channel 802: preempted (no request for" in acme.log("launcher")
        assert sorted(provider_entry(acme)["channels"]) == ["803", "804"]
        assert provider.violations == [] and provider.max_concurrent["acct"] <= LIMIT
    finally:
        alice.stop()
        bob.stop()
    metrics = first_request(acme.launcher_url("/metrics"))[2].decode()
    assert "streamkeeper_launcher_provider_preempted_total 2.0" in metrics
    assert "streamkeeper_launcher_provider_refused_total 1.0" in metrics


def test_a_slot_of_a_stream_that_no_longer_runs_is_reclaimed(acme, provider):
    """A stream gone without a word (its host crashed, Redis kept its slot): its slot is
    taken back at the next start, with no violation."""
    acme.launcher_json("/streams/stop", "POST")
    acme.redis.hset(
        keys.provider_slots_key("acme"),
        mapping={
            "901": json.dumps({"run_id": "gone", "host": "crashed-host", "at": time.time() - 3600}),
            "902": "junk",
        },
    )
    add(acme, provider, 805)
    add(acme, provider, 806)
    assert first_request(acme.playlist_url(805))[0] == 200
    assert first_request(acme.playlist_url(806))[0] == 200
    assert sorted(acme.redis.hkeys(keys.provider_slots_key("acme"))) == [b"805", b"806"]
    # Every way a stream ends frees its slot: stopped here, or reaped.
    acme.launcher_json("/channel/805/stop", "POST")
    assert provider_entry(acme)["channels"] == ["806"]
    assert provider.violations == []
    acme.launcher_json("/streams/stop", "POST")
    assert provider_entry(acme)["channels"] == []


def test_status_shows_the_providers_slots(acme, provider):
    import subprocess
    import sys

    from tests.conftest import REPO

    add(acme, provider, 807)
    assert first_request(acme.playlist_url(807))[0] == 200
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "status", "--json", "--config", acme.config_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    providers = {p["provider"]: p for p in json.loads(result.stdout)["providers"]}
    assert providers["acme"]["channels"] == ["807"] and providers["acme"]["limit"] == LIMIT
    text = subprocess.run(
        [sys.executable, "-m", "streamctl", "status", "--config", acme.config_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "provider acme: 1/2 connections" in text.stdout
    acme.launcher_json("/streams/stop", "POST")
    assert os.path.isdir(acme.hls_dir)


def test_a_provider_s_server_takes_a_slot_however_it_is_reached(acme, provider):
    """A fallback on the account belongs to the provider (its start waits for a slot like any
    other); a source of no provider that redirects to the provider's server is refused by the
    relay; sources of two providers in one channel are refused outright."""
    viewers = []
    for channel, token in ((811, "erin"), (812, "frank")):
        add(acme, provider, channel)
        viewers.append(Viewer(acme, channel, token))
    try:
        wait_for(lambda: viewers_of(acme, 811) and viewers_of(acme, 812), 30, message="two watched channels")
        dead = f"http://127.0.0.1:{acme.upstream_port}/missing/813.ts"
        acme.redis.set(
            keys.channel_key(813),
            json.dumps({"source_url": dead, "quality": "copy", "fallback_urls": [provider.url("acct", "pass", "813")]}),
        )
        status, _, body = first_request(acme.playlist_url(813, "?token=gina"))
        assert status == 503 and b"provider acme: all 2 connections are in use" in body
        redirect = f"http://127.0.0.1:{acme.upstream_port}/redirect/x?to=" + provider.url("acct", "pass", "814")
        acme.redis.set(keys.channel_key(814), json.dumps({"source_url": redirect, "quality": "copy"}))
        status, _, body = first_request(acme.playlist_url(814, "?token=gina"))
        assert status == 503 and body == b"channel 814: upstream address not allowed\n"
        assert "provider acme, and this stream holds none of its connections" in acme.log("egress")
        # Slots lost from Redis (a restart that kept the records): this host's streams hold
        # theirs again before anyone takes one.
        acme.redis.delete(keys.provider_slots_key("acme"))
        acme.redis.delete(keys.failed_key(813))
        status, _, body = first_request(acme.playlist_url(813, "?token=gina"))
        assert status == 503 and b"provider acme: all 2 connections are in use" in body
        assert provider.violations == [] and provider.max_concurrent["acct"] <= LIMIT
    finally:
        for viewer in viewers:
            viewer.stop()
        acme.launcher_json("/streams/stop", "POST")


@pytest.mark.parametrize("spelling", ["localhost", "127.1", "[::ffff:127.0.0.1]", "2130706433"])
def test_a_provider_s_server_is_known_by_its_address_in_any_spelling(acme, provider, spelling):
    """Finding: a channel naming the provider's server as localhost, 127.1 or
    [::ffff:127.0.0.1] matched no provider, took no slot, and the relay let it through: the
    provider saw 3 connections on a 2-connection account.  Now it is the provider's (its
    start takes a slot, here refused: both are in use) and the provider never sees a third."""
    for channel in (821, 822):
        add(acme, provider, channel)
    viewers = [Viewer(acme, 821, "hana"), Viewer(acme, 822, "ivan")]
    try:
        wait_for(lambda: viewers_of(acme, 821) and viewers_of(acme, 822), 30, message="two watched channels")
        source = provider.url("acct", "pass", "823").replace("127.0.0.1", spelling, 1)
        acme.redis.set(keys.channel_key(823), json.dumps({"source_url": source, "quality": "copy"}))
        status, _, body = first_request(acme.playlist_url(823, "?token=jack"))
        assert status == 503 and b"provider acme: all 2 connections are in use" in body, body
        assert not ffmpegs_writing(acme, 823)
        # Reached by a redirect from a source of no provider: the relay knows the server by
        # the address it connects to, and refuses.
        redirect = f"http://127.0.0.1:{acme.upstream_port}/redirect/x?to=" + source
        acme.redis.set(keys.channel_key(824), json.dumps({"source_url": redirect, "quality": "copy"}))
        status, _, body = first_request(acme.playlist_url(824, "?token=jack"))
        assert status == 503 and body == b"channel 824: upstream address not allowed\n", body
        assert provider.violations == [] and provider.max_concurrent["acct"] <= LIMIT
    finally:
        for viewer in viewers:
            viewer.stop()
        acme.launcher_json("/streams/stop", "POST")
        acme.redis.delete(keys.failed_key(823), keys.failed_key(824))


# -- two accounts on one server (attack on issue 16) ---------------------------------------


def _two_accounts(state_dir: str, port: int):
    from streamstate.settings import load_settings

    return load_settings(
        None,
        {
            "state_dir": state_dir,
            "upstream_allow": "127.0.0.0/8",
            "providers": {
                "acme": {"match": f"http://127.0.0.1:{port}/live/acct/", "max_streams": 2},
                "beta": {"match": f"http://127.0.0.1:{port}/live/other/", "max_streams": 2},
            },
        },
        environ={},
    )


def test_a_stream_with_one_account_s_slot_cannot_fetch_the_other_s(tmp_path):
    """Finding: with two accounts on one server, the relay knew the server (both providers')
    but not the account, so a stream holding beta's slot, redirected to acme's URL, used acme's
    account beyond its limit.  Now a URL under a limited provider's prefix is fetched only by a
    stream holding that provider's slot.  The relay in this process, a real origin."""
    import asyncio
    import base64

    from egress.relay import EgressRelay
    from streamstate import egress
    from tests.fakes.listeners import KeepAliveOrigin

    origin = KeepAliveOrigin(b"segment\n")
    settings = _two_accounts(str(tmp_path), origin.port)
    token = egress.write_ticket(str(tmp_path), "850", None, provider="beta")
    auth = "Basic " + base64.b64encode(f"850:{token}".encode()).decode()

    async def ask(port, path):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET http://127.0.0.1:{origin.port}{path} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {auth}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    async def scenario():
        server = await asyncio.start_server(EgressRelay(settings).handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await ask(port, "/live/other/1.ts"), await ask(port, "/live/acct/1.ts")
        finally:
            server.close()

    try:
        own, others = asyncio.run(scenario())
    finally:
        origin.close()
    assert own.startswith(b"HTTP/1.1 200") and own.endswith(b"segment\n")
    assert others.startswith(b"HTTP/1.1 403") and b"X-Streamkeeper-Refused: address" in others
    assert [head.split()[1] for head in origin.heads] == ["/live/other/1.ts"]


def test_a_record_naming_one_provider_for_another_s_sources_is_refused():
    """A channel record saying provider beta for a source under acme's prefix would take beta's
    slot and use acme's account: refused with a clear error."""
    from streamstate.channels import ChannelError, parse_channel
    from streamstate.upstreams import provider_of

    providers = _two_accounts("/nonexistent", 8080).providers
    own = parse_channel(
        "851", json.dumps({"source_url": "http://127.0.0.1:8080/live/other/851.ts", "provider": "beta"})
    )
    assert provider_of(own, providers).name == "beta"
    wrong = parse_channel(
        "852", json.dumps({"source_url": "http://127.0.0.1:8080/live/acct/852.ts", "provider": "beta"})
    )
    with pytest.raises(ChannelError, match="channel 852: its sources belong to provider acme, not beta"):
        provider_of(wrong, providers)
