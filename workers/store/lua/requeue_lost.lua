-- A running job whose lease lapsed (its worker died or was cut off): queue it again, or fail it once
-- it has had its attempts.
-- KEYS: job, lease, queue, running, events, images.
-- ARGV: id, queue seq, now, max_attempts, error json, fallback ttl_s, events_maxlen.
-- A requeued job takes back its place in line (its first queue seq, kept on the job): it waited once
-- already, and a crash must not send it behind everything submitted since.
-- Returns 0 (nothing to do), 1 (requeued: the caller sends a new message) or 2 (failed).
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then redis.call('SREM', KEYS[4], ARGV[1]) return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SREM', KEYS[4], ARGV[1])
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s') or ARGV[6])
if attempts >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'run_token', '', 'finished_at', ARGV[3], 'error', ARGV[5])
  redis.call('DEL', KEYS[6])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'type', 'failed', 'data', ARGV[5])
  return 2
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'run_token', '', 'progress', '{}')
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'seq') or ARGV[2], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'type', 'queued', 'data',
  cjson.encode({reason = 'worker_lost', attempts = attempts}))
return 1
