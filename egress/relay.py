"""The egress relay: the one way out for every upstream connection of this host's streams.

FFmpeg (``http_proxy`` in its environment) and the resolvers speak HTTP proxy to it:
``CONNECT host:port`` for https, absolute-form requests for http.  HTTP is parsed with
h11 (never by hand): on a persistent connection each absolute-form request is parsed,
checked and forwarded on its own, over an upstream connection of its own that closes
when its answer is complete.  For each request the relay

1. knows the channel: Proxy-Authorization carries the channel id and the token of its
   ticket (streamstate.egress); anything else gets 407;
2. connects where the ticket says: directly, or through the channel's proxy (http://,
   socks5://, socks5h:// with pysocks); a proxy that cannot be used refuses the
   connection (502) - never a direct connection instead (fail closed);
3. checks the address it actually connects to (after DNS, on every redirect, every
   HLS segment) against upstream_allow / upstream_deny and this host's own services;
   a refused address gets 403 and a note the launcher reads;
4. copies the request and its answer (a CONNECT tunnel: bytes both ways) until either
   side ends, then closes the upstream connection at once (a provider counts our open
   connections); Proxy-Authorization never goes upstream.

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
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import h11

from streamstate import egress, keys
from streamstate.egress import RefusalKind
from streamstate.redact import redact_url
from streamstate.upstreams import (
    AddressPolicy,
    literal_address,
    matching_providers,
    provider_servers,
    proxy_endpoint,
    server_key,
    socks_connection,
)

log = logging.getLogger("streamkeeper.egress")

MAX_HEAD_BYTES = 32 * 1024  # a request head larger than this is refused
HEAD_TIMEOUT = 15.0  # seconds a client has to send its whole request (head and body)
IDLE_TIMEOUT = 30.0  # seconds a persistent client connection has for its whole next request head
ANSWER_TIMEOUT = 30.0  # seconds an upstream has for its whole answer head
# Client connections at most: each relayed one takes two descriptors (client, upstream);
# below LimitNOFILE (65536 in the unit) with room for the rest.  At the cap, a new
# connection takes the place of the oldest one that has not yet shown a ticket.
FD_RESERVE = 256
CONNECT_TIMEOUT = 10.0  # seconds to reach an upstream or a proxy
CHUNK = 64 * 1024
SMALL_READ = 16 * 1024  # a read below this waits COALESCE before the next one
COALESCE = 0.01  # seconds
_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive", "te", "trailer", "upgrade"}


class Refused(Exception):
    """A connection the relay will not make: ``kind`` says why (what the launcher tells the
    player), ``reason`` is for the log (no password in it)."""

    def __init__(self, kind: RefusalKind, reason: str, status: int):
        super().__init__(reason)
        self.kind, self.reason, self.status = kind, reason, status


class Unreachable(Exception):
    """The upstream did not answer (no policy involved): 502, FFmpeg reports it."""


class EgressRelay:
    def __init__(self, settings, policy: AddressPolicy | None = None, max_clients: int | None = None):
        self.settings = settings
        self.state_dir = settings.state_dir
        self.policy = policy or AddressPolicy.from_settings(settings)
        # Every provider's server, by name and by address (its name resolved once here: a
        # source that reaches the server by another name or address is caught by address).
        self.provider_servers = provider_servers(settings.providers, resolve=_addresses_now)
        self.open: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        # client connection (its writer) -> whether it has shown a valid ticket; oldest first
        self.clients: dict[asyncio.StreamWriter, bool] = {}
        self.max_clients = max_clients or _max_clients()

    # -- one client connection ---------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.clients) >= self.max_clients and not self._evict_a_stranger():
            self.counters["clients_refused"] += 1
            writer.transport.abort()
            return
        self.clients[writer] = False
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the relay is exiting: the connection is cut below, quietly
        except Exception:  # noqa: BLE001 - one connection's bug never stops the relay
            log.exception("unexpected error on a relayed connection")
        finally:
            self.clients.pop(writer, None)
            writer.transport.abort()

    def _evict_a_stranger(self) -> bool:
        """Cut the oldest client connection that has shown no valid ticket (anyone on the
        host can open connections; only our streams hold tickets); False if there is none."""
        stranger = next((w for w, known in self.clients.items() if not known), None)
        if stranger is None:
            return False
        del self.clients[stranger]
        stranger.transport.abort()
        self.counters["clients_evicted"] += 1
        return True

    async def _handle(self, reader, writer) -> None:
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        request_deadline = _deadline(HEAD_TIMEOUT)
        request = await _next_event(client, reader, request_deadline)
        if request is _TOO_LARGE:
            return await _answer(writer, 431, "request head too large")
        if not isinstance(request, h11.Request):
            return await _answer(writer, 400, "bad request")
        method, target = request.method.decode("ascii", "replace"), request.target.decode("ascii", "replace")
        headers = _decoded(request.headers)
        if target.startswith("/"):
            return await self._status_route(writer, method, target)
        channel_id, ticket = self._authorised(headers)
        if channel_id is None:
            # FFmpeg's first request on each connection carries no credentials: it sends them
            # after this challenge, so one per connection is normal.
            self.counters["auth_challenges"] += 1
            return await _answer(
                writer,
                407,
                "proxy authentication required",
                {"Proxy-Authenticate": 'Basic realm="streamkeeper-egress"'},
            )
        self.clients[writer] = True
        if method == "CONNECT":
            host, port = _split_host_port(target, None)
            if host is None or port is None:
                return await _answer(writer, 400, "bad target")
            early = _early_tunnel_bytes(client)
            if early is None:
                return await _answer(writer, 400, "a CONNECT request has no body")
            return await self._tunnel(channel_id, ticket, reader, writer, host, port, early)
        await self._forward_requests(channel_id, ticket, client, request, request_deadline, reader, writer)

    async def _forward_requests(
        self,
        channel_id: str,
        ticket: dict,
        client: h11.Connection,
        request: h11.Request,
        request_deadline: float,
        reader,
        writer,
    ) -> None:
        """Absolute-form requests on one client connection, each on its own: checked
        (credentials, address policy, provider), forwarded over an upstream connection of its
        own, its answer copied back; then the next request, while both sides keep the
        connection."""
        while True:
            target = request.target.decode("ascii", "replace")
            parts = urlsplit(target)
            if parts.scheme.lower() != "http" or not parts.hostname:
                return await _answer(writer, 400, "only CONNECT and absolute http:// requests")
            try:
                port = parts.port or 80
            except ValueError:
                return await _answer(writer, 400, "bad target")
            if not await self._forward_one(
                channel_id, ticket, client, request, request_deadline, parts, port, reader, writer
            ):
                return
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                return
            try:
                client.start_next_cycle()
            except h11.LocalProtocolError:
                return
            request_deadline = _deadline(IDLE_TIMEOUT)
            request = await _next_event(client, reader, request_deadline)
            if not isinstance(request, h11.Request):
                return
            again, _ = self._authorised(_decoded(request.headers))
            if again != channel_id:
                return await _answer(
                    writer,
                    407,
                    "proxy authentication required",
                    {"Proxy-Authenticate": 'Basic realm="streamkeeper-egress"'},
                )

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

    async def _upstream(self, channel_id: str, ticket: dict, writer, host: str, port: int, *, tunnel: bool):
        """(reader, writer, via) of an upstream connection for the channel, counted open; None
        when it was refused or unreachable (the client has been answered, the note written)."""
        proxy = ticket.get("proxy") or ""
        try:
            self._check_provider(ticket, host, port)
            up_reader, up_writer, via = await self._connect(host, port, proxy, tunnel=tunnel, ticket=ticket)
        except Refused as refused:
            self._refused(channel_id, host, port, refused)
            await _answer_refused(writer, refused)
            return None
        except Unreachable as exc:
            self.counters["unreachable"] += 1
            log.info("channel %s: %s unreachable: %s", channel_id, _shown_target(host, port), exc)
            egress.record_refusal(
                self.state_dir, channel_id, RefusalKind.UNREACHABLE, f"{_shown_target(host, port)}: {exc}"
            )
            await _answer(writer, 502, "upstream unreachable")
            return None
        self.open[channel_id] += 1
        self.counters["connections"] += 1
        log.debug("channel %s: connected to %s%s", channel_id, _shown_target(host, port), via)
        return up_reader, up_writer, via

    def _closed(self, channel_id: str, up_writer) -> None:
        up_writer.transport.abort()  # the provider sees the close at once
        self.open[channel_id] -= 1
        if self.open[channel_id] <= 0:
            del self.open[channel_id]

    async def _tunnel(self, channel_id: str, ticket: dict, reader, writer, host: str, port: int, early: bytes) -> None:
        """CONNECT: an upstream connection, then bytes both ways until either side ends."""
        upstream = await self._upstream(channel_id, ticket, writer, host, port, tunnel=True)
        if upstream is None:
            return
        up_reader, up_writer, _ = upstream
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if early:
                up_writer.write(early)
                self.counters["bytes_up"] += len(early)
            await _splice(reader, writer, up_reader, up_writer, self.counters)
        finally:
            self._closed(channel_id, up_writer)

    async def _forward_one(
        self,
        channel_id: str,
        ticket: dict,
        client: h11.Connection,
        request: h11.Request,
        request_deadline: float,
        parts,
        port: int,
        reader,
        writer,
    ) -> bool:
        """One request and its answer; False when the client connection cannot go on."""
        proxy = ticket.get("proxy") or ""
        try:
            self._check_account(ticket, request.target.decode("ascii", "replace"))
        except Refused as refused:
            self._refused(channel_id, parts.hostname, port, refused)
            await _answer_refused(writer, refused)
            return False
        upstream = await self._upstream(channel_id, ticket, writer, parts.hostname, port, tunnel=False)
        if upstream is None:
            return False
        up_reader, up_writer, _ = upstream
        server = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            up_writer.write(server.send(_upstream_request(request, parts, proxy)))
            while True:  # the request's body, if any
                event = await _next_event(client, reader, request_deadline)
                if isinstance(event, h11.Data):
                    up_writer.write(server.send(event))
                elif isinstance(event, h11.EndOfMessage):
                    up_writer.write(server.send(h11.EndOfMessage()))  # its trailers stay here
                    break
                else:
                    return False
            answer = await _next_event(server, up_reader, _deadline(ANSWER_TIMEOUT), skip_informational=True)
            if not isinstance(answer, h11.Response):
                await _answer(writer, 502, "upstream sent no answer")
                return False
            if answer.status_code == 407 and proxy.lower().startswith("http://"):
                raise Refused(RefusalKind.PROXY, f"proxy {redact_url(proxy)}: authentication failed (407)", 502)
            writer.write(client.send(_client_response(answer)))
            await _copy_body(server, up_reader, client, writer, self.counters)
            return True
        except Refused as refused:
            self._refused(channel_id, parts.hostname, port, refused)
            await _answer_refused(writer, refused)
            return False
        except h11.ProtocolError:
            return False
        finally:
            self._closed(channel_id, up_writer)

    def _check_provider(self, ticket: dict, host: str, port: int, addresses: Sequence[str] = ()) -> None:
        """A provider's server is reached only by a stream holding one of its slots: known by
        its name, or by any address the request names or resolves to."""
        owners: set[str] = set()
        for key in [server_key(host), *(server_key(a) for a in addresses)]:
            owners |= self.provider_servers.get((key, port), set())
        if owners and ticket.get("provider") not in owners:
            raise Refused(
                RefusalKind.ADDRESS,
                f"{_shown_target(host, port)} is the server of provider "
                f"{' or '.join(sorted(owners))}, and this stream holds none of its connections",
                403,
            )

    def _check_account(self, ticket: dict, url: str) -> None:
        """A URL under a limited provider's match prefix is fetched only by a stream holding a
        slot of that provider: two accounts on one server are told apart by their prefix."""
        owners = matching_providers(url, {n: p for n, p in self.settings.providers.items() if p.max_streams})
        if owners and ticket.get("provider") not in owners:
            raise Refused(
                RefusalKind.ADDRESS,
                f"{redact_url(url)} belongs to provider {' or '.join(sorted(owners))}, "
                "and this stream holds none of its connections",
                403,
            )

    def _refused(self, channel_id: str, host: str, port: int, refused: Refused) -> None:
        """One log line and the note the launcher reads."""
        self.counters[f"refused_{refused.kind}"] += 1
        log.warning("channel %s: refused a connection to %s: %s", channel_id, _shown_target(host, port), refused.reason)
        egress.record_refusal(self.state_dir, channel_id, refused.kind, refused.reason)

    # -- where a connection goes ---------------------------------------------------
    async def _connect(self, host: str, port: int, proxy: str, *, tunnel: bool, ticket: dict):
        """(reader, writer, description) of a connection to host:port, directly or through
        the proxy; Refused or Unreachable."""
        if not proxy:
            reader, writer, address = await self._connect_direct(host, port, ticket)
            return reader, writer, ""
        parts = urlsplit(proxy)
        scheme = parts.scheme.lower()
        shown = redact_url(proxy)
        proxy_host, proxy_port = proxy_endpoint(proxy)
        for address in await _resolve(proxy_host, proxy_port, proxy_shown=shown):
            if self.policy.refuses_service(address, proxy_port):
                raise Refused(RefusalKind.PROXY, f"proxy {shown} is one of this host's own services", 502)
        target_host = host
        if scheme != "socks5" and literal_address(host) is None:
            # The proxy resolves the name on its network; a provider's server under another
            # name is still caught by what the name resolves to here (best effort).
            self._check_provider(ticket, host, port, await _addresses_or_none(host, port))
        if scheme == "socks5" or literal_address(host) is not None:
            # socks5: names are resolved here and the address checked; socks5h and http
            # proxies resolve names on their own network (an address literal is checked).
            addresses = await _resolve(host, port)
            self._check_provider(ticket, host, port, addresses)
            target_host = self._check_addresses(addresses, port)[0]
        if scheme in ("socks5", "socks5h"):
            sock = await asyncio.to_thread(_socks_connect, parts, target_host, port, scheme == "socks5h", shown)
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            return reader, writer, f" through {shown}"
        reader, writer = await _open_proxy(proxy_host, proxy_port, shown)
        if tunnel:
            await _http_proxy_connect(reader, writer, parts, target_host, port, shown)
        return reader, writer, f" through {shown}"

    async def _connect_direct(self, host: str, port: int, ticket: dict):
        resolved = await _resolve(host, port)
        self._check_provider(ticket, host, port, resolved)
        addresses = self._check_addresses(resolved, port)
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
            raise Refused(RefusalKind.ADDRESS, reasons[0], 403)
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

_TOO_LARGE = object()


def _early_tunnel_bytes(client: h11.Connection) -> bytes | None:
    """Bytes the client sent right after its CONNECT head (a TLS hello in the same packet):
    they go up first.  None when the CONNECT request has a body (nonsense)."""
    try:
        if not isinstance(client.next_event(), h11.EndOfMessage) or client.next_event() is not h11.PAUSED:
            return None
    except h11.RemoteProtocolError:
        return None
    return client.trailing_data[0]


def _max_clients() -> int:
    """Client connections at most: half the descriptors this process may open, less a reserve."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, (soft - FD_RESERVE) // 2)


async def _addresses_or_none(host: str, port: int) -> list[str]:
    """What host resolves to here; [] when it does not (the proxy may know it)."""
    try:
        return await _resolve(host, port)
    except Unreachable:
        return []


def _addresses_now(host: str) -> list[str]:
    """A provider server's addresses, resolved once at start (blocking; a name that does not
    resolve yet is known by its name only)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError:
        return []


def _deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def _next_event(connection: h11.Connection, reader, deadline: float, *, skip_informational: bool = False):
    """The next h11 event of a connection, reading as it needs until ``deadline`` (the loop's
    clock: one bound for a whole head, however it is cut up); None when the peer closed or
    broke the protocol, _TOO_LARGE for a head over MAX_HEAD_BYTES.  Raises TimeoutError."""
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            return _TOO_LARGE if exc.error_status_hint == 431 else None
        if event is h11.NEED_DATA:
            remaining = deadline - asyncio.get_running_loop().time()
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


def _decoded(headers) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers.raw_items()]


def _upstream_request(request: h11.Request, parts, proxy: str) -> h11.Request:
    """The request as the upstream gets it: origin-form (absolute-form to an http proxy,
    with its credentials), without our proxy headers, on a connection of its own."""
    via_http_proxy = proxy.lower().startswith("http://")
    target = (
        request.target
        if via_http_proxy
        else ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode("latin-1")
    )
    headers = _end_to_end(request.headers)
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        # h11 framed the body by Transfer-Encoding: a Content-Length beside it would be read by
        # the upstream as another framing (request smuggling).
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    if via_http_proxy and urlsplit(proxy).username:
        headers.append((b"Proxy-Authorization", _basic(urlsplit(proxy)).encode("latin-1")))
    headers.append((b"Connection", b"close"))
    return h11.Request(method=request.method, target=target, headers=headers)


def _end_to_end(headers) -> list[tuple[bytes, bytes]]:
    """The headers without hop-by-hop ones: ours, and any the Connection header names."""
    named = {
        token.strip().lower()
        for name, value in headers.raw_items()
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    hop = {name.encode() for name in _HOP_HEADERS} | named
    return [(name, value) for name, value in headers.raw_items() if name.lower() not in hop]


def _client_response(answer: h11.Response) -> h11.Response:
    """The upstream's answer as the client gets it: its hop-by-hop headers off (h11 frames
    the body for the client connection)."""
    headers = [(name, value) for name, value in _end_to_end(answer.headers) if name.lower() != b"transfer-encoding"]
    return h11.Response(status_code=answer.status_code, reason=answer.reason, headers=headers)


async def _copy_body(server: h11.Connection, up_reader, client: h11.Connection, writer, counters) -> None:
    """The answer's body, upstream to client, until its end (or the upstream's close, for a
    body that has no length).  After a small read, COALESCE before the next (see _pipe)."""
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


async def _resolve(host: str, port: int, *, proxy_shown: str = "") -> list[str]:
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
                RefusalKind.PROXY, f"proxy {proxy_shown}: cannot resolve its name ({_error_text(exc)})", 502
            ) from None
        raise Unreachable(f"cannot resolve {host}: {_error_text(exc)}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


async def _open_proxy(host: str, port: int, shown: str):
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        raise Refused(RefusalKind.PROXY, f"proxy {shown} unreachable: {_error_text(exc)}", 502) from None


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
        raise Refused(RefusalKind.PROXY, f"proxy {shown} unusable: {message}", 502) from None
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


def _basic(parts) -> str:
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(credentials.encode()).decode()


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
    tasks = {
        asyncio.create_task(_pipe(reader, up_writer, counters, "bytes_up")),
        asyncio.create_task(_pipe(up_reader, writer, counters, "bytes_down")),
    }
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _answer_refused(writer, refused: Refused) -> None:
    await _answer(writer, refused.status, refused.kind.text, {"X-Streamkeeper-Refused": refused.kind.value})


async def _answer(writer, status: int, text: str, headers: dict | None = None) -> None:
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
