-- Extend an active contract by extra_s seconds. ARGV: tag, region, now, contract_id, extra_s,
-- longest_s (the longest total duration the lease's value bound allows: engine.core), budgeted
-- ('1': the renter has a monthly budget). KEYS also name the region's wallets: the extension is
-- held (size x extra_s x price) from the renter's region wallet, else a 402 refusal.
-- Refuses: unknown or closed contract, a contract whose end has passed, a node no longer active,
-- a total duration beyond the node's max_duration_s or beyond longest_s. Returns the contract's
-- JSON.
local cid, extra, longest = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local c = contract(cid)
if not c then return refuse('not_found', 'contract not found', 'contract_id') end
if c.status ~= 'active' then return refuse('conflict', 'contract is ' .. c.status, 'contract_id') end
if NOW >= n0(c.end_ms) then return refuse('conflict', 'contract has ended', 'contract_id') end
if c.lease_state == 'closing' then return refuse('conflict', 'lease is closing', 'contract_id') end
local n = hfields(K.node(c.node_id), {'status', 'max_duration_s', 'lease_value_pusd'})
if not n then return redis.error_reply('inconsistent: node of contract ' .. cid .. ' missing') end
if n.status ~= 'active' then return refuse('node_unavailable', 'node is ' .. n.status, 'contract_id') end
local duration = n0(c.duration_s) + extra
if duration > n0(n.max_duration_s) then
  return refuse('outside_node_terms', string.format(
    "the contract would last %d s, over the node's max_duration_sec of %d s",
    duration, n0(n.max_duration_s)), 'extra_s')
end
if duration > longest then
  return refuse('invalid_request', string.format(
    'the lease would be worth over 1,000,000 USD (size x duration x price cap) at %d s', duration),
    'extra_s')
end

local extra_hold = bmul(big((n0(c.ram_gb) + n0(c.vram_gb)) * extra), big(c.price_pusd))
local w = wallet(c.client_id)
local why = hold_refusal(w, extra_hold, ARGV[7] == '1', 'extra_s')
if why then return why end
hold(w, extra_hold)
wallet_save(w)
lease_value_add(c.node_id, n.lease_value_pusd, extra_hold)
c.hold_pusd, c.hold_month = bstr(badd(big(c.hold_pusd or '0'), extra_hold)), MONTH

local end_ms = n0(c.end_ms) + extra * 1000
local version = n0(c.version) + 1
c.duration_s, c.end_ms, c.extensions, c.version = int(duration), end_ms, int(n0(c.extensions) + 1),
  int(version)
local cj = cjson.encode(c)
redis.call('SET', K.contract(cid), cj)
redis.call('ZADD', K.ends, end_ms, cid)
local ev = event({type = 'contract_extended', contract_id = cid, node_id = c.node_id, duration_s = duration,
  end_ms = end_ms, version = version, hold_pusd = bstr(extra_hold), hold_month = MONTH,
  wallet = wallet_obj(w)})
return {1, ev, cj}
