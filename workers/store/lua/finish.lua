-- End a run's job: only the run that holds it (its token) and only while it is running.
-- KEYS: job, lease, running, images, events, then one key per result image.
-- ARGV: token, status, ttl_s, event data json, events_maxlen, n (result images), their n byte
-- strings, then field/value pairs to set on the job. Returns 1 when written, 0 when another run
-- owns the job.
local owner = redis.call('HGET', KEYS[1], 'run_token')
if owner ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'run_token', '')
for i = 7 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 1, n do redis.call('SET', KEYS[5 + i], ARGV[6 + i], 'EX', ttl) end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[2], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[5], ttl)
return 1
