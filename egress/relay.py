"""The egress relay: the one way out for every upstream connection of this host's streams.

FFmpeg (``http_proxy`` in its environment) and the resolvers speak HTTP proxy to it:
``CONNECT host:port`` for https, absolute-form requests for http.  For each
connection the relay

1. knows the channel: Proxy-Authorization carries the channel id and the token of its
   ticket (streamstate.egress); anything else gets 407;
2. connects where the ticket says: directly, or through the channel's proxy (http://,
   socks5://, socks5h:// with pysocks); a proxy that cannot be used refuses the
   connection (502) - never a direct connection instead (fail closed);
3. checks the address it actually connects to (after DNS, on every redirect, every
   HLS segment) against upstream_allow / upstream_deny and this host's own services;
   a refused address gets 403 and a note the launcher reads;
4. copies bytes both ways until either side closes, then closes the other at once
   (a provider counts our open connections).

``GET /connections`` (origin-form, no auth) answers the open upstream connections per
channel: the launcher waits on it before a preempted slot is given to another stream.

It runs as its own service, not inside the launcher: a launcher restart leaves every
FFmpeg running (they outlive it) and so must their connections.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import json
import logging
import re
import socket
from urllib.parse import unquote, urlsplit

from streamstate import egress, keys
from streamstate.redact import redact_url
from streamstate.upstreams import AddressPolicy, literal_address, provider_servers, socks_connection

log = logging.getLogger("streamkeeper.egress")

MAX_HEAD_BYTES = 32 * 1024      # a request head larger than this is refused
HEAD_TIMEOUT = 15.0             # seconds a client has to send its request head
CONNECT_TIMEOUT = 10.0          # seconds to reach an upstream or a proxy
CHUNK = 64 * 1024
SMALL_READ = 16 * 1024          # a read below this waits COALESCE before the next one
COALESCE = 0.01                 # seconds
_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


class Refused(Exception):
    """A connection the relay will not make: ``kind`` is 'address' or 'proxy' (what the
    launcher tells the player), ``reason`` is for the log (no password in it)."""

    def __init__(self, kind: str, reason: str, status: int):
        super().__init__(reason)
        self.kind, self.reason, self.status = kind, reason, status


class Unreachable(Exception):
    """The upstream did not answer (no policy involved): 502, FFmpeg reports it."""


class EgressRelay:
    def __init__(self, settings, policy: AddressPolicy | None = None):
        self.settings = settings
        self.state_dir = settings.state_dir
        self.policy = policy or AddressPolicy.from_settings(settings)
        self.provider_servers = provider_servers(settings.providers)
        self.open: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()

    # -- one client connection ---------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            pass        # the relay is exiting: the connection is cut below, quietly
        except Exception:  # noqa: BLE001 - one connection's bug never stops the relay
            log.exception("unexpected error on a relayed connection")
        finally:
            writer.transport.abort()

    async def _handle(self, reader, writer) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            return await _answer(writer, 431, "request head too large")
        if len(head) > MAX_HEAD_BYTES:
            return await _answer(writer, 431, "request head too large")
        try:
            method, target, headers = _parse_head(head)
        except ValueError:
            return await _answer(writer, 400, "bad request")
        if target.startswith("/"):
            return await self._status_route(writer, method, target)
        channel_id, ticket = self._authorised(headers)
        if channel_id is None:
            # FFmpeg's first request on each connection carries no credentials: it sends them
            # after this challenge, so one per connection is normal.
            self.counters["auth_challenges"] += 1
            return await _answer(writer, 407, "proxy authentication required",
                                 {"Proxy-Authenticate": 'Basic realm="streamkeeper-egress"'})
        if method == "CONNECT":
            host, port = _split_host_port(target, None)
            forward = None
        else:
            parts = urlsplit(target)
            if parts.scheme.lower() != "http" or not parts.hostname:
                return await _answer(writer, 400, "only CONNECT and absolute http:// requests")
            host, port = parts.hostname, parts.port or 80
            forward = (method, target, parts, headers)
        if host is None or port is None:
            return await _answer(writer, 400, "bad target")
        await self._relay(channel_id, ticket, reader, writer, host, port, forward)

    def _authorised(self, headers: list[tuple[str, str]]) -> tuple[str | None, dict]:
        """(channel, its ticket) that the Proxy-Authorization matches, else (None, {}).  The
        ticket is read once: what was authorised is what is used (a ticket rewritten or
        deleted meanwhile can never turn into 'no proxy')."""
        value = next((v for k, v in headers if k.lower() == "proxy-authorization"), "")
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return None, {}
        try:
            user, _, token = base64.b64decode(encoded.strip(), validate=True).decode("ascii").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, {}
        if not keys.CHANNEL_ID_RE.fullmatch(user):
            return None, {}
        ticket = egress.read_ticket(self.state_dir, user)
        if ticket is None or not hmac.compare_digest(ticket["token"].encode(), unquote(token).encode()):
            return None, {}
        return user, ticket

    async def _relay(self, channel_id: str, ticket: dict, reader, writer, host: str, port: int, forward) -> None:
        proxy = ticket.get("proxy") or ""
        try:
            self._check_provider(ticket, host, port)
            up_reader, up_writer, via = await self._connect(host, port, proxy, tunnel=forward is None)
        except Refused as refused:
            self._refused(channel_id, host, port, refused)
            return await _answer(writer, refused.status,
                                 "upstream address not allowed" if refused.kind == "address" else
                                 "proxy unusable", {"X-Streamkeeper-Refused": refused.kind})
        except Unreachable as exc:
            self.counters["unreachable"] += 1
            log.info("channel %s: %s unreachable: %s", channel_id, _shown_target(host, port), exc)
            egress.record_refusal(self.state_dir, channel_id, "unreachable",
                                  f"{_shown_target(host, port)}: {exc}")
            return await _answer(writer, 502, "upstream unreachable")
        self.open[channel_id] += 1
        self.counters["connections"] += 1
        log.debug("channel %s: connected to %s%s", channel_id, _shown_target(host, port), via)
        try:
            if forward is None:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(_forwarded_head(forward, proxy))
                if proxy.lower().startswith("http://"):
                    # Through an http proxy the first answer may be the proxy's own refusal.
                    status_line = await asyncio.wait_for(up_reader.readuntil(b"\r\n"), 3 * CONNECT_TIMEOUT)
                    if status_line.split(b" ")[1:2] == [b"407"]:
                        raise Refused("proxy", f"proxy {redact_url(proxy)}: authentication failed (407)", 502)
                    writer.write(status_line)
            await _splice(reader, writer, up_reader, up_writer, self.counters)
        except Refused as refused:
            self._refused(channel_id, host, port, refused)
            await _answer(writer, refused.status, "proxy unusable", {"X-Streamkeeper-Refused": refused.kind})
        finally:
            up_writer.transport.abort()           # the provider sees the close at once
            self.open[channel_id] -= 1
            if self.open[channel_id] <= 0:
                del self.open[channel_id]

    def _check_provider(self, ticket: dict, host: str, port: int) -> None:
        """A provider's server is reached only by a stream holding one of its slots."""
        owners = self.provider_servers.get((host.lower().rstrip("."), port))
        if owners and ticket.get("provider") not in owners:
            raise Refused("address", f"{_shown_target(host, port)} is the server of provider "
                          f"{' or '.join(sorted(owners))}, and this stream holds none of its connections", 403)

    def _refused(self, channel_id: str, host: str, port: int, refused: Refused) -> None:
        """One log line and the note the launcher reads."""
        self.counters[f"refused_{refused.kind}"] += 1
        log.warning("channel %s: refused a connection to %s: %s", channel_id, _shown_target(host, port),
                    refused.reason)
        egress.record_refusal(self.state_dir, channel_id, refused.kind, refused.reason)

    # -- where a connection goes ---------------------------------------------------
    async def _connect(self, host: str, port: int, proxy: str, *, tunnel: bool):
        """(reader, writer, description) of a connection to host:port, directly or through
        the proxy; Refused or Unreachable."""
        if not proxy:
            reader, writer, address = await self._connect_direct(host, port)
            return reader, writer, ""
        parts = urlsplit(proxy)
        scheme = parts.scheme.lower()
        shown = redact_url(proxy)
        proxy_host, proxy_port = parts.hostname, parts.port
        for address in await _resolve(proxy_host, proxy_port, refuse_as="proxy", shown=shown):
            if self.policy.refuses_service(address, proxy_port):
                raise Refused("proxy", f"proxy {shown} is one of this host's own services", 502)
        target_host = host
        if scheme == "socks5" or literal_address(host) is not None:
            # socks5: names are resolved here and the address checked; socks5h and http
            # proxies resolve names on their own network (an address literal is checked).
            target_host = self._check_addresses(await _resolve(host, port), port)[0]
        if scheme in ("socks5", "socks5h"):
            sock = await asyncio.to_thread(_socks_connect, parts, target_host, port, scheme == "socks5h", shown)
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            return reader, writer, f" through {shown}"
        reader, writer = await _open(proxy_host, proxy_port, refuse_as="proxy", shown=shown)
        if tunnel:
            await _http_proxy_connect(reader, writer, parts, target_host, port, shown)
        return reader, writer, f" through {shown}"

    async def _connect_direct(self, host: str, port: int):
        addresses = self._check_addresses(await _resolve(host, port), port)
        last_error: Exception | None = None
        for address in addresses:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port, limit=CHUNK),
                                                        CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                last_error = exc
                continue
            # The address connected to, checked again (what the kernel reached, not what
            # the name said): both must pass.
            peer = writer.get_extra_info("peername")
            if peer and self.policy.refusal(peer[0], peer[1]):
                writer.transport.abort()
                raise Refused("address", self.policy.refusal(peer[0], peer[1]), 403)
            return reader, writer, address
        raise Unreachable(_error_text(last_error))

    def _check_addresses(self, addresses: list[str], port: int) -> list[str]:
        """The addresses the policy allows, in order; Refused when none is."""
        allowed, reasons = [], []
        for address in addresses:
            reason = self.policy.refusal(address, port)
            (reasons.append(reason) if reason else allowed.append(address))
        if reasons:
            # A name that resolves to any denied address is refused whole: the next lookup
            # (FFmpeg's reconnect, a rebinding DNS) could pick that one.
            raise Refused("address", reasons[0], 403)
        return allowed

    # -- the relay's own routes ----------------------------------------------------
    async def _status_route(self, writer, method: str, target: str) -> None:
        if method != "GET":
            return await _answer(writer, 405, "method not allowed")
        if target == egress.CONNECTIONS_PATH:
            body = json.dumps({"channels": dict(self.open), "counters": dict(self.counters)})
            return await _answer(writer, 200, body, {"Content-Type": "application/json"})
        if target == "/healthz":
            return await _answer(writer, 200, "ok")
        return await _answer(writer, 404, "not found")


# -- helpers -----------------------------------------------------------------------------

def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/1.") or not method.isalpha() or not target:
        raise ValueError("bad request line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or "\n" in line or "\r" in line:
            raise ValueError("bad header")           # a bare CR or LF could smuggle a request
        headers.append((name, value.strip()))
    return method, target, headers


def _split_host_port(target: str, default_port: int | None) -> tuple[str | None, int | None]:
    try:
        parts = urlsplit("//" + target)
        return parts.hostname, parts.port or default_port
    except ValueError:
        return None, None


def _shown_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error_text(exc: Exception | None) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def _resolve(host: str, port: int, *, refuse_as: str = "", shown: str = "") -> list[str]:
    """Every address of host (an address stays itself); Unreachable (or Refused for a
    proxy) when the name does not resolve."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        if refuse_as:
            raise Refused(refuse_as, f"proxy {shown}: cannot resolve its name ({_error_text(exc)})", 502)
        raise Unreachable(f"cannot resolve {host}: {_error_text(exc)}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


async def _open(host: str, port: int, *, refuse_as: str, shown: str):
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        raise Refused(refuse_as, f"proxy {shown} unreachable: {_error_text(exc)}", 502) from None


def _socks_connect(parts, host: str, port: int, remote_dns: bool, shown: str) -> socket.socket:
    """A connected socket through a SOCKS5 proxy (pysocks, in a thread)."""
    import socks
    try:
        sock = socks_connection(parts.geturl(), host, port, CONNECT_TIMEOUT, remote_dns=remote_dns)
    except (socks.ProxyError, OSError) as exc:
        # The proxy works but could not reach the target (SOCKS5 replies 0x03-0x06), or it
        # cannot be used: unreachable, authentication failed, refused by its rules.
        message = str(exc).replace(parts.password or "\0", "***") if parts.password else str(exc)
        if re.search(r"0x0[3-6]", message):
            raise Unreachable(f"through {shown}: {message}") from None
        raise Refused("proxy", f"proxy {shown} unusable: {message}", 502) from None
    sock.settimeout(None)
    sock.setblocking(False)
    return sock


async def _http_proxy_connect(reader, writer, parts, host: str, port: int, shown: str) -> None:
    """CONNECT through an http:// proxy; Refused unless it answers 200."""
    target = _shown_target(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if parts.username:
        lines.append(f"Proxy-Authorization: {_basic(parts)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
        status = int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        writer.transport.abort()
        raise Refused("proxy", f"proxy {shown} gave no answer to CONNECT", 502) from None
    if status == 407:
        writer.transport.abort()
        raise Refused("proxy", f"proxy {shown}: authentication failed (407)", 502)
    if status in (502, 503, 504):                # the proxy could not reach the target
        writer.transport.abort()
        raise Unreachable(f"through {shown}: CONNECT answered {status}")
    if status != 200:                            # the proxy itself refuses (403 by its rules, ...)
        writer.transport.abort()
        raise Refused("proxy", f"proxy {shown} refused CONNECT ({status})", 502)


def _basic(parts) -> str:
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _forwarded_head(forward, proxy: str) -> bytes:
    """The request as the upstream gets it: origin-form (absolute-form to an http proxy,
    with its credentials), without our proxy headers, one request per connection."""
    method, target, parts, headers = forward
    via_http_proxy = proxy.lower().startswith("http://")
    path = target if via_http_proxy else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in _HOP_HEADERS]
    if via_http_proxy and urlsplit(proxy).username:
        lines.append(f"Proxy-Authorization: {_basic(urlsplit(proxy))}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters, name: str) -> None:
    """Copy until EOF.  After a small read, wait COALESCE before the next: a live source
    sends 1316-byte packets, and one wake-up per packet costs ten times the CPU per byte
    of a bulk copy (bench/relay.py); 10 ms of delay is nothing to a live stream (a
    fast source fills the buffer meanwhile: its next read is large, and not delayed)."""
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return
            counters[name] += len(data)
            writer.write(data)
            await writer.drain()
            if len(data) < SMALL_READ:
                await asyncio.sleep(COALESCE)


async def _splice(reader, writer, up_reader, up_writer, counters) -> None:
    """Both directions until either ends; the other is then ended too."""
    tasks = {asyncio.create_task(_pipe(reader, up_writer, counters, "bytes_up")),
             asyncio.create_task(_pipe(up_reader, writer, counters, "bytes_down"))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _answer(writer, status: int, text: str, headers: dict | None = None) -> None:
    reasons = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 407: "Proxy Authentication Required",
               431: "Request Header Fields Too Large", 502: "Bad Gateway"}
    body = (text + ("" if text.endswith("\n") else "\n")).encode()
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Error')}", f"Content-Length: {len(body)}",
             "Connection: close"]
    headers = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
