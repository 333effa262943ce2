"""Render the nginx snippet and the logrotate file from the settings.

Their templates ship inside the package (``streamstate/nginx/``, package data), so an
installed wheel renders exactly what a checkout does; the log format is
``logformat.STREAMKEEPER_LOG_FORMAT``.
"""

from __future__ import annotations

import math

from .keys import CHANNEL_ID_PATTERN
from .logformat import STREAMKEEPER_LOG_FORMAT, LogLineParser
from .templates import fill, package_file
from .urls import ACCEL_PREFIX, FORWARDED_HEADER, PEER_PREFIX

# Request headers nginx's @start_stream sets: "answer a player, with X-Accel-Redirect", and
# the player's query string as nginx received it ($args).
ACCEL_REQUEST_HEADER = "X-Streamkeeper-Accel"
QUERY_HEADER = "X-Streamkeeper-Query"
AGENT_HEADER = "X-Streamkeeper-Agent"  # the player's User-Agent (viewer identity)
CLIENT_HEADER = "X-Forwarded-For"  # the player's address, $remote_addr

# On every answer under /live/, errors included (`always`): CORS for web players on other
# origins, and nosniff (a body is only ever what its Content-Type says).
ANSWER_HEADERS = (
    'add_header Access-Control-Allow-Origin "*" always;',
    'add_header Access-Control-Allow-Methods "GET, HEAD, OPTIONS" always;',
    'add_header Access-Control-Allow-Headers "Range, Origin, Accept" always;',
    'add_header Access-Control-Expose-Headers "Content-Length, Content-Range, Retry-After" always;',
    "add_header Access-Control-Max-Age 86400 always;",
    "add_header X-Content-Type-Options nosniff always;",
)
# The names of those headers (a forwarded answer's own are hidden, so each is sent once).
_ANSWER_HEADER_NAMES = tuple(line.split()[1] for line in ANSWER_HEADERS)
# A playlist, whether a plain file hit or the answer to a cold start.
PLAYLIST_HEADERS = (
    "types { application/vnd.apple.mpegurl m3u8; }",
    'add_header Cache-Control "no-cache, no-store, must-revalidate" always;',
    *ANSWER_HEADERS,
)


def log_format_directive(log_format: str = "streamkeeper") -> str:
    """The log_format heartbeatd parses, named streamkeeper: ours, or the setting's format."""
    fmt = (
        STREAMKEEPER_LOG_FORMAT if log_format == "streamkeeper" else LogLineParser(log_format).format
    )  # refuses what heartbeatd cannot parse
    if "'" in fmt or "\n" in fmt:
        raise ValueError("log_format: a format with a single quote or a newline cannot be rendered")
    return f"log_format streamkeeper '{fmt}';"


def render_nginx_config(settings) -> str:
    return fill(
        package_file("nginx", "streamkeeper.conf.template"),
        dict(
            config_source=settings.config_path or "built-in defaults",
            log_format_directive=log_format_directive(settings.log_format),
            launcher_listen=settings.launcher_listen,
            nginx_listen=settings.nginx_listen,
            access_log=settings.access_log,
            hls_dir=settings.hls_dir.rstrip("/") or "/",
            segment_max_age=int(max(60, settings.hls_time * settings.hls_list_size * 2)),
            start_timeout=f"{settings.start_timeout:g}",
            proxy_read_timeout=int(math.ceil(settings.start_timeout)) + 10,
            accel_prefix=ACCEL_PREFIX,
            accel_request_header=ACCEL_REQUEST_HEADER,
            query_header=QUERY_HEADER,
            agent_header=AGENT_HEADER,
            channel_id=CHANNEL_ID_PATTERN,
            answer_headers=ANSWER_HEADERS,
            playlist_headers=PLAYLIST_HEADERS,
            start_rate_burst=START_RATE_BURST,
            **start_rate_limit(settings.start_rate_limit),
            **viewer_auth(settings),
            edge_real_ip=edge_real_ip(settings.edge_from),
            peer_prefix=PEER_PREFIX,
            forwarded_header=FORWARDED_HEADER,
            forwarded_variable=FORWARDED_HEADER.lower().replace("-", "_"),
            peer_hidden_headers=tuple(f"proxy_hide_header {name};" for name in _ANSWER_HEADER_NAMES),
        ),
    )


def edge_real_ip(networks) -> tuple[str, ...]:
    """The realip lines that trust X-Forwarded-For from the edge's networks only."""
    if not networks:
        return ("# (edge_from not set: $remote_addr is the connection's own address)",)
    return (*(f"set_real_ip_from {network};" for network in networks), "real_ip_header X-Forwarded-For;")


START_RATE_BURST = 10  # cold starts an address may make at once (a household zapping)


AUTH_LOCATION = "/_streamkeeper/auth"
TOKEN_HEADER = "X-Streamkeeper-Token"
CHANNEL_HEADER = "X-Streamkeeper-Channel"


def viewer_auth(settings) -> dict:
    """auth_request on playlists (and so on cold starts) when auth_url is set; nothing else."""
    if not settings.auth_url:
        return {"auth_zone": (), "auth_check": (), "auth_location": ()}
    seconds = settings.auth_cache_seconds
    cache = (
        (
            "proxy_cache streamkeeper_auth;",
            # The address too: a validator may decide by it (viewers without a token).
            'proxy_cache_key "$streamkeeper_token $streamkeeper_channel $remote_addr";',
            f"proxy_cache_valid 200 401 403 {seconds}s;",
            "proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;",
        )
        if seconds
        else ()
    )
    return {
        "auth_zone": (
            f"proxy_cache_path {settings.auth_cache_dir} levels=1 keys_zone=streamkeeper_auth:1m "
            "max_size=16m inactive=60s use_temp_path=off;",
        )
        if seconds
        else (),
        "auth_check": (
            "set $streamkeeper_token $arg_token;",  # the subrequest sees it
            f"auth_request {AUTH_LOCATION};",
        ),
        "auth_location": (
            f"location = {AUTH_LOCATION} {{",
            "    internal;",
            f"    proxy_pass {settings.auth_url};",
            "    proxy_pass_request_body off;",
            "    proxy_pass_request_headers off;",
            '    proxy_set_header Content-Length "";',
            f"    proxy_set_header {TOKEN_HEADER} $streamkeeper_token;",
            f"    proxy_set_header {CHANNEL_HEADER} $streamkeeper_channel;",
            "    proxy_set_header X-Forwarded-For $remote_addr;",
            "    proxy_set_header X-Original-URI $request_uri;",
            "    proxy_connect_timeout 3s;",
            "    proxy_read_timeout 5s;",
            *("    " + line for line in cache),
            "}",
        ),
    }


def render_logrotate(settings, nginx_pid: str = "/run/nginx.pid") -> str:
    """logrotate's file for the access log: rename, create, nginx reopens on USR1."""
    return fill(
        package_file("nginx", "logrotate.streamkeeper"), {"access_log": settings.access_log, "nginx_pid": nginx_pid}
    )


def start_rate_limit(per_minute: int) -> dict:
    """nginx's limit_req on cold starts, per client address; nothing at 0."""
    if not per_minute:
        return {"start_rate_zone": (), "start_rate_limit": ()}
    return {
        "start_rate_zone": (f"limit_req_zone $binary_remote_addr zone=streamkeeper_starts:10m rate={per_minute}r/m;",),
        "start_rate_limit": (
            f"limit_req zone=streamkeeper_starts burst={START_RATE_BURST} nodelay;",
            "limit_req_status 429;",
            "error_page 429 = @streamkeeper_too_many_starts;",
        ),
    }


# Failed connections before the edge takes a host out of its ring: more than one, so a reused
# keepalive connection that a host's nginx reload closed does not take a healthy host out.
EDGE_MAX_FAILS = 3


def render_edge_config(settings) -> str:
    """The edge's snippet: /live/ to one of ``hosts`` by a consistent hash of the channel id."""
    if not settings.hosts:
        raise ValueError("hosts: list every streaming host's nginx (IP:port) to render the edge")
    if settings.nginx_listen in settings.hosts:
        raise ValueError(
            f"nginx_listen {settings.nginx_listen} is one of hosts: the edge would route to itself; give the "
            "edge's own address (--listen, or nginx_listen in the edge's settings)"
        )
    return fill(
        package_file("nginx", "edge.conf.template"),
        dict(
            config_source=settings.config_path or "built-in defaults",
            nginx_listen=settings.nginx_listen,
            channel_id=CHANNEL_ID_PATTERN,
            host_timeout=f"{settings.host_timeout:g}",
            host_servers=tuple(
                f"server {host} max_fails={EDGE_MAX_FAILS} fail_timeout={int(math.ceil(settings.host_timeout))}s;"
                for host in settings.hosts
            ),
            start_timeout=f"{settings.start_timeout:g}",
            proxy_read_timeout=int(math.ceil(settings.start_timeout)) + 10,
        ),
    )
