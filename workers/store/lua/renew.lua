-- Extend a run's lease, only while it is still that run's.
-- KEYS: lease. ARGV: token, lease_ttl_s. Returns 1 when renewed, 0 when the lease is another run's or gone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[2]) * 1000))
end
return 0
