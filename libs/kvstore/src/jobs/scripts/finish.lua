-- Acknowledges and removes a finished queue entry in one step: KEYS = queue; ARGV =
-- group, entry. A script rather than a MULTI, whose redirections a cluster client does
-- not follow (see sessions/scripts/read.lua).
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
