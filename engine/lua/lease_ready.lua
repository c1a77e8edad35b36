-- The node's agent serves delivered lease `contract_id` at host:port (a ready report): the lease
-- becomes ready, billing counts from its first ready report (`ready_ms`), and the engine stops
-- watching its readiness deadline. A later report (the agent restarted the lease's server)
-- moves the endpoint, keeps `ready_ms` and fails the node's open uptime window. ARGV: tag, region, now, contract_id, node_id, host,
-- port, tls ('true' or 'false'). Refuses a contract of another node (not_found) and a lease
-- that is not pending or ready (conflict). Returns {1, event, contract JSON}.
local cid, nid = ARGV[4], ARGV[5]
local t = contract(cid)
if not t or t.node_id ~= nid then return refuse('not_found', 'no such lease on this node', 'contract_id') end
if t.status ~= 'active' then return refuse('conflict', 'contract is ' .. t.status, 'contract_id') end
local why = lease_refusal_of(t, {pending = true, ready = true})
if why then return why end

if t.lease_state == 'pending' then
  t.ready_ms = NOW
elseif t.lease_state == 'ready' then
  -- A ready lease reported ready again: its server stopped answering and the agent started it
  -- afresh, empty. The renter lost its data and its connection, so the node's open uptime
  -- window counts 0 (engine.trust), as for a lease it never made ready.
  local u, ms, me = up_unpack(nid)
  if u then
    u.fail = UP_WIN
    redis.call('HSET', K.uptime, nid, up_pack(u, ms, me))
  end
end
t.lease_state, t.lease_host, t.lease_port, t.lease_tls = 'ready', ARGV[6], tonumber(ARGV[7]), ARGV[8] == 'true'
t.version = int(n0(t.version) + 1)
local cj = cjson.encode(t)
redis.call('SET', K.contract(cid), cj)
redis.call('ZREM', K.lease_pending, cid)
return {1, lease_event(t, 'ready'), cj}
