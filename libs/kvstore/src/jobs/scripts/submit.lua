-- Stores a job and queues it: KEYS = job, index, queue; ARGV = id, body, time in ms.
-- Returns 1, or 0 when the job exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rev', 1, 'body', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return 1
