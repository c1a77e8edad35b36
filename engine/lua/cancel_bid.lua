-- Cancel an open bid. ARGV: tag, region, now, bid_id, retention_ms (how long the closed bid's
-- hash stays readable). KEYS also name the region's wallets and open counts: the bid's hold goes
-- back to the renter's wallet. Returns the bid's fields.
local id, retention = ARGV[4], ARGV[5]
local bkey = K.bid(id)
local b = hfields(bkey, {'status', 'seq', 'client_id', 'user_id', 'hold_pusd', 'hold_month'})
if not b then return refuse('not_found', 'bid not found', 'bid_id') end
if b.status ~= 'open' then return refuse('conflict', 'bid is ' .. b.status, 'bid_id') end

redis.call('HSET', bkey, 'status', 'cancelled')
redis.call('ZREM', K.bids, string.format('%016d', n0(b.seq)) .. ':' .. id)
redis.call('ZREM', K.bid_expiry, id)
redis.call('PEXPIRE', bkey, retention)
local money = bid_release_money(id, b)
money.type, money.bid_id = 'bid_cancelled', id
return {1, event(money), redis.call('HGETALL', bkey)}
