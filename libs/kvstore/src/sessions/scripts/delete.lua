-- Deletes a session: KEYS = tombstone, then the doomed keys (the record first); ARGV =
-- TTL in ms. Returns the metadata of the record deleted, false when there was none. The
-- tombstone holds its expiry (ms of the server's clock) and no Redis TTL, so no
-- maxmemory policy evicts it; the janitor deletes it once expired (sweep.lua).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local meta = redis.call('HGET', KEYS[2], 'meta')
redis.call('SET', KEYS[1], tostring(now + tonumber(ARGV[1])))
for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
return meta
