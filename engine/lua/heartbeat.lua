-- Apply a batch of heartbeats of one owner's nodes in one region. ARGV: tag, region, now,
-- min_interval_ms, missed_heartbeats_offline, owner_id, then the beats as one JSON array (one
-- argument, so a batch of thousands costs the client one encode): each beat is
-- [node_id, available_ram_gb, available_vram_gb, cpu_usage_pct, gpu_usage_pct, temperature_c,
-- bandwidth_mbps, lat, lng], the GB as numbers, the rest as the strings Python formats
-- ('' for absent), so floats keep their exact text.
-- Per beat: 0 ok, 1 not_found, 2 forbidden (not the owner's node), 3 too_soon (with the ms to
-- wait), 4 deactivated. An accepted beat sets offered = min(total, available + reserved) per
-- dimension, moves the heartbeat deadline, and brings an offline node back to active.
-- Returns {1, event JSON or false when no beat was accepted, code1, wait1, code2, wait2, ...};
-- one HeartbeatsApplied event carries every accepted beat, in order.
local min_interval, missed, owner = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local beats = cjson.decode(ARGV[7])
local FIELDS = {'owner_id', 'status', 'last_heartbeat_ms', 'total_ram_gb', 'total_vram_gb',
  'reserved_ram_gb', 'reserved_vram_gb', 'price_pusd', 'ask_expires_ms', 'heartbeat_interval_s',
  'offered_ram_gb', 'offered_vram_gb'}

local out = {1, false}
local entries = {}
-- Index updates are batched; the last beat of a node in the batch decides its entries. This
-- loop is the hot path of heartbeat ingestion: positional fields, no per-beat helper tables.
local hb, ask, price, expiry, geo = {}, {}, {}, {}, {}
for _, beat in ipairs(beats) do
  local id = beat[1]
  local nkey = TAG .. 'node:' .. id
  local v = redis.call('HMGET', nkey, unpack(FIELDS))
  local status = v[2]
  local code, wait = 0, 0
  if not status then
    code = 1
  elseif v[1] ~= owner then
    code = 2
  elseif status == 'deactivated' then
    code = 4
  else
    local last = tonumber(v[3])
    if last ~= 0 and NOW - last < min_interval then
      code, wait = 3, last + min_interval - NOW
    end
  end
  if code == 0 then
    local reserved_ram, reserved_vram = tonumber(v[6]), tonumber(v[7])
    local offered_ram = math.min(tonumber(v[4]), beat[2] + reserved_ram)
    local offered_vram = math.min(tonumber(v[5]), beat[3] + reserved_vram)
    if status == 'offline' then status = 'active' end
    local set = {'offered_ram_gb', offered_ram, 'offered_vram_gb', offered_vram,
      'last_heartbeat_ms', NOW_S, 'status', status}
    local e = {node_id = id, offered_ram_gb = offered_ram, offered_vram_gb = offered_vram,
      available_ram_gb = offered_ram - reserved_ram,
      available_vram_gb = offered_vram - reserved_vram, status = status}
    if beat[4] ~= '' then e.cpu_usage_pct = beat[4] end
    if beat[5] ~= '' then e.gpu_usage_pct = beat[5] end
    if beat[6] ~= '' then e.temperature_c = beat[6] end
    if beat[7] ~= '' then
      e.bandwidth_mbps = beat[7]
      set[#set + 1], set[#set + 2] = 'bandwidth_mbps', beat[7]
    end
    if beat[8] ~= '' then
      e.lat, e.lng = beat[8], beat[9]
      set[#set + 1], set[#set + 2] = 'lat', beat[8]
      set[#set + 1], set[#set + 2] = 'lng', beat[9]
      geo[id] = {beat[9], geo_lat(beat[8])}
    end
    redis.call('HSET', nkey, unpack(set))
    hb[id] = deadline(NOW, v[10], missed)
    -- engine.core.ask_listed, inlined, after and before the beat. The asks book holds each
    -- node as listed at its last change. For an ask that never expires that depends on the
    -- node alone, so when this beat leaves it as it was, the entry is already right and is
    -- left alone (unless an earlier beat of this batch has an update pending).
    local exp = tonumber(v[9])
    local now_listed = status == 'active' and (exp == 0 or NOW < exp)
      and offered_ram + offered_vram - reserved_ram - reserved_vram > 0
    local was_listed = v[2] == 'active'
      and tonumber(v[11]) + tonumber(v[12]) - reserved_ram - reserved_vram > 0
    if exp ~= 0 or now_listed ~= was_listed or ask[id] ~= nil then
      ask[id] = now_listed
      price[id], expiry[id] = v[8], exp
    end
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
for id, on in pairs(ask) do
  local exp = expiry[id]
  if on then
    ask_add[#ask_add + 1] = price[id]
    ask_add[#ask_add + 1] = id
    if exp > 0 then
      exp_add[#exp_add + 1] = exp
      exp_add[#exp_add + 1] = id
    end
  else
    ask_rem[#ask_rem + 1] = id
    if exp > 0 then exp_rem[#exp_rem + 1] = id end
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
