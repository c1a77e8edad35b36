-- Delist the asks that expired with no change to their node since (the listing rule is applied
-- at every change; this catches the passage of time). ARGV: tag, region, now, then the ids the
-- caller found due in the `ask_expiry` index, earliest first (it declares their node keys: a
-- script reads no key it was not given). An id whose entry is no longer due (a change since
-- that read moved or removed it) is skipped. One NodeUpdated event per node delisted (the node
-- is unchanged; the event records the delisting).
local out = {1}
for i = 4, #ARGV do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', K.ask_expiry, id)
  if due and tonumber(due) <= NOW then
    local n = hmap(K.node(id))
    redis.call('ZREM', K.asks, id)
    redis.call('ZREM', K.ask_expiry, id)
    out[#out + 1] = event({type = 'node_updated', node = obj(n)})
  end
end
return out
