-- Retires a model version: KEYS = versions, pins, names, retired; ARGV = name, version.
-- Returns {1, body} when retired (the record gone, `name/version` queued for the removal
-- of its files, the name unlisted with its last version), {0, ''} when there is no such
-- version, {2, ''} when it is pinned.
local body = redis.call('HGET', KEYS[1], ARGV[2])
if not body then return {0, ''} end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return {2, ''} end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1] .. '/' .. ARGV[2])
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
return {1, body}
