-- Reserve capacity on a node: create an active contract at the node's ask price. ARGV: tag,
-- region, now, node_id, contract_id, client_id, user_id, ram_gb, vram_gb, duration_s,
-- max_price_pusd, bid_id ('' for none), retention_ms. KEYS: seq, dir.
-- With a bid, the same call fills it (engine.core.bid_refusal: open, not expired, same client,
-- user, duration and cap, split rules); a bid whose remainder reaches zero is filled and leaves
-- the book. Checks, in order (engine.core): node exists, the bid, node active, ask not expired,
-- duration within terms, price <= cap, free capacity covers the request.
local id, cid, client, user = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local ram, vram, duration, max_price = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local bid_id, retention = ARGV[12], ARGV[13]

local nkey = TAG .. 'node:' .. id
local n = hfields(nkey, NODE_TERMS)
if not n then return refuse('not_found', 'node not found', 'node_id') end

local b, bkey
if bid_id ~= '' then
  bkey = TAG .. 'bid:' .. bid_id
  b = hfields(bkey, {'status', 'expires_ms', 'client_id', 'user_id', 'duration_s',
    'max_price_pusd', 'ram_gb', 'vram_gb', 'filled_ram_gb', 'filled_vram_gb', 'allow_split',
    'min_fill_gb', 'contract_ids', 'seq'})
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
  owner_id = n.owner_id, ram_gb = ARGV[8], vram_gb = ARGV[9], duration_s = ARGV[10],
  start_ms = NOW_S, end_ms = NOW + duration * 1000, price_pusd = n.price_pusd,
  egress_price_pusd = n.egress_price_pusd, max_price_pusd = ARGV[11], status = 'active',
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
return {1, event(ev)}
