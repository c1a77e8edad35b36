-- Apply a batch of heartbeats of one owner's nodes in one region. ARGV: tag, region, now,
-- min_interval_ms, missed_heartbeats_offline, owner_id, then the beats as one JSON array (one
-- argument, so a batch of thousands costs the client one encode): each beat is
-- [node_id, available_ram_gb, available_vram_gb, cpu_usage_pct, gpu_usage_pct, temperature_c,
-- bandwidth_mbps, lat, lng(, lease meters)], the GB as numbers, the rest as the strings Python
-- formats ('' for absent), so floats keep their exact text; a beat with lease meters has a
-- tenth item, {{contract_id, egress_bytes, peak_memory_bytes}, ...} (decimal text).
-- Per beat: 0 ok, 1 not_found, 2 forbidden (not the owner's node), 3 too_soon (with the ms to
-- wait), 4 deactivated. An accepted beat sets offered = min(total, available + reserved) per
-- dimension, moves the heartbeat deadline, and brings an offline node back to active.
-- Returns {1, codes, wait...}: `codes` a string of one digit per beat, then the ms to wait of
-- each too_soon beat, in order (a small answer: the event is for the stream's readers). One
-- HeartbeatsApplied event carries every accepted beat, in order, and a TrustUpdated event
-- follows it when a beat closed an uptime window (up_beat in _lib.lua).
-- KEYS: the region's seq, events and node indexes (uptime accounting included), then each
-- beat's node key (a call of 1,000 beats declares 1,008).
local min_interval, missed, owner = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local beats = cjson.decode(ARGV[7])
local node_key = K.node -- a local: the loop below names a key per beat

local codes, out = {}, {1, false}
-- This loop is the hot path of heartbeat ingestion: positional fields, no per-beat tables, only
-- the fields that change written. The event's entries are written here as JSON text, piece by
-- piece into one list joined once (their values are numbers, the status, a registered node id
-- and the number texts Python formatted: nothing to escape). Index updates are batched; the
-- last beat of a node in the batch decides its entries (ZADD and GEOADD apply their members in
-- order, so later beats win).
local parts, accepted, hb_args, geo_args = {}, 0, {}, {}
local meter_parts = {} -- lease meters stored (engine/lua/_lib.lua, delivery)
local ask, expiry = {}, {}
local deadlines = {}
for _, beat in ipairs(beats) do
  local id = beat[1]
  local nkey = node_key(id)
  local v = redis.call('HMGET', nkey, 'owner_id', 'status', 'last_heartbeat_ms', 'total_ram_gb',
    'total_vram_gb', 'reserved_ram_gb', 'reserved_vram_gb', 'offered_ram_gb', 'offered_vram_gb',
    'ask_expires_ms', 'heartbeat_interval_s', 'suspended_ms')
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
    -- trust (engine.trust.on_time): a beat in its previous one's window, within the grace,
    -- changes no uptime accounting; any other goes through up_beat (_lib.lua)
    local held, last = v[12], tonumber(v[3])
    if last < UP_WIN_START or last - UP_WIN_START >= UP_WINDOW_MS or NOW - last > up_grace(v[11]) then
      held = up_beat(id, nkey, v[3], v[11], v[2])
    end
    local reserved_ram, reserved_vram = tonumber(v[6]), tonumber(v[7])
    local offered_ram = math.min(tonumber(v[4]), beat[2] + reserved_ram)
    local offered_vram = math.min(tonumber(v[5]), beat[3] + reserved_vram)
    local was_ram, was_vram = tonumber(v[8]), tonumber(v[9])
    local n = #parts
    parts[n + 1] = (accepted == 0 and '{"node_id":"' or ',{"node_id":"')
    parts[n + 2] = id
    parts[n + 3] = '","offered_ram_gb":'
    parts[n + 4] = offered_ram
    parts[n + 5] = ',"offered_vram_gb":'
    parts[n + 6] = offered_vram
    parts[n + 7] = ',"available_ram_gb":'
    parts[n + 8] = offered_ram - reserved_ram
    parts[n + 9] = ',"available_vram_gb":'
    parts[n + 10] = offered_vram - reserved_vram
    if status == 'offline' then status = 'active' end
    parts[n + 11] = ',"status":"'
    parts[n + 12] = status
    parts[n + 13] = '"'
    n = n + 13
    if beat[4] ~= '' then
      parts[n + 1], parts[n + 2], parts[n + 3] = ',"cpu_usage_pct":"', beat[4], '"'
      n = n + 3
    end
    if beat[5] ~= '' then
      parts[n + 1], parts[n + 2], parts[n + 3] = ',"gpu_usage_pct":"', beat[5], '"'
      n = n + 3
    end
    if beat[6] ~= '' then
      parts[n + 1], parts[n + 2], parts[n + 3] = ',"temperature_c":"', beat[6], '"'
      n = n + 3
    end
    if beat[7] == '' and beat[8] == '' and status == v[2] then
      if offered_ram == was_ram and offered_vram == was_vram then
        redis.call('HSET', nkey, 'last_heartbeat_ms', NOW_S)
      else
        redis.call('HSET', nkey, 'offered_ram_gb', offered_ram, 'offered_vram_gb', offered_vram,
          'last_heartbeat_ms', NOW_S)
      end
    else
      local set = {'offered_ram_gb', offered_ram, 'offered_vram_gb', offered_vram,
        'last_heartbeat_ms', NOW_S, 'status', status}
      if beat[7] ~= '' then
        parts[n + 1], parts[n + 2], parts[n + 3] = ',"bandwidth_mbps":"', beat[7], '"'
        n = n + 3
        set[#set + 1], set[#set + 2] = 'bandwidth_mbps', beat[7]
      end
      if beat[8] ~= '' then
        parts[n + 1], parts[n + 2], parts[n + 3] = ',"lat":"', beat[8], '","lng":"'
        parts[n + 4], parts[n + 5] = beat[9], '"'
        n = n + 5
        set[#set + 1], set[#set + 2] = 'lat', beat[8]
        set[#set + 1], set[#set + 2] = 'lng', beat[9]
        geo_args[#geo_args + 1] = beat[9]
        geo_args[#geo_args + 1] = geo_lat(beat[8])
        geo_args[#geo_args + 1] = id
      end
      redis.call('HSET', nkey, unpack(set))
    end
    parts[n + 1] = '}'
    accepted = accepted + 1
    if beat[10] then lease_meters(id, beat[10], meter_parts) end
    local due = deadlines[v[11]]
    if not due then
      due = deadline(NOW, v[11], missed)
      deadlines[v[11]] = due
    end
    hb_args[#hb_args + 1] = due
    hb_args[#hb_args + 1] = id
    -- engine.core.ask_listed, inlined, after and before the beat. The asks book holds each
    -- node as listed at its last change. For an ask that never expires that depends on the
    -- node alone, so when this beat leaves it as it was, the entry is already right and is
    -- left alone (unless an earlier beat of this batch has an update pending).
    local exp = tonumber(v[10])
    local now_listed = status == 'active' and n0(held) == 0 and (exp == 0 or NOW < exp)
      and offered_ram + offered_vram - reserved_ram - reserved_vram > 0
    local was_listed = v[2] == 'active' and n0(v[12]) == 0
      and was_ram + was_vram - reserved_ram - reserved_vram > 0
    if exp ~= 0 or now_listed ~= was_listed or ask[id] ~= nil then
      ask[id], expiry[id] = now_listed, exp
    end
  end
  codes[#codes + 1] = code
  if code == 3 then out[#out + 1] = wait end
end
out[2] = table.concat(codes)

if accepted == 0 then return out end

local ask_add, ask_rem, exp_add, exp_rem = {}, {}, {}, {}
for id, on in pairs(ask) do
  local exp = expiry[id]
  if on then
    -- the price is read only here: few beats change a listing
    ask_add[#ask_add + 1] = redis.call('HGET', node_key(id), 'price_pusd')
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
many('ZADD', K.heartbeats, hb_args, 2)
many('ZADD', K.asks, ask_add, 2)
many('ZREM', K.asks, ask_rem, 1)
many('ZADD', K.ask_expiry, exp_add, 2)
many('ZREM', K.ask_expiry, exp_rem, 1)
many('GEOADD', K.geo, geo_args, 3)
event_text('"type":"heartbeats","entries":[' .. table.concat(parts) .. ']'
  .. lease_meters_stored(meter_parts))
up_flush()
return out
