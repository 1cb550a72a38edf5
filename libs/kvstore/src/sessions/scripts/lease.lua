-- Takes or renews a lease: KEYS = lease; ARGV = owner, TTL in ms. Returns 0 when another
-- owner holds it, 1 when renewed, 2 when taken. The lease holds '{until} {owner}' (until:
-- ms of the server's clock) and no Redis TTL, so no maxmemory policy evicts it: expired,
-- it is anyone's to take, and the janitor deletes it (sweep.lua).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('GET', KEYS[1])
local renewed = false
if held then
  local until_ms, owner = string.match(held, '^(%d+) (.*)$')
  -- A lease written with a Redis TTL (by an earlier version) holds its owner only.
  if not owner then until_ms, owner = now + 1, held end
  if owner ~= ARGV[1] and tonumber(until_ms) > now then return 0 end
  renewed = owner == ARGV[1]
end
redis.call('SET', KEYS[1], (now + tonumber(ARGV[2])) .. ' ' .. ARGV[1])
if renewed then return 1 end
return 2
