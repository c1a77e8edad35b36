-- Reserve capacity on nodes: each request creates an active contract at its node's ask price.
-- ARGV: tag, region, now, retention_ms, then the requests as one JSON array, each
-- [node_id, contract_id, client_id, user_id, ram_gb, vram_gb, duration_s, max_price_pusd,
-- bid_id ('' for none)], every value a string. KEYS: seq, dir, then the region keys of the
-- requests (engine.market).
-- Requests apply one after the other, each on its own: it checks all its preconditions before
-- it changes anything and is refused with nothing changed, or makes its contract and appends its
-- ContractCreated event (so a later request of the batch sees an earlier one's lease).
-- With a bid, the same step fills it (engine.core.bid_refusal: open, not expired, same client,
-- user, duration and cap, split rules); a bid whose remainder reaches zero is filled and leaves
-- the book. Checks, in order (engine.core): node exists, the bid, node active, ask not expired,
-- duration within terms, price <= cap, free capacity covers the request.
-- Returns one entry per request: {1, owner_id, price_pusd, egress_price_pusd} (the node's
-- terms; the caller knows the rest of the contract) or {0, code, message, field}.
--
-- This is the hot path of contract creation, so the batch's changes are kept in tables as it
-- goes (the nodes and bids it read, read once) and written at the end, grouped: one command per
-- touched node, bid, client and index instead of ten per contract (a script is atomic, so nobody
-- sees the difference, and the append-only file gets fewer, smaller commands). The asks book is
-- left alone for a node whose ask never expires and whose listing the batch did not change (its
-- entry is already right: engine.core.ask_listed depends on the node alone then).
local DIRECTORY = KEYS[2] -- global: outside the region's slot
local retention = ARGV[4]
local requests = cjson.decode(ARGV[5])
local BID_FIELDS = {'status', 'expires_ms', 'client_id', 'user_id', 'duration_s', 'max_price_pusd',
  'ram_gb', 'vram_gb', 'filled_ram_gb', 'filled_vram_gb', 'allow_split', 'min_fill_gb',
  'contract_ids', 'seq'}

local nodes, node_order, node_cids = {}, {}, {}
local bids, bid_order = {}, {}
local client_order, client_cids = {}, {}
local contracts, ends, dir, fills, bodies = {}, {}, {}, {}, {}

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

  local rr = n0(n.reserved_ram_gb) + ram
  local rv = n0(n.reserved_vram_gb) + vram
  n.reserved_ram_gb, n.reserved_vram_gb = rr, rv
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

  local end_ms = NOW + duration * 1000
  local extra = ''
  if b then extra = ',"bid_id":"' .. bid_id .. '"' end
  local cj = contract_json(cid, client, user, id, n.owner_id, r[5], r[6], r[7], end_ms,
    n.price_pusd, n.egress_price_pusd, r[8], extra)
  contracts[#contracts + 1] = K.contract(cid)
  contracts[#contracts + 1] = cj
  ends[#ends + 1] = end_ms
  ends[#ends + 1] = cid
  dir[#dir + 1] = cid
  dir[#dir + 1] = REGION
  fills[#fills + 1] = NOW
  fills[#fills + 1] = cid .. ':' .. n.price_pusd .. ':' .. int((ram + vram) * duration)

  local body = created_body(cj, rr, rv)
  if b then
    local fr, fv = n0(b.filled_ram_gb) + ram, n0(b.filled_vram_gb) + vram
    local status = 'open'
    if fr == n0(b.ram_gb) and fv == n0(b.vram_gb) then status = 'filled' end
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
  return {1, n.owner_id, n.price_pusd, n.egress_price_pusd}
end

local out = {}
for i, r in ipairs(requests) do out[i] = reserve(r) end
if #bodies == 0 then return out end

for _, id in ipairs(node_order) do
  local n = nodes[id]
  local nkey = K.node(id)
  redis.call('HSET', nkey, 'reserved_ram_gb', n.reserved_ram_gb, 'reserved_vram_gb', n.reserved_vram_gb)
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
  if b.status == 'filled' then
    unbooked[#unbooked + 1] = string.format('%016d', n0(b.seq)) .. ':' .. bid_id
    if n0(b.expires_ms) > 0 then unexpiring[#unexpiring + 1] = bid_id end
    redis.call('PEXPIRE', bkey, retention)
  end
end
many('ZREM', K.bids, unbooked, 1)
many('ZREM', K.bid_expiry, unexpiring, 1)
many('MSET', nil, contracts, 2)
many('ZADD', K.ends, ends, 2)
many('HSET', DIRECTORY, dir, 2)
many('ZADD', K.fills, fills, 2)
-- Every fill of the batch is stamped NOW, so one trim serves them all.
redis.call('ZREMRANGEBYSCORE', K.fills, '-inf', NOW - FILLS_WINDOW_MS)
local seq = redis.call('INCRBY', K.seq, #bodies) - #bodies
for i, body in ipairs(bodies) do event_text(body, seq + i) end
return out
