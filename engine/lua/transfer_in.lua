-- Step 2 of a transfer (see transfer_out.lua): credit this slot's wallet with a transfer sent
-- from `from_slot`, once per transfer id (a repeat answers {1, 0} and changes nothing). The
-- allowance counts only in the month it was sent for. ARGV: tag, slot, now, transfer_id,
-- client_id, from_slot, amount_pusd, allow_pusd, month, funding ('1': this is the funding
-- slot: the allowance comes back off what it granted). KEYS: seq, events, wallets, transfers.
-- Returns {1, 1, event}.
local id, c, from = ARGV[4], ARGV[5], ARGV[6]
local amount, allow = big(ARGV[7]), big(ARGV[8])
if redis.call('ZSCORE', K.transfers, 'in:' .. id) then return {1, 0} end
local w = wallet(c)
if ARGV[9] ~= w.month then allow = ZERO end
if ARGV[10] == '1' then w.allow = bsub(w.allow, allow) else w.allow = badd(w.allow, allow) end
w.avail = badd(w.avail, amount)
wallet_save(w)
redis.call('ZADD', K.transfers, NOW, 'in:' .. id)
redis.call('ZREMRANGEBYSCORE', K.transfers, '-inf', NOW - 2592000000)
local ev = event({type = 'transfer_received', transfer_id = id, client_id = c, from_slot = from,
  amount_pusd = bstr(amount), allow_pusd = bstr(allow), month = ARGV[9], wallet = wallet_obj(w)})
return {1, 1, ev}
