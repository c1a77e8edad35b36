#!lua flags=no-writes
-- Read-only: a region's top of book. ARGV: tag, region, now, levels, scan_limit. KEYS: the
-- asks and bids books, the fills, then the keys of the nodes and bids the caller read at the
-- top of the books (engine.market: a script reads no key it was not given).
-- Asks: listed nodes by ascending price (skipping asks that expired since their last change),
-- free GB (ram + vram) summed per price level. Bids: open, unexpired bids by priority, remaining
-- GB summed per price level. At most `levels` levels each, at most `scan_limit` entries read
-- each. Also the last fill's member and the fills of the last 24 h (their gb_s, summed here).
-- Returns {1, ask_levels (price, gb, ...), bid_levels, last_fill_member or false, volume_gb_s,
-- asks read, bids read}, or {2, book} ('asks' or 'bids') when that book needs a key the caller did not declare (it
-- changed since the caller's read, or the levels reach deeper): the caller reads more, retries.
local levels, scan = tonumber(ARGV[4]), tonumber(ARGV[5])
local declared = {}
for i = 4, #KEYS do declared[KEYS[i]] = true end

-- The levels and the count of entries read. `read(member, score)` answers price, gb; or false
-- when it needs an undeclared key (depth answers nil then).
local function depth(key, read)
  local out, last, count, start = {}, nil, 0, 0
  while count < scan do
    local page = redis.call('ZRANGE', key, start, start + 199, 'WITHSCORES')
    if #page == 0 then break end
    for i = 1, #page, 2 do
      count = count + 1
      local price, gb = read(page[i], tonumber(page[i + 1]))
      if price == false then return nil end
      if gb and gb > 0 then
        if price ~= last then
          if #out >= 2 * levels then return out, count end
          out[#out + 1] = int(price)
          out[#out + 1] = gb
          last = price
        else
          out[#out] = out[#out] + gb
        end
      end
      if count >= scan then break end
    end
    start = start + 200
  end
  return out, count
end

local asks, asks_read = depth(K.asks, function(id, price)
  local key = K.node(id)
  if not declared[key] then return false end
  local n = hfields(key, {'status', 'offered_ram_gb', 'offered_vram_gb',
    'reserved_ram_gb', 'reserved_vram_gb', 'ask_expires_ms'})
  if not n or not listed(n) then return price, nil end
  return price, n0(n.offered_ram_gb) - n0(n.reserved_ram_gb) + n0(n.offered_vram_gb) - n0(n.reserved_vram_gb)
end)
if not asks then return {2, 'asks'} end
local bids, bids_read = depth(K.bids, function(member, score)
  local key = K.bid(string.sub(member, 18))
  if not declared[key] then return false end
  local b = hfields(key, {'status', 'ram_gb', 'vram_gb', 'filled_ram_gb',
    'filled_vram_gb', 'expires_ms'})
  if not b or b.status ~= 'open' then return -score, nil end
  local exp = n0(b.expires_ms)
  if exp ~= 0 and NOW >= exp then return -score, nil end
  return -score, n0(b.ram_gb) - n0(b.filled_ram_gb) + n0(b.vram_gb) - n0(b.filled_vram_gb)
end)
if not bids then return {2, 'bids'} end

local last = redis.call('ZREVRANGE', K.fills, 0, 0)
local volume = 0
local recent = redis.call('ZRANGEBYSCORE', K.fills, '(' .. int(NOW - FILLS_WINDOW_MS), '+inf')
for _, member in ipairs(recent) do
  volume = volume + n0(string.match(member, ':(%d+)$'))
end
for i = 2, #asks, 2 do asks[i] = int(asks[i]) end
for i = 2, #bids, 2 do bids[i] = int(bids[i]) end
return {1, asks, bids, last[1] or false, int(volume), asks_read, bids_read}
