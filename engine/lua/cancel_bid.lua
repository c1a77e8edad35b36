-- Cancel an open bid. ARGV: tag, region, now, bid_id, retention_ms (how long the closed bid's
-- hash stays readable). Returns the bid's fields.
local id, retention = ARGV[4], ARGV[5]
local bkey = K.bid(id)
local b = hfields(bkey, {'status', 'seq'})
if not b then return refuse('not_found', 'bid not found', 'bid_id') end
if b.status ~= 'open' then return refuse('conflict', 'bid is ' .. b.status, 'bid_id') end

redis.call('HSET', bkey, 'status', 'cancelled')
redis.call('ZREM', K.bids, string.format('%016d', n0(b.seq)) .. ':' .. id)
redis.call('ZREM', K.bid_expiry, id)
redis.call('PEXPIRE', bkey, retention)
return {1, event({type = 'bid_cancelled', bid_id = id}), redis.call('HGETALL', bkey)}
