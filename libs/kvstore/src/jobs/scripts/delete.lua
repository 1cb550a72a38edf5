-- Deletes a job's record if it is at the revision read: KEYS = job, index; ARGV = id,
-- revision. Returns 1 when deleted, 0 when another writer moved it or it is gone.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
