"""The stream record: one run of one channel's FFmpeg, and the stop routine's key cleanup.

Every run has an identity: run id, host, pid, the process's start time.  The
legacy keys (pid, started, last_access) are written beside the run hash, so
runbooks and heartbeatd see a running stream as before.  Keys are deleted only
while they still belong to the run being stopped (compare-and-delete in one
script), so a stream started again in between keeps its keys.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
import uuid

import redis

from . import keys, run_scripts
from .redis_client import registered_script
from .redis_values import epoch_seconds, int_or_none, json_value, text, wrong_type


class RunState(enum.StrEnum):
    """A run's states, as the run record keeps them (the value), and the moves allowed
    between them (``can_become``): as supervisor's BACKOFF and FATAL are: states, not strings."""

    STARTING = "starting"  # FFmpeg runs, its playlist not yet playable
    RUNNING = "running"  # playable, watched
    BACKOFF = "backoff"  # between two FFmpegs: a restart or a wait for the host
    STOPPING = "stopping"  # the stop routine has begun
    FAILED = "failed"  # ended for good with a reason (starts get 503 for failed_cooldown)
    STOPPED = "stopped"  # ended

    @classmethod
    def parse(cls, value: str | None) -> "RunState | None":
        """A state read from Redis (hostile): None when it is none of ours."""
        if value is None:
            return None
        try:
            return cls(value)
        except ValueError:
            return None

    def can_become(self, other: "RunState") -> bool:
        return other is self or other in TRANSITIONS[self]

    @property
    def ended(self) -> bool:
        return self in (RunState.STOPPING, RunState.FAILED, RunState.STOPPED)


TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.STARTING: frozenset(
        {RunState.RUNNING, RunState.BACKOFF, RunState.FAILED, RunState.STOPPING, RunState.STOPPED}
    ),
    RunState.RUNNING: frozenset({RunState.BACKOFF, RunState.FAILED, RunState.STOPPING, RunState.STOPPED}),
    RunState.BACKOFF: frozenset({RunState.STARTING, RunState.FAILED, RunState.STOPPING, RunState.STOPPED}),
    RunState.STOPPING: frozenset({RunState.STOPPED}),
    RunState.FAILED: frozenset({RunState.STOPPED}),
    RunState.STOPPED: frozenset(),
}
# States in which the launcher vouches for a run (its record's ``until``).
VOUCHED_STATES = frozenset({RunState.STARTING, RunState.BACKOFF, RunState.RUNNING})


@dataclasses.dataclass
class RunRecord:
    channel: str
    run_id: str
    host: str
    pid: int
    pid_start: int | None
    started: float
    state: RunState | None = RunState.STARTING  # None: junk in Redis
    last_error: str = ""
    restarts: int = 0
    source: str = ""  # the source in use, redacted (a channel may have fallbacks)
    provider: str = ""  # the provider account whose connection slot it holds
    # The launcher vouches for this run until this epoch time: it watches it (running; it
    # renews the promise every few seconds) or is about to start its next FFmpeg (starting,
    # backoff).  Until then the reaper leaves the record alone whatever its pid says (the
    # FFmpeg that just died, in the moment before the launcher noticed).
    until: float | None = None

    @classmethod
    def from_hash(cls, channel: str, data: dict) -> "RunRecord | None":
        """A record from its hash (bytes or text); None without a run_id.  Fields that do
        not parse read as nothing (pid 0 is never proven: such a record is stale), so even
        junk can be compared-and-deleted by its run_id."""
        data = {text(k): text(v) for k, v in data.items()}
        if not data.get("run_id"):
            return None
        return cls(
            channel=channel,
            run_id=data["run_id"],
            host=data.get("host") or "",
            pid=int_or_none(data.get("pid")) or 0,
            pid_start=int_or_none(data.get("pid_start")),
            started=epoch_seconds(data.get("started")) or 0.0,
            state=RunState.parse(data.get("state")),
            last_error=data.get("last_error") or "",
            restarts=int_or_none(data.get("restarts")) or 0,
            source=data.get("source") or "",
            provider=data.get("provider") or "",
            until=epoch_seconds(data.get("until")),
        )

    def vouched(self, now: float) -> bool:
        """Its launcher vouches for it (``until``): its pid proves nothing either way, and it
        must not be taken for stale.  A promise further ahead than MAX_PROMISE is junk
        (Redis contents are hostile): not vouched."""
        return self.state in VOUCHED_STATES and self.until is not None and now < self.until <= now + MAX_PROMISE


def reaper_last_pass(client, host_id: str) -> dict[str, str]:
    """The host's reaper's last pass as recorded (text; {} when none, or junk of another type)."""
    try:
        raw = client.hgetall(keys.reaper_last_pass_key(host_id))
    except redis.ResponseError as exc:
        if not wrong_type(exc):
            raise
        return {}
    return {text(k): text(v) for k, v in raw.items()}


# The furthest a launcher ever vouches ahead (the longest back-off, a start_timeout, slack):
# beyond it a record's `until` is junk.
MAX_PROMISE = 3600.0


def new_run_id() -> str:
    return uuid.uuid4().hex


def record_run(client, record: RunRecord, *, now: float | None = None) -> None:
    """Write the run hash and the legacy keys, and index the stream, in one transaction."""
    now = time.time() if now is None else now
    channel = record.channel
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.run_key(channel))
    pipe.hset(
        keys.run_key(channel),
        mapping={
            "run_id": record.run_id,
            "host": record.host,
            "pid": record.pid,
            "pid_start": record.pid_start if record.pid_start is not None else "",
            "started": f"{record.started:.3f}",
            "state": str(record.state or RunState.STARTING),
            "last_error": record.last_error,
            "restarts": record.restarts,
            "source": record.source,
            "provider": record.provider,
            "until": f"{record.until:.3f}" if record.until else "",
        },
    )
    pipe.set(keys.pid_key(channel), record.pid)
    pipe.set(keys.started_key(channel), f"{record.started:.3f}")
    pipe.set(keys.last_access_key(channel), f"{now:.3f}")
    pipe.sadd(keys.ACTIVE_STREAMS_KEY, channel)
    pipe.execute()


def mark_failed(client, channel: str, reason: str, host: str, cooldown: float) -> None:
    """The channel failed: its starts get 503 with ``reason`` for ``cooldown`` seconds, on
    every host (a provider bans addresses that retry in a tight loop)."""
    if cooldown > 0:
        client.set(
            keys.failed_key(channel),
            json.dumps({"reason": reason, "host": host, "at": round(time.time(), 3)}),
            px=int(cooldown * 1000),
        )


def get_failed(client, channel: str) -> dict | None:
    """The failure a channel is cooling down from, if any (junk counts as none)."""
    try:
        raw = client.get(keys.failed_key(channel))
    except redis.ResponseError as exc:
        if wrong_type(exc):  # junk of another type: no failure (a new one overwrites it)
            return None
        raise
    data = None if raw is None else json_value(raw)
    return data if isinstance(data, dict) and isinstance(data.get("reason"), str) else None


def failed_seconds_left(client, channel: str) -> float:
    """Seconds of the channel's failed_cooldown still to run (0 when none)."""
    return max(0, client.pttl(keys.failed_key(channel))) / 1000


def failed_channels(client) -> list[dict]:
    """Channels cooling down after a failure (SCAN: an operator's view), with the reason."""
    found = []
    for key in client.scan_iter(match=keys.FAILED_KEY_PATTERN, count=1000):
        channel = keys.channel_id_from_failed_key(key)
        failed = get_failed(client, channel) if channel else None
        if channel is not None and failed is not None:
            found.append(
                {
                    "id": channel,
                    "reason": failed["reason"],
                    "host": str(failed.get("host", "")),
                    "cooldown_seconds": round(failed_seconds_left(client, channel), 1),
                }
            )
    return sorted(found, key=lambda entry: int(entry["id"]))


def redis_server_id(client) -> str:
    """The Redis server's run_id: it changes whenever the server restarts (and may have lost
    data), so a record that vanished without a restart was deleted on purpose."""
    value = client.info("server").get("run_id", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def update_run(client, channel: str, run_id: str, **fields) -> bool:
    """Set fields of the run hash if it is still this run; legacy pid follows a restart."""
    args = [run_id]
    for name, value in fields.items():
        args += [name, "" if value is None else value]
    done = bool(
        registered_script(client, "update", run_scripts.UPDATE_IF_RUN_LUA)(keys=[keys.run_key(channel)], args=args)
    )
    if done and "pid" in fields:
        client.set(keys.pid_key(channel), fields["pid"])
    return done


def vouch(client, channel: str, run_id: str, until: float) -> int:
    """Renew the launcher's promise for its run: 1 done, 0 the record is another run's or
    stopping (not wanted), -1 the record is gone."""
    return int(
        registered_script(client, "vouch", run_scripts.VOUCH_LUA)(
            keys=[keys.run_key(channel)], args=[run_id, f"{until:.3f}"]
        )
    )


def get_run(client, channel: str) -> RunRecord | None:
    try:
        data = client.hgetall(keys.run_key(channel))
    except redis.ResponseError:  # not a hash: junk, read as no record
        return None
    return RunRecord.from_hash(channel, data) if data else None


def delete_run_if(client, channel: str, run_id: str) -> bool:
    """Delete the stream's keys only if they still belong to ``run_id``."""
    return delete_many_if_ours(client, [(channel, "run", run_id)])[0]


def read_batch(client, channels: list[str]) -> list[tuple["RunRecord | None", str | None, str | None, str | None]]:
    """(run record, pid, started, last_access) of each channel, in one call."""
    key_list = []
    for channel in channels:
        key_list += [
            keys.run_key(channel),
            keys.pid_key(channel),
            keys.started_key(channel),
            keys.last_access_key(channel),
        ]
    flat = registered_script(client, "read_batch", run_scripts.READ_BATCH_LUA)(keys=key_list) if channels else []
    flat = [text(v) for v in flat]
    result = []
    for index, channel in enumerate(channels):
        values = flat[13 * index : 13 * index + 13]
        fields = dict(
            zip(
                (
                    "run_id",
                    "host",
                    "pid",
                    "pid_start",
                    "started",
                    "state",
                    "restarts",
                    "last_error",
                    "until",
                    "provider",
                ),
                values[:10],
            )
        )
        record = RunRecord.from_hash(channel, {k: v for k, v in fields.items() if v is not None})
        result.append((record, values[10], values[11], values[12]))
    return result


def delete_many_if_ours(client, items: list[tuple[str, str, str]]) -> list[bool]:
    """Compare-and-delete many records in one call: items of (channel, 'run'|'pid', expected)."""
    if not items:
        return []
    key_list, args = [], []
    for channel, kind, expected in items:
        key_list += keys.stream_keys(channel)
        args += [kind, str(expected), channel]
    key_list.append(keys.ACTIVE_STREAMS_KEY)
    return [
        bool(x) for x in registered_script(client, "delete_many", run_scripts.DELETE_MANY_LUA)(keys=key_list, args=args)
    ]


def mark_stopping_in(pipeline, client, channel: str, run_id: str):
    """Queue 'state = stopping' on a pipeline, only if the record is still that run."""
    return registered_script(client, "update", run_scripts.UPDATE_IF_RUN_LUA)(
        keys=[keys.run_key(channel)], args=[run_id, "state", RunState.STOPPING.value], client=pipeline
    )


def refresh_host(client, host_id: str, ttl_seconds: float, new_id: str | None = None, address: str = "") -> str:
    """This host is alive for ttl_seconds more: other hosts' reapers leave its records alone.
    Returns the lease as "<id>@<epoch it began>": the one the key held while it never
    lapsed, else a new one under ``new_id`` (streamstate.lease).  ``address``: this host's
    nginx as the others reach it (host_address), said for as long."""
    script = registered_script(client, "renew_host", run_scripts.RENEW_HOST_LUA)
    args = [int(ttl_seconds * 1000), new_id or uuid.uuid4().hex, address]
    return text(script(keys=[keys.host_key(host_id), keys.host_address_key(host_id)], args=args)) or ""


def host_address(client, host_id: str) -> str | None:
    """The host's nginx as it said it (hostile: callers accept only an address of `hosts`)."""
    try:
        return text(client.get(keys.host_address_key(host_id)))
    except redis.ResponseError as exc:
        if not wrong_type(exc):
            raise
        return None


def last_access_times(client, channels: list[str]) -> list[float | None]:
    """stream:<id>:last_access of each channel, in one round trip (None: missing or junk)."""
    if not channels:
        return []
    now = time.time()
    return [epoch_seconds(raw, now) for raw in client.mget([keys.last_access_key(c) for c in channels])]


def recent_viewers(client, channels: list[str], since: float) -> list[set[str]]:
    """The viewer hashes heartbeatd saw on each channel since ``since`` (junk: none)."""
    if not channels:
        return []
    pipe = client.pipeline(transaction=False)
    for channel in channels:
        pipe.zrangebyscore(keys.viewers_key(channel), since, "+inf")
    return [set() if isinstance(r, Exception) else {text(m) for m in r} for r in pipe.execute(raise_on_error=False)]


def record_viewer(client, channel: str, viewer: str, when: float) -> None:
    """The viewer whose request the launcher answered (a cold start or a join), in the
    stream's viewers at once: heartbeatd sees the same request only a second or two later,
    and a channel change on a full provider account needs to know now (launcher.core)."""
    registered_script(client, "record_viewer", run_scripts.RECORD_VIEWER_LUA)(
        keys=[keys.run_key(channel), keys.viewers_key(channel)], args=[f"{when:.3f}", viewer]
    )


@dataclasses.dataclass
class ActiveSet:
    """``streams:active`` as read: channel ids, and members that are not one (junk)."""

    channels: list[str]
    invalid: list[str | bytes]  # as stored (so they can be removed); show with shown_member


def read_active(client) -> ActiveSet:
    """Every member of the active set; junk is set apart, never trusted nor fatal."""
    valid, invalid = [], []
    try:
        members = client.smembers(keys.ACTIVE_STREAMS_KEY)
    except redis.ResponseError:  # not a set: junk; nothing to read from it
        return ActiveSet(channels=[], invalid=[keys.ACTIVE_STREAMS_KEY + " is not a set"])
    for member in members:
        text = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
        if keys.CHANNEL_ID_RE.fullmatch(text):
            valid.append(text)
        else:
            invalid.append(member)
    return ActiveSet(channels=sorted(valid, key=int), invalid=sorted(invalid, key=repr))


def active_channels(client) -> list[str]:
    return read_active(client).channels


def shown_member(member: str | bytes) -> str:
    """A junk member as a log or status line may show it: quoted, escaped, cut."""
    text = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def acquire_start_lock(client, channel: str, token: str, ttl_seconds: float) -> bool:
    return bool(client.set(keys.lock_key(channel), token, nx=True, px=int(ttl_seconds * 1000)))


def start_lock_token(host_id: str) -> str:
    """A start lock's value: unique, and saying which host holds it (start_lock_holder)."""
    return f"{uuid.uuid4().hex}@{host_id}"


def start_lock_holder(client, channel: str) -> tuple[str | None, str | None]:
    """(the start lock's value, the host it names); (None, None) when it is free."""
    value = text(client.get(keys.lock_key(channel)))
    _, at, host = (value or "").partition("@")
    return value, (host if at and host else None)


def drop_start_lock(client, channel: str, value: str) -> None:
    """A start lock left by a start whose release was lost (Redis unreachable then), deleted
    only while it still holds ``value``."""
    release_lock(client, keys.lock_key(channel), value)


def host_alive(client, host_id: str) -> bool:
    """The host's lease (host:<id>) stands: its records are its own (streamstate.lease)."""
    return bool(client.exists(keys.host_key(host_id)))


def release_start_lock(client, channel: str, token: str) -> None:
    release_lock(client, keys.lock_key(channel), token)


def release_lock(client, key: str, token: str) -> None:
    """Delete a lock only if it still holds our token (it may have expired and been retaken)."""
    registered_script(client, "release", run_scripts.RELEASE_LOCK_LUA)(keys=[key], args=[token])
