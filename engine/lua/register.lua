-- Register a node. ARGV: tag, region, now, missed_heartbeats_offline, node_id, then the node's
-- stored fields as name/value pairs (engine.core.new_node, engine.core.to_fields).
-- KEYS: seq, dir, regions, then the node's region keys (engine.market). Refuses an id already
-- in the directory (any kind of object).
local DIRECTORY, REGIONS = KEYS[2], KEYS[3] -- global keys: outside the region's slot
local missed, id = tonumber(ARGV[4]), ARGV[5]
if redis.call('HEXISTS', DIRECTORY, id) == 1 then
  return refuse('conflict', 'id already in use', 'node_id')
end

local n = {}
for i = 6, #ARGV, 2 do n[ARGV[i]] = ARGV[i + 1] end
n.arrival_seq = redis.call('INCR', K.arrival)
hset(K.node(id), n)
redis.call('GEOADD', K.geo, n.lng, geo_lat(n.lat), id)
redis.call('ZADD', K.heartbeats, deadline(NOW, n.heartbeat_interval_s, missed), id)
sync_ask(id, n)
redis.call('HSET', DIRECTORY, id, REGION)
redis.call('SADD', REGIONS, REGION)
return {1, event({type = 'node_registered', node = obj(n)})}
