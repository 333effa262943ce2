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
import hmac
import json
import logging
import time
from urllib.parse import unquote, urlsplit

import h11

from streamstate import egress, keys, lease
from streamstate.address_policy import AddressPolicy
from streamstate.egress import RefusalKind
from streamstate.redact import redact_url

from .connect import (
    Refused,
    Unreachable,
    shown_target,
    splice,
)
from .dialer import Dialer
from .http1 import (
    MAX_HEAD_BYTES,
    TOO_LARGE,
    client_response,
    copy_body,
    deadline,
    decoded,
    early_tunnel_bytes,
    next_event,
    reply,
    reply_refused,
    split_host_port,
    upstream_request,
)

log = logging.getLogger("streamkeeper.egress")

HEAD_TIMEOUT = 15.0  # seconds a client has to send its whole request (head and body)
IDLE_TIMEOUT = 30.0  # seconds a persistent client connection has for its whole next request head
ANSWER_TIMEOUT = 30.0  # seconds an upstream has for its whole answer head
# Client connections at most: each relayed one takes two descriptors (client, upstream);
# below LimitNOFILE (65536 in the unit) with room for the rest.  At the cap, a new
# connection takes the place of the oldest one that has not yet shown a ticket.
FD_RESERVE = 256


class EgressRelay:
    def __init__(self, settings, policy: AddressPolicy | None = None, max_clients: int | None = None):
        self.settings = settings
        self.state_dir = settings.state_dir
        self.policy = policy or AddressPolicy.from_settings(settings)
        self.open: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        # client connection (its writer) -> whether it has shown a valid ticket; oldest first
        self.clients: dict[asyncio.StreamWriter, bool] = {}
        self.max_clients = max_clients or _max_clients()
        self.dialer = Dialer(settings, self.policy)  # where connections go, and who may go there
        self.upstreams: set[asyncio.StreamWriter] = set()  # every open upstream connection
        # Fenced (streamstate.lease): this host's lease lapsed, it pulls nothing until renewed.
        # With fencing on, the relay starts fenced: nothing is pulled before a lease is held.
        self.fenced = lease.fencing_on(settings)
        # When the last fence began (epoch): a ticket written before it is void, so an FFmpeg
        # left from before a partition does not pull again once it heals (the launcher
        # starts a stream anew, with a new ticket, only if it is still this host's).
        self.fenced_at = time.time() if self.fenced else 0.0

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
        except Exception:  # one connection's bug never stops the relay (logged, with its traceback)
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
        request_deadline = deadline(HEAD_TIMEOUT)
        request = await next_event(client, reader, request_deadline)
        if request is TOO_LARGE:
            return await reply(writer, 431, "request head too large")
        if not isinstance(request, h11.Request):
            return await reply(writer, 400, "bad request")
        method, target = request.method.decode("ascii", "replace"), request.target.decode("ascii", "replace")
        headers = decoded(request.headers)
        if target.startswith("/"):
            return await self._status_route(writer, method, target)
        channel_id, ticket = self._authorised(headers)
        if channel_id is None:
            # FFmpeg's first request on each connection carries no credentials: it sends them
            # after this challenge, so one per connection is normal.
            self.counters["auth_challenges"] += 1
            return await reply(
                writer,
                407,
                "proxy authentication required",
                {"Proxy-Authenticate": 'Basic realm="streamkeeper-egress"'},
            )
        self.clients[writer] = True
        if method == "CONNECT":
            host, port = split_host_port(target, None)
            if host is None or port is None:
                return await reply(writer, 400, "bad target")
            early = early_tunnel_bytes(client)
            if early is None:
                return await reply(writer, 400, "a CONNECT request has no body")
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
                return await reply(writer, 400, "only CONNECT and absolute http:// requests")
            try:
                port = parts.port or 80
            except ValueError:
                return await reply(writer, 400, "bad target")
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
            request_deadline = deadline(IDLE_TIMEOUT)
            request = await next_event(client, reader, request_deadline)
            if not isinstance(request, h11.Request):
                return
            again, _ = self._authorised(decoded(request.headers))
            if again != channel_id:
                return await reply(
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
            if self.fenced:
                raise Refused(RefusalKind.FENCED, "this host is fenced: it could not renew its Redis lease", 503)
            if _ticket_time(ticket) < self.fenced_at:
                raise Refused(
                    RefusalKind.FENCED, "a ticket from before this host was fenced: the stream must start anew", 503
                )
            self.dialer.check_provider(ticket, host, port)
            up_reader, up_writer, via = await self.dialer.connect(host, port, proxy, tunnel=tunnel, ticket=ticket)
            if self.fenced:  # fenced while it connected: cut before a byte goes either way
                up_writer.transport.abort()
                raise Refused(RefusalKind.FENCED, "this host is fenced: it could not renew its Redis lease", 503)
        except Refused as refused:
            self._refused(channel_id, host, port, refused)
            await reply_refused(writer, refused)
            return None
        except Unreachable as exc:
            self.counters["unreachable"] += 1
            log.info("channel %s: %s unreachable: %s", channel_id, shown_target(host, port), exc)
            egress.record_refusal(
                self.state_dir, channel_id, RefusalKind.UNREACHABLE, f"{shown_target(host, port)}: {exc}"
            )
            await reply(writer, 502, "upstream unreachable")
            return None
        self.open[channel_id] += 1
        self.upstreams.add(up_writer)
        self.counters["connections"] += 1
        log.debug("channel %s: connected to %s%s", channel_id, shown_target(host, port), via)
        return up_reader, up_writer, via

    def _closed(self, channel_id: str, up_writer) -> None:
        up_writer.transport.abort()  # the provider sees the close at once
        if up_writer not in self.upstreams:
            return  # cut by the fence, counted then
        self.upstreams.discard(up_writer)
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
            await splice(reader, writer, up_reader, up_writer, self.counters)
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
            self.dialer.check_account(ticket, request.target.decode("ascii", "replace"))
        except Refused as refused:
            self._refused(channel_id, parts.hostname, port, refused)
            await reply_refused(writer, refused)
            return False
        upstream = await self._upstream(channel_id, ticket, writer, parts.hostname, port, tunnel=False)
        if upstream is None:
            return False
        up_reader, up_writer, _ = upstream
        server = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            up_writer.write(server.send(upstream_request(request, parts, proxy)))
            while True:  # the request's body, if any
                event = await next_event(client, reader, request_deadline)
                if isinstance(event, h11.Data):
                    up_writer.write(server.send(event))
                elif isinstance(event, h11.EndOfMessage):
                    up_writer.write(server.send(h11.EndOfMessage()))  # its trailers stay here
                    break
                else:
                    return False
            answer = await next_event(server, up_reader, deadline(ANSWER_TIMEOUT), skip_informational=True)
            if not isinstance(answer, h11.Response):
                await reply(writer, 502, "upstream sent no answer")
                return False
            if answer.status_code == 407 and proxy.lower().startswith("http://"):
                raise Refused(RefusalKind.PROXY, f"proxy {redact_url(proxy)}: authentication failed (407)", 502)
            writer.write(client.send(client_response(answer)))
            await copy_body(server, up_reader, client, writer, self.counters)
            return True
        except Refused as refused:
            self._refused(channel_id, parts.hostname, port, refused)
            await reply_refused(writer, refused)
            return False
        except h11.ProtocolError:
            return False
        finally:
            self._closed(channel_id, up_writer)

    def _refused(self, channel_id: str, host: str, port: int, refused: Refused) -> None:
        """One log line and the note the launcher reads."""
        self.counters[f"refused_{refused.kind}"] += 1
        log.warning("channel %s: refused a connection to %s: %s", channel_id, shown_target(host, port), refused.reason)
        egress.record_refusal(self.state_dir, channel_id, refused.kind, refused.reason)

    # -- fencing ---------------------------------------------------------------------------
    def fence(self) -> int:
        """This host's lease lapsed: every upstream connection is cut now (the provider sees
        them close) and new ones are refused until it is renewed; every ticket written
        before now is void; how many connections were cut."""
        self.fenced = True
        self.fenced_at = time.time()
        cut = len(self.upstreams)
        for up_writer in list(self.upstreams):
            up_writer.transport.abort()
        self.upstreams.clear()
        self.open.clear()
        return cut

    def unfence(self, began: float) -> None:
        """The lease is held (again): tickets written before the lease held now began are
        void (other hosts may have taken this host's slots while there was none); within one
        lease that never lapsed (this service alone could not renew it), none is."""
        self.fenced = False
        self.fenced_at = began

    # -- the relay's own routes ----------------------------------------------------
    async def _status_route(self, writer, method: str, target: str) -> None:
        if method != "GET":
            return await reply(writer, 405, "method not allowed")
        if target == egress.CONNECTIONS_PATH:
            body = json.dumps({"channels": dict(self.open), "counters": dict(self.counters), "fenced": self.fenced})
            return await reply(writer, 200, body, {"Content-Type": "application/json"})
        if target == "/healthz":
            return await reply(writer, 200, "ok")
        return await reply(writer, 404, "not found")


# -- helpers -----------------------------------------------------------------------------


def _max_clients() -> int:
    """Client connections at most: half the descriptors this process may open, less a reserve."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, (soft - FD_RESERVE) // 2)


def _ticket_time(ticket: dict) -> float:
    """When the launcher wrote the ticket (epoch; 0 for a ticket that does not say)."""
    written = ticket.get("written")
    return float(written) if isinstance(written, (int, float)) and not isinstance(written, bool) else 0.0
