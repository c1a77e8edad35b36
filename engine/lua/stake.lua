-- Lock stake for a node, or release it (engine.trust). ARGV: tag, region, now, node_id,
-- owner_id, kind ('lock' | 'release'), amount_pusd (decimal), key (a lock: the id under which the
-- gateway moved the amount out of the provider's earnings into `stake_transit` in the ledger;
-- a lock applies once per key: a repeat changes nothing and answers {1, ''}). A release beyond
-- what the node's leases do not require is refused (409); it goes back to the provider's
-- earnings. Returns {1, StakeChanged event}.
local id, owner, kind, key = ARGV[4], ARGV[5], ARGV[6], ARGV[8]
local amount = big(ARGV[7])
local nkey = K.node(id)
local n = hfields(nkey, {'owner_id', 'status', 'stake_pusd', 'stake_held_pusd', 'lease_value_pusd'})
if not n then return refuse('not_found', 'node not found', 'node_id') end
if n.owner_id ~= owner then return refuse('conflict', "only the node's owner may change its stake", 'node_id') end
if amount.neg or #amount == 0 then return refuse('invalid_request', 'the amount must be positive', 'amount_usd') end
if kind == 'lock' then
  if redis.call('HEXISTS', K.stake_ops, key) == 1 then return {1, ''} end
end
local stake, held = big(n.stake_pusd or '0'), big(n.stake_held_pusd or '0')
if kind == 'lock' then
  stake = badd(stake, amount)
else
  local free = bsub(stake, stake_required(big(n.lease_value_pusd or '0')))
  if bcmp(amount, free) > 0 then
    return refuse('conflict', "the node's leases require the rest of its stake", 'amount_usd')
  end
  stake = bsub(stake, amount)
  if bcmp(held, stake) > 0 then held = stake end
end
redis.call('HSET', nkey, 'stake_pusd', bstr(stake), 'stake_held_pusd', bstr(held))
local ev = {type = 'stake_changed', node_id = id, owner_id = owner, kind = kind,
  amount_pusd = bstr(amount), node_stake_pusd = bstr(stake), node_stake_held_pusd = bstr(held)}
if kind == 'lock' then ev.key = key end
local json = event(ev)
if kind == 'lock' then redis.call('HSET', K.stake_ops, key, REGION .. ':' .. redis.call('GET', K.seq)) end
return {1, json}
