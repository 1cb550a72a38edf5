-- Writes a job if it is at the revision read: KEYS = job; ARGV = revision, body.
-- Returns the new revision, or false.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[1] then return false end
local next = tonumber(rev) + 1
redis.call('HSET', KEYS[1], 'rev', next, 'body', ARGV[2])
return next
