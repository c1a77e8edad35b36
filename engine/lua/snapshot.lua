#!lua flags=no-writes
-- Read-only (engine.replay.region_snapshot): the contents of the keys in KEYS (one region's).
-- Returns, per key, {type, data}: a hash as a flat field/value list, a set's members, a sorted
-- set's member/score list in order, a string, or nothing.
local out = {}
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local data = {}
  if kind == 'hash' then
    data = redis.call('HGETALL', key)
  elseif kind == 'set' then
    data = redis.call('SMEMBERS', key)
  elseif kind == 'zset' then
    data = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'string' then
    data = {redis.call('GET', key)}
  end
  out[#out + 1] = {kind, data}
end
return out
