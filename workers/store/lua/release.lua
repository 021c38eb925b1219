-- Give a run's job back at once, when its worker cannot finish it (its GPU failed for good): drop the
-- lease, only while the lease and the job are still that run's. The job stays running with no lease,
-- as a dead worker's does, so the reapers' next pass requeues it (or fails it `worker_lost` once out
-- of attempts) within a reaper interval instead of a lease later; the attempt counts.
-- KEYS: lease, job. ARGV: token.
-- Returns 1 when released, 0 when the lease is gone already or another run's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'run_token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
