"""Where an upstream connection may go: ``upstream_deny`` (default: this host, link-local and
cloud metadata, shared address space, unspecified, multicast), ``upstream_allow`` (wins over
the deny list), and this host's own services (Redis, the launcher, the relay, nginx), always
refused.  An address in any spelling the C library accepts is judged (2130706433, 0x7f.1 and
127.1 are 127.0.0.1), and an IPv6 address that carries an IPv4 one by that IPv4.  The egress
relay checks the address it actually connects to; doctor checks before it probes."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Iterable
from urllib.parse import urlsplit

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
    """(address, port) of Redis and its sentinels, the launcher, the relay and heartbeatd's metrics."""
    endpoints = []
    redis_url = urlsplit(settings.redis_url)
    if redis_url.scheme in ("redis", "rediss") and redis_url.hostname:
        endpoints.append((redis_url.hostname, redis_url.port or 6379))
    for listen in (
        settings.launcher_listen,
        settings.egress_listen,
        settings.metrics_listen,
        *settings.redis_sentinels,
    ):
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
