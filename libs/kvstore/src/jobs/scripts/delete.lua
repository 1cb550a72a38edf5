-- Deletes a job's record if it is at the revision read: KEYS = job, index, changes;
-- ARGV = id, revision. Returns 1 when deleted, 0 when another writer moved it or it is
-- gone. The deletion is appended to the changes stream, as an update is.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'job', ARGV[1])
return 1
