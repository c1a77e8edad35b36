-- Delist the asks that expired with no change to their node since (the listing rule is applied
-- at every change; this catches the passage of time). ARGV: tag, region, now, limit.
-- One NodeUpdated event per node (the node is unchanged; the event records the delisting).
local limit = tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', TAG .. 'ask-exp', '-inf', NOW, 'LIMIT', 0, limit)
local out = {1}
for _, id in ipairs(ids) do
  local n = hmap(TAG .. 'node:' .. id)
  redis.call('ZREM', TAG .. 'asks', id)
  redis.call('ZREM', TAG .. 'ask-exp', id)
  out[#out + 1] = event({type = 'node_updated', node = obj(n)})
end
return out
