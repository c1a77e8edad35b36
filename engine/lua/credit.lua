-- Credit (or debit) a renter's funding wallet from (to) a rail, once per idempotency key
-- (issue 14). Runs on the funding slot (engine.keys.FUNDING). ARGV: tag, slot, now, client_id,
-- amount_pusd (> 0), key, rail, reference, reason, direction ('credit' or 'debit'),
-- allow_negative ('1': a debit may take the balance below zero, e.g. a refund of money already
-- spent). KEYS: seq, events, wallets, ops.
-- A key already used answers {1, 0, balance, event id of its first use} and changes nothing; a
-- debit beyond the balance (allow_negative '0') is refused with the spendable amount as the
-- shortfall's complement: {0, 'insufficient_funds', message, 'amount', shortfall}.
-- Returns {1, 1, balance, event}.
local c, amount, key = ARGV[4], big(ARGV[5]), ARGV[6]
local debit = ARGV[10] == 'debit'
local first = redis.call('HGET', K.ops, key)
local w = wallet(c)
if first then return {1, 0, bstr(w.avail), first} end
if debit and ARGV[11] ~= '1' and bcmp(w.avail, amount) < 0 then
  local spendable = bmax0(w.avail)
  return refuse_money('insufficient_funds', 'the funding balance holds ' .. bstr(spendable)
    .. ' pico-USD, less than the ' .. bstr(amount) .. ' to debit', 'amount', bsub(amount, spendable))
end
if debit then w.avail = bsub(w.avail, amount) else w.avail = badd(w.avail, amount) end
wallet_save(w)
local ev = event({type = debit and 'wallet_debited' or 'wallet_credited', client_id = c,
  amount_pusd = bstr(amount), key = key, rail = ARGV[7], reference = ARGV[8], reason = ARGV[9],
  wallet = wallet_obj(w)})
redis.call('HSET', K.ops, key, REGION .. ':' .. redis.call('GET', K.seq))
return {1, 1, bstr(w.avail), ev}
