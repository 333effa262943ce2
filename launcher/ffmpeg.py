"""FFmpeg's argv for a channel (a list, never a shell) and its meaningful error."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from streamstate import files
from streamstate.channels import Channel, ChannelError, check_proxy, check_source_url

# Read/write timeout: a dead upstream ends in an error, not a hang.
RW_TIMEOUT_US = 10_000_000
RECONNECT_DELAY_MAX = 4

WHITELIST = {"http": "http,tcp", "https": "https,tls,tcp"}


def keyframe_interval(settings) -> float:
    """Keyframes where segments may be cut: every hls_init_time (which divides hls_time)."""
    return min(float(settings.hls_time), float(settings.hls_init_time))


def build_argv(channel: Channel, settings) -> list[str]:
    """The complete FFmpeg command for ``channel``; ChannelError if it cannot be run."""
    source = check_source_url(channel.id, channel.source_url)
    profiles = settings.quality_profiles
    if channel.quality not in profiles:
        raise ChannelError(f"channel {channel.id}: unknown quality {channel.quality!r} "
                           f"(profiles: {', '.join(sorted(profiles))})")
    profile = profiles[channel.quality]
    proxy = check_proxy(channel.id, channel.proxy or settings.upstream_proxy or None)
    scheme = urlsplit(source).scheme.lower()

    argv = [settings.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "warning", "-nostats",
            "-protocol_whitelist", WHITELIST[scheme],
            "-user_agent", channel.user_agent or settings.user_agent]
    if channel.referer:
        argv += ["-referer", channel.referer]
    if channel.headers:
        argv += ["-headers", "".join(f"{k}: {v}\r\n" for k, v in channel.headers.items())]
    if proxy:
        argv += ["-http_proxy", proxy]
    argv += ["-rw_timeout", str(RW_TIMEOUT_US),
             "-reconnect", "1", "-reconnect_streamed", "1",
             "-reconnect_delay_max", str(RECONNECT_DELAY_MAX),
             "-analyzeduration", str(profile["analyzeduration"]),
             "-probesize", str(profile["probesize"]),
             "-i", source,
             "-map", "0:v:0?", "-map", "0:a:0?"]
    argv += profile["video"]
    if "copy" not in profile["video"]:
        # Cut where asked: a keyframe every hls_init_time; without it the first
        # segment waits for the source's own keyframe.
        argv += ["-force_key_frames", f"expr:gte(t,n_forced*{keyframe_interval(settings):g})",
                 "-sc_threshold", "0"]
    argv += profile["audio"]
    argv += ["-f", "hls",
             "-hls_time", f"{float(settings.hls_time):g}",
             "-hls_init_time", f"{float(settings.hls_init_time):g}",
             "-hls_list_size", str(int(settings.hls_list_size)),
             "-hls_flags", "delete_segments+temp_file",
             "-hls_segment_filename", files.segment_pattern(settings.hls_dir, channel.id),
             files.playlist_path(settings.hls_dir, channel.id)]
    return argv


_ERROR_PATTERNS = [
    re.compile(r"HTTP error \d{3}[^\r\n]*"),
    re.compile(r"Server returned \d{3}[^\r\n(]*"),
    re.compile(r"Connection refused|Connection timed out|Network is unreachable|"
               r"No route to host|Name or service not known|Temporary failure in name resolution|"
               r"Protocol not on whitelist[^\r\n]*|Invalid data found when processing input|"
               r"End of file|Operation timed out|I/O error", re.IGNORECASE),
]
_URL_RE = re.compile(r"\b(https?://[^\s'\"]+)")


def redact_urls(text: str) -> str:
    """Drop credentials and query strings (tokens) from URLs in a line."""
    def clean(match: re.Match) -> str:
        parts = urlsplit(match.group(1))
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return _URL_RE.sub(clean, text)


def meaningful_error(stderr_lines: list[str]) -> str:
    """The line of FFmpeg's output that says why it failed, e.g. 'HTTP error 403 Forbidden'."""
    for pattern in _ERROR_PATTERNS:
        for line in reversed(stderr_lines):
            match = pattern.search(line)
            if match:
                return match.group(0).strip()
    for line in reversed(stderr_lines):
        if line.strip():
            return redact_urls(re.sub(r"^\[[^\]]+\]\s*", "", line.strip()))[:300]
    return ""
