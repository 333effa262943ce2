"""The Lua scripts of the run records (streamstate.runs), each one atomic on Redis: a key of
the wrong type reads as missing, and a record is changed or deleted only while it is still
the run that asked."""

# Many records in one call (the reaper's batches).  KEYS: per record run, pid, started,
# last_access (4 keys).  Returns per record 13 values: the run hash's run_id, host, pid,
# pid_start, started, state, restarts, last_error, until, provider, then pid, started,
# last_access.
READ_BATCH_LUA = """
-- A key of the wrong type (Redis contents are hostile) reads as missing, never as an error
-- that would stop the whole pass.
local function value(reply)
  if type(reply) == 'table' and reply.err then return false end
  return reply
end
local out = {}
for k = 1, #KEYS, 4 do
  local run = redis.pcall('HMGET', KEYS[k], 'run_id', 'host', 'pid', 'pid_start', 'started',
                          'state', 'restarts', 'last_error', 'until', 'provider')
  if type(run) == 'table' and run.err then run = {} end
  for i = 1, 10 do out[#out + 1] = run[i] or false end
  out[#out + 1] = value(redis.pcall('GET', KEYS[k + 1]))
  out[#out + 1] = value(redis.pcall('GET', KEYS[k + 2]))
  out[#out + 1] = value(redis.pcall('GET', KEYS[k + 3]))
end
return out
"""

# Compare-and-delete many records in one call.  KEYS: per record run, pid, started,
# last_access, viewers (5 keys), then the active set last.  ARGV: per record
# kind ('run': compare run_id; 'pid': a legacy record or junk, compare the pid key), the
# expected value, the channel id.  Returns per record 1 (deleted) or 0 (kept).
DELETE_MANY_LUA = """
local active = KEYS[#KEYS]
local out = {}
local a = 1
for k = 1, #KEYS - 1, 5 do
  local kind, expected, channel = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  local ours
  if kind == 'run' then
    ours = redis.pcall('HGET', KEYS[k], 'run_id') == expected
  else
    -- A legacy record (or junk): no run hash with a run_id, and the pid key still holds
    -- what was read ('' for none, or a key that is not a string).
    local has_run = redis.call('TYPE', KEYS[k]).ok == 'hash' and redis.call('HEXISTS', KEYS[k], 'run_id') == 1
    local pid = redis.pcall('GET', KEYS[k + 1])
    if type(pid) ~= 'string' then pid = '' end
    ours = (not has_run) and pid == expected
  end
  if ours then
    redis.call('DEL', KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
    redis.pcall('SREM', active, channel)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: run; ARGV: run id, then field, value pairs
UPDATE_IF_RUN_LUA = """
if redis.pcall('HGET', KEYS[1], 'run_id') ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""

# KEYS: run, viewers; ARGV: time, viewer.  Only for a running stream (nothing is created
# for a stream that has no record), never moving a viewer's time backwards.
RECORD_VIEWER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('TYPE', KEYS[2]).ok ~= 'string' then
  redis.pcall('ZADD', KEYS[2], 'GT', ARGV[1], ARGV[2])
end
return 0
"""

# KEYS: run; ARGV: run id, until.  The launcher's periodic look at its run: 1 and the promise
# renewed if the record is still that run and not stopping; 0 if it is another run or
# stopping; -1 if there is none.
VOUCH_LUA = """
local run_id = redis.pcall('HGET', KEYS[1], 'run_id')
if type(run_id) ~= 'string' then
  return -1
end
if run_id ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') == 'stopping' then
  return 0
end
redis.call('HSET', KEYS[1], 'until', ARGV[2])
return 1
"""

# KEYS: lock; ARGV: token
RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# KEYS: host:<id>, hosts:<id>:address; ARGV: ttl (ms), a new lease id, the host's address
# ('' : not said).  The host's key renewed for ttl, keeping what it holds (the lease held
# without a lapse: "<id>@<when it began>"); a key that had expired (or junk) starts a new
# lease under the new id, begun now by Redis's clock.  The address, when given, lives as
# long.  Returns the value the key holds now.
RENEW_HOST_LUA = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local id = kind == 'string' and redis.call('GET', KEYS[1]) or false
if not id or #id > 96 or not string.find(id, '^[0-9a-f]+@[0-9]+%.[0-9]+$') then
  local now = redis.call('TIME')
  id = ARGV[2] .. '@' .. now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
end
redis.call('SET', KEYS[1], id, 'PX', ARGV[1])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[1])
end
return id
"""
