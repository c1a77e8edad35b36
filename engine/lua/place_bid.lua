-- Place limit bids in their region's book, one after the other, each on its own (a refused bid
-- changes nothing). ARGV: tag, region, now, max_open (a user's resting bids in the region at
-- most, 0: no cap), then per bid: bid_id, the bid's stored fields but `seq` and `hold_month`
-- (engine.core.new_bid, engine.core.to_fields) as one JSON object of strings, budgeted ('1':
-- the renter has a monthly budget).
-- Money (issue 14): a bid rests only if its hold (`hold_pusd`: size x duration x cap, computed by
-- the caller) is covered by the renter's region wallet (and, budgeted, the month's allowance):
-- else 402, or 429 when the user has max_open bids resting. KEYS also name the wallets and
-- open counts.
-- KEYS: seq, then the bids' region keys (engine.market). The book member is "<seq:016d>:<bid_id>" with score -max_price_pusd
-- (engine.core.bid_member). Each BidPlaced event's `bid` is that JSON with `seq` added (one
-- argument per bid and no re-encoding: a bid has some twenty fields). The writes shared by the
-- bids (book, expiry, counters) are grouped at the end, as in reserve.lua. Refuses the id of a
-- bid that exists (engine.market has claimed an id that carries no region before this call).
-- Returns one entry per bid: {1, seq} or {0, code, message, field}.
local arrival = tonumber(redis.call('GET', K.arrival)) or 0
local out, placed, book, expiring, bodies = {}, {}, {}, {}, {}
local max_open = n0(ARGV[4])
local wallets, wallet_order = {}, {}
for i = 5, #ARGV, 3 do
  local id, json = ARGV[i], ARGV[i + 1]
  local b = cjson.decode(json)
  local w = wallets[b.client_id]
  if not w then
    w = wallet(b.client_id)
    wallets[b.client_id] = w
    wallet_order[#wallet_order + 1] = b.client_id
  end
  local h = big(b.hold_pusd or '0')
  local why
  if placed[id] or redis.call('EXISTS', K.bid(id)) == 1 then
    why = refuse('conflict', 'id already in use', 'bid_id')
  else
    why = hold_refusal(w, h, ARGV[i + 2] == '1', 'client_id')
      or open_refusal(b.user_id, 'b', max_open, 'client_id')
  end
  if why then
    out[#out + 1] = why
  else
    placed[id] = true
    hold(w, h)
    w.dirty = true
    open_add(b.user_id, 'b', 1)
    arrival = arrival + 1
    local args = {'seq', arrival, 'hold_month', MONTH}
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
    bodies[#bodies + 1] = '"type":"bid_placed","bid":' .. string.sub(json, 1, -2) .. ',"seq":'
      .. arrival .. ',"hold_month":"' .. MONTH .. '"},' .. wallet_json(w)
    out[#out + 1] = {1, arrival}
  end
end
if #bodies == 0 then return out end

for _, client in ipairs(wallet_order) do
  if wallets[client].dirty then wallet_save(wallets[client]) end
end
redis.call('INCRBY', K.arrival, #bodies)
many('ZADD', K.bids, book, 2)
many('ZADD', K.bid_expiry, expiring, 2)
local seq = redis.call('INCRBY', K.seq, #bodies) - #bodies
for i, body in ipairs(bodies) do event_text(body, seq + i) end
return out
