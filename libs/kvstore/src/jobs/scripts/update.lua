-- Writes a job if it is at the revision read: KEYS = job, changes, and for a write that
-- ends the job its owner's open jobs (a set); ARGV = revision, body, id. Returns the new
-- revision, or false. The change is appended to the changes stream (capped) that
-- watchers block on; an ended job leaves its owner's open jobs.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[1] then return false end
local next = tonumber(rev) + 1
redis.call('HSET', KEYS[1], 'rev', next, 'body', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'job', ARGV[3])
if KEYS[3] then redis.call('SREM', KEYS[3], ARGV[3]) end
return next
