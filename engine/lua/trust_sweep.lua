-- Close the uptime windows of offline nodes (engine.trust: a silent node's windows close as
-- their end passes, not only at its next heartbeat). ARGV: tag, region, now, then the ids the
-- caller found due in `trust_due` (it declares their node keys). An id no longer due is skipped;
-- one that is not offline any more (it beat, or was deactivated) leaves the index. A node silent
-- for the whole period has nothing left to change and leaves it too; the others are due again
-- at the end of the current window. One TrustUpdated event (`sweep`) for the nodes accounted
-- and those dropped.
local dropped = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', K.trust_due, id)
  if due and tonumber(due) <= NOW then
    local nkey = K.node(id)
    local f = hfields(nkey, UP_FIELDS)
    if not f or f.status ~= 'offline' then
      redis.call('ZREM', K.trust_due, id)
      dropped[#dropped + 1] = id
    else
      up_account(id, nkey, f, nil, nil, n0(f.maint_last_ms))
      local last = n0(f.last_heartbeat_ms)
      if last == 0 then last = n0(f.created_ms) end
      if NOW - last > (UP_PERIOD + 1) * UP_WINDOW_MS then
        redis.call('ZREM', K.trust_due, id)
      else
        redis.call('ZADD', K.trust_due, (UP_WIN + 1) * UP_WINDOW_MS, id)
      end
    end
  end
end
if #UP_ENTRIES > 0 or #dropped > 0 then
  local ev = {type = 'trust_updated', sweep = true}
  if #UP_ENTRIES > 0 then ev.entries = UP_ENTRIES end
  if #dropped > 0 then ev.dropped = dropped end
  event(ev)
end
return {1, #UP_ENTRIES}
