-- Pins or unpins a recorded model version: KEYS = versions, pins; ARGV = version, 1 to
-- pin or 0 to unpin. Returns 1, or 0 when there is no such version.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('SREM', KEYS[2], ARGV[1])
end
return 1
