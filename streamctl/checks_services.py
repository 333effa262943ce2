"""doctor's checks of streamkeeper's services on this host: the launcher and its start route,
the egress relay, the validator, heartbeatd, the reaper."""

from __future__ import annotations

import json
import os
import time

from streamstate import egress, redis_values, runs
from streamstate.checkpoint import checkpoint_path, load_checkpoint
from streamstate.redact import redact_url
from streamstate.urls import INVALID_CHANNEL_ID_KIND

from .checks_common import (
    FAIL,
    OK,
    TIMEOUT,
    WARN,
    Check,
    http_get,
    processes,
    same_config,
)


def check_launcher(settings) -> list[Check]:
    """It answers on launcher_listen, and its start route exists there."""
    base = f"http://{settings.launcher_listen}"
    try:
        status, body = http_get(f"{base}/healthz")
    except TimeoutError:
        status, body = 0, ""
        found = [
            Check(
                FAIL,
                "launcher",
                f"no answer from {settings.launcher_listen} within {TIMEOUT:g} s "
                "(its /healthz asks Redis: is Redis hanging?)",
            )
        ]
    except OSError as exc:
        found = [
            Check(
                FAIL,
                "launcher",
                f"nothing answers on {settings.launcher_listen} ({exc}): start "
                "it (systemctl start streamkeeper-launcher)",
            )
        ]
    else:
        found = []
    if found:
        return found + check_relay(settings)
    found = [
        Check(
            OK if status == 200 else FAIL,
            "launcher",
            f"answers on {settings.launcher_listen}"
            + ("" if status == 200 else f" but is unhealthy: {_health_reason(body)}"),
        )
    ]
    try:
        status, body = http_get(f"{base}/channel/x/start")  # an invalid id: 400 from the route itself
    except OSError as exc:
        status, body = 0, str(exc)
    if status == 400 and _json_field(body, "kind") == INVALID_CHANNEL_ID_KIND:
        found.append(Check(OK, "launcher start route", f"{base}/channel/<id>/start exists"))
    else:
        found.append(
            Check(
                FAIL,
                "launcher start route",
                f"{base}/channel/<id>/start answered {status}: whatever listens there is not this launcher",
            )
        )
    return found + check_relay(settings)


def check_relay(settings) -> list[Check]:
    counts = egress.open_connections(settings.egress_listen, timeout=TIMEOUT)
    if counts is None:
        return [
            Check(
                FAIL,
                "egress relay",
                f"nothing answers on {settings.egress_listen}: every start "
                "fails with 'egress relay unavailable'; start it (systemctl start streamkeeper-egress)",
            )
        ]
    return [
        Check(
            OK,
            "egress relay",
            f"answers on {settings.egress_listen} ({sum(counts.values())} upstream connection(s) open)",
        )
    ]


def check_validator(settings) -> list[Check]:
    """auth_url answers (a validator that is down makes every playlist request a 500)."""
    if not settings.auth_url:
        return []
    try:
        status, _ = http_get(settings.auth_url)
    except OSError as exc:
        return [
            Check(
                FAIL,
                "viewer validator",
                f"{redact_url(settings.auth_url)} does not answer ({exc}): "
                "every playlist request gets 500 from nginx; start it or unset auth_url",
            )
        ]
    return [
        Check(
            OK if status < 500 else FAIL,
            "viewer validator",
            f"{redact_url(settings.auth_url)} answers {status} to a request without a token",
        )
    ]


def _health_reason(body: str) -> str:
    try:
        data = json.loads(body)
        return f"Redis: {data.get('redis')}" if isinstance(data, dict) and data.get("redis") else body[:120]
    except ValueError:
        return " ".join(body.split())[:120]


def check_heartbeatd(settings) -> list[Check]:
    """Running (a process of that name), and how far behind the access log it is."""

    running = [
        pid
        for pid, argv in processes()
        if any(os.path.basename(a) == "heartbeatd" for a in argv[:3]) and same_config(argv, settings.config_path)
    ]
    if not running:
        return [
            Check(
                FAIL,
                "heartbeatd",
                "not running: last_access is never bumped and the reaper stops "
                "watched streams; start it (systemctl start streamkeeper-heartbeatd)",
            )
        ]
    position = load_checkpoint(checkpoint_path(settings.state_dir, settings.access_log), settings.access_log)
    try:
        size = os.stat(settings.access_log).st_size
    except OSError:
        size = None
    if position is None or size is None:
        return [Check(OK, "heartbeatd", f"running (pid {running[0]}); no checkpoint yet")]
    lag = max(0, size - position.offset)
    return [
        Check(
            OK if lag < 1 << 20 else WARN,
            "heartbeatd",
            f"running (pid {running[0]}), {lag} bytes of {settings.access_log} behind",
        )
    ]


def check_reaper(client, settings) -> list[Check]:
    """It passed within 2 x reaper_interval (the cleanup has a scheduler)."""
    data = runs.reaper_last_pass(client, settings.host_id)
    last = redis_values.epoch_seconds(data.get("time"))
    interval = settings.reaper_interval
    if last is None:
        return [
            Check(
                FAIL,
                "reaper",
                f"no pass recorded for host {settings.host_id}: idle streams are never "
                "stopped; start stream-reaper (systemctl start streamkeeper-reaper)",
            )
        ]
    age = time.time() - last
    if age > 2 * interval:
        return [
            Check(
                FAIL,
                "reaper",
                f"last pass {age:.0f} s ago (reaper_interval {interval:g} s): start it "
                "(systemctl start streamkeeper-reaper)",
            )
        ]
    return [Check(OK, "reaper", f"last pass {age:.0f} s ago")]


def _json_field(body: str, name: str):
    """A field of a JSON object body (None: not JSON, not an object, or no such field)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None
