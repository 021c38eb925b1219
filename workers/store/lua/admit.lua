-- Admit one submission, atomically: the global queue cap, the key's active jobs, its token bucket.
-- KEYS: bucket hash, active-jobs set, queue zset. ARGV: job id, now (s), rate (tokens/s), burst,
-- max active, max queue depth, job key prefix, ttl of the set (s).
-- Returns {0, tokens_left} when admitted (the job id is in the active set), or
-- {1, retry_after_ms} rate, {2, active} active jobs, {3, depth} queue full.
local bucket, active, queue = KEYS[1], KEYS[2], KEYS[3]
local job_id, now = ARGV[1], tonumber(ARGV[2])
local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_active, max_queue = tonumber(ARGV[5]), tonumber(ARGV[6])
local prefix, ttl = ARGV[7], tonumber(ARGV[8])

local depth = redis.call('ZCARD', queue)
if depth >= max_queue then
  return {3, depth}
end

-- Jobs that ended or expired leave the count here, lazily: no other script has to know about it.
local members = redis.call('SMEMBERS', active)
local count = 0
for _, id in ipairs(members) do
  local status = redis.call('HGET', prefix .. id, 'status')
  if status == 'queued' or status == 'running' then
    count = count + 1
  else
    redis.call('SREM', active, id)
  end
end
if count >= max_active then
  return {2, count}
end

local state = redis.call('HMGET', bucket, 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then
  return {1, math.ceil((1 - tokens) / rate * 1000)}
end
tokens = tokens - 1
redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', bucket, math.ceil(burst / rate) + 60)
redis.call('SADD', active, job_id)
redis.call('EXPIRE', active, ttl)
return {0, math.floor(tokens)}
