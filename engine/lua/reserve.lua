-- Reserve capacity on nodes: each request creates an active contract at its node's ask price.
-- ARGV: tag, region, now, retention_ms, then the requests as one JSON array, each
-- [node_id, contract_id, client_id, user_id, ram_gb, vram_gb, duration_s, max_price_pusd,
-- bid_id ('' for none)], every value a string. KEYS: seq, dir.
-- Requests apply one after the other, each on its own: it checks all its preconditions before
-- its first write and is refused with nothing written, or makes its contract and appends its
-- ContractCreated event (so a later request of the batch sees an earlier one's lease).
-- With a bid, the same step fills it (engine.core.bid_refusal: open, not expired, same client,
-- user, duration and cap, split rules); a bid whose remainder reaches zero is filled and leaves
-- the book. Checks, in order (engine.core): node exists, the bid, node active, ask not expired,
-- duration within terms, price <= cap, free capacity covers the request.
-- Returns one entry per request: {1, owner_id, price_pusd, egress_price_pusd} (the node's
-- terms; the caller knows the rest of the contract) or {0, code, message, field}.
local retention = ARGV[4]
local requests = cjson.decode(ARGV[5])
local BID_FIELDS = {'status', 'expires_ms', 'client_id', 'user_id', 'duration_s', 'max_price_pusd',
  'ram_gb', 'vram_gb', 'filled_ram_gb', 'filled_vram_gb', 'allow_split', 'min_fill_gb',
  'contract_ids', 'seq'}

local function reserve(r)
  local id, cid, client, user = r[1], r[2], r[3], r[4]
  local ram, vram, duration, max_price = tonumber(r[5]), tonumber(r[6]), tonumber(r[7]), tonumber(r[8])
  local bid_id = r[9]

  local n = hfields(TAG .. 'node:' .. id, NODE_TERMS)
  if not n then return refuse('not_found', 'node not found', 'node_id') end

  local b, bkey
  if bid_id ~= '' then
    bkey = TAG .. 'bid:' .. bid_id
    b = hfields(bkey, BID_FIELDS)
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

  local c = {contract_id = cid, region = REGION, client_id = client, user_id = user, node_id = id,
    owner_id = n.owner_id, ram_gb = r[5], vram_gb = r[6], duration_s = r[7], start_ms = NOW_S,
    end_ms = NOW + duration * 1000, price_pusd = n.price_pusd,
    egress_price_pusd = n.egress_price_pusd, max_price_pusd = r[8], status = 'active',
    extensions = '0', used_s = '0', egress_mgb = '0', cost_pusd = '0', completed_ms = '0',
    version = '1'}
  if b then c.bid_id = bid_id end
  local rr, rv = open_contract(id, n, c, true)

  local ev = {type = 'contract_created', contract = c, node_reserved_ram_gb = rr,
    node_reserved_vram_gb = rv}
  if b then
    local fr, fv = n0(b.filled_ram_gb) + ram, n0(b.filled_vram_gb) + vram
    local status = 'open'
    if fr == n0(b.ram_gb) and fv == n0(b.vram_gb) then status = 'filled' end
    local ids = cid
    if b.contract_ids and b.contract_ids ~= '' then ids = b.contract_ids .. ',' .. cid end
    redis.call('HSET', bkey, 'filled_ram_gb', fr, 'filled_vram_gb', fv, 'status', status,
      'contract_ids', ids)
    if status == 'filled' then
      redis.call('ZREM', TAG .. 'bids', string.format('%016d', n0(b.seq)) .. ':' .. bid_id)
      redis.call('ZREM', TAG .. 'bid-exp', bid_id)
      redis.call('PEXPIRE', bkey, retention)
    end
    ev.bid_id, ev.bid_filled_ram_gb, ev.bid_filled_vram_gb, ev.bid_status = bid_id, fr, fv, status
  end
  event(ev)
  return {1, n.owner_id, n.price_pusd, n.egress_price_pusd}
end

local out, traded = {}, false
for i, r in ipairs(requests) do
  out[i] = reserve(r)
  if out[i][1] == 1 then traded = true end
end
-- Every fill of the batch is stamped NOW, so one trim serves them all.
if traded then redis.call('ZREMRANGEBYSCORE', TAG .. 'fills', '-inf', NOW - FILLS_WINDOW_MS) end
return out
