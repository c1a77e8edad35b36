-- Apply a batch of heartbeats of one owner's nodes in one region. ARGV: tag, region, now,
-- min_interval_ms, missed_heartbeats_offline, owner_id, then 9 values per beat: node_id,
-- available_ram_gb, available_vram_gb, cpu_usage_pct, gpu_usage_pct, temperature_c,
-- bandwidth_mbps, lat, lng ('' for absent).
-- Per beat: 0 ok, 1 not_found, 2 forbidden (not the owner's node), 3 too_soon (with the ms to
-- wait), 4 deactivated. An accepted beat sets offered = min(total, available + reserved) per
-- dimension, moves the heartbeat deadline, and brings an offline node back to active.
-- Returns {1, event JSON or false when no beat was accepted, code1, wait1, code2, wait2, ...};
-- one HeartbeatsApplied event carries every accepted beat, in order.
local min_interval, missed, owner = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local FIELDS = {'owner_id', 'status', 'last_heartbeat_ms', 'total_ram_gb', 'total_vram_gb',
  'reserved_ram_gb', 'reserved_vram_gb', 'price_pusd', 'ask_expires_ms', 'heartbeat_interval_s'}

local out = {1, false}
local entries = {}
-- Index updates are batched; the last beat of a node in the batch decides its entries.
local hb, ask, geo = {}, {}, {}
for i = 7, #ARGV, 9 do
  local id = ARGV[i]
  local nkey = TAG .. 'node:' .. id
  local n = hfields(nkey, FIELDS)
  local code, wait = 0, 0
  if not n then
    code = 1
  elseif n.owner_id ~= owner then
    code = 2
  elseif n.status == 'deactivated' then
    code = 4
  else
    local last = n0(n.last_heartbeat_ms)
    if last ~= 0 and NOW - last < min_interval then
      code, wait = 3, last + min_interval - NOW
    end
  end
  if code == 0 then
    local offered_ram = math.min(n0(n.total_ram_gb), n0(ARGV[i + 1]) + n0(n.reserved_ram_gb))
    local offered_vram = math.min(n0(n.total_vram_gb), n0(ARGV[i + 2]) + n0(n.reserved_vram_gb))
    if n.status == 'offline' then n.status = 'active' end
    n.offered_ram_gb, n.offered_vram_gb = offered_ram, offered_vram
    local set = {'offered_ram_gb', offered_ram, 'offered_vram_gb', offered_vram,
      'last_heartbeat_ms', NOW_S, 'status', n.status}
    local e = {node_id = id, offered_ram_gb = offered_ram, offered_vram_gb = offered_vram,
      available_ram_gb = offered_ram - n0(n.reserved_ram_gb),
      available_vram_gb = offered_vram - n0(n.reserved_vram_gb), status = n.status}
    if ARGV[i + 3] ~= '' then e.cpu_usage_pct = ARGV[i + 3] end
    if ARGV[i + 4] ~= '' then e.gpu_usage_pct = ARGV[i + 4] end
    if ARGV[i + 5] ~= '' then e.temperature_c = ARGV[i + 5] end
    if ARGV[i + 6] ~= '' then
      e.bandwidth_mbps = ARGV[i + 6]
      set[#set + 1], set[#set + 2] = 'bandwidth_mbps', ARGV[i + 6]
    end
    if ARGV[i + 7] ~= '' then
      e.lat, e.lng = ARGV[i + 7], ARGV[i + 8]
      set[#set + 1], set[#set + 2] = 'lat', ARGV[i + 7]
      set[#set + 1], set[#set + 2] = 'lng', ARGV[i + 8]
      geo[id] = {ARGV[i + 8], geo_lat(ARGV[i + 7])}
    end
    redis.call('HSET', nkey, unpack(set))
    hb[id] = deadline(NOW, n.heartbeat_interval_s, missed)
    ask[id] = {listed(n), n.price_pusd, n0(n.ask_expires_ms)}
    entries[#entries + 1] = e
  end
  out[#out + 1] = code
  out[#out + 1] = wait
end

if #entries == 0 then return out end

-- Variadic commands in chunks: unpack() is limited by the Lua stack.
local function batched(cmd, key, args, width)
  local chunk = {}
  for _, v in ipairs(args) do
    chunk[#chunk + 1] = v
    if #chunk >= 3000 * width then
      redis.call(cmd, key, unpack(chunk))
      chunk = {}
    end
  end
  if #chunk > 0 then redis.call(cmd, key, unpack(chunk)) end
end

local hb_args, ask_add, ask_rem, exp_add, exp_rem, geo_args = {}, {}, {}, {}, {}, {}
for id, due in pairs(hb) do
  hb_args[#hb_args + 1] = due
  hb_args[#hb_args + 1] = id
end
for id, a in pairs(ask) do
  if a[1] then
    ask_add[#ask_add + 1] = a[2]
    ask_add[#ask_add + 1] = id
    if a[3] > 0 then
      exp_add[#exp_add + 1] = a[3]
      exp_add[#exp_add + 1] = id
    end
  else
    ask_rem[#ask_rem + 1] = id
    if a[3] > 0 then exp_rem[#exp_rem + 1] = id end
  end
end
for id, p in pairs(geo) do
  geo_args[#geo_args + 1] = p[1]
  geo_args[#geo_args + 1] = p[2]
  geo_args[#geo_args + 1] = id
end
batched('ZADD', TAG .. 'hb', hb_args, 2)
batched('ZADD', TAG .. 'asks', ask_add, 2)
batched('ZREM', TAG .. 'asks', ask_rem, 1)
batched('ZADD', TAG .. 'ask-exp', exp_add, 2)
batched('ZREM', TAG .. 'ask-exp', exp_rem, 1)
batched('GEOADD', TAG .. 'geo', geo_args, 3)
out[2] = event({type = 'heartbeats', entries = entries})
return out
