-- Helpers prepended to every script by engine.market (EVAL has no includes), after the key
-- names (`K`, generated from engine/keys.py: no script spells a key itself).
--
-- Conventions. ARGV[1] is the region's key prefix with its hash tag (`P{region}:`, `TAG`),
-- ARGV[2] the region, ARGV[3] the time of the change in ms (the caller's clock; scripts never
-- read one). Every key a script touches is declared in KEYS (engine.market lists them; a Redis
-- Cluster routes by them): KEYS[1] is the region's `seq` (the read-only quote's: its asks); the
-- scripts that create objects declare the global directory and regions set as KEYS[2] and
-- KEYS[3] and name them DIRECTORY and REGIONS, the only keys outside the region's slot; the
-- region's keys follow, in any order.
-- A script returns {1, ...} when it made its change, {0, code, message, field} when it refused
-- (before its first write: Lua does not roll back), and {2} when an optimistic version check
-- failed (the caller re-reads and retries).
-- Values are kept as the strings Python stored (ints in decimal, floats as repr) and copied into
-- events unchanged; EVENT_DECODER (strict=False) restores exact ints and floats. Numbers this
-- code computes are small integers (GB, seconds, ms, counters): exact in a double and printed
-- exactly by Redis (%.17g) and by cjson (%.14g, exact below 1e14). Money is never computed here
-- beyond comparing prices, which are < 2^53 (engine.core.MAX_PRICE_PUSD).

local REGION, NOW_S = ARGV[2], ARGV[3]
local NOW = tonumber(NOW_S)
local FILLS_WINDOW_MS = 86400000 -- engine.core.FILLS_WINDOW_MS
local GEO_LAT_LIMIT = 85.05112878 -- engine.core.GEO_LAT_LIMIT

local function refuse(code, message, field)
  return {0, code, message, field or ''}
end

local function n0(v)
  return tonumber(v) or 0
end

local function int(v)
  return string.format('%.0f', v)
end

local function hmap(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- HMGET into a table keyed by field name; nil when the hash is absent (names[1] always exists).
local function hfields(key, names)
  local vals = redis.call('HMGET', key, unpack(names))
  if not vals[1] then return nil end
  local t = {}
  for i, name in ipairs(names) do
    if vals[i] then t[name] = vals[i] end
  end
  return t
end

local function hset(key, t)
  local args = {}
  for k, v in pairs(t) do
    args[#args + 1] = k
    args[#args + 1] = v
  end
  redis.call('HSET', key, unpack(args))
end

-- engine.core.ask_listed
local function listed(n)
  if n.status ~= 'active' then return false end
  local free = n0(n.offered_ram_gb) - n0(n.reserved_ram_gb) + n0(n.offered_vram_gb) - n0(n.reserved_vram_gb)
  if free <= 0 then return false end
  local exp = n0(n.ask_expires_ms)
  return exp == 0 or NOW < exp
end

-- Puts node `id` in or out of the asks book by the listing rule. `ask-exp` mirrors the listed
-- nodes whose ask expires; a node whose ask_expires_ms is 0 is never in it (update removes the
-- entry itself when a provider clears the expiry).
local function sync_ask(id, n)
  local exp = n0(n.ask_expires_ms)
  if listed(n) then
    redis.call('ZADD', K.asks, n.price_pusd, id)
    if exp > 0 then redis.call('ZADD', K.ask_expiry, n.ask_expires_ms, id) end
  else
    redis.call('ZREM', K.asks, id)
    if exp > 0 then redis.call('ZREM', K.ask_expiry, id) end
  end
end

-- engine.core.hb_deadline_ms (same double arithmetic, same result)
local function deadline(last_ms, interval_s, missed)
  return last_ms + math.floor(missed * tonumber(interval_s) * 1000)
end

local function geo_lat(lat)
  local v = tonumber(lat)
  if v > GEO_LAT_LIMIT then return GEO_LAT_LIMIT end
  if v < -GEO_LAT_LIMIT then return -GEO_LAT_LIMIT end
  return lat
end

-- Appends one event to the region's stream under the next region sequence number.
local function event(ev)
  local seq = redis.call('INCR', K.seq)
  ev.event_id = REGION .. ':' .. seq
  ev.region = REGION
  ev.ts_ms = NOW
  local json = cjson.encode(ev)
  redis.call('XADD', K.events, '*', 'e', json)
  return json
end

-- A stored hash as an event object (metadata back to an object; contract ids are not carried).
local function obj(t)
  local o = {}
  for k, v in pairs(t) do o[k] = v end
  if o.metadata then o.metadata = cjson.decode(o.metadata) end
  o.contract_ids = nil
  return o
end

local function flat(t)
  local out = {}
  for k, v in pairs(t) do
    out[#out + 1] = k
    out[#out + 1] = tostring(v)
  end
  return out
end

local NODE_TERMS = {'status', 'owner_id', 'offered_ram_gb', 'offered_vram_gb', 'reserved_ram_gb',
  'reserved_vram_gb', 'price_pusd', 'egress_price_pusd', 'ask_expires_ms', 'min_duration_s',
  'max_duration_s'}

-- engine.core.reserve_refusal: nil when node `n` (NODE_TERMS) can take the lease now.
local function lease_refusal(n, ram, vram, duration, max_price)
  if n.status ~= 'active' then return refuse('node_unavailable', 'node is ' .. n.status, 'node_id') end
  local exp = n0(n.ask_expires_ms)
  if exp ~= 0 and NOW >= exp then return refuse('node_unavailable', 'ask expired', 'node_id') end
  if duration < n0(n.min_duration_s) or duration > n0(n.max_duration_s) then
    return refuse('capacity_taken', "duration outside the node's terms", 'duration_s')
  end
  if n0(n.price_pusd) > max_price then return refuse('capacity_taken', 'price above cap', 'max_price_pusd') end
  if ram > n0(n.offered_ram_gb) - n0(n.reserved_ram_gb) or vram > n0(n.offered_vram_gb) - n0(n.reserved_vram_gb) then
    return refuse('capacity_taken', 'capacity taken', 'node_id')
  end
  return nil
end

-- A variadic command over `args` (groups of `width`), in chunks: unpack() is limited by the Lua
-- stack. `key` nil: the arguments start with the first key (MSET).
local function many(cmd, key, args, width)
  local size = 3000 * width
  for i = 1, #args, size do
    local last = math.min(#args, i + size - 1)
    if key then
      redis.call(cmd, key, unpack(args, i, last))
    else
      redis.call(cmd, unpack(args, i, last))
    end
  end
end

-- Contracts are stored as one JSON string (`contract:<id>`): the fields as the decimal strings
-- the other stored objects hold, but `end_ms`, a number (exact: ms below 1e14). A new one's text
-- is formatted once and spliced into its ContractCreated event as the event's `contract`.

-- A string as JSON text (ids are plain; user and owner ids may hold anything).
local function jstr(s)
  if string.find(s, '[%c"\\]') then return cjson.encode(s) end
  return '"' .. s .. '"'
end

local CONTRACT_JSON = '{"contract_id":"%s","region":"%s","client_id":"%s","user_id":%s,'
  .. '"node_id":"%s","owner_id":%s,"ram_gb":"%s","vram_gb":"%s","duration_s":"%s","start_ms":"%s","end_ms":%s,'
  .. '"price_pusd":"%s","egress_price_pusd":"%s","max_price_pusd":"%s","status":"active",'
  .. '"extensions":"0","used_s":"0","egress_mgb":"0","cost_pusd":"0","completed_ms":"0",'
  .. '"version":"1"%s}'

-- The JSON of a new active contract; `extra` is '' or more members (`,"bid_id":...`). The ids
-- but the user's and the owner's are of the plain kind (engine.core checks them: letters,
-- digits, '_', '.', '-'; the contract id is Market's hex), the numbers decimal text.
local function contract_json(cid, client, user, node_id, owner, ram, vram, duration, end_ms, price,
    egress, max_price, extra)
  return string.format(CONTRACT_JSON, cid, REGION, client, jstr(user), node_id, jstr(owner), ram,
    vram, duration, NOW_S, int(end_ms), price, egress, max_price, extra)
end

-- Appends an event given as JSON members (`"type":"...",...`, without braces) under the next
-- region sequence number `seq` (or INCR's); returns the event text.
local function event_text(body, seq)
  seq = seq or redis.call('INCR', K.seq)
  local json = '{' .. body .. ',"event_id":"' .. REGION .. ':' .. int(seq) .. '","region":"'
    .. REGION .. '","ts_ms":' .. NOW_S .. '}'
  redis.call('XADD', K.events, '*', 'e', json)
  return json
end

-- (GB are below 1e14: Lua writes them as integers)
local function created_body(cj, rr, rv)
  return '"type":"contract_created","contract":' .. cj .. ',"node_reserved_ram_gb":' .. rr
    .. ',"node_reserved_vram_gb":' .. rv
end

-- Opens new active contract `cid` (its JSON `cj`, from contract_json) of `client` on node `id`
-- (NODE_TERMS in `n`, updated in place) for `ram` + `vram` GB until `end_ms`. Returns the
-- node's reserved GB. (reserve.lua does the same for a batch, its writes grouped.) The caller
-- enters the contract in the directory.
local function open_contract(id, n, cid, cj, client, ram, vram, end_ms)
  local rr = n0(n.reserved_ram_gb) + ram
  local rv = n0(n.reserved_vram_gb) + vram
  n.reserved_ram_gb, n.reserved_vram_gb = rr, rv
  redis.call('HSET', K.node(id), 'reserved_ram_gb', rr, 'reserved_vram_gb', rv)
  redis.call('SET', K.contract(cid), cj)
  redis.call('SADD', K.node_contracts(id), cid)
  redis.call('SADD', K.client_contracts(client), cid)
  redis.call('ZADD', K.ends, end_ms, cid)
  sync_ask(id, n)
  return rr, rv
end

-- A stored contract as a table (nil when absent). A hash is a contract stored before they
-- became JSON (an upgraded server): read as such, it is written back as JSON by its next change.
local function contract(cid)
  local key = K.contract(cid)
  local raw = redis.pcall('GET', key)
  if type(raw) == 'table' and raw.err then return hmap(key) end
  if not raw then return nil end
  return cjson.decode(raw)
end

-- The checks of closing contract `t` (its stored fields): its node and the node's reserved GB
-- after the capacity returns. Raises (no refusal is possible) if the books are inconsistent.
local function prepare_close(t)
  local n = hfields(K.node(t.node_id), NODE_TERMS)
  if not n then return redis.error_reply('inconsistent: node of contract ' .. t.contract_id .. ' missing') end
  local rr = n0(n.reserved_ram_gb) - n0(t.ram_gb)
  local rv = n0(n.reserved_vram_gb) - n0(t.vram_gb)
  if rr < 0 or rv < 0 then
    return redis.error_reply('inconsistent: node ' .. t.node_id .. ' reserves less than contract ' .. t.contract_id)
  end
  return n, rr, rv
end

-- Closes contract `t` (decoded; checked by prepare_close): stores it closed (with the retention
-- TTL) and returns its ContractSettled event.
-- `s` holds status, used_s, egress_mgb, cost_pusd, settlement_hash and successor_id (or nil).
local function close_contract(t, n, rr, rv, s, retention_ms)
  local nid = t.node_id
  t.status, t.used_s, t.egress_mgb, t.cost_pusd = s.status, s.used_s, s.egress_mgb, s.cost_pusd
  t.settlement_hash, t.completed_ms, t.version = s.settlement_hash, NOW_S, int(n0(t.version) + 1)
  if s.successor_id then t.successor_id = s.successor_id end
  redis.call('SET', K.contract(t.contract_id), cjson.encode(t), 'PX', retention_ms)
  n.reserved_ram_gb, n.reserved_vram_gb = rr, rv
  redis.call('HSET', K.node(nid), 'reserved_ram_gb', rr, 'reserved_vram_gb', rv)
  redis.call('SREM', K.node_contracts(nid), t.contract_id)
  redis.call('SREM', K.client_contracts(t.client_id), t.contract_id)
  redis.call('ZREM', K.ends, t.contract_id)
  sync_ask(nid, n)
  return event({type = 'contract_settled', contract_id = t.contract_id, node_id = nid,
    client_id = t.client_id, ram_gb = t.ram_gb, vram_gb = t.vram_gb, status = s.status,
    used_s = s.used_s, egress_mgb = s.egress_mgb, cost_pusd = s.cost_pusd,
    settlement_hash = s.settlement_hash, completed_ms = NOW, successor_id = s.successor_id,
    node_reserved_ram_gb = rr, node_reserved_vram_gb = rv})
end
