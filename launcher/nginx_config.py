"""Render the nginx snippet from the settings.

The template and the log format ship inside the package (``streamstate/nginx/``,
package data), so an installed wheel renders exactly what a checkout does.
"""
from __future__ import annotations

import math
import re
from importlib import resources

# Where the launcher's X-Accel-Redirect sends nginx for a cold start's answer: an
# `internal` location of the rendered snippet that serves the playlist file.
ACCEL_PREFIX = "/_streamkeeper/playlist/"
# The request header nginx's @start_stream sets: "answer a player, with X-Accel-Redirect".
ACCEL_REQUEST_HEADER = "X-Streamkeeper-Accel"

# On every answer under /live/, errors included (`always`), for web players on other origins.
CORS_HEADERS = (
    'add_header Access-Control-Allow-Origin "*" always;',
    'add_header Access-Control-Allow-Methods "GET, HEAD, OPTIONS" always;',
    'add_header Access-Control-Allow-Headers "Range, Origin, Accept" always;',
    'add_header Access-Control-Expose-Headers "Content-Length, Content-Range, Retry-After" always;',
    'add_header Access-Control-Max-Age 86400 always;',
)
# A playlist, whether a plain file hit or the answer to a cold start.
PLAYLIST_HEADERS = (
    "types { application/vnd.apple.mpegurl m3u8; }",
    'add_header Cache-Control "no-cache, no-store, must-revalidate" always;',
    *CORS_HEADERS,
)


def shipped_file(name: str) -> str:
    """The text of a file shipped in streamstate/nginx/."""
    return resources.files("streamstate").joinpath("nginx", name).read_text(encoding="utf-8")


def log_format_directive() -> str:
    text = shipped_file("streamkeeper-log-format.conf")
    return next(line for line in text.splitlines() if line.startswith("log_format"))


def render_nginx_config(settings) -> str:
    return fill(shipped_file("streamkeeper.conf.template"), dict(
        config_source=settings.config_path or "built-in defaults",
        log_format_directive=log_format_directive(),
        launcher_listen=settings.launcher_listen,
        nginx_listen=settings.nginx_listen,
        access_log=settings.access_log,
        hls_dir=settings.hls_dir.rstrip("/") or "/",
        segment_max_age=int(max(60, float(settings.hls_time) * int(settings.hls_list_size) * 2)),
        start_timeout=f"{float(settings.start_timeout):g}",
        proxy_read_timeout=int(math.ceil(float(settings.start_timeout))) + 10,
        accel_prefix=ACCEL_PREFIX,
        cors_headers=CORS_HEADERS,
        playlist_headers=PLAYLIST_HEADERS,
    ))


def fill(template: str, values: dict) -> str:
    """Replace {{name}} placeholders (nginx's own $variables are left alone).

    A tuple value is a block of directives: one per line, each at the
    placeholder's indentation.
    """
    def value(match: re.Match) -> str:
        indent, name = match.group(1), match.group(2)
        if name not in values:
            raise KeyError(f"nginx template: no value for {{{{{name}}}}}")
        found = values[name]
        if isinstance(found, tuple):
            return "\n".join(indent + line for line in found)
        return indent + str(found)
    return re.sub(r"([ \t]*)\{\{([a-z_]+)\}\}", value, template)
