"""Where a channel's traffic goes: its provider account, its proxy, and the addresses it may reach.

A channel belongs to the provider named in its ``provider`` field, else to the first
``[providers.<name>]`` whose ``match`` prefixes its source URL.  The provider gives
defaults (user_agent, referer, headers, proxy, resolver, tls_verify) and a connection
limit (``max_streams``); the channel's own fields win.

Every connection to an upstream, FFmpeg's or a resolver's, goes through the egress relay
(egress/), which checks the address it actually connects to against
:class:`AddressPolicy`: ``upstream_deny`` (default: loopback, link-local, unspecified,
multicast), ``upstream_allow`` (wins over the deny list), and the host's own services
(Redis, the launcher, the relay), which are always refused.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Any, Iterable
from urllib.parse import urlsplit

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

DEFAULT_UPSTREAM_DENY = (
    "127.0.0.0/8",
    "::1/128",  # loopback: this host's services
    "169.254.0.0/16",
    "fe80::/10",  # link-local: cloud metadata (AWS,
    # GCP, Azure, Oracle, DigitalOcean)
    "100.64.0.0/10",  # shared address space (CGNAT): a
    # provider's internal network, and
    # Alibaba's metadata (100.100.100.200)
    "fd00:ec2::/32",  # AWS's IPv6 metadata (fd00:ec2::254)
    "fd20:ce::254/128",  # GCP's IPv6 metadata
    "192.0.0.192/32",  # Oracle Cloud Classic's metadata
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): its
    # IPv4 may sit anywhere in it
    "2001::/32",  # Teredo: a relay takes it to the
    # IPv4 it carries, obfuscated
    "0.0.0.0/8",
    "::/128",  # unspecified: this host again
    "224.0.0.0/4",
    "ff00::/8",
)  # multicast
# IPv6 ranges that carry an IPv4 address in their last 32 bits: such an address is judged by
# the IPv4 it carries (a NAT64 gateway or a translator would take it there).
_EMBEDDED_IPV4_NETWORKS = (
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, well-known prefix
    ipaddress.ip_network("::/96"),
)  # IPv4-compatible (deprecated)
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

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: Any) -> tuple[Network, ...]:
    """A list of CIDR networks (a TOML list, or text separated by commas)."""
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, (list, tuple)):
        raise ValueError('expected a list of networks, e.g. ["10.0.0.0/8", "127.0.0.2/32"]')
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{str(item)[:60]!r} is not a network (CIDR, e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def normal_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the policy judges it, scope ids off; None if not one.  An IPv6 address
    that carries an IPv4 one is that IPv4 address: mapped (::ffff:a.b.c.d), translated
    (::ffff:0:a.b.c.d), NAT64 (64:ff9b::a.b.c.d), IPv4-compatible (::a.b.c.d, but :: and
    ::1 themselves) and 6to4 (2002:aabb:ccdd::/48)."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if not isinstance(parsed, ipaddress.IPv6Address):
        return parsed
    if parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    if parsed.sixtofour is not None:
        return parsed.sixtofour
    if parsed not in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")) and any(
        parsed in network for network in _EMBEDDED_IPV4_NETWORKS
    ):
        return ipaddress.IPv4Address(int(parsed) & 0xFFFFFFFF)
    return parsed


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


def literal_address(host: str) -> str | None:
    """The address a host names without DNS: an IP in any spelling the C library accepts
    (2130706433, 0x7f.1, 127.1, 0177.0.0.1 are all 127.0.0.1), or localhost and its
    subdomains (RFC 6761: always this host); None for a real name."""
    bare = host.strip("[]").rstrip(".").lower()
    if normal_address(bare) is not None:
        return bare
    try:
        return socket.inet_ntoa(socket.inet_aton(bare))
    except OSError:
        pass
    if bare == "localhost" or bare.endswith(".localhost"):
        return "127.0.0.1"
    return None


class AddressPolicy:
    """May a connection go to this address and port?  Decided on the address itself."""

    def __init__(self, allow: Iterable[Network], deny: Iterable[Network], own_services: Iterable[tuple[str, int]] = ()):
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        own = [(normal_address(host), port) for host, port in own_services if normal_address(host) is not None]
        # A service on this host may answer on any of its addresses (bound to 0.0.0.0, or
        # Redis reached as 127.0.0.1 but listening everywhere): its port is refused on every
        # local address.  A remote one (Redis on another host): that address and port.
        self.own_ports_everywhere = {port for address, port in own if is_local(address)}
        self.own_services = {(address, port) for address, port in own if not is_local(address)}

    @classmethod
    def from_settings(cls, settings) -> "AddressPolicy":
        return cls(settings.upstream_allow, settings.upstream_deny, own_service_addresses(settings))

    def refusal(self, address: str, port: int) -> str | None:
        """Why a connection to address:port is refused, or None if it is allowed."""
        parsed = normal_address(address)
        if parsed is None:
            return f"{address} is not an address"
        if (parsed, port) in self.own_services or (port in self.own_ports_everywhere and is_local(parsed)):
            return f"{_shown(parsed, port)} is one of this host's own services (Redis, launcher, relay, nginx)"
        if any(parsed in network for network in self.allow if network.version == parsed.version):
            return None
        for network in self.deny:
            if network.version == parsed.version and parsed in network:
                return f"{_shown(parsed, port)} is in upstream_deny ({network})"
        return None

    def refuses_service(self, address: str, port: int) -> bool:
        """A proxy may be on loopback (WARP is), but never one of our own services."""
        parsed = normal_address(address)
        return (
            parsed is None
            or (parsed, port) in self.own_services
            or (port in self.own_ports_everywhere and is_local(parsed))
        )


def is_local(address) -> bool:
    """Is this one of this host's own addresses (loopback, or any interface's)?  Only a
    local address can be bound."""
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


def _shown(address, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def own_service_addresses(settings) -> list[tuple[str, int]]:
    """(address, port) of Redis, the launcher, the relay and heartbeatd's metrics."""
    endpoints = []
    redis_url = urlsplit(settings.redis_url)
    if redis_url.scheme in ("redis", "rediss") and redis_url.hostname:
        endpoints.append((redis_url.hostname, redis_url.port or 6379))
    for listen in (settings.launcher_listen, settings.egress_listen, settings.metrics_listen):
        if listen:
            host, _, port = listen.rpartition(":")
            endpoints.append((host.strip("[]"), int(port)))
    nginx = _nginx_listen_endpoint(settings.nginx_listen)  # a redirect back to our own /live/
    if nginx:
        endpoints.append(nginx)
    found = []
    for host, port in endpoints:
        found += [(address, port) for address in _addresses_of(host)]
    return found


def _nginx_listen_endpoint(listen: str) -> tuple[str, int] | None:
    """(address, port) of what nginx's listen names: "80" is every address."""
    first = listen.split()[0] if listen.split() else ""
    host, sep, port = first.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", first
    if not (port.isascii() and port.isdigit()):
        return None
    return ("0.0.0.0" if host in ("", "*") else host.strip("[]")), int(port)


def _addresses_of(host: str) -> list[str]:
    if normal_address(host) is not None:
        return [host]
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError:
        return []
