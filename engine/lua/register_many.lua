-- Register a batch of nodes of one region, all or nothing. ARGV: tag, region, now,
-- missed_heartbeats_offline, then the nodes as one JSON array (one argument: the caller encodes
-- a batch once) of objects of the stored fields (engine.core.new_node, engine.core.to_fields:
-- every value a string). KEYS: seq, then the nodes' region keys (engine.market).
-- Refuses the whole batch, before the first write, if an id is a node that exists or appears
-- twice in the batch; returns {0, code, message, field, index}
-- (1-based index of the node refused). Otherwise each node is written exactly as register.lua
-- writes one (same keys, same indexes) and gets its own node_registered event of the same
-- shape, in batch order; arrival_seq runs consecutively. Returns {1, first arrival_seq}.
-- Index writes (geo, heartbeat deadlines, asks) are one command per batch.
local missed = tonumber(ARGV[4])
local nodes = cjson.decode(ARGV[5])
local count = #nodes
if count == 0 then return {1, 0} end

local ids = {}
local seen = {}
for i, n in ipairs(nodes) do
  local id = n.node_id
  if seen[id] then return {0, 'conflict', 'id appears twice in the batch', 'node_id', i} end
  seen[id] = true
  ids[i] = id
end
for i = 1, count do
  if redis.call('EXISTS', K.node(ids[i])) == 1 then
    return {0, 'conflict', 'id already in use', 'node_id', i}
  end
end

local first = redis.call('INCRBY', K.arrival, count) - count + 1
local geo, hb, asks, expiring = {}, {}, {}, {}
for i, n in ipairs(nodes) do
  local id = ids[i]
  n.arrival_seq = first + i - 1
  hset(K.node(id), n)
  geo[#geo + 1] = n.lng
  geo[#geo + 1] = geo_lat(n.lat)
  geo[#geo + 1] = id
  hb[#hb + 1] = deadline(NOW, n.heartbeat_interval_s, missed)
  hb[#hb + 1] = id
  -- sync_ask for a node that is in no book yet: only the ZADDs, batched below.
  if listed(n) then
    asks[#asks + 1] = n.price_pusd
    asks[#asks + 1] = id
    if n0(n.ask_expires_ms) > 0 then
      expiring[#expiring + 1] = n.ask_expires_ms
      expiring[#expiring + 1] = id
    end
  end
  event({type = 'node_registered', node = obj(n)})
end
redis.call('GEOADD', K.geo, unpack(geo))
redis.call('ZADD', K.heartbeats, unpack(hb))
if #asks > 0 then redis.call('ZADD', K.asks, unpack(asks)) end
if #expiring > 0 then redis.call('ZADD', K.ask_expiry, unpack(expiring)) end
return {1, first}
