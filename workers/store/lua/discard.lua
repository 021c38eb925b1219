-- Delete a job that no run has taken, as if it had never been stored: the gateway's answer for a job
-- whose write did not reach its replicas (DREAMOMNI2_REDIS_MIN_REPLICAS) is then a 503 with nothing
-- behind it. A job some worker claimed meanwhile is left alone: it exists, and is answered as such.
-- KEYS: job, images, events, queue, deadlines, the owner's active jobs, then any other key to delete
-- with it (the Idempotency-Key's record). ARGV: id.
-- Returns 'deleted', 'missing' (nothing was there: the other keys are deleted all the same) or 'taken'.
local status = redis.call('HGET', KEYS[1], 'status')
if status and (status ~= 'queued' or redis.call('HGET', KEYS[1], 'attempts') ~= '0') then
  return 'taken'
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
if status then return 'deleted' end
return 'missing'
