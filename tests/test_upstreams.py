"""Upstreams (issue: upstreams): proxies that carry FFmpeg's traffic and fail closed, where a
source may connect, fallback sources, HLS sources, resolvers - against the real stack
(redis-server, nginx with the rendered snippet, the egress relay, the launcher, FFmpeg)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from streamstate import keys
from tests.conftest import REPO
from tests.fakes.hls_origin import HLSOrigin
from tests.fakes.listeners import KeepAliveOrigin, RecordingListener
from tests.fakes.socks5_server import Socks5Server
from tests.fakes.tls_relay import TLSRelay
from tests.helpers import add_channel, decode, ffmpegs_writing, first_request, streamctl, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "Pr0xyPass"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plays(stack, channel_id, seconds: float = 3) -> bool:
    """ffmpeg decodes ``seconds`` of the channel through nginx (a cold start included)."""
    return decode(stack.playlist_url(channel_id), seconds).returncode == 0


@pytest.fixture
def socks():
    server = Socks5Server("streamer", PASSWORD, names={"upstream.test": "127.0.0.1"})
    yield server
    server.close()


@pytest.mark.parametrize(
    "scheme, host, atyp", [("socks5h", "upstream.test", "domain"), ("socks5", "127.0.0.1", "ipv4")]
)
def test_a_socks_proxy_carries_ffmpeg_s_traffic(stack, socks, scheme, host, atyp):
    """socks5h: the proxy resolves the name (only its DNS knows upstream.test); socks5: the
    relay resolves, checks the address and asks for that address."""
    channel = 701 if scheme == "socks5h" else 702
    source = f"http://{host}:{stack.upstream_port}/live/socks{channel}.ts"
    add_channel(stack, channel, source_url=source, proxy=f"{scheme}://streamer:{PASSWORD}@127.0.0.1:{socks.port}")
    assert first_request(stack.playlist_url(channel))[0] == 200
    assert {"atyp": atyp, "host": host, "port": stack.upstream_port, "user": "streamer", "ok": True} in socks.requests
    streams = {s["id"]: s for s in stack.launcher_json("/streams")[1]["streams"]}
    assert streams[str(channel)]["state"] == "running"
    assert PASSWORD not in stack.log("launcher") + stack.log("egress")
    stack.launcher_json(f"/channel/{channel}/stop", "POST")


@pytest.mark.parametrize("case", ["dead", "bad password"])
def test_a_proxy_that_cannot_be_used_starts_nothing_and_no_direct_connection(stack, socks, case):
    listener = RecordingListener()
    channel = 703 if case == "dead" else 704
    proxy = (
        f"socks5h://streamer:{PASSWORD}@127.0.0.1:{closed_port()}"
        if case == "dead"
        else f"socks5h://streamer:wrong{PASSWORD}@127.0.0.1:{socks.port}"
    )
    try:
        add_channel(stack, channel, source_url=listener.url(f"/live/{channel}.ts"), proxy=proxy)
        status, headers, body = first_request(stack.playlist_url(channel))
        assert status == 503 and body == f"channel {channel}: upstream proxy unusable\n".encode()
        assert "Retry-After" in headers
        assert listener.connections == 0  # never a direct connection instead
        assert not ffmpegs_writing(stack, channel)
        egress_log = stack.log("egress")
        assert f"channel {channel}: refused a connection" in egress_log
        assert "socks5h://127.0.0.1:" in egress_log and PASSWORD not in egress_log + stack.log("launcher")
        if case == "bad password":
            assert socks.auth_failures >= 1 and not socks.requests
    finally:
        listener.close()
        stack.redis.delete(keys.failed_key(channel))


@pytest.fixture
def http_proxy(stack):
    """A second egress relay, serving as an authenticating http:// proxy: its credentials
    are a ticket of a channel of its own (7050)."""
    from streamstate import egress

    port = closed_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "egress", "--config", stack.config_path, "--listen", f"127.0.0.1:{port}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    token = egress.write_ticket(stack.settings["state_dir"], "7050", None)
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 20, message="a second relay")
    yield f"http://7050:{token}@127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=20)
    egress.delete_ticket(stack.settings["state_dir"], "7050")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_http_proxy_carries_http_and_https_sources(stack, tmp_path, http_proxy, scheme):
    """http: an absolute-form request with the proxy's credentials; https: CONNECT."""
    channel = 705 if scheme == "http" else 706
    relay = TLSRelay(str(tmp_path), "127.0.0.1", stack.upstream_port)
    source = (
        stack.upstream_url(f"proxied{channel}")
        if scheme == "http"
        else f"https://127.0.0.1:{relay.port}/live/proxied{channel}.ts"
    )
    try:
        add_channel(stack, channel, source_url=source, proxy=http_proxy, tls_verify=False)
        assert first_request(stack.playlist_url(channel))[0] == 200, stack.log("launcher")[-1500:]
        stack.launcher_json(f"/channel/{channel}/stop", "POST")
        # The same proxy with a wrong password: refused by the proxy, reported as such.
        add_channel(stack, channel, source_url=source, proxy=http_proxy.replace("7050:", "7050:x"), tls_verify=False)
        status, _, body = first_request(stack.playlist_url(channel))
        assert status == 503 and body == f"channel {channel}: upstream proxy unusable\n".encode()
    finally:
        relay.close()
        stack.redis.delete(keys.failed_key(channel))


# -- where a source may connect ----------------------------------------------------------


def test_a_source_on_redis_s_port_is_refused_even_when_loopback_is_allowed(stack):
    add_channel(stack, 710, source_url=f"http://127.0.0.1:{stack.redis_port}/")
    status, _, body = first_request(stack.playlist_url(710))
    assert status == 503 and body == b"channel 710: upstream address not allowed\n"
    assert f"127.0.0.1:{stack.redis_port} is one of this host's own services" in stack.log("egress")
    assert "SECURITY ATTACK" not in stack.log("redis")
    stack.redis.delete(keys.failed_key(710))


@pytest.mark.parametrize(
    "channel, target, address",
    [
        (711, "http://169.254.169.254/latest/meta-data/", "169.254.169.254:80"),
        (712, "http://[::1]:{port}/live/x.ts", "[::1]:{port}"),
        (713, "http://0.0.0.0:{port}/live/x.ts", "0.0.0.0:{port}"),
    ],
)
def test_a_redirect_to_a_denied_address_is_refused(stack, channel, target, address):
    target, address = (t.format(port=stack.upstream_port) for t in (target, address))
    add_channel(stack, channel, source_url=f"http://127.0.0.1:{stack.upstream_port}/redirect/x?to={target}")
    status, _, body = first_request(stack.playlist_url(channel))
    assert status == 503 and body == f"channel {channel}: upstream address not allowed\n".encode()
    assert f"channel {channel}: refused a connection to {address}" in stack.log("egress")
    stack.redis.delete(keys.failed_key(channel))


def test_hls_segments_on_a_denied_address_are_refused(stack, tmp_path):
    origin = HLSOrigin(str(tmp_path / "hls"), segment_base=f"http://[::1]:{closed_port()}/")
    try:
        add_channel(stack, 714, source_url=origin.url)
        status, _, body = first_request(stack.playlist_url(714))
        assert status == 503 and body == b"channel 714: upstream address not allowed\n"
        assert "/index.m3u8" in origin.paths  # the playlist itself was fetched
    finally:
        origin.close()
        stack.redis.delete(keys.failed_key(714))


def test_the_relay_refuses_strangers(stack):
    """Without a ticket's token the relay is no open proxy: 407."""
    with socket.create_connection(("127.0.0.1", stack.egress_port), timeout=10) as sock:
        sock.sendall(
            f"GET {stack.upstream_url('x')} HTTP/1.1\r\nHost: x\r\n"
            "Proxy-Authorization: Basic NzE1Om5vcGU=\r\n\r\n".encode()
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 407 ")


# -- sources -------------------------------------------------------------------------------


def test_failover_from_a_403_source_to_a_live_one(stack):
    forbidden = f"http://127.0.0.1:{stack.upstream_port}/forbidden/720.ts?password={PASSWORD}"
    result = streamctl(
        stack, "channels", "add", "720", forbidden, "--quality", "copy", "--fallback", stack.upstream_url("fallback720")
    )
    assert result.returncode == 0, result.stderr
    assert first_request(stack.playlist_url(720))[0] == 200
    entry = {s["id"]: s for s in stack.launcher_json("/streams")[1]["streams"]}["720"]
    assert entry["source"].endswith("/…/fallback720.ts") and PASSWORD not in json.dumps(entry)
    log = stack.log("launcher")
    assert "channel 720: source 1/2 (http://127.0.0.1:" in log and "upstream refused: HTTP 403" in log
    # Started again within source_cooldown: the 403 source is skipped, not asked again.
    stack.launcher_json("/channel/720/stop", "POST")
    assert first_request(stack.playlist_url(720))[0] == 200
    assert stack.log("launcher").count("channel 720: source 1/2") == 1
    stack.launcher_json("/channel/720/stop", "POST")


def test_every_source_failing_is_one_503(stack):
    add_channel(
        stack,
        721,
        source_url=f"http://127.0.0.1:{stack.upstream_port}/forbidden/721.ts",
        fallback_urls=[f"http://127.0.0.1:{stack.upstream_port}/missing/721.ts"],
    )
    status, _, body = first_request(stack.playlist_url(721))
    assert status == 503 and body == b"channel 721: upstream refused: HTTP 404\n"
    assert not ffmpegs_writing(stack, 721)
    stack.redis.delete(keys.failed_key(721))


@pytest.mark.parametrize("kind", ["plain", "aes-128", "https segments"])
def test_hls_sources_play_through_nginx(stack, tmp_path, kind):
    """An HLS source, AES-128 encrypted (its key fetched through the relay too), and an
    http playlist whose segments are https (a self-signed TLS relay in front of the origin)."""
    channel = {"plain": 730, "aes-128": 731, "https segments": 732}[kind]
    relay = TLSRelay(str(tmp_path), "127.0.0.1", 9) if kind == "https segments" else None
    origin = HLSOrigin(
        str(tmp_path / "hls"),
        encrypt=kind == "aes-128",
        segment_base=f"https://127.0.0.1:{relay.port}/" if relay else None,
    )
    if relay is not None:
        relay.upstream = ("127.0.0.1", origin.port)
    try:
        add_channel(stack, channel, source_url=origin.url)
        assert plays(stack, channel), stack.log("launcher")[-2000:]
        if kind == "aes-128":
            assert "/key.bin" in origin.paths
        if kind == "https segments":
            assert any(p.endswith(".ts") for p in origin.paths)  # through the TLS relay
    finally:
        stack.launcher_json(f"/channel/{channel}/stop", "POST")
        origin.close()
        if relay is not None:
            relay.close()


# -- resolvers -------------------------------------------------------------------------------


@pytest.mark.parametrize("resolver, plays_it", [("none", False), ("plain", False), ("cloudscraper", True)])
def test_the_cloudscraper_resolver_carries_the_cookie_the_upstream_requires(stack, resolver, plays_it):
    """/gate/ hands its cookie only to a browser-like session (Accept-Language) and plays only
    with it: FFmpeg alone and the plain resolver are refused; cloudscraper's session gets the
    cookie, and FFmpeg reads the stream with it."""
    channel = {"none": 740, "plain": 741, "cloudscraper": 742}[resolver]
    add_channel(stack, channel, source_url=f"http://127.0.0.1:{stack.upstream_port}/gate/{channel}", resolver=resolver)
    status, _, body = first_request(stack.playlist_url(channel))
    if plays_it:
        assert status == 200, body
        assert plays(stack, channel)
        stack.launcher_json(f"/channel/{channel}/stop", "POST")
    else:
        assert status == 503 and body == f"channel {channel}: upstream refused: HTTP 403\n".encode()
        stack.redis.delete(keys.failed_key(channel))


def test_a_resolver_s_redirect_to_a_denied_address_is_refused(stack):
    add_channel(
        stack,
        743,
        source_url=f"http://127.0.0.1:{stack.upstream_port}/redirect/x?to=http://169.254.169.254/latest/meta-data/",
        resolver="plain",
    )
    status, _, body = first_request(stack.playlist_url(743))
    assert status == 503 and body == b"channel 743: upstream address not allowed\n"
    stack.redis.delete(keys.failed_key(743))


def test_a_launcher_restart_leaves_a_proxied_stream_and_its_connection(stack, channel_id, socks):
    """The relay is its own service: the launcher's restart cuts no connection."""
    add_channel(
        stack,
        channel_id,
        source_url=stack.upstream_url(f"restart{channel_id}"),
        proxy=f"socks5h://streamer:{PASSWORD}@127.0.0.1:{socks.port}",
    )
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    pids, connections = ffmpegs_writing(stack, channel_id), len(socks.requests)
    stack.restart_launcher()
    wait_for(lambda: f"channel {channel_id}: adopted pid" in stack.log("launcher"), 20, message="adoption")
    playlist = os.path.join(stack.hls_dir, f"stream_{channel_id}.m3u8")
    written = os.stat(playlist).st_mtime
    wait_for(lambda: os.stat(playlist).st_mtime > written, 10, message="the playlist to move on")
    assert ffmpegs_writing(stack, channel_id) == pids and len(socks.requests) == connections
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def test_doctor_checks_the_relay_and_every_proxy(stack, tmp_path, socks):
    config = tmp_path / "doctor.toml"
    config.write_text(
        open(stack.config_path).read() + "\n[providers.acme]\n"
        f'proxy = "socks5h://streamer:{PASSWORD}@127.0.0.1:{closed_port()}"\n'
        "[providers.warp]\n"
        f'proxy = "socks5h://streamer:{PASSWORD}@127.0.0.1:{socks.port}"\n'
        "[providers.badlogin]\n"
        f'proxy = "socks5h://streamer:wrong@127.0.0.1:{socks.port}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "doctor", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and PASSWORD not in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok") and "egress relay: answers on" in line for line in lines)
    assert any(line.startswith("FAIL") and "provider acme proxy: socks5h://127.0.0.1:" in line for line in lines)
    assert any(line.startswith("ok") and "provider warp proxy" in line for line in lines)
    assert any(
        line.startswith("FAIL") and "provider badlogin proxy" in line and "rejects the username" in line
        for line in lines
    )


def test_a_relay_outage_is_not_the_sources_fault(stack):
    """The relay stopped under a running stream with fallbacks, and started again: no source
    cools down, no restart is spent waiting, the channel is not failed; a start meanwhile
    gets 503 'egress relay unavailable' and no cooldown; the relay exits quietly."""
    sources = [stack.upstream_url("outage760"), stack.upstream_url("fallback760")]
    add_channel(stack, 760, source_url=sources[0], fallback_urls=sources[1:])
    add_channel(stack, 761)
    assert first_request(stack.playlist_url(760))[0] == 200
    stack.stop_process("egress")
    try:
        status, _, body = first_request(stack.playlist_url(761))
        assert status == 503 and body == b"channel 761: egress relay unavailable\n"
        assert not stack.redis.exists(keys.failed_key(761))
        wait_for(
            lambda: "channel 760: egress relay unavailable" in stack.log("launcher"),
            30,
            message="the launcher to wait for the relay",
        )
    finally:
        stack.start_egress()
    wait_for(
        lambda: ffmpegs_writing(stack, 760) and os.path.exists(os.path.join(stack.hls_dir, "stream_760.m3u8")),
        30,
        message="channel 760 to play again",
    )
    assert first_request(stack.playlist_url(761))[0] == 200
    assert not any(stack.redis.exists(keys.source_failed_key(url)) for url in sources)
    assert not stack.redis.exists(keys.failed_key(760))
    # Finding (operator, issue 16): the FFmpeg that lost its connection with the relay was
    # restarted (a restart spent, the back-off grown) before the wait; now the wait is all.
    assert int(stack.redis.hget(keys.run_key(760), "restarts")) == 0
    assert "Traceback" not in stack.log("egress") and "Exception in callback" not in stack.log("egress")
    stack.launcher_json("/channel/760/stop", "POST")
    stack.launcher_json("/channel/761/stop", "POST")


@pytest.mark.parametrize(
    "channel, spelling", [(780, "2130706433"), (781, "0x7f.1"), (782, "127.1"), (783, "0177.0.0.1"), (784, "localhost")]
)
def test_any_spelling_of_this_host_is_refused_through_a_proxy_too(stack, socks, channel, spelling):
    """With socks5h (the proxy resolves names), an address in any spelling the C library
    reads, and localhost, are still checked here: Redis is never reached."""
    add_channel(
        stack,
        channel,
        source_url=f"http://{spelling}:{stack.redis_port}/x.ts",
        proxy=f"socks5h://streamer:{PASSWORD}@127.0.0.1:{socks.port}",
    )
    status, _, body = first_request(stack.playlist_url(channel))
    assert status == 503 and body == f"channel {channel}: upstream address not allowed\n".encode()
    assert not [r for r in socks.requests if r["port"] == stack.redis_port]
    stack.redis.delete(keys.failed_key(channel))


def test_our_own_ports_are_refused_on_every_address_of_this_host(stack):
    """Redis reached as 127.0.0.1 may listen everywhere: its port is refused on 127.0.0.2 too
    (loopback is allowed in this stack), and so is nginx's."""
    for channel, port in ((785, stack.redis_port), (786, stack.nginx_port)):
        add_channel(
            stack,
            channel,
            source_url=f"http://127.0.0.1:{stack.upstream_port}/redirect/x"
            f"?to=http://127.0.0.2:{port}/live/stream_1.m3u8",
        )
        status, _, body = first_request(stack.playlist_url(channel))
        assert status == 503 and body == f"channel {channel}: upstream address not allowed\n".encode()
        stack.redis.delete(keys.failed_key(channel))


def test_an_http_proxy_that_refuses_connect_is_the_proxy_s_fault(stack):
    """403 to CONNECT from the proxy: 'upstream proxy unusable', no failover, no source cooled."""
    import socketserver
    import threading

    class Refusing(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sources = [
        f"https://127.0.0.1:{stack.upstream_port}/live/787.ts",
        f"https://127.0.0.1:{stack.upstream_port}/live/787b.ts",
    ]
    try:
        add_channel(
            stack,
            787,
            source_url=sources[0],
            fallback_urls=sources[1:],
            proxy=f"http://127.0.0.1:{server.server_address[1]}",
        )
        status, _, body = first_request(stack.playlist_url(787))
        assert status == 503 and body == b"channel 787: upstream proxy unusable\n"
        assert not any(stack.redis.exists(keys.source_failed_key(url)) for url in sources)
    finally:
        server.shutdown()
        server.server_close()
        stack.redis.delete(keys.failed_key(787))


def test_each_request_on_a_persistent_proxy_connection_is_its_own(stack):
    """Finding: the relay spliced every request after the first raw to the first upstream,
    Proxy-Authorization included.  Now each absolute-form request on one connection is
    parsed (h11), checked against the address policy, forwarded to its own upstream without
    our credentials, and answered in turn."""
    import base64
    import http.client

    from streamstate import egress

    first, second = KeepAliveOrigin(b"first\n"), KeepAliveOrigin(b"second\n")
    token = egress.write_ticket(stack.settings["state_dir"], "7060", None)
    auth = "Basic " + base64.b64encode(f"7060:{token}".encode()).decode()
    relay = http.client.HTTPConnection("127.0.0.1", stack.egress_port, timeout=20)
    try:
        answers = []
        for origin in (first, second, first):
            relay.request("GET", f"http://127.0.0.1:{origin.port}/x.ts", headers={"Proxy-Authorization": auth})
            answer = relay.getresponse()
            answers.append((answer.status, answer.read()))
        # An address the policy refuses, asked on the same connection: refused on its own.
        relay.request("GET", f"http://127.0.0.1:{stack.redis_port}/", headers={"Proxy-Authorization": auth})
        refused = relay.getresponse()
        assert refused.status == 403 and refused.getheader("X-Streamkeeper-Refused") == "address"
    finally:
        relay.close()
        first.close()
        second.close()
        egress.delete_ticket(stack.settings["state_dir"], "7060")
    assert answers == [(200, b"first\n"), (200, b"second\n"), (200, b"first\n")]
    assert len(first.heads) == 2 and len(second.heads) == 1
    for head in first.heads + second.heads:
        assert head.startswith("GET /x.ts HTTP/1.1") and "proxy-authorization" not in head.lower()


# -- the relay's own defences (attack on issue 16) ------------------------------------------


def _ticket_auth(stack, channel_id: str) -> str:
    import base64

    from streamstate import egress

    token = egress.write_ticket(stack.settings["state_dir"], channel_id, None)
    return "Basic " + base64.b64encode(f"{channel_id}:{token}".encode()).decode()


def _in_process_relay(stack, scenario, **relay_options):
    """Run ``scenario(relay, port)`` against an EgressRelay in this process, on the stack's
    settings (its tickets, its address policy), listening on a free loopback port."""
    import asyncio

    from egress.relay import EgressRelay
    from streamstate.settings import load_settings

    async def run():
        relay = EgressRelay(load_settings(stack.config_path, environ={}), **relay_options)
        server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
        try:
            return await scenario(relay, server.sockets[0].getsockname()[1])
        finally:
            server.close()

    return asyncio.run(run())


def test_a_request_head_sent_a_byte_at_a_time_is_cut_at_its_deadline(stack, monkeypatch):
    """Finding: each read had its own timeout, so a head dribbled a byte at a time held a
    connection for ever.  Now the whole head has one deadline (HEAD_TIMEOUT, 1 s here)."""
    import asyncio

    from egress import relay as relay_module

    monkeypatch.setattr(relay_module, "HEAD_TIMEOUT", 1.0)

    async def scenario(relay, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        dribble = b"GET http://127.0.0.1/ HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 400
        try:
            for sent, byte in enumerate(dribble):  # 0.05 s apart: 21 s for all of them
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(100), 0.05) == b"":
                        return sent
                except asyncio.TimeoutError:
                    pass
            return None
        except ConnectionError:
            return sent
        finally:
            writer.close()

    cut_after = _in_process_relay(stack, scenario)
    assert cut_after is not None, "the relay kept a dribbled head open to its end"


def test_at_the_client_cap_a_stranger_gives_way(stack):
    """Anyone on the host may open connections to the relay; only our streams hold tickets.
    At the cap (2 here) a new connection takes the place of the oldest one that has shown no
    ticket, and a connection that has shown one is never cut for it."""
    import asyncio

    origin = KeepAliveOrigin(b"ours\n")
    auth = _ticket_auth(stack, "7061")

    async def scenario(relay, port):
        ours = await asyncio.open_connection("127.0.0.1", port)
        ours[1].write(
            f"GET http://127.0.0.1:{origin.port}/a.ts HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        assert (await asyncio.wait_for(ours[0].readuntil(b"ours\n"), 10)).startswith(b"HTTP/1.1 200")
        stranger = await asyncio.open_connection("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while len(relay.clients) < 2:  # the stranger taken in before the newcomer comes
            assert time.monotonic() < deadline, "the relay never took the second client in"
            await asyncio.sleep(0.01)
        newcomer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(stranger[0].read(), 10) == b""  # cut
        ours[1].write(
            f"GET http://127.0.0.1:{origin.port}/b.ts HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        assert (await asyncio.wait_for(ours[0].readuntil(b"ours\n"), 10)).startswith(b"HTTP/1.1 200")
        # Both places are now held by a ticket holder and the newcomer, which shows none:
        # the newcomer gives way to the next connection, the ticket holder does not.
        third = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(newcomer[0].read(), 10) == b""
        counters = dict(relay.counters)
        for _, writer in (ours, stranger, newcomer, third):
            writer.close()
        return counters

    try:
        counters = _in_process_relay(stack, scenario, max_clients=2)
    finally:
        origin.close()
    assert counters["clients_evicted"] == 2 and len(origin.heads) == 2


def test_bytes_sent_right_after_connect_reach_the_upstream(stack):
    """Finding: a client that sent its TLS hello in the same packet as its CONNECT head lost
    it (h11 kept it as trailing data).  Now it goes up first."""
    auth = _ticket_auth(stack, "7062")
    early = b"EARLY-HELLO\r\n\r\n"
    listener = RecordingListener()
    with socket.create_connection(("127.0.0.1", stack.egress_port), timeout=10) as sock:
        sock.sendall(
            f"CONNECT 127.0.0.1:{listener.port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {auth}\r\n\r\n".encode()
            + early
        )
        received = b""
        while b"404 Not Found" not in received:
            chunk = sock.recv(4096)
            assert chunk, f"tunnel closed before the upstream answered: {received!r}"
            received += chunk
    listener.close()
    assert received.startswith(b"HTTP/1.1 200 ") and bytes(listener.received) == early


def test_a_request_reaches_the_upstream_with_one_framing_and_no_hop_headers(stack):
    """Finding: Transfer-Encoding and Content-Length both went up (a smuggling pair), and
    headers the client's Connection header named were forwarded.  Now h11's framing is the
    only one, and every hop-by-hop header stays at the relay."""
    auth = _ticket_auth(stack, "7063")
    listener = RecordingListener(answer_after=b"0\r\n\r\n")  # answers once the body has come
    with socket.create_connection(("127.0.0.1", stack.egress_port), timeout=10) as sock:
        sock.sendall(
            f"POST http://127.0.0.1:{listener.port}/x HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {auth}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n"
            "Connection: X-Secret\r\nX-Secret: relay-only\r\nTE: trailers\r\nUpgrade: h2c\r\n"
            "X-Kept: yes\r\n\r\n4\r\nbody\r\n0\r\nX-Trailer: no\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
    listener.close()
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert bytes(listener.received).endswith(b"\r\n\r\n4\r\nbody\r\n0\r\n\r\n")  # no trailer
    head = bytes(listener.received).split(b"\r\n\r\n")[0].lower()
    assert b"x-kept: yes" in head and b"transfer-encoding: chunked" in head
    for hop in (b"content-length", b"x-secret", b"te:", b"upgrade", b"proxy-authorization"):
        assert hop not in head, hop
