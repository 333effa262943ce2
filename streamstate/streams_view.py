"""The read-only view of the streams that the launcher's GET /streams and `streamctl status`
share: every stream Redis lists as active, with its record, viewers and idle time, plus the
failed channels and the provider accounts' slots."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from . import keys, providers, redis_values, runs
from .redact import redact_text


class LiveStream(Protocol):
    """What the view reads of a launcher's stream (launcher.supervisor.StreamSupervisor)."""

    @property
    def state(self) -> runs.RunState: ...
    @property
    def finished(self) -> bool: ...
    @property
    def last_error(self) -> str: ...
    @property
    def speed(self) -> float | None: ...


def collect_streams(client, settings, supervisors: Mapping[str, LiveStream], *, with_hosts: bool = False) -> dict:
    """GET /streams and `streamctl status`: every stream Redis lists as active, plus this
    process's supervisors; members of the active set that are no channel id, apart."""
    active = runs.read_active(client)
    ids = set(active.channels) | {cid for cid, s in supervisors.items() if not s.finished}
    ordered = sorted(ids, key=int)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for channel_id in ordered:
        pipe.hgetall(keys.run_key(channel_id))
        pipe.get(keys.last_access_key(channel_id))
        pipe.zcount(keys.viewers_key(channel_id), now - settings.viewer_window, "+inf")
    # A key of the wrong type (junk) answers an error in its place: read as missing.
    replies = [None if isinstance(r, Exception) else r for r in (pipe.execute(raise_on_error=False) if ordered else [])]
    result = []
    for index, channel_id in enumerate(ordered):
        raw, last_access, viewers = replies[3 * index : 3 * index + 3]
        record = runs.RunRecord.from_hash(channel_id, raw) if raw else None
        supervisor = supervisors.get(channel_id)
        last = redis_values.epoch_seconds(last_access, now)
        entry = {
            "id": channel_id,
            "state": supervisor.state
            if supervisor and not supervisor.finished
            else ((record.state or "unknown") if record else "unknown"),
            "pid": record.pid if record else None,
            "host": record.host if record else None,
            "started": record.started if record else None,
            "uptime_seconds": round(now - record.started, 1) if record and record.started else None,
            "last_access": last,
            "idle_seconds": round(now - last, 1) if last else None,
            "viewers": int(viewers or 0),
            "restarts": record.restarts if record else 0,
            # Redis contents are hostile too: a record's error is shown redacted.
            "last_error": (supervisor.last_error if supervisor else redact_text(record.last_error) if record else ""),
            "source": redact_text(record.source) if record else "",
            "provider": redact_text(record.provider) if record else "",
            # Media seconds made per wall second over the last 30 s (this launcher's streams).
            "speed": round(supervisor.speed, 3) if supervisor and supervisor.speed is not None else None,
        }
        result.append(entry)
    grace = settings.start_timeout + 10
    return {
        "streams": result,
        "failed": runs.failed_channels(client),
        "providers": providers.usage(client, settings.providers, grace),
        # Every host (a SCAN of host:*): for `streamctl status`, not the launcher's polled routes.
        **({"hosts": hosts_view(client, settings, result)} if with_hosts else {}),
        "invalid_members": [runs.shown_member(m) for m in active.invalid],
    }


# Hosts looked for by their keys at most (SCAN host:*): a cluster has a handful; junk beyond
# this many is not listed.
MAX_HOSTS_LISTED = 256


def hosts_view(client, settings, streams: list[dict]) -> list[dict]:
    """Every host Redis knows of (a lease standing, or streams recorded): alive, the age of
    its lease's last renewal (host_timeout less what is left of it), its streams and the
    provider slots they hold."""
    names = {s["host"] for s in streams if s.get("host")} | {settings.host_id}
    for key in client.scan_iter(match=keys.host_key("*"), count=100):
        name = redis_values.text(key)[len(keys.host_key("")) :]
        if len(names) >= MAX_HOSTS_LISTED:
            break
        if name and keys.valid_host_id(name):
            names.add(name)
    ordered = sorted(names)
    pipe = client.pipeline(transaction=False)
    for name in ordered:
        pipe.pttl(keys.host_key(name))
    left = pipe.execute() if ordered else []
    view = []
    for name, ttl in zip(ordered, left):
        alive = isinstance(ttl, int) and ttl != -2  # the key exists (runs.host_alive's rule)
        mine = [s for s in streams if s.get("host") == name]
        view.append(
            {
                "host": name,
                "this_host": name == settings.host_id,
                "alive": alive,
                "lease_age_seconds": round(max(0.0, settings.host_timeout - ttl / 1000), 1)
                if alive and ttl > 0
                else None,
                "streams": len(mine),
                "slots": sum(1 for s in mine if s.get("provider")),
            }
        )
    return view
