"""Channel records: ``channel:<id>`` JSON (source_url, quality, and optional upstream details)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterator
from urllib.parse import urlsplit

from . import keys

DEFAULT_QUALITY = "medium"
ALLOWED_SOURCE_SCHEMES = ("http", "https")
# Proxies the egress relay can use (FFmpeg itself only ever talks to the relay).
PROXY_SCHEMES = ("http", "socks5", "socks5h")
RESOLVERS = ("none", "plain", "cloudscraper")
MAX_FALLBACK_URLS = 8

# Channel records come from providers' M3U files and an unauthenticated legacy route:
# every field is bounded, and nothing that reaches FFmpeg's argv may hold a control
# character (CR/LF would become extra request lines: header injection).
MAX_RECORD_BYTES = 16 * 1024
MAX_FIELD_CHARS = {
    "source_url": 4096,
    "fallback_urls": 4096,
    "proxy": 2048,
    "user_agent": 512,
    "referer": 2048,
    "quality": 64,
    "name": 256,
    "group": 256,
}
MAX_HEADERS = 32
MAX_HEADER_NAME_CHARS = 64
MAX_HEADER_VALUE_CHARS = 2048
UPSTREAM_FIELDS = ("source_url", "proxy", "user_agent", "referer")  # sent upstream
DISPLAY_FIELDS = ("name", "group")  # shown, never sent
# C0 controls (NUL, TAB, CR, LF, ...), DEL, C1 controls and lone surrogates (raw bytes that
# came through JSON escapes or a terminal): what FFmpeg would put on the wire as it is.
# C0, DEL, C1 and lone surrogates: never in a value that reaches a header, an argv or a log.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What is sent upstream as text (URLs, header values): printable ASCII only; anything else is
# percent-encoded in a URL, and has no place in a header.
_WIRE_TEXT_RE = re.compile(r"[\x20-\x7e]*")
# RFC 7230 token: what a header name may be.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Headers that frame or route the request: FFmpeg sets them itself.
_RESERVED_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-connection",
}


class ChannelError(ValueError):
    """A channel record that cannot be used; the message names the channel and the field,
    never a URL or a credential (it may reach an anonymous player)."""


@dataclasses.dataclass(frozen=True)
class Channel:
    id: str
    source_url: str
    quality: str = DEFAULT_QUALITY
    user_agent: str | None = None
    referer: str | None = None
    headers: dict = dataclasses.field(default_factory=dict)
    proxy: str | None = None
    name: str | None = None
    group: str | None = None
    # None: not set here (the provider's, else true).
    tls_verify: bool | None = None
    provider: str | None = None
    fallback_urls: tuple[str, ...] = ()
    resolver: str | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        """The source, then the fallbacks, in the order they are tried."""
        return (self.source_url, *self.fallback_urls)

    def as_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {}, "", ())}
        data.pop("id")
        if "fallback_urls" in data:
            data["fallback_urls"] = list(data["fallback_urls"])
        return json.dumps(data, sort_keys=True)


def _check_text(channel_id: str, field: str, value, limit: int) -> str:
    if not isinstance(value, str):
        raise ChannelError(f"channel {channel_id}: {field} must be a string")
    if len(value) > limit:
        raise ChannelError(f"channel {channel_id}: {field} is too long ({len(value)} characters, at most {limit})")
    if CONTROL_RE.search(value):
        raise ChannelError(
            f"channel {channel_id}: {field} contains a control character (CR, LF, NUL, TAB or another); refused"
        )
    if field not in DISPLAY_FIELDS and field != "quality" and not _WIRE_TEXT_RE.fullmatch(value):
        raise ChannelError(
            f"channel {channel_id}: {field} has characters outside printable ASCII "
            "(percent-encode them in a URL); refused"
        )
    return value


def _check_url(channel_id: str, field: str, value, schemes: tuple[str, ...]) -> str:
    url = _check_text(channel_id, field, value, MAX_FIELD_CHARS[field]).strip()
    if not url:
        raise ChannelError(f"channel {channel_id}: {field} is missing or empty")
    if any(ch.isspace() for ch in url):
        raise ChannelError(f"channel {channel_id}: {field} contains whitespace (encode it as %20)")
    try:
        parts = urlsplit(url)
        parts.port  # raises on a bad port
    except ValueError:
        raise ChannelError(f"channel {channel_id}: {field} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes or not parts.hostname:
        shown = re.sub(r"[^a-z0-9+.-]", "", scheme)[:16] or "none"
        raise ChannelError(
            f"channel {channel_id}: {field} refused: only "
            f"{' and '.join(s + '://' for s in schemes)} URLs are allowed "
            f"(scheme: {shown})"
        )
    return scheme + url[len(parts.scheme) :]  # HtTp:// is http:// (FFmpeg wants it so)


def check_source_url(channel_id: str, url) -> str:
    """Only http(s) sources reach FFmpeg: no file:, concat:, data:, bare paths."""
    return _check_url(channel_id, "source_url", url, ALLOWED_SOURCE_SCHEMES)


def check_proxy(channel_id: str, proxy) -> str | None:
    """http://, socks5:// or socks5h:// (the proxy resolves names), user:pass allowed."""
    if not proxy:
        return None
    url = _check_url(channel_id, "proxy", proxy, PROXY_SCHEMES)
    if urlsplit(url).path not in ("", "/") or urlsplit(url).query:
        raise ChannelError(f"channel {channel_id}: proxy must be scheme://[user:pass@]host:port with no path or query")
    if not urlsplit(url).port:
        raise ChannelError(f"channel {channel_id}: proxy needs a port (e.g. socks5h://127.0.0.1:40000)")
    return url


def check_fallback_urls(channel_id: str, urls) -> tuple[str, ...]:
    if urls in (None, "", []):
        return ()
    if not isinstance(urls, (list, tuple)) or len(urls) > MAX_FALLBACK_URLS:
        raise ChannelError(
            f"channel {channel_id}: fallback_urls must be a list of at most {MAX_FALLBACK_URLS} source URLs"
        )
    return tuple(_check_url(channel_id, "fallback_urls", url, ALLOWED_SOURCE_SCHEMES) for url in urls)


def check_provider_name(channel_id: str, name) -> str | None:
    if name in (None, ""):
        return None
    if not isinstance(name, str) or not keys.valid_provider_name(name):
        raise ChannelError(f"channel {channel_id}: provider must be a name of letters, digits, _ and - (at most 64)")
    return name


def check_resolver(channel_id: str, resolver) -> str | None:
    if resolver in (None, ""):
        return None
    if resolver not in RESOLVERS:
        raise ChannelError(f"channel {channel_id}: resolver must be one of {', '.join(RESOLVERS)}")
    return resolver


def check_tls_verify(channel_id: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ChannelError(f"channel {channel_id}: tls_verify must be true or false")
    return value


def check_headers(channel_id: str, headers) -> dict[str, str]:
    if headers in (None, ""):
        return {}
    if not isinstance(headers, dict):
        raise ChannelError(f"channel {channel_id}: headers must be an object of strings")
    if len(headers) > MAX_HEADERS:
        raise ChannelError(f"channel {channel_id}: too many headers ({len(headers)}, at most {MAX_HEADERS})")
    checked = {}
    for name, value in headers.items():
        if not isinstance(name, str) or len(name) > MAX_HEADER_NAME_CHARS or not _HEADER_NAME_RE.fullmatch(name):
            raise ChannelError(
                f"channel {channel_id}: a header name is not a valid HTTP token "
                "(letters, digits and !#$%&'*+-.^_`|~ only)"
            )
        if name.lower() in _RESERVED_HEADERS:
            raise ChannelError(f"channel {channel_id}: header {name} is set by FFmpeg itself")
        checked[name] = _check_text(channel_id, f"header {name}", value, MAX_HEADER_VALUE_CHARS)
    return checked


def _display_text(channel_id: str, field: str, value) -> str | None:
    """name and group: shown, never sent upstream; control characters become spaces."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ChannelError(f"channel {channel_id}: {field} must be a string")
    return CONTROL_RE.sub(" ", value[: MAX_FIELD_CHARS[field]]).strip() or None


def channel_from_dict(channel_id: str, data) -> Channel:
    """A Channel from a record's fields, every one checked; ChannelError names the field."""
    channel_id = keys.check_channel_id(channel_id)
    if not isinstance(data, dict):
        raise ChannelError(f"channel {channel_id}: record is not a JSON object")
    optional = {}
    for field in ("user_agent", "referer"):
        if data.get(field) not in (None, ""):
            optional[field] = _check_text(channel_id, field, data[field], MAX_FIELD_CHARS[field])
    quality = data.get("quality") or DEFAULT_QUALITY
    _check_text(channel_id, "quality", quality, MAX_FIELD_CHARS["quality"])
    channel = Channel(
        id=channel_id,
        source_url=check_source_url(channel_id, data.get("source_url")),
        quality=quality,
        headers=check_headers(channel_id, data.get("headers")),
        proxy=check_proxy(channel_id, data.get("proxy")),
        name=_display_text(channel_id, "name", data.get("name")),
        group=_display_text(channel_id, "group", data.get("group")),
        tls_verify=check_tls_verify(channel_id, data.get("tls_verify")),
        provider=check_provider_name(channel_id, data.get("provider")),
        fallback_urls=check_fallback_urls(channel_id, data.get("fallback_urls")),
        resolver=check_resolver(channel_id, data.get("resolver")),
        **optional,
    )
    size = len(channel.as_json().encode())
    if size > MAX_RECORD_BYTES:  # however it came (a file, the legacy route)
        raise ChannelError(f"channel {channel_id}: record is too large ({size} bytes, at most {MAX_RECORD_BYTES})")
    return channel


def recheck(channel: Channel) -> Channel:
    """Every check again, on a Channel however it was made (right before FFmpeg runs)."""
    fields = dataclasses.asdict(channel)
    return channel_from_dict(fields.pop("id"), fields)


def parse_channel(channel_id: str, raw: str | bytes) -> Channel:
    if len(raw) > MAX_RECORD_BYTES:
        raise ChannelError(f"channel {channel_id}: record is too large ({len(raw)} bytes, at most {MAX_RECORD_BYTES})")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(
            f"channel {channel_id}: {keys.channel_key(channel_id)} is not valid JSON ({str(exc)[:80]})"
        ) from None
    except RecursionError:
        raise ChannelError(f"channel {channel_id}: record is nested too deeply") from None
    return channel_from_dict(channel_id, data)


def get_channel(client, channel_id: str) -> Channel | None:
    """The channel, None if there is no record; ChannelError if the record is unusable."""
    raw = client.get(keys.channel_key(channel_id))
    if raw is None:
        return None
    return parse_channel(channel_id, raw)


def put_channel(client, channel: Channel, pipeline=None) -> None:
    (pipeline or client).set(keys.channel_key(channel.id), channel.as_json())


# KEYS: channel; ARGV: the value we wrote, then the value before it ('' for none).
_UNDO_PUT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""


def put_channel_undoably(client, channel: Channel) -> tuple[str, bytes | str | None]:
    """Store the record and return what undo_put_channel needs to take it back."""
    key = keys.channel_key(channel.id)
    written = channel.as_json()
    previous = client.set(key, written, get=True)
    return written, previous


def undo_put_channel(client, channel_id: str, written: str, previous) -> bool:
    """The record as it was before put_channel_undoably, unless someone changed it since."""
    from .redis_client import registered_script

    before = previous.decode() if isinstance(previous, bytes) else (previous or "")
    return bool(
        registered_script(client, "undo_put_channel", _UNDO_PUT_LUA)(
            keys=[keys.channel_key(channel_id)], args=[written, before]
        )
    )


def delete_channel(client, channel_id: str, pipeline=None) -> int:
    return (pipeline or client).delete(keys.channel_key(channel_id))


def iter_channels(client) -> Iterator[tuple[str, Channel | ChannelError]]:
    """Every channel record (SCAN, never KEYS), parsed, or the error that stops it."""
    ids = sorted(
        {
            cid
            for key in client.scan_iter(match=keys.CHANNEL_KEY_PATTERN, count=1000)
            if (cid := keys.channel_id_from_channel_key(key))
        },
        key=int,
    )
    for start in range(0, len(ids), 500):
        batch = ids[start : start + 500]
        for channel_id, raw in zip(batch, client.mget([keys.channel_key(c) for c in batch])):
            if raw is None:
                continue
            try:
                yield channel_id, parse_channel(channel_id, raw)
            except ChannelError as exc:
                yield channel_id, exc
