-- Reserve capacity on nodes: each request creates an active contract at its node's ask price.
-- ARGV: tag, region, now, retention_ms, then the requests as one JSON array, each
-- [node_id, contract_id, client_id, user_id, ram_gb, vram_gb, duration_s, max_price_pusd,
-- bid_id ('' for none), budgeted ('1': the renter has a monthly budget)], every value a string,
-- then max_open (a user's open contracts in the region at most, 0: no cap). KEYS: seq,
-- then the region keys of the requests (engine.market), the wallets and open counts among them.
-- Money (issue 14): a request without a bid holds the contract's cost at the node's price
-- (size x duration x price) from the renter's region wallet, refused (402) before anything is
-- reserved when the wallet (or, budgeted, the month's allowance) cannot cover it, or (429) when
-- the user has max_open contracts open; a fill converts the part of the bid's hold it takes
-- (size x duration x the bid's cap) into the contract's hold and releases the difference.
-- Requests apply one after the other, each on its own: it checks all its preconditions before
-- it changes anything and is refused with nothing changed, or makes its contract and appends its
-- ContractCreated event (so a later request of the batch sees an earlier one's lease).
-- With a bid, the same step fills it (engine.core.bid_refusal: open, not expired, same client,
-- user, duration and cap, split rules); a bid whose remainder reaches zero is filled and leaves
-- the book. Checks, in order (engine.core): node exists, the bid, node active, ask not expired,
-- duration within terms, price <= cap, free capacity covers the request, the node's stake
-- covers its lease value with this one (engine.trust.required_stake).
-- Returns one entry per request: {1, owner_id, price_pusd, egress_price_pusd, hold_pusd,
-- hold_month, lease_state} (the node's terms, the hold and the lease's delivery; the caller
-- knows the rest of the contract) or {0, code, message, field} ({..., shortfall} for a 402).
--
-- This is the hot path of contract creation, so the batch's changes are kept in tables as it
-- goes (the nodes and bids it read, read once) and written at the end, grouped: one command per
-- touched node, bid, client and index instead of ten per contract (a script is atomic, so nobody
-- sees the difference, and the append-only file gets fewer, smaller commands). The asks book is
-- left alone for a node whose ask never expires and whose listing the batch did not change (its
-- entry is already right: engine.core.ask_listed depends on the node alone then).
local retention = ARGV[4]
local requests = cjson.decode(ARGV[5])
local max_open = n0(ARGV[6])
local BID_FIELDS = {'status', 'expires_ms', 'client_id', 'user_id', 'duration_s', 'max_price_pusd',
  'ram_gb', 'vram_gb', 'filled_ram_gb', 'filled_vram_gb', 'allow_split', 'min_fill_gb',
  'contract_ids', 'seq', 'hold_pusd', 'hold_month'}

local nodes, node_order, node_cids = {}, {}, {}
local bids, bid_order = {}, {}
local client_order, client_cids = {}, {}
local contracts, ends, fills, bodies = {}, {}, {}, {}
local wallets, wallet_order = {}, {}

local function wallet_of(client)
  local w = wallets[client]
  if not w then
    w = wallet(client)
    wallets[client] = w
    wallet_order[#wallet_order + 1] = client
  end
  return w
end

local function node_terms(id)
  local n = nodes[id]
  if n == nil then
    n = hfields(K.node(id), NODE_TERMS) or false
    if n then n.was_listed = listed(n) end
    nodes[id] = n
  end
  return n
end

local function bid_state(id)
  local b = bids[id]
  if b == nil then
    b = hfields(K.bid(id), BID_FIELDS) or false
    bids[id] = b
  end
  return b
end

local function reserve(r)
  local id, cid, client, user = r[1], r[2], r[3], r[4]
  local ram, vram, duration, max_price = tonumber(r[5]), tonumber(r[6]), tonumber(r[7]), tonumber(r[8])
  local bid_id = r[9]

  local n = node_terms(id)
  if not n then return refuse('not_found', 'node not found', 'node_id') end

  local b
  if bid_id ~= '' then
    b = bid_state(bid_id)
    if not b then return refuse('not_found', 'bid not found', 'bid_id') end
    if b.status ~= 'open' then return refuse('conflict', 'bid is ' .. b.status, 'bid_id') end
    local exp = n0(b.expires_ms)
    if exp ~= 0 and NOW >= exp then return refuse('conflict', 'bid expired', 'bid_id') end
    if b.client_id ~= client or b.user_id ~= user or n0(b.duration_s) ~= duration
        or n0(b.max_price_pusd) ~= max_price then
      return refuse('invalid_request', 'reserve does not match the bid', 'bid_id')
    end
    local rem_ram = n0(b.ram_gb) - n0(b.filled_ram_gb)
    local rem_vram = n0(b.vram_gb) - n0(b.filled_vram_gb)
    if ram > rem_ram or vram > rem_vram then
      return refuse('conflict', "fill exceeds the bid's remaining size", 'bid_id')
    end
    if not (ram == rem_ram and vram == rem_vram) then
      if b.allow_split ~= 'true' then
        return refuse('invalid_request', 'bid does not allow split fills', 'ram_gb')
      end
      if ram + vram < math.max(n0(b.min_fill_gb), 1) then
        return refuse('invalid_request', "fill below the bid's minimum size", 'ram_gb')
      end
    end
  end

  local why = lease_refusal(n, ram, vram, duration, max_price)
  if why then return why end
  local w = wallet_of(client)
  local gbs = big((ram + vram) * duration)
  local h = bmul(gbs, big(n.price_pusd))
  why = stake_refusal(n, h)
  if why then return why end
  local bid_take
  if b and not b.hold_pusd then
    h = ZERO -- a bid placed before holds existed: nothing to convert
  elseif b then
    bid_take = bmul(gbs, big(b.max_price_pusd))
  else
    why = hold_refusal(w, h, r[10] == '1', 'client_id') or open_refusal(user, 'c', max_open, 'client_id')
    if why then return why end
  end

  local rr = n0(n.reserved_ram_gb) + ram
  local rv = n0(n.reserved_vram_gb) + vram
  n.reserved_ram_gb, n.reserved_vram_gb = rr, rv
  n.lease_value_pusd = bstr(badd(big(n.lease_value_pusd or '0'), h))
  local cids = node_cids[id]
  if not cids then
    cids = {}
    node_cids[id] = cids
    node_order[#node_order + 1] = id
  end
  cids[#cids + 1] = cid
  cids = client_cids[client]
  if not cids then
    cids = {}
    client_cids[client] = cids
    client_order[#client_order + 1] = client
  end
  cids[#cids + 1] = cid

  local hold_month, money = MONTH, ''
  if bid_take then
    local released = bsub(bid_take, h)
    release(w, released, b.hold_month)
    b.hold_pusd = bstr(bsub(big(b.hold_pusd), bid_take))
    hold_month = b.hold_month
    money = ',"released_pusd":"' .. bstr(released) .. '","bid_hold_pusd":"' .. b.hold_pusd .. '"'
  elseif not b then
    hold(w, h)
  end
  open_add(user, 'c', 1)
  w.dirty = true
  money = money .. ',' .. wallet_json(w)

  local end_ms = NOW + duration * 1000
  local extra = ',"hold_pusd":"' .. bstr(h) .. '","hold_month":"' .. hold_month .. '"'
  if b then extra = extra .. ',"bid_id":"' .. bid_id .. '"' end
  local lease_json, lease = lease_extra(n, ram)
  extra = extra .. lease_json
  if lease == 'pending' then lease_opened(cid, id) end
  local cj = contract_json(cid, client, user, id, n.owner_id, r[5], r[6], r[7], end_ms,
    n.price_pusd, n.egress_price_pusd, r[8], extra)
  contracts[#contracts + 1] = K.contract(cid)
  contracts[#contracts + 1] = cj
  ends[#ends + 1] = end_ms
  ends[#ends + 1] = cid
  fills[#fills + 1] = NOW
  fills[#fills + 1] = cid .. ':' .. n.price_pusd .. ':' .. int((ram + vram) * duration)

  local body = created_body(cj, rr, rv) .. money
  if b then
    local fr, fv = n0(b.filled_ram_gb) + ram, n0(b.filled_vram_gb) + vram
    local status = 'open'
    if fr == n0(b.ram_gb) and fv == n0(b.vram_gb) then
      status = 'filled'
      open_add(b.user_id, 'b', -1)
    end
    local ids = cid
    if b.contract_ids and b.contract_ids ~= '' then ids = b.contract_ids .. ',' .. cid end
    if not b.changed then
      b.changed = true
      bid_order[#bid_order + 1] = bid_id
    end
    b.filled_ram_gb, b.filled_vram_gb, b.status, b.contract_ids = fr, fv, status, ids
    body = body .. ',"bid_id":"' .. bid_id .. '","bid_filled_ram_gb":' .. fr
      .. ',"bid_filled_vram_gb":' .. fv .. ',"bid_status":"' .. status .. '"'
  end
  bodies[#bodies + 1] = body
  return {1, n.owner_id, n.price_pusd, n.egress_price_pusd, bstr(h), hold_month, lease}
end

local out = {}
for i, r in ipairs(requests) do out[i] = reserve(r) end
if #bodies == 0 then return out end

for _, id in ipairs(node_order) do
  local n = nodes[id]
  local nkey = K.node(id)
  redis.call('HSET', nkey, 'reserved_ram_gb', n.reserved_ram_gb, 'reserved_vram_gb', n.reserved_vram_gb,
    'lease_value_pusd', n.lease_value_pusd)
  many('SADD', K.node_contracts(id), node_cids[id], 1)
  if n0(n.ask_expires_ms) ~= 0 or listed(n) ~= n.was_listed then sync_ask(id, n) end
end
for _, client in ipairs(client_order) do
  many('SADD', K.client_contracts(client), client_cids[client], 1)
end
local unbooked, unexpiring = {}, {}
for _, bid_id in ipairs(bid_order) do
  local b, bkey = bids[bid_id], K.bid(bid_id)
  redis.call('HSET', bkey, 'filled_ram_gb', b.filled_ram_gb, 'filled_vram_gb', b.filled_vram_gb,
    'status', b.status, 'contract_ids', b.contract_ids)
  if b.hold_pusd then redis.call('HSET', bkey, 'hold_pusd', b.hold_pusd) end
  if b.status == 'filled' then
    unbooked[#unbooked + 1] = string.format('%016d', n0(b.seq)) .. ':' .. bid_id
    if n0(b.expires_ms) > 0 then unexpiring[#unexpiring + 1] = bid_id end
    redis.call('PEXPIRE', bkey, retention)
  end
end
many('ZREM', K.bids, unbooked, 1)
many('ZREM', K.bid_expiry, unexpiring, 1)
for _, client in ipairs(wallet_order) do
  if wallets[client].dirty then wallet_save(wallets[client]) end
end
many('MSET', nil, contracts, 2)
many('ZADD', K.ends, ends, 2)
many('ZADD', K.fills, fills, 2)
-- Every fill of the batch is stamped NOW, so one trim serves them all.
redis.call('ZREMRANGEBYSCORE', K.fills, '-inf', NOW - FILLS_WINDOW_MS)
local seq = redis.call('INCRBY', K.seq, #bodies) - #bodies
for i, body in ipairs(bodies) do event_text(body, seq + i) end
return out
