-- A claimed retry whose message was sent: drop it from the waiting retries, unless an attempt has
-- scheduled the delivery again since (its due time is then no longer the claim's end).
-- KEYS: retries. ARGV: delivery id, claimed until.
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and tonumber(due) == tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
