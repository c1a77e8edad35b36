-- Move the rest of an active contract to another node: the old contract closes as failed_over
-- (time served priced, successor_id set) and a successor opens on the new node at its price
-- (which must be within the old contract's cap) for the remaining seconds, predecessor_id set.
-- ARGV: tag, region, now, contract_id, expected_version, used_s, cost_pusd, settlement_hash,
-- successor_id, new_node_id, remaining_s, retention_ms, fee_pusd. KEYS: seq, then the
-- region keys of both contracts and nodes (engine.market: the caller read the old contract), the
-- wallets and open counts. The old contract's hold pays its cost; what is left of it becomes the
-- successor's hold (settle_money in _lib.lua).
-- Two events: ContractSettled (old), ContractCreated (successor). Returns {1, ev_old, ev_new,
-- old contract JSON, new contract JSON} or {2} on a version mismatch.
local cid, new_cid, new_id = ARGV[4], ARGV[9], ARGV[10]
local remaining = tonumber(ARGV[11])
local t = contract(cid)
if not t then return refuse('not_found', 'contract not found', 'contract_id') end
if t.status ~= 'active' then return refuse('conflict', 'contract is ' .. t.status, 'contract_id') end
if n0(t.version) ~= n0(ARGV[5]) then return {2} end
local m = hfields(K.node(new_id), NODE_TERMS)
if not m then return refuse('not_found', 'node not found', 'node_id') end
local ram, vram = n0(t.ram_gb), n0(t.vram_gb)
local why = lease_refusal(m, ram, vram, remaining, n0(t.max_price_pusd))
if why then return why end
local h_old, cost_old = big(t.hold_pusd or '0'), big(ARGV[7])
why = stake_refusal(m, bmax0(bsub(h_old, cost_old)))
if why then return why end
local n, rr, rv = prepare_close(t)
if n.err then return n end

local money, moved = settle_money(t, big(ARGV[7]), ARGV[13], true)
stake_close(t, money, 'failed_over', ARGV[6], ARGV[7], ARGV[13])
local ev_old = close_contract(t, n, rr, rv, {status = 'failed_over', used_s = ARGV[6],
  egress_mgb = '0', cost_pusd = ARGV[7], settlement_hash = ARGV[8], successor_id = new_cid,
  money = money}, ARGV[12])
local end_ms = NOW + remaining * 1000
local cj = contract_json(new_cid, t.client_id, t.user_id, new_id, m.owner_id, t.ram_gb, t.vram_gb,
  ARGV[11], end_ms, m.price_pusd, m.egress_price_pusd, t.max_price_pusd,
  ',"predecessor_id":"' .. cid .. '","hold_pusd":"' .. bstr(moved) .. '","hold_month":"'
  .. (t.hold_month or '') .. '"' .. lease_extra(m, ram))
local mr, mv = open_contract(new_id, m, new_cid, cj, t.client_id, ram, vram, end_ms)
lease_value_add(new_id, m.lease_value_pusd, moved)
if select(2, lease_extra(m, ram)) == 'pending' then lease_opened(new_cid, new_id) end
local ev_new = event_text(created_body(cj, mr, mv))
return {1, ev_old, ev_new, cjson.encode(t), cj}
