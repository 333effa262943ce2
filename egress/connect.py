"""How the relay reaches an upstream: names resolved (with a deadline), a connection made
directly, through a SOCKS5 proxy (pysocks) or an http proxy's CONNECT, and bytes copied both
ways until either side ends.  Refused and Unreachable say why a connection was not made."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
from urllib.parse import unquote

from streamstate.address_policy import literal_address
from streamstate.egress import RefusalKind
from streamstate.upstreams import socks_connection

CONNECT_TIMEOUT = 10.0  # seconds to reach an upstream or a proxy
CHUNK = 64 * 1024
SMALL_READ = 16 * 1024  # a read below this waits COALESCE before the next one
COALESCE = 0.01  # seconds


class Refused(Exception):
    """A connection the relay will not make: ``kind`` says why (what the launcher tells the
    player), ``reason`` is for the log (no password in it)."""

    def __init__(self, kind: RefusalKind, reason: str, status: int):
        super().__init__(reason)
        self.kind, self.reason, self.status = kind, reason, status


class Unreachable(Exception):
    """The upstream did not answer (no policy involved): 502, FFmpeg reports it."""


async def addresses_or_none(host: str, port: int) -> list[str]:
    """What host resolves to here; [] when it does not (the proxy may know it)."""
    try:
        return await resolve(host, port)
    except Unreachable:
        return []


def addresses_now(host: str) -> list[str]:
    """A provider server's addresses, resolved once at start (blocking; a name that does not
    resolve yet is known by its name only)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError:
        return []


def error_text(exc: Exception | None) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def resolve(host: str, port: int, *, proxy_shown: str = "") -> list[str]:
    """Every address of host (an address stays itself); Unreachable when the name does not
    resolve, or Refused when it is the proxy's (``proxy_shown``: its name for the log)."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT
        )
    except (OSError, asyncio.TimeoutError) as exc:
        if proxy_shown:
            raise Refused(
                RefusalKind.PROXY, f"proxy {proxy_shown}: cannot resolve its name ({error_text(exc)})", 502
            ) from None
        raise Unreachable(f"cannot resolve {host}: {error_text(exc)}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


async def open_proxy(host: str, port: int, shown: str):
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        raise Refused(RefusalKind.PROXY, f"proxy {shown} unreachable: {error_text(exc)}", 502) from None


def socks_connect(parts, host: str, port: int, remote_dns: bool, shown: str) -> socket.socket:
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
        raise Refused(RefusalKind.PROXY, f"proxy {shown} unusable: {message}", 502) from None
    sock.settimeout(None)
    sock.setblocking(False)
    return sock


async def http_proxy_connect(reader, writer, parts, host: str, port: int, shown: str) -> None:
    """CONNECT through an http:// proxy; Refused unless it answers 200."""
    target = shown_target(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if parts.username:
        lines.append(f"Proxy-Authorization: {basic(parts)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
        status = int(head.split(b" ", 2)[1])
    except (
        OSError,
        ValueError,
        IndexError,
        asyncio.TimeoutError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        writer.transport.abort()
        raise Refused(RefusalKind.PROXY, f"proxy {shown} gave no answer to CONNECT", 502) from None
    if status == 407:
        writer.transport.abort()
        raise Refused(RefusalKind.PROXY, f"proxy {shown}: authentication failed (407)", 502)
    if status in (502, 503, 504):  # the proxy could not reach the target
        writer.transport.abort()
        raise Unreachable(f"through {shown}: CONNECT answered {status}")
    if status != 200:  # the proxy itself refuses (403 by its rules, ...)
        writer.transport.abort()
        raise Refused(RefusalKind.PROXY, f"proxy {shown} refused CONNECT ({status})", 502)


def basic(parts) -> str:
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(credentials.encode()).decode()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters, name: str) -> None:
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


async def splice(reader, writer, up_reader, up_writer, counters) -> None:
    """Both directions until either ends; the other is then ended too."""
    tasks = {
        asyncio.create_task(pipe(reader, up_writer, counters, "bytes_up")),
        asyncio.create_task(pipe(up_reader, writer, counters, "bytes_down")),
    }
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def shown_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
