-- Record the final meter of delivered lease `contract_id`: its node's closed report (node_id
-- given: the egress counter and peak bytes it measured, the digest or ''), or, at the close
-- timeout (node_id '', egress ''), the meter its heartbeats stored, without a digest. The
-- report's counter continues the heartbeats' (engine/lua/_lib.lua, delivery). The lease must be
-- closing, or its term over (an agent closes a lease whose end passed on its own). The
-- contract is then due for settlement (`lease-closing` score 0). ARGV: tag, region, now,
-- contract_id, node_id, egress_bytes ('' for none), peak_memory_bytes, digest. Returns {1, event, contract
-- JSON}, or {3, contract JSON} when a final meter was recorded already (nothing changed).
local cid, nid = ARGV[4], ARGV[5]
local t = contract(cid)
if not t or (nid ~= '' and t.node_id ~= nid) then
  return refuse('not_found', 'no such lease on this node', 'contract_id')
end
if t.status ~= 'active' then return refuse('conflict', 'contract is ' .. t.status, 'contract_id') end
if t.lease_state == 'closing' and n0(t.reported_ms) > 0 then return {3, cjson.encode(t)} end
if t.lease_state ~= 'closing' then
  local why = lease_refusal_of(t, {pending = true, ready = true})
  if why then return why end
  if NOW < n0(t.end_ms) then return refuse('conflict', 'the lease has not been closed', 'contract_id') end
end

local _, base, counter, peak = lease_meter(cid)
base, counter, peak = base or 0, counter or 0, peak or 0
if ARGV[6] ~= '' then
  base, counter, peak = lease_metered(base, counter, peak, tonumber(ARGV[6]), tonumber(ARGV[7]))
end
local egress = int(base + counter)
peak = int(peak)
if t.lease_state ~= 'closing' then
  t.lease_state, t.closing_ms = 'closing', NOW
  redis.call('ZREM', K.lease_pending, cid)
  redis.call('ZREM', K.ends, cid)
end
t.reported_ms, t.egress_bytes, t.peak_memory_bytes = NOW, egress, peak
if ARGV[8] ~= '' then t.lease_digest = ARGV[8] end
t.version = int(n0(t.version) + 1)
local cj = cjson.encode(t)
redis.call('SET', K.contract(cid), cj)
redis.call('ZADD', K.lease_closing, 0, cid)
return {1, lease_event(t, 'reported'), cj}
