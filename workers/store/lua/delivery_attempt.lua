-- Record a webhook delivery's attempt count, and its summary on the job if the job still exists
-- (writing to an expired job would leave a partial hash without a TTL). The retry that follows a
-- failed attempt is scheduled in the same step, so no delivery shows `retrying` with none waiting; an
-- attempt with no retry after it takes away any still waiting (a second copy of its message's).
-- A final attempt (delivered, or out of attempts) marks the delivery done: a second copy of its message
-- (handed out again after a reconnection) then sends nothing.
-- KEYS: delivery, job, retries. ARGV: attempts, delivery summary json, delivery id, retry due ('' none),
-- final ('1' or '0').
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 0
end
redis.call('HSET', KEYS[1], 'attempts', ARGV[1])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'done', '1') end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'webhook', ARGV[2]) end
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return 1
