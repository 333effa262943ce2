"""The other hosts (docs/design.md, "Several hosts").  A channel another live host runs is
refused here (RunsElsewhere); a dead host's record is taken over once its lease has
expired.  A player's request for a channel another live host runs is fetched from that
host's nginx through this one (an internal location, PEER_PREFIX<ip:port>/<file>), so a
viewer the edge sends here keeps playing and one FFmpeg runs.  A host's address comes from
Redis (hosts:<id>:address, said with its lease) and is used only if it is one of `hosts`;
a forwarded request is never forwarded again.  Also the rule for the query string an
X-Accel-Redirect may carry."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Awaitable, Callable

import redis
from aiohttp import web

from streamstate import keys, runs, stream_end
from streamstate.nginx_config import QUERY_HEADER
from streamstate.urls import FORWARDED_HEADER, PEER_PREFIX

from .host_services import HostServices
from .supervisor import StartFailed

log = logging.getLogger("streamkeeper.launcher")

# The player's query string (?token=...), as nginx received it (X-Streamkeeper-Query: $args,
# undecoded), rides on the internal redirect, so nginx logs the same $arg_token for the first
# request as for the later ones.  Only URI query characters, at most what fits in nginx's
# request line; anything else is dropped, never passed on.
_SAFE_QUERY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]{1,8192}")


class RunsElsewhere(StartFailed):
    """Another live host runs or starts the channel: one FFmpeg per channel cluster-wide, so
    this host does not start it.  ``peer``: that host's nginx (one of `hosts`), where a
    player's request is forwarded; None: 503 at once."""

    def __init__(self, reason: str, peer: str | None = None):
        super().__init__(reason)
        self.peer = peer


async def refuse_if_elsewhere(host: HostServices, channel_id: str) -> None:
    """A channel another live host runs is that host's (RunsElsewhere, forwarded there for
    a player): said before any of this host's own checks, locks or starts, so a moved
    viewer's every request costs two Redis reads here."""
    record = await host.redis_call(runs.get_run, channel_id)
    if record is None or record.host in ("", host.settings.host_id):
        return
    if await host.redis_call(runs.host_alive, record.host):
        peer = await peer_of(host.settings, host.redis_call, record.host)
        raise RunsElsewhere(f"channel {channel_id} runs on host {record.host}", peer)


async def take_over(host: HostServices, record: runs.RunRecord) -> None:
    """The channel's record is another host's.  While that host's lease stands the run is
    its own (RunsElsewhere); once it has expired the host is gone and so is its
    connection (a host fences itself first, streamstate.lease): its record and provider
    slot are cleared here, as the reaper would, and the channel starts on this host."""
    if await host.redis_call(runs.host_alive, record.host):
        raise RunsElsewhere(
            f"channel {record.channel} runs on host {record.host}",
            await peer_of(host.settings, host.redis_call, record.host),
        )
    why = f"host {record.host} not seen for {host.settings.host_timeout:g} s"
    await asyncio.to_thread(
        stream_end.stop_streams,
        host.redis,
        host.settings,
        [stream_end.StopTarget.of_record(record, why, local=False)],
        executable=host.ffmpeg_executable,
        log=log,
        signal=False,
        need_mark=False,
        relay_wait=0,
    )
    log.info("channel %s: took it over from host %s (%s)", record.channel, record.host, why)


def with_query(target: str, query_string: str) -> str:
    """An X-Accel-Redirect target with the player's query string, if it is a safe one."""
    return target + "?" + query_string if _SAFE_QUERY.fullmatch(query_string) else target


def peer_target(peer: str, file_name: str, query_string: str) -> str:
    """Where nginx fetches a file of a channel another host runs: its internal location that
    proxies to ``peer`` (an address of `hosts`) with the player's query string."""
    return with_query(f"{PEER_PREFIX}{peer}/{file_name}", query_string)


def forwarded(request: web.Request) -> bool:
    """A request another host forwarded here: never forwarded again (no loop)."""
    return bool(request.headers.get(FORWARDED_HEADER))


async def peer_of(settings, redis_call: Callable[..., Awaitable[Any]], host_id: str) -> str | None:
    """Host ``host_id``'s nginx, if it said where (with its lease) and that is one of `hosts`
    (what Redis says is never trusted as an address on its own)."""
    if host_id == settings.host_id or not settings.hosts:
        return None
    address = await redis_call(runs.host_address, host_id)
    return address if address in settings.hosts else None


async def segment_peer(settings, redis_call: Callable[..., Awaitable[Any]], channel_id: str) -> str | None:
    """The nginx of the live host that runs the channel, if it is another; None: not another
    live host's."""
    record = await redis_call(runs.get_run, channel_id)
    if record is None or record.host in ("", settings.host_id):
        return None
    if not await redis_call(runs.host_alive, record.host):
        return None
    return await peer_of(settings, redis_call, record.host)


async def segment_elsewhere(request: web.Request) -> web.Response:
    """nginx's question about a segment it does not have (``@streamkeeper_segment_elsewhere``):
    the channel runs on another live host, so the segment is fetched there through this
    nginx (X-Accel-Redirect); else 404 (the player fetches its playlist again)."""
    launcher = request.app["launcher"]
    channel_id, name = request.match_info["channel_id"], request.match_info["segment"]
    if (
        not keys.CHANNEL_ID_RE.fullmatch(channel_id)
        or not re.fullmatch(rf"stream_{channel_id}_[0-9]{{1,20}}\.ts", name)
        or forwarded(request)
    ):
        return web.Response(status=404, text="no such segment\n")
    try:
        peer = await segment_peer(launcher.settings, launcher.redis_call, channel_id)
    except redis.RedisError:
        peer = None
    if peer is None:
        return web.Response(status=404, text="no such segment\n")
    return web.Response(
        status=200, headers={"X-Accel-Redirect": peer_target(peer, name, request.headers.get(QUERY_HEADER, ""))}
    )
