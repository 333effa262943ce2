"""Hostile channel records, viewers and Redis contents (issue: hardening), each against the
real stack: redis-server, nginx with the rendered snippet, the launcher and FFmpeg.

"A service an attacker targets" is a loopback TCP listener that records the raw bytes it
receives: FFmpeg's request must be exactly what a valid record asks for, never more."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import redis

from streamstate import keys, runs
from streamstate.logformat import LogLineParser
from tests.conftest import REPO
from tests.fakes.listeners import RecordingListener
from tests.helpers import add_channel, ffmpegs_writing, first_request, streamctl, wait_for

pytestmark = pytest.mark.e2e

SECRET = "S3cretPass"


@pytest.fixture
def listener():
    recorder = RecordingListener()
    yield recorder
    recorder.close()


INJECTIONS = [
    ("user_agent", "x\r\nSET pwned_ua 1"),
    ("referer", "http://r.example/\nSET pwned_ref 1"),
    ("headers", {"X-Ok": "v\r\nSET pwned_hdr 1"}),
    ("headers", {"Bad Name": "v"}),
    ("headers", {"X-Nul": "a\x00b"}),
    ("headers", {"X-Tab": "a\tb"}),
    ("headers", {"Content-Length": "0"}),
    ("user_agent", "del\x7f"),
    ("proxy", "http://127.0.0.1:3128/\r\nX: y"),
]


@pytest.mark.parametrize("field, value", INJECTIONS)
def test_control_characters_never_reach_ffmpeg(stack, listener, field, value):
    """Finding 1: a record with CR/LF (or any control character, or a header name that is not
    a token) is refused by the launcher with 422 naming the field; FFmpeg never connects."""
    stack.redis.set(keys.channel_key(501), json.dumps({"source_url": listener.url(), "quality": "copy", field: value}))
    status, headers, body = first_request(stack.playlist_url(501))
    assert status == 422, body
    named = "header" if field == "headers" else field
    assert body.startswith(b"channel 501: ") and named.encode() in body
    assert listener.connections == 0 and not ffmpegs_writing(stack, 501)


def test_the_legacy_route_takes_only_its_own_fields_and_stores_nothing_else(stack, listener):
    """Finding (attack, issue 16): the old route passed any field on to the record (proxy,
    provider, tls_verify, headers).  It takes channel_id, source_url and quality, as the old
    host did; anything else is a 400 naming the field, and nothing is stored."""
    for field, value in [
        *INJECTIONS[:3],
        ("proxy", "socks5h://127.0.0.1:1"),
        ("tls_verify", False),
        ("provider", "acme"),
    ]:
        status, body = stack.launcher_json(
            "/api/stream/start",
            "POST",
            {"channel_id": "502", "source_url": listener.url(), "quality": "copy", field: value},
        )
        assert status == 400 and f"unknown fields {field}" in body["error"] and body["stored"] is False
    status, body = stack.launcher_json(
        "/api/stream/start",
        "POST",
        {"channel_id": "502", "source_url": "http://127.0.0.1:1/\r\nX: y", "quality": "copy"},
    )
    assert status == 422 and "channel 502" in body["error"]
    assert stack.redis.exists(keys.channel_key(502)) == 0
    assert listener.connections == 0


def test_the_legacy_start_answers_json_whatever_headers_it_is_sent(stack, channel_id):
    """Finding (attack, issue 16): X-Streamkeeper-Accel: 1 on the legacy route (nginx's header
    for a player's start) made it answer a redirect it then read as JSON: a 500."""
    add_channel(stack, channel_id)
    request = urllib.request.Request(
        stack.launcher_url("/api/stream/start"),
        method="POST",
        data=json.dumps({"channel_id": channel_id}).encode(),
        headers={"Content-Type": "application/json", "X-Streamkeeper-Accel": "1"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200 and "X-Accel-Redirect" not in response.headers
        assert json.loads(response.read())["status"] in ("started", "running")
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def test_a_legacy_start_with_redis_down_is_a_503_with_its_reason(stack, extra_launcher, tmp_path, channel_id):
    """Found by mypy (issue 17): with Redis unreachable the legacy route passed its
    Retry-After header as a positional argument: a TypeError, a 500.  Now the 503 it meant:
    JSON, the reason, nothing stored, Retry-After."""
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    launcher = extra_launcher(hls_dir=str(tmp_path / "hls"), redis_url=f"redis://127.0.0.1:{port}/0")
    request = urllib.request.Request(
        launcher.url("/api/stream/start"),
        method="POST",
        data=json.dumps({"channel_id": channel_id, "source_url": stack.upstream_url(f"ch{channel_id}")}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    body = json.loads(refused.value.read())
    assert refused.value.code == 503 and refused.value.headers["Retry-After"]
    assert body["stored"] is False and "redis unreachable" in body["error"]
    assert "Traceback" not in launcher.log()


def test_two_legacy_starts_of_one_channel_take_turns(stack, channel_id):
    """Finding (attack, issue 16): B's record, written while A's start was failing, was put back
    to A's when B's start failed too: a record no start had succeeded with was left.  Legacy
    starts of one channel take turns now, and a failed start leaves no record."""

    def stalled(name):
        return f"http://127.0.0.1:{stack.upstream_port}/stall/0/{name}.ts"

    results = {}

    def start(name):
        results[name] = stack.launcher_json(
            "/api/stream/start", "POST", {"channel_id": channel_id, "source_url": stalled(name), "quality": "copy"}
        )

    first = threading.Thread(target=start, args=("A",))
    first.start()
    wait_for(lambda: stack.redis.exists(keys.channel_key(channel_id)), timeout=30, message="A's record written")
    second = threading.Thread(target=start, args=("B",))
    second.start()
    first.join(120)
    second.join(120)
    assert results["A"][0] == 503 and results["B"][0] == 503, results
    assert stack.redis.get(keys.channel_key(channel_id)) is None
    stack.redis.delete(keys.failed_key(channel_id))


def test_a_legacy_body_sent_slowly_is_cut_off(stack):
    """Finding (attack, issue 16): a legacy call that never sent its announced body held its
    connection and handler for ever.  It gets a 408 once BODY_TIMEOUT has passed."""
    from launcher.app import BODY_TIMEOUT

    with socket.create_connection(("127.0.0.1", stack.launcher_port), timeout=BODY_TIMEOUT + 30) as sock:
        sock.sendall(
            b"POST /api/stream/start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer


@pytest.mark.parametrize(
    "args, field",
    [
        (["--user-agent", "x\r\nSET pwned 1"], "user_agent"),
        (["--referer", "a\nb"], "referer"),
        (["--header", "X-A: v\rSET pwned 1"], "header X-A"),
        (["--header", "Bad Name: v"], "header name"),
    ],
)
def test_streamctl_refuses_injections(stack, listener, args, field):
    result = streamctl(stack, "channels", "add", "503", listener.url(), *args)
    assert result.returncode == 2 and "channel 503" in result.stderr and field in result.stderr
    assert stack.redis.exists(keys.channel_key(503)) == 0


def test_a_valid_record_sends_exactly_its_headers(stack, channel_id, listener):
    """The positive side: what a record asks for arrives as single header lines."""
    add_channel(
        stack,
        channel_id,
        source_url=listener.url(f"/live/u/p/{channel_id}.ts"),
        user_agent="UA/1 (x)",
        referer="http://r.example/",
        headers={"X-Key": "v1"},
    )
    assert first_request(stack.playlist_url(channel_id))[0] == 503
    request = bytes(listener.received).split(b"\r\n\r\n")[0].decode()
    lines = request.split("\r\n")
    assert lines[0] == f"GET /live/u/p/{channel_id}.ts HTTP/1.1"
    assert "User-Agent: UA/1 (x)" in lines and "Referer: http://r.example/" in lines
    assert "X-Key: v1" in lines
    assert all(":" in line for line in lines[1:])


def test_m3u_import_skips_hostile_entries_and_keeps_the_rest(stack, tmp_path):
    """Findings 1 and 8: each entry decided on its own."""
    playlist = tmp_path / "hostile.m3u"
    playlist.write_bytes(
        b"#EXTM3U\n"
        b'#EXTINF:-1 tvg-name="Good",Good\nhttp://up.example/live/u/p/505.ts\n'
        b"#EXTINF:-1,Arabic digits\nhttp://up.example/live/u/p/\xd9\xa7\xd9\xa1.ts\n"
        b"#EXTINF:-1,Binary\n\x00\x01\xfe\xff/506.ts\n"
        b"#EXTINF:-1,Tab\nhttp://up.example/a\tb/507.ts\n"
        b"#EXTINF:-1,Leading zero\nhttp://up.example/live/u/p/0508.ts\n"
        b"#EXTINF:-1,Bad port\nhttp://up.example:99999/509.ts\n"
        b"#EXTINF:-1,Bad v6\nhttp://[::1/510.ts\n"
        b'#EXTINF:-1 tvg-name="Good too",Good too\nhttps://up.example/live/u/p/511.ts\n'
    )
    result = streamctl(stack, "channels", "import", str(playlist), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["added"] == 2 and len(report["skipped"]) == 6
    assert stack.redis.exists(keys.channel_key(505), keys.channel_key(511)) == 2
    refused = streamctl(stack, "channels", "import", str(playlist), "--start-id", "-5")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr


def test_oversized_and_deeply_nested_records_are_refused_and_listed_as_invalid(stack, channel_id):
    """Finding 8."""
    stack.redis.set(keys.channel_key(512), "[" * 5000 + "]" * 5000)
    stack.redis.set(keys.channel_key(513), json.dumps({"source_url": "http://up.example/" + "a" * 200_000}))
    stack.redis.set(
        keys.channel_key(514), json.dumps({"source_url": "http://up.example/x.ts", "user_agent": "u" * 10_000})
    )
    add_channel(stack, channel_id)
    for channel, why in ((512, b"nested too deeply"), (513, b"too large"), (514, b"user_agent is too long")):
        status, _, body = first_request(stack.playlist_url(channel))
        assert status == 422 and why in body, (channel, body)
    listed = streamctl(stack, "channels", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert all("error" in rows[str(c)] for c in (512, 513, 514))
    assert "error" not in rows[channel_id]


def test_credentials_never_reach_a_player_nor_the_logs(stack):
    """Finding 2: Xtream-style sources carry the account in the path."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: connection refused
    sources = {
        516: f"http://user42:{SECRET}@127.0.0.1:{port}/live/user42/{SECRET}/516.ts",
        517: f"https://127.0.0.1:{stack.upstream_port}/live/user42/{SECRET}/517.ts?token={SECRET}",
        518: f"http://127.0.0.1:{stack.upstream_port}/forbidden/user42/{SECRET}/518.ts",
        519: f"ftp://user42:{SECRET}@127.0.0.1/519.ts",
    }
    for channel, source in sources.items():
        add_channel(stack, channel, source_url=source)
    answers = {c: first_request(stack.playlist_url(c)) for c in sources}
    assert answers[516][0] == 503 and answers[516][2] == b"channel 516: upstream unreachable\n"
    assert answers[517][0] == 503 and b"upstream TLS failed" in answers[517][2]
    assert answers[518][2].startswith(b"channel 518: upstream refused: HTTP 40")
    assert answers[519][0] == 422
    for status, headers, body in answers.values():
        assert SECRET.encode() not in body and b"user42" not in body
    launcher_log = stack.log("launcher")
    assert "channel 516" in launcher_log and SECRET not in launcher_log and "user42" not in launcher_log
    assert "/…/516.ts" in launcher_log
    status = streamctl(stack, "status", "--json")
    listed = streamctl(stack, "channels", "list")
    assert SECRET not in status.stdout + status.stderr and SECRET not in listed.stdout


def test_tls_is_verified_by_default(stack, extra_launcher, tmp_path):
    """Finding 3: a self-signed https upstream is refused; tls_verify = false plays it; the
    same certificate as tls_ca_file plays with verification on."""
    from tests.fakes.tls_relay import TLSRelay

    relay = TLSRelay(tmp_path, "127.0.0.1", stack.upstream_port)
    try:
        source = f"https://127.0.0.1:{relay.port}/live/tls.ts"
        add_channel(stack, 520, source_url=source)
        add_channel(stack, 521, source_url=source, tls_verify=False)
        refused = first_request(stack.playlist_url(520))
        assert refused[0] == 503 and b"upstream TLS failed" in refused[2]
        assert first_request(stack.playlist_url(521))[0] == 200
        stack.redis.delete(keys.failed_key(520))  # the failure's cooldown, lifted
        trusting = extra_launcher(tls_ca_file=relay.certificate, hls_dir=str(tmp_path / "trusting-hls"))
        status, body = trusting.json("/channel/520/start", "POST")
        assert status == 200 and body["status"] == "started", body
        trusting.json("/channel/520/stop", "POST")
    finally:
        relay.close()
        stack.launcher_json("/channel/521/stop", "POST")


@pytest.mark.parametrize("spelling", ["007", "00", "07", "+7", " 7", "٧"])
def test_one_spelling_per_channel(stack, spelling):
    """Finding 6: 007 is not 7, anywhere."""
    result = streamctl(stack, "channels", "add", spelling, "http://up.example/7.ts")
    assert result.returncode == 2 and "invalid channel id" in result.stderr
    route = urllib.parse.quote(spelling)
    assert stack.launcher_json(f"/channel/{route}/start", "POST")[0] == 400
    with pytest.raises(keys.InvalidChannelId):
        keys.channel_key(spelling)


def test_leading_zero_paths_start_nothing_and_count_nothing(stack):
    add_channel(stack, 7)
    status, _, _ = first_request(stack.nginx_url("/live/stream_007.m3u8"))
    assert status == 404 and not ffmpegs_writing(stack, 7)
    parser = LogLineParser("streamkeeper")
    result = parser.parse_chunk(b'1795000000.000 200 GET "/live/stream_007.m3u8" 1.2.3.4 "-" "x"\n')
    assert result.channel_times == {} and result.bad_channel == 1


def test_junk_in_the_active_set_is_shown_as_invalid(stack):
    """Finding 9."""
    stack.redis.sadd(keys.ACTIVE_STREAMS_KEY, "abc", "007", "x" * 100)
    try:
        status, body = stack.launcher_json("/streams")
        assert status == 200 and len(body["invalid_members"]) == 3
        assert stack.launcher_json("/api/streams/active")[0] == 200
        result = streamctl(stack, "status")
        assert result.returncode == 0 and "invalid member 'abc'" in result.stdout
        assert "unreachable" not in result.stderr
        reaped = streamctl(stack, "reap", "--json")
        assert reaped.returncode == 0 and json.loads(reaped.stdout)["invalid_members"] == 3
        assert not {"abc", "007"} & stack.redis.smembers(keys.ACTIVE_STREAMS_KEY)
    finally:
        stack.redis.srem(keys.ACTIVE_STREAMS_KEY, "abc", "007", "x" * 100)


@pytest.mark.parametrize(
    "path",
    ["/live//stream_522.m3u8", "/live/./stream_522.m3u8", "/live/stream_%35%32%32.m3u8", "/x/../live/stream_522.m3u8"],
)
def test_what_nginx_serves_as_a_channel_is_counted_as_that_channel(stack, path):
    """Finding 10: the log records $uri, nginx's normalised path."""
    add_channel(stack, 522)
    assert first_request(stack.playlist_url(522))[0] == 200
    with open(stack.settings["access_log"], "rb") as handle:
        handle.seek(0, os.SEEK_END)
        offset = handle.tell()
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", stack.nginx_port, timeout=30)
    connection.putrequest("GET", path + "?token=alias")
    connection.endheaders()
    assert connection.getresponse().status == 200
    connection.close()

    def counted():
        with open(stack.settings["access_log"], "rb") as handle:
            handle.seek(offset)
            return LogLineParser("streamkeeper").parse_chunk(handle.read()).channel_times

    assert wait_for(lambda: counted().get("522"), timeout=10, message="the aliased request counted")


def test_a_record_of_an_unknown_process_is_never_trusted(stack, channel_id):
    """Finding 7 through the launcher: a run record naming a process that is not this
    channel's FFmpeg (here: this test's own Python) is stale, never joined nor signalled."""
    record = runs.RunRecord(
        channel=channel_id,
        run_id="forged",
        host=stack.settings.get("host_id", socket.gethostname()),
        pid=os.getpid(),
        pid_start=None,
        started=1.0,
        state="running",
    )
    from streamstate.process import process_start_time

    record.pid_start = process_start_time(os.getpid())
    runs.record_run(stack.redis, record)
    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id))[0] == 200  # started anew, we live on
    assert stack.redis.hget(keys.run_key(channel_id), "run_id") != "forged"


JUNK = [
    ("hash", keys.run_key(540), {"run_id": "j", "host": socket.gethostname(), "pid": "5", "last_error": b"x\xff\xfe"}),
    ("string", keys.run_key(541), "not a hash"),
    ("list", keys.last_access_key(542), ["1", "2"]),
    ("list", keys.pid_key(543), ["1"]),
    ("string", keys.viewers_key(544), "not a zset"),
    ("string", keys.pid_key(545), "abc"),
    ("string", keys.pid_key(546), " 30829"),
    ("string", keys.last_access_key(547), "inf"),
]


def put_junk(client):
    raw = redis.Redis(port=client.connection_pool.connection_kwargs["port"])
    for kind, key, value in JUNK:
        raw.delete(key)
        if kind == "hash":
            raw.hset(key, mapping=value)
        elif kind == "list":
            raw.rpush(key, *value)
        else:
            raw.set(key, value)
    for channel in range(540, 548):
        raw.sadd(keys.ACTIVE_STREAMS_KEY, str(channel))
    raw.set(keys.pid_key(547), "1")


def test_junk_of_any_type_or_encoding_in_redis_breaks_nothing(stack):
    """Redis contents are hostile: undecodable bytes, keys of the wrong type, unparsable or
    infinite numbers.  No 500, no traceback, the reaper's pass completes and clears them."""
    put_junk(stack.redis)
    status, body = stack.launcher_json("/streams")
    assert status == 200 and isinstance(body, dict), body
    assert stack.launcher_json("/api/streams/active")[0] == 200
    result = streamctl(stack, "status", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    json.loads(result.stdout)  # valid JSON: no Infinity
    reaped = streamctl(stack, "reap", "--json")
    assert reaped.returncode == 0, reaped.stderr
    summary = json.loads(reaped.stdout)
    assert summary["stale"] >= 6
    again = json.loads(streamctl(stack, "reap", "--json").stdout)
    assert not {a["channel"] for a in again["actions"]} & {str(c) for c in range(540, 548)}
    stack.redis.delete(*[key for _, key, _ in JUNK], keys.pid_key(547))


def test_junk_in_failure_slot_history_and_pass_keys_is_only_junk(stack, channel_id):
    """Finding (attack, issue 16): a failure mark of another type made every start of its
    channel a 503 "redis unreachable"; a slot or failure nested too deep raised
    RecursionError; a provider's slots of another type blocked its every start; a reaper's
    last pass of another type was never written again; Infinity in the status history, or
    a 5,000-digit pid, raised.  Each is junk now: ignored, and replaced by our next write."""
    from launcher import status_page
    from streamstate import providers

    add_channel(stack, channel_id)
    stack.redis.hset(keys.failed_key(channel_id), "reason", "junk of another type")
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")
    stack.redis.set(keys.failed_key(564), "[" * 100_000)
    assert runs.get_failed(stack.redis, "564") is None
    stack.redis.delete(keys.failed_key(channel_id), keys.failed_key(564))

    slots = keys.provider_slots_key("junkprov")
    stack.redis.set(slots, "not a hash")
    assert providers.acquire_slot(stack.redis, "junkprov", 1, "565", "run-565", "h", 60)
    stack.redis.hset(slots, "566", "[" * 100_000)
    assert providers.stale_slots(stack.redis, "junkprov", 60) == ["566"]
    assert providers.release_slot(stack.redis, "junkprov", "566", "run-566") is False
    stack.redis.delete(slots)

    history = keys.status_history_key("junk-host")
    stack.redis.set(history, "not a list")
    assert status_page.read_history(stack.redis, "junk-host") == []
    stack.redis.delete(history)
    stack.redis.rpush(
        history,
        '{"t": Infinity, "streams": 1, "viewers": 1}',
        '{"t": 1e400, "streams": 1, "viewers": 1}',
        '{"t": NaN, "streams": 1, "viewers": 1}',
        '{"t": 5, "streams": 1e400, "viewers": 1}',
        "[" * 100_000,
        '{"t": 7, "streams": 2, "viewers": 3}',
    )
    assert status_page.read_history(stack.redis, "junk-host") == [{"t": 7.0, "streams": 2, "viewers": 3}]
    stack.redis.delete(history)

    host = stack.settings.get("host_id") or socket.gethostname()
    stack.redis.set(keys.reaper_last_pass_key(host), "not a hash")
    assert runs.reaper_last_pass(stack.redis, host) == {}
    stack.redis.set(keys.pid_key(567), "9" * 5000)
    stack.redis.sadd(keys.ACTIVE_STREAMS_KEY, "567")
    for _ in range(2):
        reaped = streamctl(stack, "reap", "--json")
        assert reaped.returncode == 0 and "Traceback" not in reaped.stderr, reaped.stderr
    assert stack.redis.type(keys.reaper_last_pass_key(host)) == "hash", reaped.stderr
    assert not stack.redis.sismember(keys.ACTIVE_STREAMS_KEY, "567")


def test_an_infinite_last_access_keeps_nothing_alive(stack, channel_id):
    """A stored last_access of inf (or far in the future) is junk: the next heartbeat
    replaces it, and the reaper falls back to the start time."""
    from streamstate import heartbeats

    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    stack.redis.set(keys.last_access_key(channel_id), "inf")
    now = time.time()
    heartbeats.write_heartbeats(stack.redis, {channel_id: now - 1}, now=now)
    assert float(stack.redis.get(keys.last_access_key(channel_id))) == pytest.approx(now - 1, abs=0.01)
    stack.redis.set(keys.last_access_key(channel_id), "9999999999")
    heartbeats.write_heartbeats(stack.redis, {channel_id: now}, now=now)
    assert float(stack.redis.get(keys.last_access_key(channel_id))) == pytest.approx(now, abs=0.01)
    stack.launcher_json(f"/channel/{channel_id}/stop", "POST")


def test_status_escapes_what_redis_holds(stack):
    stack.redis.hset(
        keys.run_key(549),
        mapping={
            "run_id": "esc",
            "host": "elsewhere",
            "pid": "1",
            "state": "\x1b[31mRED\x1b[0m\r\nfake line",
            "last_error": "\x1b]0;title\x07",
        },
    )
    stack.redis.sadd(keys.ACTIVE_STREAMS_KEY, "549")
    try:
        result = streamctl(stack, "status")
        assert result.returncode == 0
        assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\x07" not in result.stdout
        # A state that is none of ours (issue 17: states are an enum) reads as no state.
        assert re.search(r"^\s*549\s+unknown\s", result.stdout, re.M), result.stdout
    finally:
        stack.redis.delete(keys.run_key(549))
        stack.redis.srem(keys.ACTIVE_STREAMS_KEY, "549")


@pytest.mark.parametrize(
    "field, value",
    [
        ("user_agent", "UA\udc8d\udc8aX-Inj: 1"),
        ("user_agent", "UA\x85"),
        ("referer", "http://r/\u00e9"),
        ("headers", {"X-A": "caf\u00e9"}),
        ("source_url", "http://up.example/\u00e9/1.ts"),
    ],
)
def test_only_printable_ascii_goes_on_the_wire(stack, listener, field, value):
    record = {"source_url": listener.url(), "quality": "copy", field: value}
    stack.redis.set(keys.channel_key(550), json.dumps(record))
    status, _, body = first_request(stack.playlist_url(550))
    assert status == 422, body
    assert listener.connections == 0


def test_the_legacy_route_stores_nothing_it_would_refuse(stack, listener):
    status, body = stack.launcher_json(
        "/api/stream/start", "POST", {"channel_id": "551", "source_url": listener.url() + "?" + "v" * 70_000}
    )
    assert status == 422 and body["stored"] is False
    status, body = stack.launcher_json(
        "/api/stream/start", "POST", {"channel_id": "551", "source_url": listener.url(), "quality": "ultra"}
    )
    assert status == 422 and "unknown quality" in body["error"]
    assert stack.redis.exists(keys.channel_key(551)) == 0 and listener.connections == 0


def test_a_scheme_in_capitals_is_still_http(stack):
    stack.redis.set(
        keys.channel_key(552),
        json.dumps({"source_url": stack.upstream_url("ch552").replace("http://", "HtTp://"), "quality": "copy"}),
    )
    assert first_request(stack.playlist_url(552))[0] == 200
    stack.launcher_json("/channel/552/stop", "POST")


def test_a_body_nested_too_deep_is_a_400_with_its_reason(stack):
    """100,000 nested arrays to the legacy start: one line and a 400, never a traceback."""
    body = b"[" * 100_000 + b"]" * 100_000
    request = urllib.request.Request(
        stack.launcher_url("/api/stream/start"), data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a 400 was expected")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert json.loads(exc.read())["error"] == "body is nested too deep"
    assert "Traceback" not in stack.log("launcher") and "RecursionError" not in stack.log("launcher")


def test_the_legacy_start_keeps_the_record_only_when_the_start_succeeds(stack):
    """A failed start puts the record back as it was (none here, a previous one below), and
    the answer says whether it stored it."""
    forbidden = f"http://127.0.0.1:{stack.upstream_port}/forbidden/x.ts"
    status, body = stack.launcher_json(
        "/api/stream/start", "POST", {"channel_id": "553", "source_url": forbidden, "quality": "copy"}
    )
    assert status == 503 and body["stored"] is False
    assert stack.redis.exists(keys.channel_key(553)) == 0
    previous = json.dumps({"source_url": stack.upstream_url("ch554"), "quality": "copy"})
    stack.redis.set(keys.channel_key(554), previous)
    status, body = stack.launcher_json(
        "/api/stream/start", "POST", {"channel_id": "554", "source_url": forbidden, "quality": "copy"}
    )
    assert status == 503 and body["stored"] is False
    assert stack.redis.get(keys.channel_key(554)) == previous
    stack.redis.delete(keys.failed_key(554))
    status, body = stack.launcher_json(
        "/api/stream/start",
        "POST",
        {"channel_id": "554", "source_url": stack.upstream_url("ch554b"), "quality": "copy"},
    )
    assert status == 200 and body["stored"] is True and body["status"] == "started"
    assert "ch554b" in stack.redis.get(keys.channel_key(554))
    stack.launcher_json("/channel/554/stop", "POST")


def test_status_escapes_what_redis_holds_about_the_reaper(stack):
    """A hostile reaper:<host>:last_pass puts no escape sequence on the operator's terminal."""
    host = "status-host"
    stack.redis.hset(
        keys.reaper_last_pass_key(host),
        mapping={"time": f"{time.time():.3f}", "stopped": "\x1b]0;owned\x07", "stale": "\x1b[2J", "passes": "1\x07"},
    )
    result = subprocess.run(
        [sys.executable, "-m", "streamctl", "status", "--config", stack.config_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STREAMKEEPER_HOST_ID": host},
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "stopped \\x1b]0;owned\\x07" in result.stdout
    stack.redis.delete(keys.reaper_last_pass_key(host))
