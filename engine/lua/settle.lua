-- Close an active contract (settle: completed; the engine's fail: failed) and return its
-- capacity to the node. The money and the settlement hash were computed in Python
-- (engine.core.close_contract) from the version read; a different version means a concurrent
-- change, and the call answers {2} without writing. ARGV: tag, region, now, contract_id,
-- expected_version, status, used_s, egress_mgb, cost_pusd, settlement_hash, retention_ms,
-- fee_pusd (the platform's fee out of the cost). KEYS also name the region's wallets and open
-- counts: the hold pays the cost (settle_money in _lib.lua); the node's stake holds back
-- earnings or pays the renter's SLA credit (stake_close).
-- Returns {1, event, contract JSON}.
local cid = ARGV[4]
local t = contract(cid)
if not t then return refuse('not_found', 'contract not found', 'contract_id') end
if t.status ~= 'active' then return refuse('conflict', 'contract is ' .. t.status, 'contract_id') end
if n0(t.version) ~= n0(ARGV[5]) then return {2} end
local n, rr, rv = prepare_close(t)
if n.err then return n end

local money = settle_money(t, big(ARGV[9]), ARGV[12], false)
stake_close(t, money, ARGV[6], ARGV[7], ARGV[9], ARGV[12])
local ev = close_contract(t, n, rr, rv, {status = ARGV[6], used_s = ARGV[7], egress_mgb = ARGV[8],
  cost_pusd = ARGV[9], settlement_hash = ARGV[10], money = money}, ARGV[11])
return {1, ev, cjson.encode(t)}
