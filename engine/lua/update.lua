-- Change a node's terms. ARGV: tag, region, now, node_id, then changed fields as name/value
-- pairs (engine.core.validate_changes, stored form). Refuses: unknown node, a deactivated node,
-- a status change of an offline node (a heartbeat brings it back), min > max duration.
local id = ARGV[4]
local nkey = K.node(id)
local n = hmap(nkey)
if not n then return refuse('not_found', 'node not found', 'node_id') end
if n.status == 'deactivated' then return refuse('conflict', 'node is deactivated', 'node_id') end

local changes = {}
for i = 5, #ARGV, 2 do changes[ARGV[i]] = ARGV[i + 1] end
if changes.status and n.status == 'offline' then
  return refuse('conflict', 'node is offline', 'status')
end
local min_s = n0(changes.min_duration_s or n.min_duration_s)
local max_s = n0(changes.max_duration_s or n.max_duration_s)
if min_s > max_s then
  return refuse('invalid_request', 'min_duration_s exceeds max_duration_s', 'min_duration_s')
end

local old_exp = n0(n.ask_expires_ms)
if next(changes) then hset(nkey, changes) end
for k, v in pairs(changes) do n[k] = v end
if changes.lat then redis.call('GEOADD', K.geo, n.lng, geo_lat(n.lat), id) end
if old_exp > 0 then redis.call('ZREM', K.ask_expiry, id) end
sync_ask(id, n)
return {1, event({type = 'node_updated', node = obj(n)})}
