-- Register a node. ARGV: tag, region, now, missed_heartbeats_offline, node_id, then the node's
-- stored fields as name/value pairs (engine.core.new_node, engine.core.to_fields).
-- KEYS: seq, then the node's region keys (engine.market). Refuses an id of a node that exists
-- (engine.market has claimed an id that carries no region in the directory before this call).
local missed, id = tonumber(ARGV[4]), ARGV[5]
if redis.call('EXISTS', K.node(id)) == 1 then
  return refuse('conflict', 'id already in use', 'node_id')
end

local n = {}
for i = 6, #ARGV, 2 do n[ARGV[i]] = ARGV[i + 1] end
n.arrival_seq = redis.call('INCR', K.arrival)
hset(K.node(id), n)
redis.call('GEOADD', K.geo, n.lng, geo_lat(n.lat), id)
redis.call('ZADD', K.heartbeats, deadline(NOW, n.heartbeat_interval_s, missed), id)
sync_ask(id, n)
return {1, event({type = 'node_registered', node = obj(n)})}
