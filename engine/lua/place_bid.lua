-- Place a limit bid in its region's book. ARGV: tag, region, now, bid_id, then the bid's stored
-- fields as name/value pairs (engine.core.new_bid). KEYS: seq, dir, regions.
-- The book member is "<seq:016d>:<bid_id>" with score -max_price_pusd (engine.core.bid_member).
local id = ARGV[4]
if redis.call('HEXISTS', KEYS[2], id) == 1 then
  return refuse('conflict', 'id already in use', 'bid_id')
end

local b = {}
for i = 5, #ARGV, 2 do b[ARGV[i]] = ARGV[i + 1] end
local seq = redis.call('INCR', TAG .. 'arrival')
b.seq = seq
hset(TAG .. 'bid:' .. id, b)
redis.call('ZADD', TAG .. 'bids', -n0(b.max_price_pusd), string.format('%016d', seq) .. ':' .. id)
if n0(b.expires_ms) > 0 then redis.call('ZADD', TAG .. 'bid-exp', b.expires_ms, id) end
redis.call('HSET', KEYS[2], id, REGION)
redis.call('SADD', KEYS[3], REGION)
return {1, event({type = 'bid_placed', bid = obj(b)})}
