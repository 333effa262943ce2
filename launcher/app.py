"""The launcher's HTTP API (aiohttp: one event loop holds hundreds of waiting starts)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import redis
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streamstate import files, keys
from streamstate.channel_check import validate
from streamstate.channels import Channel, ChannelError, channel_from_dict, put_channel_undoably, undo_put_channel
from streamstate.nginx_config import ACCEL_PREFIX, ACCEL_REQUEST_HEADER, AGENT_HEADER, CLIENT_HEADER, QUERY_HEADER
from streamstate.runs import RunState
from streamstate.urls import INVALID_CHANNEL_ID_KIND
from streamstate.viewers import viewer_of_request

from . import peers, status_page
from .core import ChannelNotFound, CoolingDown, HostFenced, Launcher
from .peers import RunsElsewhere, forwarded, peer_target, with_query
from .supervisor import StartFailed

log = logging.getLogger("streamkeeper.launcher")

RETRY_AFTER = "5"
# Seconds a legacy API caller has to send its (small JSON) body: a body sent a byte at a
# time would hold a connection and a handler for ever.
BODY_TIMEOUT = 5.0
# The fields the old host's start accepted; anything else (proxy, provider, headers...) is
# the channel record's business, never a caller's.
LEGACY_START_FIELDS = {"channel_id", "source_url", "quality"}


def _json(data, status: int = 200, **headers) -> web.Response:
    return web.Response(text=json.dumps(data) + "\n", status=status, content_type="application/json", headers=headers)


def _for_player(request: web.Request) -> bool:
    """nginx's @start_stream asks on a player's behalf: answer with X-Accel-Redirect."""
    return request.headers.get(ACCEL_REQUEST_HEADER) == "1"


def _error(for_player: bool, status: int, message: str, headers: dict | None = None, **extra) -> web.Response:
    """A player gets the one-line reason as text (nginx adds the CORS headers); a script, JSON
    (with ``extra`` fields)."""
    if for_player:
        return web.Response(text=message + "\n", status=status, headers=headers)
    return _json({"status": "error", "error": message, **extra}, status, **(headers or {}))


def accel_target(channel_id: str, query_string: str) -> str:
    """Where nginx serves a cold start's playlist from: built from the validated channel id
    and the player's query string only; nothing else the client sent."""
    return with_query(f"{ACCEL_PREFIX}stream_{keys.check_channel_id(channel_id)}.m3u8", query_string)


def _warn_if_old_nginx_config(request: web.Request) -> None:
    """A snippet rendered before X-Accel-Redirect sends X-Original-URI and expects a 307:
    its players would get JSON.  Say so once; the fix is to render the snippet again."""
    launcher: Launcher = request.app["launcher"]
    if "X-Original-URI" in request.headers and "old nginx config" not in launcher.warned:
        launcher.warned.add("old nginx config")
        log.warning(
            "nginx calls /channel/<id>/start with an old snippet (X-Original-URI, no %s): "
            "render it again with `streamctl nginx-config` and reload nginx",
            ACCEL_REQUEST_HEADER,
        )


async def _start_response(request: web.Request, channel_id: str, channel: Channel | None = None, *, for_player: bool):
    """The answer to a start: for a player (nginx's @start_stream) X-Accel-Redirect or a text
    reason; for a script, JSON."""
    launcher: Launcher = request.app["launcher"]
    try:
        channel_id = keys.check_channel_id(channel_id)
    except keys.InvalidChannelId as exc:
        return _error(for_player, 400, str(exc), kind=INVALID_CHANNEL_ID_KIND)
    viewer = (
        viewer_of_request(
            request.headers.get(QUERY_HEADER, ""),
            request.headers.get(CLIENT_HEADER, ""),
            request.headers.get(AGENT_HEADER, ""),
        )
        if for_player
        else None
    )
    try:
        status = await launcher.start(channel_id, channel, viewer)
    except (ChannelNotFound, ChannelError, redis.RedisError, StartFailed) as exc:
        return _refusal(request, channel_id, exc, for_player=for_player)
    if for_player:
        # nginx serves the file as the answer to the player's own request: no redirect it sees.
        return web.Response(
            status=200, headers={"X-Accel-Redirect": accel_target(channel_id, request.headers.get(QUERY_HEADER, ""))}
        )
    _warn_if_old_nginx_config(request)
    supervisor = launcher.supervisors.get(channel_id)
    return _json(
        {
            "status": status,
            "channel_id": channel_id,
            "playlist": f"/live/stream_{channel_id}.m3u8",
            "pid": supervisor.ffmpeg.process.pid if supervisor and supervisor.ffmpeg.process else None,
        }
    )


def _refusal(request: web.Request, channel_id: str, exc: Exception, *, for_player: bool) -> web.Response:
    """The answer to a start that did not happen, by what stopped it: 404 unknown channel,
    422 unusable record, 503 with the reason (Redis down, failed, busy, cooling down, another
    host's: forwarded there for a player when that host is known), 421 this host is fenced."""
    launcher: Launcher = request.app["launcher"]
    if isinstance(exc, ChannelNotFound):
        return _error(for_player, 404, str(exc))
    if isinstance(exc, ChannelError):
        log.error("%s", exc)
        return _error(for_player, 422, str(exc))
    if isinstance(exc, redis.RedisError):
        log.error("channel %s: redis unavailable: %s", channel_id, exc)
        return _error(
            for_player,
            503,
            f"channel {channel_id}: temporarily unavailable (redis unreachable)",
            {"Retry-After": RETRY_AFTER},
        )
    if isinstance(exc, RunsElsewhere):
        if for_player and exc.peer and not forwarded(request):
            # The host that runs it answers, through this nginx: the player keeps its URL.
            log.info("channel %s: forwarded to %s (%s)", channel_id, exc.peer, exc)
            target = peer_target(exc.peer, f"stream_{channel_id}.m3u8", request.headers.get(QUERY_HEADER, ""))
            return web.Response(status=200, headers={"X-Accel-Redirect": target})
    launcher.counters["start_failures"] += 1
    if isinstance(exc, RunsElsewhere):
        return _error(for_player, 503, f"channel {channel_id}: {exc}", {"Retry-After": RETRY_AFTER})
    if isinstance(exc, HostFenced):
        # 421: this host cannot produce an answer (streamstate.lease); nginx closes the
        # connection without one, and the edge tries the next host on the ring.
        log.warning("channel %s: start refused: %s", channel_id, exc)
        return _error(for_player, 421, f"channel {channel_id}: {exc}", {"Retry-After": RETRY_AFTER})
    if not isinstance(exc, CoolingDown) or _first_refusal(launcher, channel_id):
        log.warning(
            "channel %s: start %s: %s",
            channel_id,
            "refused during failed_cooldown (said once per cooldown)" if isinstance(exc, CoolingDown) else "failed",
            exc,
        )
    if isinstance(exc, CoolingDown):
        # Starts are refused until the cooldown ends: say when (the player's text stays the
        # failure's class; a script's JSON says it is the cooldown).
        retry = str(max(1, math.ceil(exc.seconds_left)))
        return _error(
            for_player,
            503,
            f"channel {channel_id}: {exc}",
            {"Retry-After": retry},
            cooldown_seconds=round(exc.seconds_left, 1),
        )
    return _error(for_player, 503, f"channel {channel_id}: {exc}", {"Retry-After": RETRY_AFTER})


def _first_refusal(launcher: Launcher, channel_id: str) -> bool:
    """A channel's first start refused in its cooldown is logged; the next ones (every viewer
    retrying) are not, until failed_cooldown has passed."""
    now = time.monotonic()
    said = launcher.warned_cooldowns
    for channel in [c for c, until in said.items() if until <= now]:
        del said[channel]
    if channel_id in said:
        return False
    said[channel_id] = now + launcher.settings.failed_cooldown
    return True


async def start_channel(request: web.Request) -> web.Response:
    return await _start_response(request, request.match_info["channel_id"], for_player=_for_player(request))


async def stop_channel(request: web.Request) -> web.Response:
    launcher: Launcher = request.app["launcher"]
    try:
        stopped = await launcher.stop(request.match_info["channel_id"], "stop requested over HTTP")
    except keys.InvalidChannelId as exc:
        return _json({"status": "error", "error": str(exc)}, 400)
    return _json({"status": "stopped" if stopped else "not_running", "channel_id": request.match_info["channel_id"]})


async def stop_all_streams(request: web.Request) -> web.Response:
    """Every stream this launcher runs, stopped (FFmpeg, files, keys): an operator's explicit
    ask (a launcher that exits leaves them running)."""
    launcher: Launcher = request.app["launcher"]
    running = [s.id for s in launcher.live_supervisors()]
    await launcher.stop_all("stop of every stream requested")
    return _json({"status": "stopped", "channels": running})


async def streams(request: web.Request) -> web.Response:
    return _json(await request.app["launcher"].streams())


@web.middleware
async def redis_unavailable(request: web.Request, handler):
    """Redis down is an expected failure: every route answers 503 with one line, and the
    log gets one line, never a traceback."""
    try:
        return await handler(request)
    except redis.RedisError as exc:
        log.error("%s %s: redis unavailable: %s", request.method, request.path, exc)
        return _error(
            _for_player(request), 503, "temporarily unavailable (redis unreachable)", {"Retry-After": RETRY_AFTER}
        )


async def healthz(request: web.Request) -> web.Response:
    launcher: Launcher = request.app["launcher"]
    try:
        await launcher.redis_call(lambda client: client.ping())
    except Exception as exc:  # noqa: BLE001 - any Redis failure makes us unhealthy
        return _json({"status": "unhealthy", "redis": str(exc)}, 503)
    running = sum(1 for s in launcher.supervisors.values() if not s.finished)
    return _json({"status": "ok", "redis": "ok", "streams": running, "host": launcher.settings.host_id})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app["registry"])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


# -- the old host's routes, same bodies ---------------------------------------------
async def _json_body(request: web.Request) -> dict:
    try:
        data = await asyncio.wait_for(request.json(), BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(
            text=json.dumps({"status": "error", "error": "body not sent in time"}), content_type="application/json"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"status": "error", "error": "body is not JSON"}), content_type="application/json"
        ) from None
    except RecursionError:  # [[[[...]]]]: json.loads gives up, nothing breaks
        raise web.HTTPBadRequest(
            text=json.dumps({"status": "error", "error": "body is nested too deep"}), content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"status": "error", "error": "body is not an object"}), content_type="application/json"
        )
    return data


async def legacy_start(request: web.Request) -> web.Response:
    """POST /api/stream/start {"channel_id", "source_url", "quality"}.  With a source_url,
    the record is stored for the start (a restart or the next launcher reads it) and kept
    only if the start succeeds: a failed one puts the record back as it was.  The answer
    says so (`stored`).  Two calls for one channel take turns: the second one's record is
    never put back by the first one's failure."""
    data = await _json_body(request)
    unknown = sorted(set(data) - LEGACY_START_FIELDS)
    if unknown:
        return _json(
            {
                "status": "error",
                "stored": False,
                "error": f"unknown fields {', '.join(unknown)[:200]} (this route takes "
                f"{', '.join(sorted(LEGACY_START_FIELDS))})",
            },
            400,
        )
    channel_id = str(data.get("channel_id", ""))
    try:
        keys.check_channel_id(channel_id)
    except keys.InvalidChannelId as exc:
        return _json({"status": "error", "error": str(exc), "stored": False}, 400)
    launcher: Launcher = request.app["launcher"]
    async with launcher.legacy_lock(channel_id):
        return await _legacy_start(request, launcher, channel_id, data)


async def _legacy_start(request: web.Request, launcher: Launcher, channel_id: str, data: dict) -> web.Response:
    channel = None
    if data.get("source_url"):
        try:
            channel = channel_from_dict(channel_id, {k: v for k, v in data.items() if k != "channel_id"})
            validate(channel, launcher.settings)  # a known quality, a configured provider, too
        except ChannelError as exc:
            log.error("%s (legacy route; nothing stored)", exc)
            return _json({"status": "error", "error": str(exc), "stored": False}, 422)
        try:
            written, previous = await launcher.redis_call(put_channel_undoably, channel)
        except redis.RedisError as exc:
            log.error("channel %s: redis unavailable: %s", channel_id, exc)
            return _json(
                {
                    "status": "error",
                    "stored": False,
                    "error": f"channel {channel_id}: temporarily unavailable (redis unreachable)",
                },
                503,
                **{"Retry-After": RETRY_AFTER},
            )
    # A script's call: JSON, whatever headers it sent (X-Streamkeeper-Accel is nginx's).
    response = await _start_response(request, channel_id, channel, for_player=False)
    if channel is None:
        return response
    stored = response.status == 200
    if not stored:
        try:
            await launcher.redis_call(undo_put_channel, channel_id, written, previous)
        except redis.RedisError as exc:
            log.warning("channel %s: cannot take back the record of a failed start (%s)", channel_id, exc)
        log.info("channel %s: its start failed; the record it came with was not kept (legacy route)", channel_id)
    body = json.loads(response.text)
    return _json(
        {**body, "stored": stored}, response.status, **{k: v for k, v in response.headers.items() if k == "Retry-After"}
    )


async def legacy_stop(request: web.Request) -> web.Response:
    """POST /api/stream/stop {"channel_id"}."""
    data = await _json_body(request)
    launcher: Launcher = request.app["launcher"]
    try:
        stopped = await launcher.stop(str(data.get("channel_id", "")), "stop requested (legacy API)")
    except keys.InvalidChannelId as exc:
        return _json({"status": "error", "error": str(exc)}, 400)
    return _json({"status": "stopped" if stopped else "not_running", "channel_id": str(data.get("channel_id"))})


async def legacy_active(request: web.Request) -> web.Response:
    """GET /api/streams/active: the old shape, a list of running channel ids and a count."""
    listing = await request.app["launcher"].streams()
    active = [e for e in listing["streams"] if e["state"] in (RunState.RUNNING, RunState.STARTING)]
    return _json({"active_streams": [e["id"] for e in active], "count": len(active), "streams": active})


def _registry(launcher: Launcher) -> CollectorRegistry:
    class Collector:
        def collect(self):
            for name, value in launcher.counters.items():
                yield CounterMetricFamily(f"streamkeeper_launcher_{name}", f"Launcher {name}", value=value)
            live = [s for s in launcher.supervisors.values() if not s.finished]
            yield GaugeMetricFamily("streamkeeper_launcher_streams", "Streams this launcher runs", value=len(live))
            yield CounterMetricFamily(
                "streamkeeper_launcher_restarts",
                "FFmpeg restarts",
                value=sum(s.restarts for s in launcher.supervisors.values()),
            )
            yield GaugeMetricFamily(
                "streamkeeper_launcher_slow_streams",
                "Streams producing slower than real time now",
                value=sum(1 for s in live if s.ffmpeg.slow),
            )
            free = files.free_mb(launcher.settings.hls_dir)
            if free is not None:
                yield GaugeMetricFamily(
                    "streamkeeper_launcher_hls_dir_free_bytes", "Free space in hls_dir", value=free * 1024 * 1024
                )

    registry = CollectorRegistry()
    registry.register(Collector())
    return registry


async def adopt_at_start_up(launcher: Launcher) -> None:
    """This host's running streams, watched again; called once the launcher listens (a
    launcher that cannot listen exits without touching them)."""
    try:
        counts = await launcher.adopt_streams()
        log.info(
            "at start-up: adopted %d running stream(s), resumed %d between two FFmpegs, cleared %d stale record(s)",
            counts["adopted"],
            counts["resumed"],
            counts["cleared"],
        )
    except Exception as exc:  # noqa: BLE001 - Redis may be down; starts will say so
        log.error("cannot look for this host's running streams at start-up: %s", exc)


def make_app(settings) -> web.Application:
    app = web.Application(middlewares=[redis_unavailable])
    launcher = Launcher(settings)
    app["launcher"] = launcher
    app["registry"] = _registry(launcher)
    app.router.add_get("/channel/{channel_id}/start", start_channel)  # HEAD too
    app.router.add_post("/channel/{channel_id}/start", start_channel)
    app.router.add_post("/channel/{channel_id}/stop", stop_channel)
    app.router.add_get("/channel/{channel_id}/segment/{segment}", peers.segment_elsewhere)
    app.router.add_get("/streams", streams)
    app.router.add_post("/streams/stop", stop_all_streams)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/stream/start", legacy_start)
    app.router.add_post("/api/stream/stop", legacy_stop)
    app.router.add_get("/api/streams/active", legacy_active)
    app.router.add_get("/status", status_page.status_page)
    app.router.add_get("/status.js", status_page.status_script)
    app.router.add_get("/status.json", status_page.status_json)
    app.router.add_get("/favicon.ico", status_page.no_icon)

    async def on_startup(app):
        app["host_refresh"] = asyncio.create_task(launcher.host_key.keep_forever())
        app["status_history"] = asyncio.create_task(status_page.record_history_forever(launcher))

    async def on_shutdown(app):
        # Streams outlive the launcher (a restart or an upgrade stops no stream); stopping
        # them all is asked for explicitly: POST /streams/stop, `streamctl stop --all`.
        app["host_refresh"].cancel()
        app["status_history"].cancel()
        launcher.detach_all()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app
