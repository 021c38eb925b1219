-- Take a queued job for one run: only a queued job is claimed (a running one whose worker died is
-- requeued by the reaper, which counts attempts), and not past its deadline.
-- KEYS: job, lease, queue, running, events. ARGV: id, token, now, lease_ttl_s, worker, events_maxlen.
-- Returns {outcome, attempt}: outcome is 'claimed', 'missing', 'deadline' or the job's status.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'queued' then return {status, 0} end
local deadline = redis.call('HGET', KEYS[1], 'deadline_at')
if deadline and deadline ~= '' and tonumber(deadline) < tonumber(ARGV[3]) then return {'deadline', 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'run_token', ARGV[2], 'started_at', ARGV[3],
  'worker', ARGV[5], 'attempts', attempts, 'progress', '{}')
redis.call('SET', KEYS[2], ARGV[2], 'PX', math.floor(tonumber(ARGV[4]) * 1000))
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'type', 'started', 'data',
  cjson.encode({attempt = attempts}))
return {'claimed', attempts}
