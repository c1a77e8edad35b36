-- Order the close of delivered lease `contract_id` (the renter settles, or its term ended): the
-- lease becomes closing, billing stops now (`closing_ms`), the renter's own egress figure is
-- recorded (`claimed_mgb`, '' for none), and the lease waits in `lease-closing` for its node's
-- closed report (or the close timeout). The contract stays active, its capacity reserved,
-- until it is settled. ARGV: tag, region, now, contract_id, claimed_mgb. Returns
-- {1, event, contract JSON}, or {3, contract JSON} when the lease is closing already (nothing
-- changed).
local cid, claimed = ARGV[4], ARGV[5]
local t = contract(cid)
if not t then return refuse('not_found', 'contract not found', 'contract_id') end
if t.status ~= 'active' then return refuse('conflict', 'contract is ' .. t.status, 'contract_id') end
if t.lease_state == 'closing' then return {3, cjson.encode(t)} end
local why = lease_refusal_of(t, {pending = true, ready = true})
if why then return why end

t.lease_state, t.closing_ms = 'closing', NOW
if claimed ~= '' then t.claimed_egress_mgb = claimed end
t.version = int(n0(t.version) + 1)
local cj = cjson.encode(t)
redis.call('SET', K.contract(cid), cj)
redis.call('ZREM', K.lease_pending, cid)
redis.call('ZADD', K.lease_closing, NOW, cid)
redis.call('ZREM', K.ends, cid) -- its end is the close's business now
return {1, lease_event(t, 'closing'), cj}
