"""Channel records: ``channel:<id>`` JSON (source_url, quality, and optional upstream details)."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator
from urllib.parse import urlsplit

from . import keys

DEFAULT_QUALITY = "medium"
ALLOWED_SOURCE_SCHEMES = ("http", "https")
PROXY_SCHEMES = ("http",)   # what FFmpeg's http protocol can use (SOCKS: a later issue)


class ChannelError(ValueError):
    """A channel record that cannot be used; the message names the channel."""


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

    def as_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {}, "")}
        data.pop("id")
        return json.dumps(data, sort_keys=True)


def check_source_url(channel_id: str, url: str) -> str:
    """Only http(s) sources reach FFmpeg: no file:, concat:, data:, bare paths."""
    if not isinstance(url, str) or not url.strip():
        raise ChannelError(f"channel {channel_id}: source_url is missing or empty")
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ALLOWED_SOURCE_SCHEMES or not parts.netloc:
        shown = url if len(url) <= 80 else url[:80] + "..."
        raise ChannelError(f"channel {channel_id}: source_url {shown!r} refused: only http:// "
                           "and https:// sources are allowed")
    if any(ch in url for ch in "\r\n\0"):
        raise ChannelError(f"channel {channel_id}: source_url contains control characters")
    return url.strip()


def check_proxy(channel_id: str, proxy: str | None) -> str | None:
    if not proxy:
        return None
    scheme = urlsplit(proxy).scheme.lower()
    if scheme.startswith("socks"):
        raise ChannelError(f"channel {channel_id}: proxy {proxy!r} is a SOCKS proxy, which FFmpeg's "
                           "http protocol cannot use; SOCKS support is not built yet - use an "
                           "http:// proxy")
    if scheme not in PROXY_SCHEMES:
        raise ChannelError(f"channel {channel_id}: proxy {proxy!r} refused: expected http://")
    return proxy


def channel_from_dict(channel_id: str, data) -> Channel:
    if not isinstance(data, dict):
        raise ChannelError(f"channel {channel_id}: record is not a JSON object")
    headers = data.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise ChannelError(f"channel {channel_id}: headers must be an object of strings")
    for name, value in headers.items():
        if any(ch in name + value for ch in "\r\n\0") or ":" in name:
            raise ChannelError(f"channel {channel_id}: header {name!r} is not a valid header")
    for field in ("quality", "user_agent", "referer", "proxy", "name", "group"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise ChannelError(f"channel {channel_id}: {field} must be a string")
    return Channel(
        id=keys.check_channel_id(channel_id),
        source_url=check_source_url(channel_id, data.get("source_url")),
        quality=data.get("quality") or DEFAULT_QUALITY,
        user_agent=data.get("user_agent"),
        referer=data.get("referer"),
        headers=dict(headers),
        proxy=check_proxy(channel_id, data.get("proxy")),
        name=data.get("name"),
        group=data.get("group"),
    )


def parse_channel(channel_id: str, raw: str | bytes) -> Channel:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"channel {channel_id}: {keys.channel_key(channel_id)} is not valid "
                           f"JSON ({exc})") from None
    return channel_from_dict(channel_id, data)


def get_channel(client, channel_id: str) -> Channel | None:
    """The channel, None if there is no record; ChannelError if the record is unusable."""
    raw = client.get(keys.channel_key(channel_id))
    if raw is None:
        return None
    return parse_channel(channel_id, raw)


def put_channel(client, channel: Channel, pipeline=None) -> None:
    (pipeline or client).set(keys.channel_key(channel.id), channel.as_json())


def delete_channel(client, channel_id: str, pipeline=None) -> int:
    return (pipeline or client).delete(keys.channel_key(channel_id))


def iter_channels(client) -> Iterator[tuple[str, Channel | ChannelError]]:
    """Every channel record (SCAN, never KEYS), parsed, or the error that stops it."""
    ids = sorted({cid for key in client.scan_iter(match=keys.CHANNEL_KEY_PATTERN, count=1000)
                  if (cid := keys.channel_id_from_channel_key(key))}, key=int)
    for start in range(0, len(ids), 500):
        batch = ids[start:start + 500]
        for channel_id, raw in zip(batch, client.mget([keys.channel_key(c) for c in batch])):
            if raw is None:
                continue
            try:
                yield channel_id, parse_channel(channel_id, raw)
            except ChannelError as exc:
                yield channel_id, exc
