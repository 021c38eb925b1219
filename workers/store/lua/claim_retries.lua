-- Claim the webhook retries that are due, a batch at a time: each one's due time moves to the end of
-- the claim, so no other webhook worker sends it meanwhile, and one whose message could not be sent
-- comes back then.
-- KEYS: retries. ARGV: now, claimed until, batch size. Returns the claimed delivery ids.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
