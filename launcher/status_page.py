"""The operators' status page: GET /status (a page) and GET /status.json (what it shows).

Read-only, on the launcher's own port (loopback by default: reach it through an SSH
tunnel, or a location of your nginx that you protect; it is never in the rendered
snippet).  It shows what `streamctl status` shows, a stream's speed, and a chart of
streams and viewers over the last hour (samples kept in Redis, so a launcher restart
keeps them).  No credentials, no tokens, no source URL unredacted: everything it shows
comes from collect_streams (redacted) and is written into the page as text, never as
markup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from importlib import resources

import redis
from aiohttp import web

from streamstate import keys, redis_values, runs
from streamstate.streams_view import collect_streams

log = logging.getLogger("streamkeeper.launcher")

HISTORY_EVERY = 30.0  # seconds between samples of the chart
HISTORY_KEEP = 120  # samples kept: an hour


def _packaged(name: str) -> str:
    return resources.files("launcher").joinpath(name).read_text(encoding="utf-8")


async def status_page(request: web.Request) -> web.Response:
    return web.Response(text=_packaged("status.html"), content_type="text/html", headers=_headers())


async def status_script(request: web.Request) -> web.Response:
    return web.Response(text=_packaged("status.js"), content_type="text/javascript", headers=_headers())


async def no_icon(request: web.Request) -> web.Response:
    """Browsers ask for one with the page: none, without a 404 in their console."""
    return web.Response(status=204)


async def status_json(request: web.Request) -> web.Response:
    launcher = request.app["launcher"]
    try:
        body = await launcher.redis_call(_snapshot, launcher.settings, launcher.supervisors)
    except Exception as exc:  # noqa: BLE001 - Redis down: the page says so
        return web.json_response({"error": f"redis unavailable: {exc}"}, status=503, headers=_headers())
    return web.json_response(body, headers=_headers())


def _headers() -> dict:
    # Nothing cached, nothing framed by another site, no script but the page's own.
    return {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'",
    }


def _snapshot(client, settings, supervisors) -> dict:
    listing = collect_streams(client, settings, supervisors)
    last_pass = runs.reaper_last_pass(client, settings.host_id)
    return {
        "host": settings.host_id,
        "now": time.time(),
        **listing,
        "reaper_last_pass": last_pass,
        "history": read_history(client, settings.host_id),
    }


def read_history(client, host_id: str) -> list[dict]:
    """The chart's samples, oldest first (junk left out)."""
    samples = []
    try:
        raws = client.lrange(keys.status_history_key(host_id), 0, HISTORY_KEEP - 1) or []
    except redis.ResponseError as exc:
        if not redis_values.wrong_type(exc):
            raise
        raws = []  # junk of another type: record_sample replaces it
    for raw in reversed(raws):
        sample = redis_values.json_value(raw)
        try:
            point = {"t": float(sample["t"]), "streams": int(sample["streams"]), "viewers": int(sample["viewers"])}
        except (ValueError, TypeError, KeyError, OverflowError):  # junk, Infinity, 1e400, NaN
            continue
        if math.isfinite(point["t"]) and 0 <= point["streams"] < 10**7 and 0 <= point["viewers"] < 10**9:
            samples.append(point)
    return samples


def record_sample(client, settings, supervisors) -> None:
    listing = collect_streams(client, settings, supervisors)
    mine = [s for s in listing["streams"] if s["host"] in (None, settings.host_id)]
    sample = json.dumps({"t": round(time.time(), 1), "streams": len(mine), "viewers": sum(s["viewers"] for s in mine)})
    redis_values.clear_other_type(client, keys.status_history_key(settings.host_id), "list")
    pipe = client.pipeline(transaction=False)
    pipe.lpush(keys.status_history_key(settings.host_id), sample)
    pipe.ltrim(keys.status_history_key(settings.host_id), 0, HISTORY_KEEP - 1)
    pipe.execute()


async def record_history_forever(launcher) -> None:
    """A sample now, then every HISTORY_EVERY seconds (a Redis error skips one)."""
    while True:
        try:
            await launcher.redis_call(record_sample, launcher.settings, launcher.supervisors)
        except Exception as exc:  # noqa: BLE001 - retried at the next sample
            log.debug("status history: %s", exc)
        await asyncio.sleep(HISTORY_EVERY)
