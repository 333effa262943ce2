"""How a source URL is shown anywhere but in its channel record: logs, /streams, status.

Providers put accounts in URLs: user info (``http://user:pass@host/``), the path
(Xtream-style ``/live/USER/PASS/71386.ts``) and the query (``?token=…``).  Shown,
a source keeps its scheme, host, port and the path's last segment (the channel's
own file); the rest becomes ``…``:  ``http://host:8080/…/71386.ts``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

ELLIPSIS = "…"
# A URL inside free text (an FFmpeg error line): up to whitespace or a quote.
_URL_IN_TEXT_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,15}://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…/last`` (no user info, query or fragment)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # e.g. an unterminated IPv6 literal
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    if port:
        host += f":{port}"
    segments = [s for s in parts.path.split("/") if s]
    path = ""
    if segments:
        path = "/" + (f"{ELLIPSIS}/" if len(segments) > 1 else "") + segments[-1]
    scheme = parts.scheme.lower() or "?"
    return f"{scheme}://{host}{path}"


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Every URL in ``text`` redacted, and each of ``secrets`` (the parts of a source URL
    that must not show: user info, path segments, query) replaced wherever it stands."""
    text = _URL_IN_TEXT_RE.sub(lambda match: redact_url(match.group(0)), text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, ELLIPSIS)
    return text


def url_secrets(url: str) -> tuple[str, ...]:
    """The parts of ``url`` that ``redact_url`` hides: user, password, every path segment
    but the last, the query and the fragment."""
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return (url,)
    segments = [s for s in parts.path.split("/") if s][:-1]
    found = [user, password, parts.query, parts.fragment, *segments]
    return tuple(s for s in found if s)


def printable(value) -> str:
    """Text from Redis as a terminal may show it: control characters escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(value))
