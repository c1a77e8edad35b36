-- Mark a node offline after its heartbeat deadline passed (the engine found it in `hb`; the
-- deadline is re-checked here, so a beat that arrived meanwhile wins). ARGV: tag, region, now,
-- node_id. Returns the ids of the node's active contracts (for failover).
local id = ARGV[4]
local nkey = K.node(id)
local n = hfields(nkey, {'status', 'last_heartbeat_ms'})
if not n then return refuse('not_found', 'node not found', 'node_id') end
if n.status ~= 'active' and n.status ~= 'maintenance' then
  return refuse('conflict', 'node is ' .. n.status, 'node_id')
end
local due = redis.call('ZSCORE', K.heartbeats, id)
if not due or tonumber(due) > NOW then
  return refuse('conflict', 'heartbeat deadline has not passed', 'node_id')
end

redis.call('HSET', nkey, 'status', 'offline')
redis.call('ZREM', K.asks, id)
redis.call('ZREM', K.ask_expiry, id)
redis.call('ZREM', K.heartbeats, id)
-- its uptime windows go on closing while it is silent (trust_sweep.lua, from now on)
redis.call('ZADD', K.trust_due, NOW, id)
local ev = event({type = 'node_offline', node_id = id, last_heartbeat_ms = n0(n.last_heartbeat_ms)})
return {1, ev, redis.call('SMEMBERS', K.node_contracts(id))}
