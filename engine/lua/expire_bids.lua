-- Expire the open bids whose expires_ms has come (expires_ms <= now), earliest first.
-- ARGV: tag, region, now, limit, retention_ms. One BidExpired event per bid.
-- Returns {1, event1, fields1, event2, fields2, ...}.
local limit, retention = tonumber(ARGV[4]), ARGV[5]
local ids = redis.call('ZRANGEBYSCORE', TAG .. 'bid-exp', '-inf', NOW, 'LIMIT', 0, limit)
local out = {1}
for _, id in ipairs(ids) do
  local bkey = TAG .. 'bid:' .. id
  local seq = redis.call('HGET', bkey, 'seq')
  redis.call('HSET', bkey, 'status', 'expired')
  redis.call('ZREM', TAG .. 'bids', string.format('%016d', n0(seq)) .. ':' .. id)
  redis.call('ZREM', TAG .. 'bid-exp', id)
  redis.call('PEXPIRE', bkey, retention)
  out[#out + 1] = event({type = 'bid_expired', bid_id = id})
  out[#out + 1] = redis.call('HGETALL', bkey)
end
return out
