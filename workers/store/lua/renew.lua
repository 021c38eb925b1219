-- Extend a run's lease, only while it is still that run's.
-- KEYS: lease, job. ARGV: token, lease_ttl_s.
-- Returns 1 when renewed, 0 when the lease is another run's, or the job is no longer this run's.
-- A lease that is gone while the job still names this run (its lease lapsed while Redis was away,
-- e.g. restarted from its append-only file) is taken back: the run was fine, only Redis was not.
local ttl_ms = math.floor(tonumber(ARGV[2]) * 1000)
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
if not held and redis.call('HGET', KEYS[2], 'status') == 'running'
    and redis.call('HGET', KEYS[2], 'run_token') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl_ms)
  return 1
end
return 0
