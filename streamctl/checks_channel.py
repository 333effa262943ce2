"""doctor --channel ID: the channel's record, and what each source answers with the channel's
headers, directly and through its proxy (never on a denied address)."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from streamstate import keys
from streamstate.address_policy import AddressPolicy, literal_address
from streamstate.channel_check import validate
from streamstate.channels import ChannelError, get_channel
from streamstate.redact import redact_url
from streamstate.upstreams import socks_connection

from .checks_common import (
    FAIL,
    OK,
    PROBE_DEADLINE,
    TIMEOUT,
    Check,
)


def check_channel(client, settings, channel_id: str) -> list[Check]:
    """The record is valid; its source answers with the channel's headers, directly and
    through its proxy (e.g. '403 without proxy, 200 through it')."""
    label = f"channel {channel_id}"
    try:
        channel = get_channel(client, keys.check_channel_id(channel_id))
        if channel is None:
            return [Check(FAIL, label, "no such channel (streamctl channels add)")]
        upstream = validate(channel, settings)
    except (ChannelError, keys.InvalidChannelId) as exc:
        return [Check(FAIL, label, f"record unusable: {exc}")]
    found = [
        Check(
            OK,
            label,
            f"record valid (source {redact_url(channel.source_url)}"
            + (f", provider {upstream.provider.name}" if upstream.provider else "")
            + (f", resolver {upstream.resolver}" if upstream.resolver != "none" else "")
            + ")",
        )
    ]
    headers = {"User-Agent": upstream.user_agent, **upstream.headers}
    if upstream.referer:
        headers["Referer"] = upstream.referer
    for index, source in enumerate(channel.sources):
        which = "source" if index == 0 else f"fallback {index}"
        direct = _probe_within(source, headers, None, settings)
        via = _probe_within(source, headers, upstream.proxy, settings) if upstream.proxy else None
        answer = f"{direct} without proxy" + (f", {via} through {redact_url(upstream.proxy or '')}" if via else "")
        good = (via or direct).startswith("2")
        found.append(Check(OK if good else FAIL, f"{label} {which}", f"{redact_url(source)}: {answer}"))
    return found


def _probe_within(url: str, headers: dict, proxy: str | None, settings) -> str:
    """_probe with one deadline for all of it (DNS, connect, a server that trickles its
    headers), and never to an address the relay would refuse."""
    if proxy is None:
        refusal = _refused_address(url, settings)
        if refusal:
            return f"not asked ({refusal})"
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_probe(url, headers, proxy)), daemon=True)
    worker.start()
    worker.join(PROBE_DEADLINE)
    return result[0] if result else f"no answer within {PROBE_DEADLINE:g} s"


def _refused_address(url: str, settings) -> str | None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        addresses = (
            [literal_address(host)]
            if literal_address(host)
            else sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        )
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    policy = AddressPolicy.from_settings(settings)
    return next((reason for address in addresses if address and (reason := policy.refusal(address, port))), None)


def _probe(url: str, headers: dict, proxy: str | None) -> str:
    """The HTTP status the source answers (headers only, then closed), or why none."""
    handlers = []
    if proxy and proxy.startswith("http://"):
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    elif not proxy:
        handlers.append(urllib.request.ProxyHandler({}))
    else:
        return _probe_socks(url, headers, proxy)
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"no answer ({getattr(exc, 'reason', exc)})"


def _probe_socks(url: str, headers: dict, proxy: str) -> str:
    import http.client
    import ssl

    import socks

    parts, target = urlsplit(proxy), urlsplit(url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        host = target.hostname or ""
        sock = socks_connection(proxy, host, port, TIMEOUT)
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        connection.sock = sock
        connection.request("GET", (target.path or "/") + (f"?{target.query}" if target.query else ""), headers=headers)
        status = connection.getresponse().status
        connection.close()
        return str(status)
    except (OSError, socks.ProxyError, http.client.HTTPException) as exc:
        return f"no answer ({str(exc).replace(parts.password or chr(0), '***')[:120]})"
