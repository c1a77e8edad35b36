-- Place limit bids in their region's book, one after the other, each on its own (a refused bid
-- changes nothing). ARGV: tag, region, now, then per bid: bid_id, the bid's stored fields but
-- `seq` (engine.core.new_bid, engine.core.to_fields) as one JSON object of strings.
-- KEYS: seq, dir, regions, then the bids' region keys (engine.market). The book member is "<seq:016d>:<bid_id>" with score -max_price_pusd
-- (engine.core.bid_member). Each BidPlaced event's `bid` is that JSON with `seq` added (one
-- argument per bid and no re-encoding: a bid has some twenty fields). The writes shared by the
-- bids (book, expiry, directory, counters) are grouped at the end, as in reserve.lua.
-- Returns one entry per bid: {1, seq} or {0, code, message, field}.
local DIRECTORY, REGIONS = KEYS[2], KEYS[3] -- global keys: outside the region's slot
local arrival = tonumber(redis.call('GET', K.arrival)) or 0
local out, placed, book, expiring, dir, bodies = {}, {}, {}, {}, {}, {}
for i = 4, #ARGV, 2 do
  local id, json = ARGV[i], ARGV[i + 1]
  if placed[id] or redis.call('HEXISTS', DIRECTORY, id) == 1 then
    out[#out + 1] = refuse('conflict', 'id already in use', 'bid_id')
  else
    placed[id] = true
    local b = cjson.decode(json)
    arrival = arrival + 1
    local args = {'seq', arrival}
    for k, v in pairs(b) do
      args[#args + 1] = k
      args[#args + 1] = v
    end
    redis.call('HSET', K.bid(id), unpack(args))
    book[#book + 1] = -n0(b.max_price_pusd)
    book[#book + 1] = string.format('%016d', arrival) .. ':' .. id
    if n0(b.expires_ms) > 0 then
      expiring[#expiring + 1] = b.expires_ms
      expiring[#expiring + 1] = id
    end
    dir[#dir + 1] = id
    dir[#dir + 1] = REGION
    bodies[#bodies + 1] = '"type":"bid_placed","bid":' .. string.sub(json, 1, -2) .. ',"seq":'
      .. arrival .. '}'
    out[#out + 1] = {1, arrival}
  end
end
if #bodies == 0 then return out end

redis.call('INCRBY', K.arrival, #bodies)
many('ZADD', K.bids, book, 2)
many('ZADD', K.bid_expiry, expiring, 2)
many('HSET', DIRECTORY, dir, 2)
redis.call('SADD', REGIONS, REGION)
local seq = redis.call('INCRBY', K.seq, #bodies) - #bodies
for i, body in ipairs(bodies) do event_text(body, seq + i) end
return out
