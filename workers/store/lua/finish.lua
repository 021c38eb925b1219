-- End a run's job: only the run that holds it (its token) and only while it is running.
-- KEYS: job, lease, running, result, images, events.
-- ARGV: token, status, ttl_s, event data json, result bytes ('' for none), events_maxlen, then
-- field/value pairs to set on the job. Returns 1 when written, 0 when another run owns the job.
local owner = redis.call('HGET', KEYS[1], 'run_token')
if owner ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'run_token', '')
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'EX', ttl) end
redis.call('DEL', KEYS[2], KEYS[5])
redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*', 'type', ARGV[2], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[6], ttl)
return 1
