"""What nginx (with the rendered snippet) and the launcher answer on a cold start: the
playlist itself, CORS on every answer under /live/, preflights, and nothing the client
sent coming back as a Location or a URL."""

import http.client
import os

import pytest

from launcher.app import accel_target
from streamstate import files, keys
from streamstate.logformat import LogLineParser, viewer_hash
from streamstate.nginx_config import ACCEL_PREFIX, ACCEL_REQUEST_HEADER, render_nginx_config
from streamstate.settings import load_settings
from tests.helpers import add_channel, ffmpegs_writing, first_request, free_port, wait_for

pytestmark = pytest.mark.e2e

ORIGIN = {"Origin": "http://player.example"}
# Headers that differ between two answers of the same file for reasons of their own.
VOLATILE = {"Date", "Last-Modified", "ETag", "Content-Length", "Connection", "Accept-Ranges"}


def raw_request(port: int, target: str, headers: dict | None = None, method: str = "GET"):
    """A request whose target goes on the wire exactly as given (no client-side normalising)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection._validate_path = lambda url: None  # let raw bytes through
    connection._validate_method = lambda method: None
    connection._validate_host = lambda host: None
    connection._encode_request = lambda request: request.encode("latin-1")  # raw bytes, as sent
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def assert_cors(headers: dict):
    assert headers.get("Access-Control-Allow-Origin") == "*", headers
    assert "GET" in headers.get("Access-Control-Allow-Methods", ""), headers


def test_the_first_viewer_gets_the_playlist_with_a_normal_hits_headers(stack, channel_id):
    add_channel(stack, channel_id)
    status, cold, body = first_request(stack.playlist_url(channel_id, f"?token=t{channel_id}"), ORIGIN)
    assert status == 200 and "Location" not in cold
    assert cold["Content-Type"] == "application/vnd.apple.mpegurl"
    assert body.startswith(b"#EXTM3U") and b"#EXTINF" in body
    status, warm, _ = first_request(stack.playlist_url(channel_id, f"?token=t{channel_id}"), ORIGIN)
    assert status == 200
    assert {k: v for k, v in cold.items() if k not in VOLATILE} == {k: v for k, v in warm.items() if k not in VOLATILE}
    assert_cors(cold)
    assert "no-cache" in cold["Cache-Control"]


def test_the_first_request_counts_as_its_viewer_for_heartbeatd(stack):
    """The cold start's log line, parsed as heartbeatd parses it: channel 602 watched, by the
    viewer of token first602 (the token rides on the internal redirect)."""
    add_channel(stack, 602)
    assert first_request(stack.playlist_url(602, "?token=first602"))[0] == 200

    def parsed():
        with open(stack.settings["access_log"], "rb") as handle:
            return LogLineParser("streamkeeper").parse_chunk(handle.read())

    result = wait_for(
        lambda: (r := parsed()) and "602" in r.channel_times and r,
        timeout=10,
        message="the cold start's line in the access log",
    )
    assert ("602", viewer_hash(b"t:first602")) in result.viewer_times


def test_cors_on_every_answer_under_live(stack):
    add_channel(stack, 603)
    add_channel(stack, 604, source_url=f"http://127.0.0.1:{stack.upstream_port}/forbidden/x.ts")
    assert first_request(stack.playlist_url(603), ORIGIN)[0] == 200
    segment = files.stream_files(stack.hls_dir, 603)
    segment = next(os.path.basename(p) for p in segment if p.endswith(".ts"))
    answers = {
        "segment": first_request(stack.nginx_url(f"/live/{segment}"), ORIGIN),
        "missing segment": first_request(stack.nginx_url("/live/stream_603_999999.ts"), ORIGIN),
        "unknown channel": first_request(stack.playlist_url(698765), ORIGIN),
        "upstream refused": first_request(stack.playlist_url(604), ORIGIN),
        "temp file": first_request(stack.nginx_url("/live/stream_603.m3u8.tmp"), ORIGIN),
        "other path": first_request(stack.nginx_url("/live/whatever.txt"), ORIGIN),
    }
    expected = {
        "segment": 200,
        "missing segment": 404,
        "unknown channel": 404,
        "upstream refused": 503,
        "temp file": 404,
        "other path": 404,
    }
    assert {name: a[0] for name, a in answers.items()} == expected
    for name, (_, headers, _) in answers.items():
        assert_cors(headers)
    assert b"channel 698765: no such channel" in answers["unknown channel"][2]
    assert answers["upstream refused"][1].get("Retry-After")
    assert "Retry-After" in answers["upstream refused"][1]["Access-Control-Expose-Headers"]


def test_a_preflight_is_answered_and_starts_nothing(stack, channel_id):
    add_channel(stack, channel_id)
    for path in (f"/live/stream_{channel_id}.m3u8", f"/live/stream_{channel_id}_3.ts"):
        status, headers, _ = first_request(
            stack.nginx_url(path),
            {**ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "range"},
            method="OPTIONS",
        )
        assert status == 204
        assert_cors(headers)
        assert "Range" in headers["Access-Control-Allow-Headers"]
    assert not ffmpegs_writing(stack, channel_id)
    assert not stack.redis.exists(keys.run_key(channel_id))


def test_a_launcher_that_is_down_still_answers_with_cors(tmp_path, rendered_nginx):
    """nginx's own answer (nothing listens at launcher_listen) reaches a web player too."""
    nginx = rendered_nginx({"launcher_listen": f"127.0.0.1:{free_port()}"})
    status, headers, _ = first_request(nginx.url("/live/stream_5.m3u8"), ORIGIN)
    assert status == 503
    assert_cors(headers)


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/../live/stream_606.m3u8",
        "/live/../live/stream_606.m3u8?x=%0d%0aLocation:%20http://evil.example/",
        "//evil.example/%2e%2e/live/stream_606.m3u8",
        "/live/stream_606.m3u8?next=https://evil.example/",
    ],
)
def test_hostile_paths_get_no_location(stack, target):
    add_channel(stack, 606)
    status, headers, body = raw_request(stack.nginx_port, target)
    assert "Location" not in headers, headers
    assert b"evil.example" not in body
    assert status in (200, 400, 404)


def test_the_launcher_never_reflects_what_the_client_sent(stack, channel_id):
    add_channel(stack, channel_id)
    status, headers, body = raw_request(
        stack.launcher_port,
        f"/channel/{channel_id}/start",
        {"X-Original-URI": "https://evil.example/", "Accept": "text/html"},
    )
    assert status == 200 and "Location" not in headers and b"evil.example" not in body
    status, headers, body = raw_request(
        stack.launcher_port, f"/channel/{channel_id}/start?x=1%0d%0aSet-Cookie:a", {ACCEL_REQUEST_HEADER: "1"}
    )
    assert status == 200 and "Location" not in headers and "Set-Cookie" not in headers
    assert headers["X-Accel-Redirect"].startswith(f"{ACCEL_PREFIX}stream_{channel_id}.m3u8")
    status, _, body = raw_request(stack.launcher_port, "/channel/https:%2F%2Fevil.example/start")
    assert status in (400, 404) and b"evil.example" not in body


def test_the_internal_location_is_not_reachable_from_outside(stack, channel_id):
    add_channel(stack, channel_id)
    assert first_request(stack.playlist_url(channel_id))[0] == 200
    assert first_request(stack.nginx_url(f"{ACCEL_PREFIX}stream_{channel_id}.m3u8"))[0] == 404


@pytest.mark.parametrize(
    "query, expected",
    [
        ("token=abc", "?token=abc"),
        ("token=a%20b&x=1", "?token=a%20b&x=1"),
        ("", ""),
        ("a=b\r\nLocation: http://evil", ""),
        ("a=<script>", ""),
        ("t=" + "x" * 3000, "?t=" + "x" * 3000),
        ("t=" + "x" * 9000, ""),
        ("token=a+b&e=%C3%A9", "?token=a+b&e=%C3%A9"),
        ("token=\u00e9", ""),
        ("a=b c", ""),
    ],
)
def test_accel_target_is_the_channel_and_a_clean_query_only(query, expected):
    assert accel_target("42", query) == f"{ACCEL_PREFIX}stream_42.m3u8{expected}"


def test_accel_target_refuses_a_bad_channel_id():
    with pytest.raises(keys.InvalidChannelId):
        accel_target("../etc/passwd", "")


def test_an_old_nginx_snippet_gets_json_and_one_warning(stack):
    add_channel(stack, 609)
    for _ in range(2):
        status, headers, body = raw_request(
            stack.launcher_port, "/channel/609/start", {"X-Original-URI": "/live/stream_609.m3u8"}
        )
        assert status == 200 and "Location" not in headers and b'"channel_id": "609"' in body
    wait_for(lambda: "old snippet" in stack.log("launcher"), timeout=5, message="the warning")
    assert stack.log("launcher").count("old snippet") == 1


def test_rendered_snippet_has_no_placeholders_left():
    text = render_nginx_config(load_settings(environ={}))
    assert "{{" not in text and "X-Accel-Redirect" in text and "internal;" in text


def test_head_on_a_cold_channel_starts_it(stack, channel_id):
    add_channel(stack, channel_id)
    status, headers, body = first_request(stack.playlist_url(channel_id), ORIGIN, method="HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert_cors(headers)
    assert ffmpegs_writing(stack, channel_id)
    assert first_request(stack.playlist_url(699991), method="HEAD")[0] == 404


def test_byte_ranges_never_give_206_or_416(stack, channel_id):
    """A 416 repeated every add_header (browsers refuse '*, *'); playlists and segments are
    always sent whole."""
    add_channel(stack, channel_id)
    status, headers, body = first_request(stack.playlist_url(channel_id), {**ORIGIN, "Range": "bytes=0-"})
    assert status == 200 and b"#EXTINF" in body
    segment = next(os.path.basename(p) for p in files.stream_files(stack.hls_dir, channel_id) if p.endswith(".ts"))
    for path in (f"/live/stream_{channel_id}.m3u8", f"/live/{segment}"):
        connection = http.client.HTTPConnection("127.0.0.1", stack.nginx_port, timeout=30)
        connection.request("GET", path, headers={**ORIGIN, "Range": "bytes=99999999-"})
        response = connection.getresponse()
        response.read()
        allow = response.headers.get_all("Access-Control-Allow-Origin")
        connection.close()
        assert response.status == 200 and allow == ["*"], (path, response.status, allow)


@pytest.mark.parametrize("query", ["token=a+b", "token=a%20b", "token=%C3%A9t%C3%A9", "token=%2541"])
def test_the_cold_line_and_later_lines_carry_the_same_token(stack, query):
    """The query string reaches the internal redirect undecoded: one player, one viewer."""
    channel = 613 + ["token=a+b", "token=a%20b", "token=%C3%A9t%C3%A9", "token=%2541"].index(query)
    add_channel(stack, channel)
    for _ in range(2):
        assert first_request(stack.playlist_url(channel, "?" + query))[0] == 200

    def tokens():
        with open(stack.settings["access_log"], errors="replace") as handle:
            return [
                line.rsplit('"', 4)[1]
                for line in handle
                if f'"/live/stream_{channel}.m3u8"' in line
                or f'stream_{channel}.m3u8" ' in line
                and "_streamkeeper" in line
            ]

    seen = wait_for(lambda: len(t := tokens()) >= 2 and t, timeout=10, message="both log lines")
    assert len(set(seen)) == 1 and seen[0] != "-", seen


def test_raw_utf8_in_the_query_still_starts_the_channel(stack, channel_id):
    add_channel(stack, channel_id)
    status, _, body = raw_request(stack.nginx_port, f"/live/stream_{channel_id}.m3u8?token=\xc3\xa9")  # raw UTF-8 é
    assert status == 200 and b"#EXTINF" in body


def test_what_the_launcher_refuses_is_never_quoted_back(stack, channel_id):
    add_channel(stack, channel_id)
    status, headers, body = raw_request(
        stack.nginx_port,
        f"/live/stream_{channel_id}.m3u8",
        {"X-A": "\x01<b>hi</b>", **{f"X-Pad-{n}": "x" for n in range(150)}},
    )
    assert b"<b>" not in body and b"hi" not in body
    assert status in (200, 400)
    assert headers.get("X-Content-Type-Options") == "nosniff"


@pytest.mark.parametrize("method, expected", [("POST", 405), ("FOO", 405), ("DELETE", 405)])
def test_only_get_and_head_start_a_channel(stack, channel_id, method, expected):
    add_channel(stack, channel_id)
    status, headers, _ = raw_request(stack.nginx_port, f"/live/stream_{channel_id}.m3u8", method=method)
    assert status == expected
    assert_cors(headers)
    assert not ffmpegs_writing(stack, channel_id)


@pytest.mark.parametrize(
    "target",
    ["/live/stream_620.m3u8%0a", "/live/stream_620.m3u8%0A", "/live/stream_0620.m3u8", "/live/stream_620_1.ts%0a"],
)
def test_paths_nginx_would_alias_are_refused(stack, target):
    add_channel(stack, 620)
    status, headers, _ = raw_request(stack.nginx_port, target)
    assert status == 404
    assert_cors(headers)
    assert not ffmpegs_writing(stack, 620)


def test_nginx_own_errors_carry_cors_and_one_line_reasons(rendered_nginx):
    nginx = rendered_nginx({"launcher_listen": f"127.0.0.1:{free_port()}"})
    status, headers, body = raw_request(nginx.port, "/live/stream_5.m3u8?t=" + "x" * 9000)
    assert status == 414
    assert_cors(headers)
    status, headers, body = first_request(nginx.url("/live/stream_5.m3u8"), ORIGIN)
    assert (status, body) == (503, b"stream launcher unavailable; retry shortly\n")
    assert headers.get("Retry-After") and headers["Content-Type"].startswith("text/plain")


def test_cold_starts_are_rate_limited_per_address(rendered_nginx):
    nginx = rendered_nginx({"launcher_listen": f"127.0.0.1:{free_port()}", "start_rate_limit": 6})
    statuses = [first_request(nginx.url(f"/live/stream_{n}.m3u8"), ORIGIN) for n in range(1, 16)]
    limited = [(s, h, b) for s, h, b in statuses if s == 429]
    assert len(limited) >= 4  # burst 10, then 1 per 10 s
    status, headers, body = limited[0]
    assert body == b"too many channel starts from your address; retry shortly\n"
    assert headers.get("Retry-After")
    assert_cors(headers)
