-- Cancel a job: a queued one ends canceled at once; a running one is flagged and stops at its next
-- step. With the deadline-only flag, only a queued job whose deadline has passed is canceled.
-- KEYS: job, queue, images, events, deadlines.
-- ARGV: id, now, error json, reason, deadline-only flag ('1' or '0'), fallback ttl_s, events_maxlen.
-- Returns 'dequeued', 'cancel_requested', 'missing' or the status the job is in.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if ARGV[5] == '1' then
  local deadline = redis.call('HGET', KEYS[1], 'deadline_at')
  -- Not due yet on this clock: keep the entry for a later sweep.
  if status == 'queued' and deadline and deadline ~= '' and tonumber(deadline) > tonumber(ARGV[2]) then
    return status
  end
  redis.call('ZREM', KEYS[5], ARGV[1])
  if status ~= 'queued' or not deadline or deadline == '' then return status end
end
if status == 'queued' then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s') or ARGV[6])
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2], 'error', ARGV[3],
    'cancel_reason', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'type', 'canceled', 'data', ARGV[3])
  redis.call('EXPIRE', KEYS[4], ttl)
  -- Not 'canceled': that is what an already canceled job answers, and only this call may notify.
  return 'dequeued'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'cancel_reason', ARGV[4])
  return 'cancel_requested'
end
return status
