-- Step 1 of a transfer of a renter's money (and budget allowance) from this slot to another
-- (issue 14): debit this slot's wallet, record the transfer in the outbox, append TransferSent.
-- Step 2 (transfer_in.lua, on the other slot) credits it once per transfer id; step 3
-- (transfer_done.lua) clears the outbox entry. A crash between the steps leaves the entry, which
-- the engine's repair loop completes. ARGV: tag, slot, now, transfer_id, client_id, to_slot,
-- amount_pusd (>= 0), allow_pusd (>= 0), funding ('1': this is the funding slot, whose balance
-- may go down to -credit_line and whose allowance is what it granted this month), credit_line_pusd,
-- budget_pusd ('' for none). KEYS: seq, events, wallets, outbox, transfers.
-- Refusals: insufficient_funds (the balance, with the credit line, is short), budget_exceeded
-- (the funding slot: the month's grants would pass the budget; a region: it has less allowance
-- than asked). A transfer id used before answers {1, 0}. Returns {1, 1, event}.
local id, c, to = ARGV[4], ARGV[5], ARGV[6]
local amount, allow = big(ARGV[7]), big(ARGV[8])
local funding = ARGV[9] == '1'
if redis.call('ZSCORE', K.transfers, 'out:' .. id) then return {1, 0} end
local w = wallet(c)
local floor = ZERO
if funding then floor = bneg(big(ARGV[10])) end
if bcmp(bsub(w.avail, amount), floor) < 0 then
  local short = bsub(floor, bsub(w.avail, amount))
  return refuse_money('insufficient_funds', 'the balance cannot cover ' .. bstr(amount)
    .. ' pico-USD (short by ' .. bstr(short) .. ')', 'amount', short)
end
if funding then
  if ARGV[11] ~= '' then
    local over = bsub(badd(w.allow, allow), big(ARGV[11]))
    if not over.neg and #over > 0 then
      return refuse_money('budget_exceeded', "this would take the month's spend past the monthly "
        .. 'budget (over by ' .. bstr(over) .. ')', 'amount', over)
    end
  end
  w.allow = badd(w.allow, allow)
else
  if bcmp(w.allow, allow) < 0 then allow = bmax0(w.allow) end
  w.allow = bsub(w.allow, allow)
end
w.avail = bsub(w.avail, amount)
wallet_save(w)
-- engine.replay.outbox_entry writes the same text
redis.call('HSET', K.outbox, id, '{"client_id":"' .. c .. '","to_slot":"' .. to .. '","amount_pusd":"'
  .. bstr(amount) .. '","allow_pusd":"' .. bstr(allow) .. '","month":"' .. w.month .. '","ts_ms":'
  .. NOW_S .. '}')
redis.call('ZADD', K.transfers, NOW, 'out:' .. id)
redis.call('ZREMRANGEBYSCORE', K.transfers, '-inf', NOW - 2592000000)
local ev = event({type = 'transfer_sent', transfer_id = id, client_id = c, to_slot = to,
  amount_pusd = bstr(amount), allow_pusd = bstr(allow), month = w.month, wallet = wallet_obj(w)})
return {1, 1, ev}
