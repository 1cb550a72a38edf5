-- Deletes a session: KEYS = tombstone, then the doomed keys (the record first); ARGV =
-- TTL in ms. Returns the metadata of the record deleted, false when there was none.
local meta = redis.call('HGET', KEYS[2], 'meta')
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
return meta
