-- Helpers prepended to every script by engine.market (EVAL has no includes), after the key
-- names (`K`, generated from engine/keys.py: no script spells a key itself).
--
-- Conventions. ARGV[1] is the region's key prefix with its hash tag (`P{region}:`, `TAG`),
-- ARGV[2] the region, ARGV[3] the time of the change in ms (the caller's clock; scripts never
-- read one). Every key a script touches is declared in KEYS (engine.market lists them; a Redis
-- Cluster routes by them): KEYS[1] is the region's `seq` (the read-only quote's: its asks); the
-- region's keys follow, in any order. Every key is in the region's slot: no script touches a
-- global key (the id directory and the regions set are written by engine.market before the
-- script that creates an object; see engine/keys.py, "Ids and routing").
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

-- The fields the heartbeat script reads from every node on every beat (its HMGET, in its
-- order) come first in a new node's hash: a small hash is a listpack, which HMGET searches from
-- its head field by field, so at a million nodes the order of a node's fields shows in the cost
-- of each beat (BENCHMARKS.md, trust).
local HOT_FIELDS = {'owner_id', 'status', 'last_heartbeat_ms', 'total_ram_gb', 'total_vram_gb',
  'reserved_ram_gb', 'reserved_vram_gb', 'offered_ram_gb', 'offered_vram_gb', 'ask_expires_ms',
  'heartbeat_interval_s', 'suspended_ms'}
local HOT_FIELD = {}
for _, f in ipairs(HOT_FIELDS) do HOT_FIELD[f] = true end

local function hset(key, t)
  local args = {}
  for _, k in ipairs(HOT_FIELDS) do
    local v = t[k]
    if v ~= nil then
      args[#args + 1] = k
      args[#args + 1] = v
    end
  end
  for k, v in pairs(t) do
    if not HOT_FIELD[k] then
      args[#args + 1] = k
      args[#args + 1] = v
    end
  end
  redis.call('HSET', key, unpack(args))
end

-- engine.core.ask_listed
local function listed(n)
  if n.status ~= 'active' or n0(n.suspended_ms) ~= 0 then return false end
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
  'max_duration_s', 'delivers', 'suspended_ms', 'stake_pusd', 'lease_value_pusd'}

-- engine.core.reserve_refusal: nil when node `n` (NODE_TERMS) can take the lease now.
local function lease_refusal(n, ram, vram, duration, max_price)
  if n.status ~= 'active' then return refuse('node_unavailable', 'node is ' .. n.status, 'node_id') end
  if n0(n.suspended_ms) ~= 0 then return refuse('node_unavailable', 'node is suspended', 'node_id') end
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

-- ---------------------------------------------------------------------------------------------
-- Delivery: the lease a node's agent serves for a RAM contract (engine.core's delivery rules;
-- the scripts call these with a line each). A delivered contract carries `lease_state` in its
-- JSON; `lease-pending` and `lease-closing` hold the leases the engine must watch, and
-- `lease-meters` each lease's meter as "<node id> <base> <counter> <peak>" (decimal text): the
-- node's egress counter as last reported, and what earlier counters had reached when they
-- started over (an agent restarted serves the lease from a new server, counting from 0), so
-- the lease's egress is base + counter and never goes down.

-- The members a new contract's JSON gets for its delivery, and its lease state: a RAM lease on
-- a node that delivers starts pending; anything else is not delivered.
local function lease_extra(n, ram)
  if n.delivers == 'true' and ram > 0 then return ',"lease_state":"pending"', 'pending' end
  return '', 'none'
end

-- A new pending lease `cid` on node `id`: watched for its ready report, its meter started.
local function lease_opened(cid, id)
  redis.call('ZADD', K.lease_pending, NOW, cid)
  redis.call('HSET', K.lease_meters, cid, id .. ' 0 0 0')
end

-- Closing contract `t` with `status`: its lease's final state (closed when completed, failed
-- otherwise), set in `t`, and the lease leaves the delivery indexes. nil: not delivered.
local function lease_finish(t, status)
  local st = t.lease_state
  if not st or st == 'none' then return nil end
  if status == 'completed' then st = 'closed' else st = 'failed' end
  t.lease_state = st
  redis.call('ZREM', K.lease_pending, t.contract_id)
  redis.call('ZREM', K.lease_closing, t.contract_id)
  redis.call('HDEL', K.lease_meters, t.contract_id)
  return st
end

local function lease_refusal_of(t, states)
  local st = t.lease_state or 'none'
  if not states[st] then
    if st == 'none' then return refuse('conflict', 'the lease is not delivered', 'contract_id') end
    return refuse('conflict', 'lease is ' .. st, 'contract_id')
  end
  return nil
end

-- Lease `cid`'s stored meter: node id, base, counter, peak (numbers); nil when it has none.
local function lease_meter(cid)
  local v = redis.call('HGET', K.lease_meters, cid)
  if not v then return nil end
  local node, base, counter, peak = string.match(v, '^(%S+) (%d+) (%d+) (%d+)$')
  return node, tonumber(base), tonumber(counter), tonumber(peak)
end

-- The meter after the node reported counter `egress` and peak `peak`: a counter below the last
-- one started over (a new server), so the last one's bytes join the base.
local function lease_metered(base, counter, peak, egress, new_peak)
  if egress < counter then base = base + counter end
  return base, egress, math.max(peak, new_peak)
end

-- Collects the meters a beat of node `id` reports ({{contract id, egress, peak}, ...}, the
-- numbers as decimal text) into `pending`; `lease_meters_stored` stores them.
local function lease_meters(id, meters, pending)
  for _, m in ipairs(meters) do
    pending[#pending + 1] = {id, m[1], m[2], m[3]}
  end
end

-- Stores the collected meters, in order, of leases of the beat's node only (one HMGET and one
-- HSET for the batch), and returns the heartbeats event's `meters` member ('' when none): the
-- meters that changed something.
local function lease_meters_stored(pending)
  if #pending == 0 then return '' end
  local cids = {}
  for i, p in ipairs(pending) do cids[i] = p[2] end
  local held = {}
  for i = 1, #cids, 3000 do
    local last = math.min(#cids, i + 2999)
    local part = redis.call('HMGET', K.lease_meters, unpack(cids, i, last))
    for j = 1, last - i + 1 do held[i + j - 1] = part[j] end
  end
  local now, writes, out = {}, {}, {}
  for i, p in ipairs(pending) do
    local id, cid = p[1], p[2]
    local v = now[cid] or held[i]
    if v then
      local node, base, counter, peak = string.match(v, '^(%S+) (%d+) (%d+) (%d+)$')
      -- a meter that says nothing new (an idle lease) is neither stored nor in the event
      if node == id and (p[3] ~= counter or tonumber(p[4]) > tonumber(peak)) then
        base, counter, peak = lease_metered(tonumber(base), tonumber(counter), tonumber(peak),
          tonumber(p[3]), tonumber(p[4]))
        local total = base + counter
        base, counter, peak = int(base), int(counter), int(peak)
        v = id .. ' ' .. base .. ' ' .. counter .. ' ' .. peak
        if not now[cid] then
          writes[#writes + 1] = cid
          writes[#writes + 1] = false
        end
        now[cid] = v
        out[#out + 1] = '{"contract_id":"' .. cid .. '","egress_bytes":' .. int(total)
          .. ',"peak_memory_bytes":' .. peak .. ',"counter_bytes":' .. counter .. '}'
      end
    end
  end
  if #out == 0 then return '' end
  for i = 1, #writes, 2 do writes[i + 1] = now[writes[i]] end
  many('HSET', K.lease_meters, writes, 2)
  return ',"meters":[' .. table.concat(out, ',') .. ']'
end

-- A lease_changed event for contract `t` after `change`.
local function lease_event(t, change)
  return event({type = 'lease_changed', contract_id = t.contract_id, node_id = t.node_id,
    change = change, lease_state = t.lease_state, version = t.version, ready_ms = t.ready_ms,
    lease_host = t.lease_host, lease_port = t.lease_port, lease_tls = t.lease_tls,
    closing_ms = t.closing_ms, reported_ms = t.reported_ms, egress_bytes = t.egress_bytes,
    peak_memory_bytes = t.peak_memory_bytes, claimed_egress_mgb = t.claimed_egress_mgb,
    lease_digest = t.lease_digest})
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
-- node's reserved GB. (reserve.lua does the same for a batch, its writes grouped.)
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

-- engine.trust.reputation: counts contract `status` (completed: delivered in full; failed or
-- failed over: cut short by the node) on node `nid` and returns its record and score after it.
local function reputation_after(nid, status)
  local nkey = K.node(nid)
  redis.call('HINCRBY', nkey, status == 'completed' and 'delivered_contracts' or 'cut_contracts', 1)
  local c = redis.call('HMGET', nkey, 'delivered_contracts', 'cut_contracts')
  local delivered, cut = n0(c[1]), n0(c[2])
  local rep = math.floor(100 * (delivered + 9) / (delivered + cut + 9))
  redis.call('HSET', nkey, 'reputation_score', rep)
  return delivered, cut, rep
end

-- Closes contract `t` (decoded; checked by prepare_close): stores it closed (with the retention
-- TTL) and returns its ContractSettled event.
-- `s` holds status, used_s, egress_mgb, cost_pusd, settlement_hash and successor_id (or nil),
-- and `money`, the event's money fields (settle_money, below).
local function close_contract(t, n, rr, rv, s, retention_ms)
  local nid = t.node_id
  t.status, t.used_s, t.egress_mgb, t.cost_pusd = s.status, s.used_s, s.egress_mgb, s.cost_pusd
  t.settlement_hash, t.completed_ms, t.version = s.settlement_hash, NOW_S, int(n0(t.version) + 1)
  if s.successor_id then t.successor_id = s.successor_id end
  local lease = lease_finish(t, s.status)
  redis.call('SET', K.contract(t.contract_id), cjson.encode(t), 'PX', retention_ms)
  n.reserved_ram_gb, n.reserved_vram_gb = rr, rv
  redis.call('HSET', K.node(nid), 'reserved_ram_gb', rr, 'reserved_vram_gb', rv)
  redis.call('SREM', K.node_contracts(nid), t.contract_id)
  redis.call('SREM', K.client_contracts(t.client_id), t.contract_id)
  redis.call('ZREM', K.ends, t.contract_id)
  sync_ask(nid, n)
  local ev = {type = 'contract_settled', contract_id = t.contract_id, node_id = nid,
    client_id = t.client_id, ram_gb = t.ram_gb, vram_gb = t.vram_gb, status = s.status,
    used_s = s.used_s, egress_mgb = s.egress_mgb, cost_pusd = s.cost_pusd,
    settlement_hash = s.settlement_hash, completed_ms = NOW, successor_id = s.successor_id,
    node_reserved_ram_gb = rr, node_reserved_vram_gb = rv, lease_state = lease}
  ev.node_delivered_contracts, ev.node_cut_contracts, ev.node_reputation_score =
    reputation_after(nid, s.status)
  if s.money then for k, v in pairs(s.money) do ev[k] = v end end -- issue 14: settle_money
  return event(ev)
end

-- =============================================================================================
-- Money (issue 14): wallets, holds, budgets, caps. Scripts call these with a line or two each.
--
-- Amounts are pico-USD and may pass 2^53, so they are exact integers here: a `big` is a table
-- of base-1e7 limbs, least significant first, with `neg` set for a negative one (zero: no limbs).
-- They travel as decimal strings (arguments, stored fields, events). engine.core has the same
-- arithmetic in Python (hold_pusd, month_of); tests/engine/test_money.py compares the two.
-- A renter's wallet in a slot (a region, or the funding slot) is four fields of K.wallets:
-- `c` available, `c:h` held, `c:a` budget allowance, `c:m` its month (engine/keys.py).

local MB = 10000000

local function big(v)
  local s = type(v) == 'number' and string.format('%.0f', v) or v
  local a, neg = {}, false
  if string.sub(s, 1, 1) == '-' then neg, s = true, string.sub(s, 2) end
  local i = #s
  while i >= 1 do
    local j = math.max(1, i - 6)
    a[#a + 1] = tonumber(string.sub(s, j, i))
    i = j - 1
  end
  while #a > 0 and a[#a] == 0 do a[#a] = nil end
  a.neg = neg and #a > 0
  return a
end

local function bstr(a)
  if #a == 0 then return '0' end
  local parts = {a.neg and '-' or '', string.format('%d', a[#a])}
  for i = #a - 1, 1, -1 do parts[#parts + 1] = string.format('%07d', a[i]) end
  return table.concat(parts)
end

local function mag_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  for i = #a, 1, -1 do
    if a[i] ~= b[i] then return a[i] < b[i] and -1 or 1 end
  end
  return 0
end

local function trim(a, neg)
  while #a > 0 and a[#a] == 0 do a[#a] = nil end
  a.neg = neg and #a > 0
  return a
end

local function badd(a, b)
  local r = {}
  if a.neg == b.neg then
    local carry = 0
    for i = 1, math.max(#a, #b) do
      local t = (a[i] or 0) + (b[i] or 0) + carry
      r[i], carry = t % MB, math.floor(t / MB)
    end
    if carry > 0 then r[#r + 1] = carry end
    return trim(r, a.neg)
  end
  local x, y = a, b
  if mag_cmp(a, b) < 0 then x, y = b, a end
  local borrow = 0
  for i = 1, #x do
    local t = x[i] - (y[i] or 0) - borrow
    if t < 0 then t, borrow = t + MB, 1 else borrow = 0 end
    r[i] = t
  end
  return trim(r, x.neg)
end

local function bneg(a)
  local r = {}
  for i = 1, #a do r[i] = a[i] end
  return trim(r, not a.neg)
end

local function bsub(a, b) return badd(a, bneg(b)) end

local function bmul(a, b)
  local r = {}
  for i = 1, #a do
    local carry = 0
    for j = 1, #b do
      local t = (r[i + j - 1] or 0) + a[i] * b[j] + carry
      r[i + j - 1], carry = t % MB, math.floor(t / MB)
    end
    local k = i + #b
    while carry > 0 do
      local t = (r[k] or 0) + carry
      r[k], carry = t % MB, math.floor(t / MB)
      k = k + 1
    end
  end
  for i = 1, #a + #b do r[i] = r[i] or 0 end
  return trim(r, a.neg ~= b.neg)
end

local function bcmp(a, b)
  if a.neg ~= b.neg then return a.neg and -1 or 1 end
  local c = mag_cmp(a, b)
  return a.neg and -c or c
end

local ZERO = big('0')

local function bmax0(a)
  if a.neg then return ZERO end
  return a
end

-- engine.core.month_of: the UTC month (YYYY-MM) of an instant in ms (civil_from_days).
local function month_of(ms)
  local z = math.floor(ms / 86400000) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d', y, m)
end

local MONTH = month_of(NOW)

-- A money refusal (402): {0, code, message, field, shortfall}.
local function refuse_money(code, message, field, shortfall)
  return {0, code, message, field or '', bstr(shortfall)}
end

-- The wallet of client `c` in this slot, with the budget month rolled to this one (a new month
-- starts with no allowance: in a region nothing left, in the funding slot nothing granted).
local function wallet(c)
  local v = redis.call('HMGET', K.wallets, c, c .. ':h', c .. ':a', c .. ':m')
  local w = {client = c, avail = big(v[1] or '0'), held = big(v[2] or '0'),
    allow = big(v[3] or '0'), month = v[4] or ''}
  if w.month ~= MONTH then w.month, w.allow = MONTH, ZERO end
  return w
end

local function wallet_save(w)
  redis.call('HSET', K.wallets, w.client, bstr(w.avail), w.client .. ':h', bstr(w.held),
    w.client .. ':a', bstr(w.allow), w.client .. ':m', w.month)
end

-- The wallet as an event's `wallet` (engine.types.WalletState), a table for event() ...
local function wallet_obj(w)
  return {client_id = w.client, avail_pusd = bstr(w.avail), held_pusd = bstr(w.held),
    allow_pusd = bstr(w.allow), month = w.month}
end

-- ... or JSON members for event_text() bodies.
local function wallet_json(w)
  return '"wallet":{"client_id":"' .. w.client .. '","avail_pusd":"' .. bstr(w.avail)
    .. '","held_pusd":"' .. bstr(w.held) .. '","allow_pusd":"' .. bstr(w.allow)
    .. '","month":"' .. w.month .. '"}'
end

-- Why region wallet `w` cannot hold `amount` now (nil: it can). The money comes first; with
-- `budgeted` (the renter has a monthly budget) the month's allowance must cover it too.
local function hold_refusal(w, amount, budgeted, field)
  if bcmp(w.avail, amount) < 0 then
    local short = bsub(amount, w.avail)
    return refuse_money('insufficient_funds', 'the balance cannot cover the hold of '
      .. bstr(amount) .. ' pico-USD (short by ' .. bstr(short) .. ')', field, short)
  end
  if budgeted and bcmp(w.allow, amount) < 0 then
    local short = bsub(amount, bmax0(w.allow))
    return refuse_money('budget_exceeded', 'the hold of ' .. bstr(amount)
      .. " pico-USD would take this month's spend past the monthly budget (over by "
      .. bstr(short) .. ')', field, short)
  end
  return nil
end

-- Takes `amount` from available into held (and from the month's allowance).
local function hold(w, amount)
  w.avail, w.held, w.allow = bsub(w.avail, amount), badd(w.held, amount), bsub(w.allow, amount)
end

-- Gives back `amount` of a hold taken in `month`; the allowance is refilled only if that month
-- is this one (a past month's spend stays spent).
local function release(w, amount, month)
  w.avail, w.held = badd(w.avail, amount), bsub(w.held, amount)
  if month == w.month then w.allow = badd(w.allow, amount) end
end

-- Open contracts ('c') and resting bids ('b') per user in the region (K.open_counts).
local function open_count(user, kind)
  return n0(redis.call('HGET', K.open_counts, user .. ':' .. kind))
end

local function open_add(user, kind, delta)
  local field = user .. ':' .. kind
  if redis.call('HINCRBY', K.open_counts, field, delta) <= 0 then
    redis.call('HDEL', K.open_counts, field)
  end
end

local function open_refusal(user, kind, limit, field)
  if limit > 0 and open_count(user, kind) >= limit then
    local what = kind == 'c' and 'open contracts' or 'resting bids'
    local message = 'at most ' .. limit .. ' ' .. what .. ' per user in a region; close some first'
    return refuse('too_many_open', message, field)
  end
  return nil
end

-- Closing contract `t` (decoded) at `cost` (big) with the platform's `fee` (string): the hold
-- pays the cost, what is left goes back to the wallet (or, `moving`, to a failover's
-- successor), a cost beyond the hold is charged to the wallet (which may go negative: a debt).
-- Saves the wallet; returns the ContractSettled event's money fields and the moved hold.
local function settle_money(t, cost, fee, moving)
  local w = wallet(t.client_id)
  local h = big(t.hold_pusd or '0')
  local used = h
  if bcmp(cost, h) < 0 then used = cost end
  local left = bsub(h, used)
  local charged = bsub(cost, used)
  local released, moved = left, ZERO
  if moving then released, moved = ZERO, left end
  w.held = bsub(w.held, used)
  release(w, released, t.hold_month)
  w.avail = bsub(w.avail, charged)
  w.allow = bsub(w.allow, charged)
  wallet_save(w)
  t.hold_pusd = '0'
  if not moving then open_add(t.user_id, 'c', -1) end
  return {owner_id = t.owner_id, hold_pusd = bstr(h), released_pusd = bstr(released),
    charged_pusd = bstr(charged), moved_pusd = bstr(moved), fee_pusd = fee,
    wallet = wallet_obj(w)}, moved
end

-- A bid leaving the book unfilled (cancelled, expired): its hold goes back to the wallet and
-- the user has one resting bid less. `b` holds the bid's client_id, user_id, hold_pusd and
-- hold_month. Returns the event's money fields.
local function bid_release_money(id, b)
  local h = big(b.hold_pusd or '0')
  local w = wallet(b.client_id)
  release(w, h, b.hold_month)
  wallet_save(w)
  redis.call('HSET', K.bid(id), 'hold_pusd', '0')
  open_add(b.user_id, 'b', -1)
  return {released_pusd = bstr(h), wallet = wallet_obj(w)}
end

-- ---------------------------------------------------------------------------------------------
-- Trust: measured uptime (engine.trust does the same arithmetic, step for step; these constants
-- are its own, and tests/engine/test_trust.py compares them). Numbers stay below 2^53 (ms,
-- sums of window values times the period's seconds), so the doubles compute exactly.

local UP_WINDOW_MS = 3600000
local UP_PERIOD = 720
local UP_MIN_WINDOWS = 168
local UP_NEW_CENTI = 9000
local UP_BUFFER_S = 600
local UP_SUSPEND_BELOW = 6000
local UP_REINSTATE_AT = 6200
local UP_SUSPEND_GRACE_MS = 86400000
local UP_MAINT_NOTICE_MS = 3600000
local UP_MAINT_MAX_MS = 14400000
local UP_MAINT_SPACING_MS = 604800000
local UP_MAINT_HORIZON_MS = 7776000000
local UP_WIN = NOW and math.floor(NOW / UP_WINDOW_MS)
local UP_WIN_START = UP_WIN and UP_WIN * UP_WINDOW_MS
local UP_ENTRIES = {}
local UP_FIELDS = {'status', 'owner_id', 'maint_start_ms', 'maint_end_ms', 'maint_last_ms',
  'created_ms', 'last_heartbeat_ms', 'heartbeat_interval_s', 'uptime_score'}

-- engine.trust.grace_ms
local function up_grace(interval_s)
  return math.floor(1.5 * tonumber(interval_s) * 1000)
end

local function up_overlap(a0, a1, b0, b1)
  local d = math.min(a1, b1) - math.max(a0, b0)
  if d > 0 then return d end
  return 0
end

-- engine.trust._down_in
local function up_down_in(a, b, lo, hi, ms, me)
  local s, e = math.max(a, lo), math.min(b, hi)
  if s >= e then return 0 end
  return e - s - up_overlap(s, e, ms, me)
end

-- engine.trust.window_value
local function up_value(w, from, exc, down, ms, me, failed)
  local lo, hi = math.max(w * UP_WINDOW_MS, from), (w + 1) * UP_WINDOW_MS
  if lo >= hi then return -1 end
  local expected = hi - lo - exc - up_overlap(lo, hi, ms, me)
  if expected <= 0 then return -1 end
  if failed then return 0 end
  local up = expected - math.min(down, expected)
  return math.floor((200 * up + expected) / (2 * expected))
end

-- engine.trust.score_centi
local function up_score(total, windows)
  if windows <= 0 then return UP_NEW_CENTI end
  local scale = 3600 * UP_PERIOD
  local measured = math.min(10000,
    math.floor((total * 100 * scale + 10000 * UP_BUFFER_S * windows) / (windows * scale)))
  if windows >= UP_MIN_WINDOWS then return measured end
  return math.floor((measured * windows + UP_NEW_CENTI * (UP_MIN_WINDOWS - windows)) / UP_MIN_WINDOWS)
end

-- engine.trust.centi_text
local function up_text(c)
  local whole, part = math.floor(c / 100), c % 100
  if part == 0 then return int(whole) .. '.0' end
  if part % 10 == 0 then return int(whole) .. '.' .. int(part / 10) end
  return int(whole) .. '.' .. string.format('%02d', part)
end

-- engine.trust.unpack of node `id`'s accounting, and its maintenance window (ms, me), or nil
-- when it is not tracked yet.
local function up_unpack(id)
  local raw = redis.call('HGET', K.uptime, id)
  if not raw then return nil end
  local sep = string.find(raw, ';', 1, true)
  local w, d, x, a, fr, fl, t, n, sa, su, ms, me = string.match(string.sub(raw, 1, sep - 1),
    '^(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+)$')
  return {win = tonumber(w), down = tonumber(d), exc = tonumber(x), at = tonumber(a),
    from = tonumber(fr), fail = tonumber(fl), total = tonumber(t), windows = tonumber(n),
    suspend_at = tonumber(sa), suspended = tonumber(su), ring = string.sub(raw, sep + 1)},
    tonumber(ms), tonumber(me)
end

-- engine.trust.start: a node tracked from `from` on.
local function up_start(from)
  return {win = math.floor(from / UP_WINDOW_MS), down = 0, exc = 0, at = from, from = from,
    fail = 0, total = 0, windows = 0, suspend_at = 0, suspended = 0, ring = ''}
end

-- The accounting of node `id` (`f`: its UP_FIELDS) and its maintenance window, started from
-- its last heartbeat (else its registration) when it is not tracked yet.
local function up_load(id, f)
  local u, ms, me = up_unpack(id)
  if u then return u, ms, me end
  local from = n0(f.last_heartbeat_ms)
  if from == 0 then from = n0(f.created_ms) end
  return up_start(from), 0, 0
end

local function up_set(ring, slot, c)
  return string.sub(ring, 1, slot) .. string.char(c) .. string.sub(ring, slot + 2)
end

-- engine.trust._standing: warn, clear, suspend or reinstate by the score `centi`.
local function up_standing(u, centi)
  if u.windows < UP_MIN_WINDOWS then return nil end
  if u.suspended ~= 0 then
    if centi >= UP_REINSTATE_AT then
      u.suspended = 0
      return 'reinstated'
    end
    return nil
  end
  if centi >= UP_SUSPEND_BELOW then
    if u.suspend_at ~= 0 then
      u.suspend_at = 0
      return 'cleared'
    end
    return nil
  end
  if u.suspend_at == 0 then
    u.suspend_at = NOW + UP_SUSPEND_GRACE_MS
    return 'warned'
  end
  if NOW >= u.suspend_at then
    u.suspend_at, u.suspended = 0, NOW
    return 'suspended'
  end
  return nil
end

-- engine.trust.advance: brings `u` up to NOW, the silence from `down_from` on being downtime,
-- closing every window before NOW's; (ms, me) the announced maintenance. Returns the closed
-- windows ({w, value, score}), whether the history was dropped first, the score (hundredths) and the
-- change of standing (nil: none).
local function up_advance(u, down_from, ms, me)
  local a = math.max(down_from, u.at, u.from)
  local ring = u.ring
  if #ring < UP_PERIOD then ring = ring .. string.rep('\0', UP_PERIOD - #ring) end
  local w, down, exc = u.win, u.down, u.exc
  local closed, reset = {}, false
  if UP_WIN - w > UP_PERIOD then
    ring = string.rep('\0', UP_PERIOD)
    u.total, u.windows = 0, 0
    w, down, exc, reset = UP_WIN - UP_PERIOD, 0, 0, true
  end
  while w < UP_WIN do
    local lo = math.max(w * UP_WINDOW_MS, u.from)
    down = down + up_down_in(a, NOW, lo, (w + 1) * UP_WINDOW_MS, ms, me)
    local v = up_value(w, u.from, exc, down, ms, me, u.fail == w)
    local slot = w % UP_PERIOD
    local old = string.byte(ring, slot + 1)
    if old > 0 then u.total, u.windows = u.total - old + 1, u.windows - 1 end
    if v >= 0 then
      u.total, u.windows = u.total + v, u.windows + 1
      ring = up_set(ring, slot, v + 1)
    elseif old > 0 then
      ring = up_set(ring, slot, 0)
    end
    closed[#closed + 1] = {w, v, up_score(u.total, u.windows)}
    w, down, exc = w + 1, 0, 0
  end
  down = down + up_down_in(a, NOW, math.max(UP_WIN * UP_WINDOW_MS, u.from),
    (UP_WIN + 1) * UP_WINDOW_MS, ms, me)
  u.win, u.down, u.exc, u.ring = UP_WIN, down, exc, ring
  if NOW > u.at then u.at = NOW end
  local centi = up_score(u.total, u.windows)
  local notice = nil
  if #closed > 0 then notice = up_standing(u, centi) end
  return closed, reset, centi, notice
end

-- engine.trust.pack
local function up_pack(u, ms, me)
  return int(u.win) .. ',' .. int(u.down) .. ',' .. int(u.exc) .. ',' .. int(u.at) .. ','
    .. int(u.from) .. ',' .. int(u.fail) .. ',' .. int(u.total) .. ',' .. u.windows .. ','
    .. int(u.suspend_at) .. ',' .. int(u.suspended) .. ',' .. int(ms) .. ',' .. int(me) .. ';'
    .. u.ring
end

-- Writes the copies in the node's hash of what changed: the score (`score`, text; `was` the
-- stored text), the history and the standing (`old`: the accounting before). Nothing at all
-- for a node whose hour closed at the same score, history and standing.
local function up_fields(nkey, old, u, score, was)
  local set = {}
  if score ~= was then set[#set + 1], set[#set + 2] = 'uptime_score', score end
  if u.windows ~= old.windows then set[#set + 1], set[#set + 2] = 'uptime_windows', u.windows end
  if u.suspend_at ~= old.suspend_at then
    set[#set + 1], set[#set + 2] = 'suspend_at_ms', int(u.suspend_at)
  end
  if u.suspended ~= old.suspended then
    set[#set + 1], set[#set + 2] = 'suspended_ms', int(u.suspended)
  end
  if #set > 0 then redis.call('HSET', nkey, unpack(set)) end
end

local function up_copy(u)
  return {windows = u.windows, suspend_at = u.suspend_at, suspended = u.suspended}
end

-- Accounts node `id` (key `nkey`, UP_FIELDS `f`) up to NOW: the silence after its last sign of
-- life (heartbeat, else registration) and grace is downtime. Then stores it, with the announced
-- window (ms, me) (nil: the one it had) and `last_start` (the node's maint_last_ms), and adds its
-- whole accounting to the TrustUpdated event up_flush() appends (the sweep's and the
-- announcements': engine.replay takes them as they are). `excuse` (optional) is called on the
-- accounting before it is stored (an announcement replaced). Returns the change of standing.
local function up_account(id, nkey, f, ms, me, last_start, excuse)
  local u, had_s, had_e = up_load(id, f)
  local old = up_copy(u)
  local last = n0(f.last_heartbeat_ms)
  if last == 0 then last = n0(f.created_ms) end
  local closed, reset, centi, notice = up_advance(u, last + up_grace(f.heartbeat_interval_s),
    had_s, had_e)
  if excuse then excuse(u, had_s, had_e) end
  if not ms then ms, me = had_s, had_e end
  redis.call('HSET', K.uptime, id, up_pack(u, ms, me))
  local score = up_text(centi)
  up_fields(nkey, old, u, score, f.uptime_score)
  local e = {node_id = id, up_win = u.win, uptime_score = score, uptime_windows = u.windows,
    down_ms = u.down, exc_ms = u.exc, at_ms = u.at, from_ms = u.from, fail_win = u.fail,
    total = u.total, suspend_at_ms = u.suspend_at, suspended_ms = u.suspended,
    maint_start_ms = ms, maint_end_ms = me, maint_last_ms = last_start}
  if #closed > 0 then e.closed = closed end
  if reset then e.reset = true end
  if notice then e.notice = notice end
  UP_ENTRIES[#UP_ENTRIES + 1] = e
  return notice
end

local UP_TEXT = {}

-- A heartbeat of node `id` that heartbeat.lua's fast check did not pass (the first of a later
-- window, or one after a silence beyond the grace), called before the beat is written: `last`
-- its previous heartbeat (text), `interval` its heartbeat interval and `status` its status, as
-- heartbeat.lua read them. Returns the node's suspended_ms after it (its listing depends on it).
-- When windows closed, the beat's entry of the TrustUpdated event is the little its readers need
-- (the score, the history, the hours closed, the standing), written as JSON text:
-- engine.replay computes the rest of what a beat changes, as this does.
local function up_beat(id, nkey, last, interval, status)
  local u, ms, me = up_unpack(id)
  local prev = n0(last)
  if not u or prev == 0 then
    local created = n0(redis.call('HGET', nkey, 'created_ms'))
    if prev == 0 then prev = created end
    if not u then u, ms, me = up_start(prev), 0, 0 end
  end
  local old = up_copy(u)
  local was = up_text(up_score(u.total, u.windows))
  local closed, reset, centi, notice = up_advance(u, prev + up_grace(interval), ms, me)
  redis.call('HSET', K.uptime, id, up_pack(u, ms, me))
  local score = up_text(centi)
  up_fields(nkey, old, u, score, was)
  if status == 'offline' then redis.call('ZREM', K.trust_due, id) end
  if #closed > 0 then
    local hours = {}
    for i, c in ipairs(closed) do hours[i] = '[' .. int(c[1]) .. ',' .. c[2] .. ',' .. c[3] .. ']' end
    local n = #UP_TEXT
    UP_TEXT[n + 1] = (n == 0 and '{"node_id":"' or ',{"node_id":"') .. id
      .. '","uptime_score":"' .. score .. '","uptime_windows":' .. u.windows
      .. ',"suspend_at_ms":' .. int(u.suspend_at) .. ',"suspended_ms":' .. int(u.suspended)
      .. ',"closed":[' .. table.concat(hours, ',') .. ']'
      .. (reset and ',"reset":true' or '') .. (notice and ',"notice":"' .. notice .. '"' or '') .. '}'
  end
  return u.suspended
end

-- Appends the TrustUpdated event of the accountings saved by this call, if any.
-- Returns its JSON (nil: none).
local function up_flush()
  if #UP_TEXT > 0 then
    return event_text('"type":"trust_updated","entries":[' .. table.concat(UP_TEXT) .. ']')
  end
  if #UP_ENTRIES > 0 then return event({type = 'trust_updated', entries = UP_ENTRIES}) end
  return nil
end

-- ---------------------------------------------------------------------------------------------
-- Stake and SLA credits (engine.trust: the rules, its constants; tests/engine/test_stake.py
-- compares the two). Amounts are pico-USD bigs (the money section's arithmetic).

local STAKE_BPS = 1000
local STAKE_FREE = big('10000000000000')
local HOLDBACK_BPS = 5000
local SLA_TIERS = {{9000, 1000}, {5000, 2500}, {1000, 5000}}
local FAILOVER_CREDIT_BPS = 1000
local SLA_STAKE_CAP_BPS = 5000

-- floor(a / d): `a` a big >= 0, `d` a positive integer below 1e7.
local function bdiv_small(a, d)
  local r, rem = {}, 0
  for i = #a, 1, -1 do
    local cur = rem * MB + a[i]
    r[i] = math.floor(cur / d)
    rem = cur - r[i] * d
  end
  return trim(r, false)
end

-- engine.trust.required_stake
local function stake_required(value)
  local over = bsub(value, STAKE_FREE)
  if over.neg or #over == 0 then return ZERO end
  return bdiv_small(badd(bmul(over, big(STAKE_BPS)), big(9999)), 10000)
end

-- Why node `n` (NODE_TERMS) cannot take a lease adding `h` (big) to its lease value: nil when
-- its stake covers the value with it.
local function stake_refusal(n, h)
  local need = stake_required(badd(big(n.lease_value_pusd or '0'), h))
  if bcmp(big(n.stake_pusd or '0'), need) < 0 then
    return refuse('insufficient_stake', "the node's stake does not cover this lease", 'node_id')
  end
  return nil
end

-- engine.trust.sla_credit_bps
local function sla_bps(status, used_s, duration_s)
  if status == 'failed_over' then return FAILOVER_CREDIT_BPS end
  if status ~= 'failed' then return 0 end
  for _, tier in ipairs(SLA_TIERS) do
    if used_s * 10000 >= tier[1] * duration_s then return tier[2] end
  end
  return 10000
end

-- Contract `t` closes (settle_money gave `money`, the event's money fields, before
-- close_contract): its hold leaves its node's lease value; a delivered lease its node never
-- made ready marks the node's open uptime window failed (it closes at 0). Completed, up to half of the
-- provider's earnings (cost - fee) is held back into the node's stake while the stake is below
-- its target (engine.trust.stake_target of the lease value before); cut short by the node (failed, failed over), its renter is
-- credited its tier of the charge out of the stake (half inside the node's announced
-- maintenance), at most half the stake. The event's fields go into `money`.
local function stake_close(t, money, status, used_s, cost_text, fee_text)
  local nkey = K.node(t.node_id)
  if status ~= 'completed' and t.lease_state == 'pending' then
    -- delivery: the node never served this lease; the hour counts as down (engine.trust)
    local u, ms, me = up_unpack(t.node_id)
    if u then
      u.fail = UP_WIN
      redis.call('HSET', K.uptime, t.node_id, up_pack(u, ms, me))
    end
  end
  local f = redis.call('HMGET', nkey, 'stake_pusd', 'stake_held_pusd', 'lease_value_pusd',
    'maint_start_ms', 'maint_end_ms')
  local stake, held, value = big(f[1] or '0'), big(f[2] or '0'), big(f[3] or '0')
  local before = value
  value = bmax0(bsub(value, big(money.hold_pusd or '0')))
  local set = {'lease_value_pusd', bstr(value)}
  if status == 'completed' then
    -- engine.trust.stake_target: the whole exposure's share, free allowance or not
    local short = bsub(bdiv_small(badd(bmul(before, big(STAKE_BPS)), big(9999)), 10000), stake)
    if not short.neg and #short > 0 then
      local earned = bmax0(bsub(big(cost_text), big(fee_text)))
      local kept = bdiv_small(bmul(earned, big(HOLDBACK_BPS)), 10000)
      if bcmp(kept, short) > 0 then kept = short end
      if #kept > 0 then
        stake, held = badd(stake, kept), badd(held, kept)
        money.stake_held_pusd = bstr(kept)
      end
    end
  else
    local bps = sla_bps(status, tonumber(used_s), n0(t.duration_s))
    if n0(f[4]) <= NOW and NOW < n0(f[5]) then bps = math.floor(bps / 2) end
    local credit = bdiv_small(bmul(big(cost_text), big(bps)), 10000)
    local cap = bdiv_small(bmul(stake, big(SLA_STAKE_CAP_BPS)), 10000)
    if bcmp(credit, cap) > 0 then credit = cap end
    if #credit > 0 then
      stake = bsub(stake, credit)
      if bcmp(held, stake) > 0 then held = stake end
      local w = wallet(t.client_id)
      w.avail = badd(w.avail, credit)
      wallet_save(w)
      money.wallet, money.sla_credit_pusd = wallet_obj(w), bstr(credit)
    end
  end
  set[#set + 1], set[#set + 2] = 'stake_pusd', bstr(stake)
  set[#set + 1], set[#set + 2] = 'stake_held_pusd', bstr(held)
  redis.call('HSET', nkey, unpack(set))
  money.node_stake_pusd, money.node_stake_held_pusd = bstr(stake), bstr(held)
end

-- Node `id`'s lease value (its stored text `value`) plus `delta` (big), stored; returns it.
local function lease_value_add(id, value, delta)
  local v = bstr(bmax0(badd(big(value or '0'), delta)))
  redis.call('HSET', K.node(id), 'lease_value_pusd', v)
  return v
end
