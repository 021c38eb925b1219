-- Record a run's progress, only while the job is still that run's.
-- KEYS: job, events. ARGV: token, progress json (kept on the job), events_maxlen, event json (the same
-- progress, with its preview when it has one). Returns 1 when written.
if redis.call('HGET', KEYS[1], 'run_token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'progress', 'data', ARGV[4])
return 1
