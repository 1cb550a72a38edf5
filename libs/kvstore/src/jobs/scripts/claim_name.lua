-- Claims a model name for an owner unless it has one: KEYS = the owners hash, the set of
-- names; ARGV = name, owner. Returns the name's owner now; false for a name published
-- before names had owners (in the set, not in the hash), which stays unowned.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
