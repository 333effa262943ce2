"""Where the relay's connections go, and who may go there: a provider's server only for a
stream holding one of its slots (by name, address or account prefix), every address
through the address policy (after DNS, and again as connected), proxies that are not
this host's own services; directly or through the channel's proxy (http, socks5,
socks5h).  Refused or Unreachable say why not."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

from streamstate.address_policy import AddressPolicy, literal_address
from streamstate.egress import RefusalKind
from streamstate.redact import redact_url
from streamstate.upstreams import matching_providers, provider_servers, proxy_endpoint, server_key

from .connect import (
    CHUNK,
    CONNECT_TIMEOUT,
    Refused,
    Unreachable,
    addresses_now,
    addresses_or_none,
    error_text,
    http_proxy_connect,
    open_proxy,
    resolve,
    shown_target,
    socks_connect,
)


class Dialer:
    def __init__(self, settings, policy: AddressPolicy):
        self.policy = policy
        # Every provider's server, by name and by address (its name resolved once here: a
        # source that reaches the server by another name or address is caught by address).
        self.provider_servers = provider_servers(settings.providers, resolve=addresses_now)
        # The accounts with a connection limit, whose match prefix check_account compares
        # every request against (computed once, not per request).
        self.limited_providers = {n: p for n, p in settings.providers.items() if p.max_streams}

    def check_provider(self, ticket: dict, host: str, port: int, addresses: Sequence[str] = ()) -> None:
        """A provider's server is reached only by a stream holding one of its slots: known by
        its name, or by any address the request names or resolves to."""
        owners: set[str] = set()
        for key in [server_key(host), *(server_key(a) for a in addresses)]:
            owners |= self.provider_servers.get((key, port), set())
        if owners and ticket.get("provider") not in owners:
            raise Refused(
                RefusalKind.ADDRESS,
                f"{shown_target(host, port)} is the server of provider "
                f"{' or '.join(sorted(owners))}, and this stream holds none of its connections",
                403,
            )

    def check_account(self, ticket: dict, url: str) -> None:
        """A URL under a limited provider's match prefix is fetched only by a stream holding a
        slot of that provider: two accounts on one server are told apart by their prefix."""
        owners = matching_providers(url, self.limited_providers)
        if owners and ticket.get("provider") not in owners:
            raise Refused(
                RefusalKind.ADDRESS,
                f"{redact_url(url)} belongs to provider {' or '.join(sorted(owners))}, "
                "and this stream holds none of its connections",
                403,
            )

    async def connect(self, host: str, port: int, proxy: str, *, tunnel: bool, ticket: dict):
        """(reader, writer, description) of a connection to host:port, directly or through
        the proxy; Refused or Unreachable."""
        if not proxy:
            reader, writer, address = await self._connect_direct(host, port, ticket)
            return reader, writer, ""
        parts = urlsplit(proxy)
        scheme = parts.scheme.lower()
        shown = redact_url(proxy)
        proxy_host, proxy_port = proxy_endpoint(proxy)
        for address in await resolve(proxy_host, proxy_port, proxy_shown=shown):
            if self.policy.refuses_service(address, proxy_port):
                raise Refused(RefusalKind.PROXY, f"proxy {shown} is one of this host's own services", 502)
        target_host = host
        if scheme != "socks5" and literal_address(host) is None:
            # The proxy resolves the name on its network; a provider's server under another
            # name is still caught by what the name resolves to here (best effort).
            self.check_provider(ticket, host, port, await addresses_or_none(host, port))
        if scheme == "socks5" or literal_address(host) is not None:
            # socks5: names are resolved here and the address checked; socks5h and http
            # proxies resolve names on their own network (an address literal is checked).
            addresses = await resolve(host, port)
            self.check_provider(ticket, host, port, addresses)
            target_host = self._allowed_addresses(addresses, port)[0]
        if scheme in ("socks5", "socks5h"):
            sock = await asyncio.to_thread(socks_connect, parts, target_host, port, scheme == "socks5h", shown)
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            return reader, writer, f" through {shown}"
        reader, writer = await open_proxy(proxy_host, proxy_port, shown)
        if tunnel:
            await http_proxy_connect(reader, writer, parts, target_host, port, shown)
        return reader, writer, f" through {shown}"

    async def _connect_direct(self, host: str, port: int, ticket: dict):
        resolved = await resolve(host, port)
        self.check_provider(ticket, host, port, resolved)
        addresses = self._allowed_addresses(resolved, port)
        last_error: Exception | None = None
        for address in addresses:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, port, limit=CHUNK), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as exc:
                last_error = exc
                continue
            # The address connected to, checked again (what the kernel reached, not what
            # the name said): both must pass.
            peer = writer.get_extra_info("peername")
            refusal = self.policy.refusal(peer[0], peer[1]) if peer else None
            if refusal:
                writer.transport.abort()
                raise Refused(RefusalKind.ADDRESS, refusal, 403)
            return reader, writer, address
        raise Unreachable(error_text(last_error))

    def _allowed_addresses(self, addresses: list[str], port: int) -> list[str]:
        """The addresses the policy allows, in order; Refused when none is."""
        allowed, reasons = [], []
        for address in addresses:
            reason = self.policy.refusal(address, port)
            (reasons.append(reason) if reason else allowed.append(address))
        if reasons:
            # A name that resolves to any denied address is refused whole: the next lookup
            # (FFmpeg's reconnect, a rebinding DNS) could pick that one.
            raise Refused(RefusalKind.ADDRESS, reasons[0], 403)
        return allowed
