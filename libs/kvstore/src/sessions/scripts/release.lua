-- Gives a lease up: KEYS = lease; ARGV = owner.
local held = redis.call('GET', KEYS[1])
if held and (held == ARGV[1] or string.match(held, '^%d+ (.*)$') == ARGV[1]) then
  redis.call('DEL', KEYS[1])
end
return 1
