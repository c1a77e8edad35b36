-- Step 3 of a transfer (see transfer_out.lua): the other slot has credited it, so its outbox
-- entry goes. ARGV: tag, slot, now, transfer_id. KEYS: seq, outbox. Returns {1, removed}.
return {1, redis.call('HDEL', K.outbox, ARGV[4])}
