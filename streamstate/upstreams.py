"""Where a channel's traffic goes: its provider account, its proxy, and the addresses it may reach.

A channel belongs to the provider named in its ``provider`` field, else to the first
``[providers.<name>]`` whose ``match`` prefixes its source URL.  The provider gives
defaults (user_agent, referer, headers, proxy, resolver, tls_verify) and a connection
limit (``max_streams``); the channel's own fields win.

Every connection to an upstream, FFmpeg's or a resolver's, goes through the egress relay
(egress/), which checks the address it actually connects to against
streamstate.address_policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit

from .address_policy import literal_address, normal_address
from .channels import (
    MAX_FIELD_CHARS,
    RESOLVERS,
    Channel,
    ChannelError,
    _check_text,
    check_headers,
    check_provider_name,
    check_proxy,
    check_resolver,
    check_tls_verify,
)

PROVIDER_KEYS = {"match", "max_streams", "user_agent", "referer", "headers", "proxy", "resolver", "tls_verify"}


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    match: str = ""
    max_streams: int = 0  # 0: no limit
    user_agent: str | None = None
    referer: str | None = None
    headers: dict = dataclasses.field(default_factory=dict)
    proxy: str | None = None
    resolver: str | None = None
    tls_verify: bool | None = None


def parse_providers(value: Any) -> dict[str, Provider]:
    """``[providers.<name>]`` tables, every field checked as a channel's (ValueError)."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise ValueError(f"expected a table (or JSON object): {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("expected tables: [providers.<name>] with match, max_streams, ...")
    providers = {}
    for name, table in value.items():
        label = f"provider {str(name)[:40]!r}"
        try:
            check_provider_name(label, name)
            if not isinstance(table, dict) or not set(table) <= PROVIDER_KEYS:
                raise ChannelError(f"{label}: expected keys among {sorted(PROVIDER_KEYS)}")
            match = table.get("match", "")
            if match:
                _check_text(label, "source_url", match, MAX_FIELD_CHARS["source_url"])
                if urlsplit(match).scheme not in ("http", "https"):
                    raise ChannelError(f"{label}: match must be an http:// or https:// URL prefix")
            limit = table.get("max_streams", 0)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 10000:
                raise ChannelError(f"{label}: max_streams must be a whole number from 0 (no limit)")
            text = {}
            for field in ("user_agent", "referer"):
                if table.get(field):
                    text[field] = _check_text(label, field, table[field], MAX_FIELD_CHARS[field])
            providers[name] = Provider(
                name=name,
                match=match,
                max_streams=limit,
                headers=check_headers(label, table.get("headers")),
                proxy=check_proxy(label, table.get("proxy")),
                resolver=check_resolver(label, table.get("resolver")),
                tls_verify=check_tls_verify(label, table.get("tls_verify")),
                **text,
            )
        except ChannelError as exc:
            raise ValueError(str(exc).replace("channel provider", "provider")) from None
    return providers


@dataclasses.dataclass(frozen=True)
class Upstream:
    """What a start of the channel uses: its fields over its provider's, over the settings'."""

    channel: Channel
    provider: Provider | None
    proxy: str | None
    resolver: str
    tls_verify: bool
    user_agent: str
    referer: str | None
    headers: dict

    @property
    def limited(self) -> bool:
        return self.limited_provider is not None

    @property
    def limited_provider(self) -> Provider | None:
        """Its provider when that limits the account's connections (a start takes a slot)."""
        return self.provider if self.provider is not None and self.provider.max_streams > 0 else None


def proxy_endpoint(proxy: str) -> tuple[str, int]:
    """(host, port) of a proxy URL: check_proxy made sure it has both."""
    parts = urlsplit(proxy)
    return parts.hostname or "", parts.port or 0


def provider_of(channel: Channel, providers: dict[str, Provider]) -> Provider | None:
    """The provider named in the channel, else the one whose match prefixes its sources;
    ChannelError when sources belong to two providers (one slot cannot cover both)."""
    matched = {name for source in channel.sources for name in [_matching(source, providers)] if name}
    if channel.provider:
        provider = providers.get(channel.provider)
        if provider is None:
            raise ChannelError(
                f"channel {channel.id}: provider {channel.provider} is not configured "
                "(no [providers.<name>] of that name)"
            )
        others = matched - {channel.provider}
        if others:
            # A record naming one account for another's sources would take the wrong slot.
            raise ChannelError(
                f"channel {channel.id}: its sources belong to provider "
                f"{' and '.join(sorted(others))}, not {channel.provider}"
            )
        return provider
    if len(matched) > 1:
        raise ChannelError(
            f"channel {channel.id}: its sources belong to providers "
            f"{' and '.join(sorted(matched))}; give each its own channel"
        )
    return providers[matched.pop()] if matched else None


def _matching(source: str, providers: dict[str, Provider]) -> str | None:
    """The first provider whose match prefixes the source."""
    return next(iter(matching_providers(source, providers)), None)


def matching_providers(url: str, providers: dict[str, Provider]) -> list[str]:
    """Every provider whose match prefixes the URL, in their order, its host compared by
    address when it names one in any spelling (http://127.1:8080/acct/ is
    http://127.0.0.1:8080/acct/, and so is http://localhost:8080/acct/)."""
    canonical = _canonical_url(url)
    return [
        provider.name
        for provider in providers.values()
        if provider.match and (url.startswith(provider.match) or canonical.startswith(_canonical_url(provider.match)))
    ]


def _canonical_url(url: str) -> str:
    """scheme://host:port/path?query with the host as the address it spells (if it spells
    one: no DNS here), the default port written out; the URL itself if it cannot be read."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return url
    host = (parts.hostname or "").lower()
    literal = literal_address(host)
    if literal is not None:
        host = str(normal_address(literal))
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme.lower()}://{host}:{port}{rest}"


def provider_servers(providers: dict[str, Provider], resolve=None) -> dict[tuple[str, int], set[str]]:
    """(host, port) of each provider's match URL -> the providers there: the relay lets
    only a stream holding one of their slots connect to it (a redirect or a fallback to a
    provider's server takes no connection of its account unnoticed).  Each server is keyed
    by its name and by every address it has: the address in any spelling, and, with
    ``resolve`` (host -> addresses), what its name resolves to."""
    servers: dict[tuple[str, int], set[str]] = {}
    for provider in providers.values():
        if provider.match and provider.max_streams:
            parts = urlsplit(provider.match)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = (parts.hostname or "").lower()
            names = {host}
            literal = literal_address(host)
            addresses = [literal] if literal is not None else (resolve(host) if resolve else [])
            names |= {str(normal_address(a)) for a in addresses if normal_address(a) is not None}
            for name in names:
                servers.setdefault((name, port), set()).add(provider.name)
    return servers


def server_key(host: str) -> str:
    """How provider_servers keys a host: the address it spells, else its name."""
    literal = literal_address(host)
    if literal is not None and normal_address(literal) is not None:
        return str(normal_address(literal))
    return host.lower().rstrip(".")


def upstream_of(channel: Channel, settings) -> Upstream:
    provider = provider_of(channel, settings.providers)
    base = provider or Provider(name="")

    def pick(field):
        own = getattr(channel, field)
        return own if own not in (None, "") else getattr(base, field)

    resolver = pick("resolver") or "none"
    assert resolver in RESOLVERS
    tls_verify = pick("tls_verify")
    return Upstream(
        channel=channel,
        provider=provider,
        proxy=pick("proxy") or settings.upstream_proxy or None,
        resolver=resolver,
        tls_verify=True if tls_verify is None else tls_verify,
        user_agent=pick("user_agent") or settings.user_agent,
        referer=pick("referer"),
        headers={**base.headers, **channel.headers},
    )


# -- addresses --------------------------------------------------------------------------


def socks_connection(proxy: str, host: str, port: int, timeout: float, *, remote_dns: bool | None = None):
    """A socket connected to host:port through a socks5:// or socks5h:// proxy (pysocks;
    socks5h lets the proxy resolve the name unless ``remote_dns`` says otherwise).
    Raises pysocks' ProxyError or OSError."""
    from urllib.parse import unquote

    import socks

    parts = urlsplit(proxy)
    return socks.create_connection(
        (host, port),
        timeout=timeout,
        proxy_type=socks.SOCKS5,
        proxy_addr=parts.hostname,
        proxy_port=parts.port,
        proxy_rdns=parts.scheme == "socks5h" if remote_dns is None else remote_dns,
        proxy_username=unquote(parts.username) if parts.username else None,
        proxy_password=unquote(parts.password) if parts.password else None,
    )
