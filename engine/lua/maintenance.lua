-- Announce, replace or withdraw a node's maintenance window (engine.trust's rules, its
-- refusals). ARGV: tag, region, now, node_id, owner_id, start_ms, end_ms; start_ms 0 withdraws
-- the announced window (a pending one is cancelled, one in progress ends now). The node's uptime is first accounted up to now under the window it had;
-- the part of that window already past in the open uptime window stays excluded from it.
-- Returns {1, TrustUpdated event}.
local id, owner = ARGV[4], ARGV[5]
local start, stop = tonumber(ARGV[6]), tonumber(ARGV[7])
local nkey = K.node(id)
local f = hfields(nkey, UP_FIELDS)
if not f then return refuse('not_found', 'node not found', 'node_id') end
if f.owner_id ~= owner then return refuse('conflict', "only the node's owner may announce its maintenance", 'node_id') end
if f.status == 'deactivated' then return refuse('conflict', 'node is deactivated', 'node_id') end
local ms, me, last_start = n0(f.maint_start_ms), n0(f.maint_end_ms), n0(f.maint_last_ms)
local new_s, new_e = start, stop
-- engine.trust.maintenance_refusal
if start == 0 then
  if ms == 0 or NOW >= me then return refuse('not_found', 'no maintenance window announced', 'start_ms') end
  new_s, new_e = 0, 0
  if ms <= NOW then last_start = ms end
else
  if ms <= NOW and NOW < me then
    return refuse('conflict', 'a maintenance window is in progress: end it first', 'start_ms')
  end
  if start < NOW + UP_MAINT_NOTICE_MS then
    return refuse('invalid_request', 'announce maintenance at least 60 min ahead', 'start_ms')
  end
  if start > NOW + UP_MAINT_HORIZON_MS then
    return refuse('invalid_request', 'announce maintenance at most 90 days ahead', 'start_ms')
  end
  if stop <= start then return refuse('invalid_request', 'end_ms must be after start_ms', 'end_ms') end
  if stop - start > UP_MAINT_MAX_MS then
    return refuse('invalid_request', 'a maintenance window lasts at most 4 h', 'end_ms')
  end
  if ms ~= 0 and ms <= NOW then last_start = ms end
  if last_start ~= 0 and start < last_start + UP_MAINT_SPACING_MS then
    return refuse('conflict', 'at most one maintenance window per 7 days', 'start_ms')
  end
end

redis.call('HSET', nkey, 'maint_start_ms', int(new_s), 'maint_end_ms', int(new_e), 'maint_last_ms', int(last_start))
-- engine.trust.excuse: what passed of the window it had stays out of the open uptime window
local function excuse(u, had_s, had_e)
  u.exc = u.exc + up_overlap(math.max(u.win * UP_WINDOW_MS, u.from), NOW, had_s, had_e)
end
local notice = up_account(id, nkey, f, new_s, new_e, last_start, excuse)
if notice == 'suspended' or notice == 'reinstated' then
  local n = hfields(nkey, NODE_TERMS)
  sync_ask(id, n)
end
return {1, up_flush()}
