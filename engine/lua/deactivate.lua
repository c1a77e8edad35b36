-- Deactivate a node: no new leases, no heartbeats; its active contracts run to their end.
-- ARGV: tag, region, now, node_id. Returns the node's fields.
local id = ARGV[4]
local nkey = K.node(id)
local status = redis.call('HGET', nkey, 'status')
if not status then return refuse('not_found', 'node not found', 'node_id') end
if status == 'deactivated' then return refuse('conflict', 'node is deactivated', 'node_id') end

redis.call('HSET', nkey, 'status', 'deactivated')
redis.call('ZREM', K.asks, id)
redis.call('ZREM', K.ask_expiry, id)
redis.call('ZREM', K.geo, id)
redis.call('ZREM', K.heartbeats, id)
redis.call('ZREM', K.trust_due, id)
return {1, event({type = 'node_deactivated', node_id = id}), redis.call('HGETALL', nkey)}
