-- Expire the open bids whose expires_ms has come (expires_ms <= now). ARGV: tag, region, now,
-- retention_ms, then the ids the caller found due in the `bid_expiry` index, earliest first (it
-- declares their keys). An id whose entry is no longer due (filled or cancelled since that
-- read) is skipped. One BidExpired event per bid; its hold goes back to the renter's wallet
-- (KEYS also name the region's wallets and open counts).
-- Returns {1, event1, fields1, event2, fields2, ...}.
local retention = ARGV[4]
local out = {1}
for i = 5, #ARGV do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', K.bid_expiry, id)
  if due and tonumber(due) <= NOW then
    local bkey = K.bid(id)
    local b = hfields(bkey, {'seq', 'client_id', 'user_id', 'hold_pusd', 'hold_month'})
    redis.call('HSET', bkey, 'status', 'expired')
    redis.call('ZREM', K.bids, string.format('%016d', n0(b.seq)) .. ':' .. id)
    redis.call('ZREM', K.bid_expiry, id)
    redis.call('PEXPIRE', bkey, retention)
    local money = bid_release_money(id, b)
    money.type, money.bid_id = 'bid_expired', id
    out[#out + 1] = event(money)
    out[#out + 1] = redis.call('HGETALL', bkey)
  end
end
return out
