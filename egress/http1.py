"""HTTP/1.1 as the relay speaks it, through h11 (never by hand): the next event of a
connection within one deadline, the request as it goes upstream (one framing, no hop-by-hop
header, no trailer), the answer as the client gets it, and the relay's own short answers."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import h11

from .connect import CHUNK, COALESCE, SMALL_READ, Refused, basic

MAX_HEAD_BYTES = 32 * 1024  # a request head larger than this is refused
_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive", "te", "trailer", "upgrade"}


TOO_LARGE = object()


def early_tunnel_bytes(client: h11.Connection) -> bytes | None:
    """Bytes the client sent right after its CONNECT head (a TLS hello in the same packet):
    they go up first.  None when the CONNECT request has a body (nonsense)."""
    try:
        if not isinstance(client.next_event(), h11.EndOfMessage) or client.next_event() is not h11.PAUSED:
            return None
    except h11.RemoteProtocolError:
        return None
    return client.trailing_data[0]


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def next_event(connection: h11.Connection, reader, until: float, *, skip_informational: bool = False):
    """The next h11 event of a connection, reading as it needs until ``until`` (the loop's
    clock: one bound for a whole head, however it is cut up); None when the peer closed or
    broke the protocol, TOO_LARGE for a head over MAX_HEAD_BYTES.  Raises TimeoutError."""
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            return TOO_LARGE if exc.error_status_hint == 431 else None
        if event is h11.NEED_DATA:
            remaining = until - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            data = await asyncio.wait_for(reader.read(CHUNK), remaining)
            connection.receive_data(data)
            continue
        if skip_informational and isinstance(event, h11.InformationalResponse):
            continue
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return None
        return event


def decoded(headers) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers.raw_items()]


def upstream_request(request: h11.Request, parts, proxy: str) -> h11.Request:
    """The request as the upstream gets it: origin-form (absolute-form to an http proxy,
    with its credentials), without our proxy headers, on a connection of its own."""
    via_http_proxy = proxy.lower().startswith("http://")
    target = (
        request.target
        if via_http_proxy
        else ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode("latin-1")
    )
    headers = end_to_end(request.headers)
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        # h11 framed the body by Transfer-Encoding: a Content-Length beside it would be read by
        # the upstream as another framing (request smuggling).
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    if via_http_proxy and urlsplit(proxy).username:
        headers.append((b"Proxy-Authorization", basic(urlsplit(proxy)).encode("latin-1")))
    headers.append((b"Connection", b"close"))
    return h11.Request(method=request.method, target=target, headers=headers)


def end_to_end(headers) -> list[tuple[bytes, bytes]]:
    """The headers without hop-by-hop ones: ours, and any the Connection header names."""
    named = {
        token.strip().lower()
        for name, value in headers.raw_items()
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    hop = {name.encode() for name in _HOP_HEADERS} | named
    return [(name, value) for name, value in headers.raw_items() if name.lower() not in hop]


def client_response(answer: h11.Response) -> h11.Response:
    """The upstream's answer as the client gets it: its hop-by-hop headers off (h11 frames
    the body for the client connection)."""
    headers = [(name, value) for name, value in end_to_end(answer.headers) if name.lower() != b"transfer-encoding"]
    return h11.Response(status_code=answer.status_code, reason=answer.reason, headers=headers)


async def copy_body(server: h11.Connection, up_reader, client: h11.Connection, writer, counters) -> None:
    """The answer's body, upstream to client, until its end (or the upstream's close, for a
    body that has no length).  After a small read, COALESCE before the next (see pipe)."""
    while True:
        event = server.next_event()
        if event is h11.NEED_DATA:
            data = await up_reader.read(CHUNK)
            server.receive_data(data)
            if data and len(data) < SMALL_READ:
                await asyncio.sleep(COALESCE)
            continue
        if isinstance(event, h11.Data):
            counters["bytes_down"] += len(event.data)
            writer.writelines(client.send_with_data_passthrough(event))  # no copy of the data
            await writer.drain()
        elif isinstance(event, h11.EndOfMessage):
            writer.write(client.send(h11.EndOfMessage()))
            await writer.drain()
            return
        else:
            raise h11.RemoteProtocolError("the upstream's answer ended early")


def split_host_port(target: str, default_port: int | None) -> tuple[str | None, int | None]:
    try:
        parts = urlsplit("//" + target)
        return parts.hostname, parts.port or default_port
    except ValueError:
        return None, None


async def reply_refused(writer, refused: Refused) -> None:
    await reply(writer, refused.status, refused.kind.text, {"X-Streamkeeper-Refused": refused.kind.value})


async def reply(writer, status: int, text: str, headers: dict | None = None) -> None:
    reasons = {
        200: "OK",
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        407: "Proxy Authentication Required",
        431: "Request Header Fields Too Large",
        502: "Bad Gateway",
    }
    body = (text + ("" if text.endswith("\n") else "\n")).encode()
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Error')}", f"Content-Length: {len(body)}", "Connection: close"]
    headers = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
