"""FFmpeg's argv for a channel (a list, never a shell) and its meaningful error."""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from urllib.parse import urlsplit

from streamstate import files, hls
from streamstate.channels import Channel, check_source_url
from streamstate.redact import redact_text, url_secrets
from streamstate.stream_end import Cause
from streamstate.upstreams import Upstream

# Read/write timeout: a dead upstream ends in an error, not a hang.
RW_TIMEOUT_US = 10_000_000
RECONNECT_DELAY_MAX = 4

# What a source may use: http and https (an http playlist may list https segments),
# crypto (AES-128 HLS), and httpproxy (the egress relay's CONNECT tunnels).  Never file,
# concat, data or subfile: a playlist must not make FFmpeg read the host's own files.
PROTOCOL_WHITELIST = "http,https,tcp,tls,crypto,httpproxy"
_COOKIE_RE = re.compile(r"[!#-+\--:<-~]{1,256}=[!#-+\--:<-~]{0,4096}")  # name=value, no ; , " or space


def keyframe_interval(settings) -> float:
    """Keyframes where segments may be cut: every hls_init_time (which divides hls_time)."""
    return min(settings.hls_time, settings.hls_init_time)


def build_argv(
    channel: Channel,
    settings,
    upstream: Upstream,
    *,
    source: str | None = None,
    cookies: Sequence[str] = (),
    start_number: int = 0,
    target_duration: int | None = None,
) -> list[str]:
    """The complete FFmpeg command for ``channel`` (checked by channel_check.validate, which
    gave ``upstream``) reading ``source`` (default: its first; a resolver's URL is checked
    here, it is hostile), with its provider's defaults.  FFmpeg's connections go to the
    egress relay (http_proxy in its environment, streamstate.egress).  It writes its own
    playlist (files.ffmpeg_playlist_path), numbering segments from ``start_number``; the
    launcher publishes the viewers' playlist from it."""
    source = check_source_url(channel.id, source or channel.source_url)
    profile = settings.quality_profiles[channel.quality]
    return [
        settings.ffmpeg,
        *("-hide_banner", "-nostdin", "-loglevel", "warning", "-nostats"),
        *_input_args(settings, upstream, source, cookies, profile),
        *_encode_args(settings, profile),
        *_hls_output_args(settings, channel.id, profile, start_number, target_duration),
    ]


def _input_args(settings, upstream: Upstream, source: str, cookies: Sequence[str], profile: dict) -> list[str]:
    """How FFmpeg reads the source: only our protocols, the channel's headers (and a
    resolver's cookies), the certificate checked, reconnects, one video and one audio."""
    args = ["-protocol_whitelist", PROTOCOL_WHITELIST, "-user_agent", upstream.user_agent]
    if upstream.referer:
        args += ["-referer", upstream.referer]
    headers = dict(upstream.headers)
    cookies = [c for c in cookies if _COOKIE_RE.fullmatch(c)]  # from a resolver: hostile
    if cookies:
        # A Cookie header, not -cookies: behind a proxy (the relay) FFmpeg 5.1 matches a
        # cookie's path against the absolute URL and never sends it (tested).
        name = next((k for k in headers if k.lower() == "cookie"), "Cookie")
        headers[name] = "; ".join(([headers[name]] if name in headers else []) + cookies)
    if headers:
        args += ["-headers", "".join(f"{k}: {v}\r\n" for k, v in headers.items())]
    if urlsplit(source).scheme.lower() == "https":
        # Verify the upstream's certificate (FFmpeg does not by default); a channel may opt
        # out with tls_verify = false (a provider with a self-signed certificate).
        args += ["-tls_verify", "1" if upstream.tls_verify else "0"]
        if upstream.tls_verify:
            args += ["-ca_file", settings.tls_ca_file]
    reconnect = ["-reconnect", "1", "-reconnect_streamed", "1", "-reconnect_delay_max", str(RECONNECT_DELAY_MAX)]
    probe = ["-analyzeduration", str(profile["analyzeduration"]), "-probesize", str(profile["probesize"])]
    return [
        *args,
        "-rw_timeout",
        str(RW_TIMEOUT_US),
        *reconnect,
        *probe,
        "-i",
        source,
        "-map",
        "0:v:0?",
        "-map",
        "0:a:0?",
    ]


def _encode_args(settings, profile: dict) -> list[str]:
    """The quality profile's video and audio options; an encode cuts a keyframe every
    hls_init_time (without it the first segment waits for the source's own keyframe)."""
    keyframes = []
    if "copy" not in profile["video"]:
        keyframes = ["-force_key_frames", f"expr:gte(t,n_forced*{keyframe_interval(settings):g})", "-sc_threshold", "0"]
    return [*profile["video"], *keyframes, *profile["audio"]]


def _hls_output_args(settings, channel_id: str, profile: dict, start_number: int, target_duration: int | None):
    """FFmpeg's own playlist: it lists (and keeps on disk) at least what the viewers'
    playlist may list, and deletes its own segments only a window after that: never one
    still listed.  Segments numbered on from ``start_number``."""
    target = target_duration or hls.target_duration(settings.hls_time, profile)
    window = hls.window_segments(settings.hls_list_size, target, min(settings.hls_time, settings.hls_init_time))
    return [
        *("-f", "hls", "-hls_time", f"{settings.hls_time:g}", "-hls_init_time", f"{settings.hls_init_time:g}"),
        *("-hls_list_size", str(window), "-hls_flags", "delete_segments+temp_file"),
        *("-hls_delete_threshold", str(window + hls.KEEP_AFTER_REMOVAL), "-start_number", str(int(start_number))),
        "-hls_segment_filename",
        files.segment_pattern(settings.hls_dir, channel_id),
        files.ffmpeg_playlist_path(settings.hls_dir, channel_id),
    ]


def start_number_of(argv: list[str]) -> int | None:
    """The ``-start_number`` a running FFmpeg was given (its first segment's number)."""
    for index, arg in enumerate(argv[:-1]):
        if arg == "-start_number" and argv[index + 1].isdigit():
            return int(argv[index + 1])
    return None


_DISK_FULL_CLASS = (re.compile(r"No space left on device", re.I), Cause.DISK_FULL.text)

# Why an FFmpeg failed, as a class a player may see (never a URL: providers put accounts
# in their URLs) and the line of its output that says so, redacted, for the log.
_FAILURE_CLASSES = [
    _DISK_FULL_CLASS,
    (re.compile(r"Protocol '?\w+'? not on whitelist", re.I), "upstream asked for a refused protocol"),
    (re.compile(r"(?:HTTP error|Server returned) (\d{3})"), "upstream refused: HTTP {0}"),
    (re.compile(r"certificate|gnutls|TLS|SSL", re.I), "upstream TLS failed (certificate not trusted?)"),
    (
        re.compile(
            r"Connection refused|Connection timed out|Network is unreachable|No route to host|"
            r"Name or service not known|Temporary failure in name resolution|"
            r"Connection reset by peer|Operation timed out|Failed to resolve",
            re.I,
        ),
        "upstream unreachable",
    ),
    (
        re.compile(
            r"Invalid data found when processing input|End of file|could not find codec|"
            r"I/O error|Input/output error|Invalid argument",
            re.I,
        ),
        "upstream sent no playable stream",
    ),
]


class FailureClass(typing.NamedTuple):
    text: str  # the class a player may see ("" when the output says nothing useful)
    detail: str  # the line that says so, redacted, for the log
    disk_full: bool  # the output says hls_dir is full: the host's problem, not the source's


def classify_failure(stderr_lines: list[str], source_url: str = "") -> FailureClass:
    """What a failed FFmpeg's output says."""
    secrets = url_secrets(source_url) if source_url else ()
    for found in _FAILURE_CLASSES:
        pattern, label = found
        for line in reversed(stderr_lines):
            match = pattern.search(line)
            if match:
                return FailureClass(
                    label.format(*match.groups()), _detail(line, secrets), disk_full=found is _DISK_FULL_CLASS
                )
    for line in reversed(stderr_lines):
        if line.strip():
            return FailureClass("", _detail(line, secrets), False)
    return FailureClass("", "", False)


def _detail(line: str, secrets: tuple[str, ...]) -> str:
    """An FFmpeg output line for the log: its [module @ 0x..] prefix off, URLs redacted."""
    return redact_text(re.sub(r"^\[[^\]]+\]\s*", "", line.strip()), secrets)[:300]
