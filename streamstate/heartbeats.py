"""Heartbeat writes: last_access (atomic max) and viewers, for running streams only.

One Lua script call per batch of channels.  Inside it, per channel:
``EXISTS stream:<id>:pid`` (running?), then ``SET last_access t KEEPTTL GET``
(put back the old value in the rare case it was newer), then one ``ZADD GT``
of the viewers seen, and every ``viewer_window`` seconds a trim of the
viewers set.  That is 2 commands per channel without viewer counting and 3
with it (plus the trim once a window), however many requests were read.
Nothing is created for a channel that is not running.  The viewers set has no
expiry: it goes with the stream's other keys when the stream is stopped or
cleared as stale.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from . import keys
from .redis_client import registered_script
from .redis_values import FUTURE_SLACK

# KEYS: per channel, 3 keys: pid, last_access, viewers.
# ARGV[1]: trim cutoff (epoch s; viewers with an older score are removed)
# ARGV[2]: "1" to return the positions of channels that were not running, else "0"
# ARGV[3]: the latest believable time (now + slack): a stored last_access past it is junk
# then per channel: time, trim flag ("1"/"0"), n, then n pairs (score, member)
# Returns {running count, positions (1-based) of the channels not running...}.
_HEARTBEAT_LUA = """
local cutoff = ARGV[1]
local report = ARGV[2] == '1'
local latest = tonumber(ARGV[3])
local a = 4
local running = 0
local skipped = {}
local index = 0
for k = 1, #KEYS, 3 do
  local t = ARGV[a]
  local trim = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  index = index + 1
  if redis.call('EXISTS', KEYS[k]) == 0 then
    if report then skipped[#skipped + 1] = index end
  else
    running = running + 1
    -- SET overwrites a key of any type; the old value is kept only when it is a finite
    -- time newer than this one and not past now + slack (inf, nan, 1e999 are junk that
    -- would keep a stream alive forever).
    local old = redis.pcall('SET', KEYS[k + 1], t, 'KEEPTTL', 'GET')
    if type(old) == 'string' then
      local oldnum = tonumber(old)
      if oldnum and oldnum == oldnum and oldnum > tonumber(t) and oldnum <= latest then
        redis.call('SET', KEYS[k + 1], old, 'KEEPTTL')
      end
    end
    -- A viewers key of the wrong type (junk) is skipped, never an error for the batch.
    if n > 0 then
      local args = {'GT'}
      for j = 0, n - 1 do
        args[#args + 1] = ARGV[a + 2 * j]
        args[#args + 1] = ARGV[a + 2 * j + 1]
      end
      redis.pcall('ZADD', KEYS[k + 2], unpack(args))
    end
    if trim == '1' then
      redis.pcall('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', '(' .. cutoff)
    end
  end
  a = a + 2 * n
end
table.insert(skipped, 1, running)
return skipped
"""

# Channels per script call, and viewers per channel per call (Lua's unpack
# limit is about 8000 values).
CHANNELS_PER_CALL = 500
MAX_VIEWERS_PER_CALL = 3000


def format_time(epoch: float) -> str:
    """last_access as the legacy keys hold it: epoch seconds, a float string."""
    return f"{epoch:.3f}"


def write_heartbeats(
    client,
    channel_times: Mapping[str, float],
    viewers: Mapping[str, Mapping[str, float]] | None = None,
    *,
    trim_channels: Iterable[str] = (),
    viewer_window: float = 0,
    now: float,
    report_skipped: bool = False,
) -> tuple[int, list[str]]:
    """Write heartbeats for running channels; return how many were running, and (with
    ``report_skipped``) which channels were not.

    ``channel_times``: channel id -> newest request time.
    ``viewers``: channel id -> {viewer hash: time of its last request}.
    ``trim_channels``: channels whose viewers set is trimmed to the window now.
    Raises redis errors to the caller, which keeps its data and retries.
    """
    viewers = viewers or {}
    trim = set(trim_channels)
    script = registered_script(client, "heartbeat", _HEARTBEAT_LUA)
    items = sorted(channel_times.items())
    running = 0
    skipped: list[str] = []
    pipe = client.pipeline(transaction=False)
    calls = 0
    for start in range(0, len(items), CHANNELS_PER_CALL):
        key_list: list[str] = []
        args: list[str] = [
            format_time(now - viewer_window),
            "1" if report_skipped else "0",
            format_time(now + FUTURE_SLACK),
        ]
        for channel, when in items[start : start + CHANNELS_PER_CALL]:
            key_list += [keys.pid_key(channel), keys.last_access_key(channel), keys.viewers_key(channel)]
            seen = viewers.get(channel) or {}
            if len(seen) > MAX_VIEWERS_PER_CALL:
                seen = dict(sorted(seen.items(), key=lambda kv: kv[1])[-MAX_VIEWERS_PER_CALL:])
            args += [format_time(when), "1" if channel in trim else "0", str(len(seen))]
            for member, score in seen.items():
                args += [format_time(score), member]
        script(keys=key_list, args=args, client=pipe)
        calls += 1
    if calls:
        for number, reply in enumerate(pipe.execute()):
            batch = items[number * CHANNELS_PER_CALL : (number + 1) * CHANNELS_PER_CALL]
            running += int(reply[0])
            skipped += [batch[int(position) - 1][0] for position in reply[1:]]
    return running, skipped
