-- Register a node. ARGV: tag, region, now, missed_heartbeats_offline, node_id, then the node's
-- stored fields as name/value pairs (engine.core.new_node, engine.core.to_fields).
-- KEYS: seq, dir, regions. Refuses an id already in the directory (any kind of object).
local missed, id = tonumber(ARGV[4]), ARGV[5]
if redis.call('HEXISTS', KEYS[2], id) == 1 then
  return refuse('conflict', 'id already in use', 'node_id')
end

local n = {}
for i = 6, #ARGV, 2 do n[ARGV[i]] = ARGV[i + 1] end
n.arrival_seq = redis.call('INCR', TAG .. 'arrival')
hset(TAG .. 'node:' .. id, n)
redis.call('GEOADD', TAG .. 'geo', n.lng, geo_lat(n.lat), id)
redis.call('ZADD', TAG .. 'hb', deadline(NOW, n.heartbeat_interval_s, missed), id)
sync_ask(id, n)
redis.call('HSET', KEYS[2], id, REGION)
redis.call('SADD', KEYS[3], REGION)
return {1, event({type = 'node_registered', node = obj(n)})}
