"""Provider accounts' connection slots, shared by every host through Redis; source cooldowns.

A provider with ``max_streams = N`` allows N connections from us.  Each stream of
it holds a slot in ``provider:<name>:slots`` (channel id -> {run_id, host, at}) from
before its FFmpeg starts until after its connection is closed.  Taking a slot is one
script: slots that no longer belong to a running stream are reclaimed first, then a
slot is added only while fewer than N are held.

A slot belongs to a running stream while the channel's run record holds the same
run_id.  So every way a stream ends frees its slot: the launcher releases it
(stop, failure, preemption); a stream reaped, crashed past its restarts, or on a
host that is gone loses its run record (the reaper clears it), and its slot is
reclaimed at the next start.  A slot whose run has no record yet (FFmpeg is being
started) is kept for ``start_grace`` seconds.
"""

from __future__ import annotations

import json
import time

import redis

from . import keys, redis_values
from .redis_client import registered_script

# KEYS: slots; ARGV: channel, value, limit, then (stale channel, its value as read) pairs.
# Returns 1 (the channel holds a slot now) or 0 (all taken).
_ACQUIRE_LUA = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then
  redis.call('DEL', KEYS[1])                 -- junk of another type under our key
end
for i = 4, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  -- The channel's slot: ours again only if it is this run's (after a failover another
  -- host's run of the channel may hold it; that one keeps it).
  local ok, data = pcall(cjson.decode, held)
  local mine = pcall(cjson.decode, ARGV[2]) and cjson.decode(ARGV[2])['run_id']
  if ok and type(data) == 'table' and data['run_id'] == mine then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
  return 0
end
if redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: slots; ARGV: channel, run_id.  Deletes the slot only if that run holds it.
_RELEASE_LUA = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then
  return 0
end
local value = redis.call('HGET', KEYS[1], ARGV[1])
local ok, data = pcall(cjson.decode, value or '')
if ok and type(data) == 'table' and data['run_id'] == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def _holders(client, provider: str) -> dict[str, tuple[str, dict | None]]:
    """channel -> (raw value, parsed value or None for junk)."""
    found = {}
    try:
        held = client.hgetall(keys.provider_slots_key(provider))
    except redis.ResponseError as exc:
        if not redis_values.wrong_type(exc):
            raise
        held = {}  # junk of another type: no slot held (acquire_slot deletes it)
    for field, raw in held.items():
        channel, value = redis_values.text(field), redis_values.text(raw)
        data = redis_values.json_value(value)
        found[channel] = (value, data if isinstance(data, dict) else None)
    return found


def _stale(
    client, holders: dict[str, tuple[str, dict | None]], start_grace: float, now: float
) -> list[tuple[str, str]]:
    """(channel, raw value) of slots no running stream holds."""
    channels = [c for c in holders if keys.CHANNEL_ID_RE.fullmatch(c)]
    pipe = client.pipeline(transaction=False)
    for channel in channels:
        pipe.hget(keys.run_key(channel), "run_id")
    run_ids = dict(
        zip(
            channels,
            [None if isinstance(r, Exception) else redis_values.text(r) for r in pipe.execute(raise_on_error=False)]
            if channels
            else [],
        )
    )
    stale = []
    for channel, (raw, data) in holders.items():
        if data is None or channel not in run_ids:
            stale.append((channel, raw))  # junk
        elif run_ids[channel] != data.get("run_id"):
            at = redis_values.epoch_seconds(data.get("at"), now) or 0.0
            if now - at > start_grace:
                stale.append((channel, raw))
    return stale


def acquire_slot(client, provider: str, limit: int, channel: str, run_id: str, host: str, start_grace: float) -> bool:
    """Take a slot of the provider for the channel's run; False when all are held."""
    script, slots, args = _acquire_call(client, provider, limit, channel, run_id, host, start_grace)
    return bool(script(keys=[slots], args=args))


def acquire_slot_on_replica(
    client, provider: str, limit: int, channel: str, run_id: str, host: str, start_grace: float, wait_ms: int
) -> tuple[bool, bool]:
    """acquire_slot for Redis through Sentinel: (taken, on a replica).  A slot taken is waited
    for on a replica (WAIT, on the same connection as the write) so that a failover, which
    promotes a replica, keeps it."""
    script, slots, args = _acquire_call(client, provider, limit, channel, run_id, host, start_grace)
    pipe = client.pipeline(transaction=False)  # one connection: WAIT counts its own writes
    script(keys=[slots], args=args, client=pipe)
    pipe.execute_command("WAIT", 1, wait_ms)
    taken, replicas = pipe.execute()
    return bool(taken), bool(taken) and int(replicas) > 0


def _acquire_call(client, provider: str, limit: int, channel: str, run_id: str, host: str, start_grace: float):
    """The acquire script, its key and its arguments: the slot's value, the limit, then
    the stale slots (channel, value as read) it reclaims first."""
    now = time.time()
    stale = _stale(client, _holders(client, provider), start_grace, now)
    value = json.dumps({"run_id": run_id, "host": host, "at": round(now, 3)})
    args = [channel, value, limit]
    for stale_channel, raw in stale:
        args += [stale_channel, raw]
    return registered_script(client, "acquire_slot", _ACQUIRE_LUA), keys.provider_slots_key(provider), args


def hold_slot(client, provider: str, channel: str, run_id: str, host: str) -> None:
    """A running stream's slot written again (Redis restarted empty): its connection is open
    whatever the count says."""
    redis_values.clear_other_type(client, keys.provider_slots_key(provider), "hash")
    client.hset(
        keys.provider_slots_key(provider),
        channel,
        json.dumps({"run_id": run_id, "host": host, "at": round(time.time(), 3)}),
    )


def release_slot(client, provider: str, channel: str, run_id: str) -> bool:
    script = registered_script(client, "release_slot", _RELEASE_LUA)
    return bool(script(keys=[keys.provider_slots_key(provider)], args=[channel, run_id]))


def stale_slots(client, provider: str, start_grace: float) -> list[str]:
    """Channels (or junk fields) holding a slot of the provider that no running stream holds:
    reclaimed at the provider's next start, named by doctor."""
    holders = _holders(client, provider)
    return sorted(channel for channel, _ in _stale(client, holders, start_grace, time.time()))


def slot_channels(client, provider: str, start_grace: float) -> list[str]:
    """The channels holding a slot of the provider now (stale slots left out)."""
    holders = _holders(client, provider)
    stale = {channel for channel, _ in _stale(client, holders, start_grace, time.time())}
    return sorted((c for c in holders if c not in stale), key=int)


def usage(client, providers: dict, start_grace: float) -> list[dict]:
    """Each provider's slots in use and its limit (streamctl status, GET /streams)."""
    return [
        {"provider": name, "limit": provider.max_streams, "channels": slot_channels(client, name, start_grace)}
        for name, provider in sorted(providers.items())
    ]


# -- sources ----------------------------------------------------------------------------


def mark_source_failed(client, source_url: str, reason: str, cooldown: float) -> None:
    if cooldown > 0:
        client.set(keys.source_failed_key(source_url), reason[:200], px=int(cooldown * 1000))


def cooling_sources(client, source_urls: list[str]) -> set[str]:
    """The sources that failed within source_cooldown."""
    if not source_urls:
        return set()
    values = client.mget([keys.source_failed_key(url) for url in source_urls])
    return {url for url, value in zip(source_urls, values) if value is not None}
