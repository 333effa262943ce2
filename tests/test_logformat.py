import pytest

from streamstate.logformat import LogFormatError, LogLineParser, normalise_format, viewer_hash
from tests.helpers import LEGACY_FORMAT, legacy_line, sk_line

pytestmark = pytest.mark.unit

T = 1795000000.0


def parse(lines, fmt="streamkeeper", viewers=True):
    parser = LogLineParser(fmt, count_viewers=viewers)
    return parser, parser.parse_chunk("".join(lines).encode("utf-8", "surrogateescape"))


def test_viewing_requests_are_matched_with_their_own_time():
    _, result = parse(
        [
            sk_line(T + 1, "/live/stream_7.m3u8"),
            sk_line(T + 2, "/live/stream_7_15.ts"),
            sk_line(T + 3, "/live/stream_8_1.m4s"),
            sk_line(T + 4, "/live/stream_9_2.aac", status=304),
            sk_line(T + 5, "/live/stream_10_3.mp4", status=206),
        ]
    )
    assert result.lines == 5 and result.matched == 5 and result.malformed == 0
    assert result.channel_times == {"7": T + 2, "8": T + 3, "9": T + 4, "10": T + 5}


@pytest.mark.parametrize(
    "uri, status",
    [
        ("/live/stream_5.m3u8", 404),
        ("/live/stream_5.m3u8", 500),
        ("/live/stream_5.m3u8", 307),
        ("/api/v1/stream_5/status", 200),
        ("/api/live/stream_5.m3u8", 200),
        ("/live/stream_5.m3u8.bak", 200),
        ("/live/stream_5.m3u8.tmp", 200),
        ("/live/stream_5_1.ts.tmp", 200),
        ("/live/stream_abc.m3u8", 200),
        ("/live/stream_5_x.ts", 200),
        ("/live/stream_-5.m3u8", 200),
        ("/live/stream_5.mp4", 200),
        ("/live/stream_1234567890123456789.m3u8", 200),
    ],
)
def test_non_viewing_requests_do_not_count(uri, status):
    _, result = parse([sk_line(T, uri, status=status)])
    assert result.channel_times == {}
    assert result.lines == 1 and result.malformed == 0


def test_eighteen_digit_ids_count():
    _, result = parse([sk_line(T, "/live/stream_123456789012345678.m3u8")])
    assert result.channel_times == {"123456789012345678": T}


def test_malformed_and_binary_lines_are_counted_and_skipped():
    lines = [
        "garbage\n",
        "\x00\x01\x02\xff binary\n",
        "1795000000.000 20\n",  # cut short
        "\n",
        sk_line(T, "/live/stream_5.m3u8"),
    ]
    _, result = parse(lines)
    assert result.lines == 5 and result.malformed == 4 and result.matched == 1
    assert result.channel_times == {"5": T}


def test_out_of_order_lines_keep_the_newest_time():
    _, result = parse(
        [
            sk_line(T + 9, "/live/stream_1.m3u8"),
            sk_line(T + 1, "/live/stream_1_1.ts"),
            sk_line(T + 5, "/live/stream_2.m3u8"),
            sk_line(T + 3, "/live/stream_1_2.ts"),
        ]
    )
    assert result.channel_times == {"1": T + 9, "2": T + 5}


def test_msec_of_different_widths_compare_as_numbers():
    _, result = parse([sk_line(999999999.5, "/live/stream_1.m3u8"), sk_line(99999999.5, "/live/stream_1.m3u8")])
    assert result.channel_times == {"1": 999999999.5}


def test_old_host_format_with_time_local():
    parser, result = parse(
        [
            legacy_line(T, "/live/stream_3_1.ts"),
            legacy_line(T + 2, "/live/stream_3.m3u8?token=abc"),
            legacy_line(T + 4, "/live/stream_3.m3u8", status=404),
        ],
        fmt=LEGACY_FORMAT,
    )
    assert result.matched == 2 and result.other == 1
    assert result.channel_times == {"3": T + 2}
    assert ("3", viewer_hash(b"t:abc")) in result.viewer_times


def test_time_iso8601_and_request_uri_format():
    fmt = '$time_iso8601 $status $request_uri "$http_user_agent"'
    line = '2026-11-22T10:00:00+00:00 200 /live/stream_4.m3u8?x=1 "VLC"\n'
    _, result = parse([line], fmt=fmt)
    assert result.channel_times == {"4": 1795341600.0}


def test_pasted_nginx_directive_is_accepted():
    text = "log_format main '$remote_addr - [$time_local] \"$request\" '\n  '$status $body_bytes_sent';"
    assert normalise_format(text) == '$remote_addr - [$time_local] "$request" $status $body_bytes_sent'
    parser = LogLineParser(text)
    assert parser.time_variable == "time_local"


@pytest.mark.parametrize(
    "fmt, problem",
    [
        ('$remote_addr "$request" $status', "time"),
        ("$msec $status $remote_addr", "request"),
        ('$msec "$request"', "status"),
    ],
)
def test_unusable_formats_are_refused(fmt, problem):
    with pytest.raises(LogFormatError, match=problem):
        LogLineParser(fmt)


def test_viewer_identity_is_token_else_address_and_agent():
    parser, result = parse(
        [
            sk_line(T, "/live/stream_1.m3u8", token="tokA", addr="10.0.0.1"),
            sk_line(T + 1, "/live/stream_1.m3u8", token="tokA", addr="10.0.0.2"),
            sk_line(T + 2, "/live/stream_1_1.ts", addr="10.0.0.2"),  # segments: no token, not a viewer
            sk_line(T + 2, "/live/stream_1.m3u8", addr="10.0.0.3", agent="VLC"),
            sk_line(T + 3, "/live/stream_1.m3u8", addr="10.0.0.3", agent="ffmpeg"),
        ]
    )
    expected = {b"t:tokA": T + 1, b"a:10.0.0.3\0VLC": T + 2, b"a:10.0.0.3\0ffmpeg": T + 3}
    assert result.viewer_times == {("1", viewer_hash(k)): v for k, v in expected.items()}


def test_viewer_counting_off_captures_no_viewers():
    _, result = parse([sk_line(T, "/live/stream_1.m3u8", token="tokA")], viewers=False)
    assert result.viewer_times == {} and result.channel_times == {"1": T}
