-- Counts a session for an API key: KEYS = the key's sorted set (session -> expiry, ms of
-- the server's clock); ARGV = session, TTL in ms, limit. Returns 1 when counted. The set
-- has no Redis TTL, so no maxmemory policy evicts it (which would reset the count): its
-- members expire by their scores (dropped by the key's next claim), and it holds at most
-- the key's limit of them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
-- One written by an earlier version carries a TTL.
redis.call('PERSIST', KEYS[1])
return 1
