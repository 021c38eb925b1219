-- Record a webhook delivery's attempt count, and its summary on the job if the job still exists
-- (writing to an expired job would leave a partial hash without a TTL).
-- KEYS: delivery, job. ARGV: attempts, delivery summary json.
redis.call('HSET', KEYS[1], 'attempts', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'webhook', ARGV[2]) end
return 1
