-- Place a limit bid in its region's book. ARGV: tag, region, now, bid_id, then the bid's stored
-- fields but `seq` (engine.core.new_bid, engine.core.to_fields) as one JSON object of strings.
-- KEYS: seq, dir, regions. The book member is "<seq:016d>:<bid_id>" with score -max_price_pusd
-- (engine.core.bid_member). The BidPlaced event's `bid` is that JSON with `seq` added (one
-- argument and no re-encoding: a bid has some twenty fields). Returns {1, seq}.
local id, json = ARGV[4], ARGV[5]
if redis.call('HEXISTS', KEYS[2], id) == 1 then
  return refuse('conflict', 'id already in use', 'bid_id')
end

local b = cjson.decode(json)
local seq = redis.call('INCR', TAG .. 'arrival')
local args = {'seq', seq}
for k, v in pairs(b) do
  args[#args + 1] = k
  args[#args + 1] = v
end
redis.call('HSET', TAG .. 'bid:' .. id, unpack(args))
redis.call('ZADD', TAG .. 'bids', -n0(b.max_price_pusd), string.format('%016d', seq) .. ':' .. id)
if n0(b.expires_ms) > 0 then redis.call('ZADD', TAG .. 'bid-exp', b.expires_ms, id) end
redis.call('HSET', KEYS[2], id, REGION)
redis.call('SADD', KEYS[3], REGION)
event_text('"type":"bid_placed","bid":' .. string.sub(json, 1, -2) .. ',"seq":' .. seq .. '}')
return {1, seq}
