-- Creates a session: KEYS = record, tokens, tombstone; ARGV = version, meta, tokens,
-- TTL in ms. Returns 'deleted', 'exists' or 'ok'.
if redis.call('EXISTS', KEYS[3]) == 1 then return 'deleted' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'meta', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 'ok'
