-- Stores a job and queues it: KEYS = job, index, queue, the owner's open jobs (a set);
-- ARGV = id, body, time in ms, owner ('' for none), the owner's limit of open jobs (0:
-- none). Returns {1, open} when queued, {0, 0} when the job exists, {2, open} when the
-- owner has its limit open already. The count and the addition are one step: a burst
-- of submissions is never queued past the limit.
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local open = 0
if ARGV[4] ~= '' then
  open = redis.call('SCARD', KEYS[4])
  local limit = tonumber(ARGV[5])
  if limit > 0 and open >= limit then return {2, open} end
  redis.call('SADD', KEYS[4], ARGV[1])
  open = open + 1
end
redis.call('HSET', KEYS[1], 'rev', 1, 'body', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return {1, open}
