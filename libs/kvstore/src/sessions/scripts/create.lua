-- Creates a session: KEYS = record, tokens, tombstone; ARGV = version, meta, tokens,
-- TTL in ms. Returns 'deleted', 'exists' or 'ok'. A session exists while its record and
-- its tokens both do (every session has a prompt): a record whose tokens were evicted is
-- replaced.
if redis.call('EXISTS', KEYS[3]) == 1 then return 'deleted' end
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 2 then return 'exists' end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'meta', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 'ok'
