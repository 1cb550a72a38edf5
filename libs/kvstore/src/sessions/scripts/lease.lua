-- Takes or renews a lease: KEYS = lease; ARGV = owner, TTL in ms. Returns 1 when the
-- owner holds it now.
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
