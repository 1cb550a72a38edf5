-- Creates a session: KEYS = record, tokens, tombstone; ARGV = version, meta, tokens,
-- TTL in ms. Returns 'deleted', 'exists' or 'ok'. A session exists while its record and
-- its tokens both do (every session has a prompt): a record whose tokens were evicted is
-- replaced. A tombstone refuses until the time it holds (one written by an earlier
-- version holds '1' and a Redis TTL instead).
local dead = redis.call('GET', KEYS[3])
if dead then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(dead) > now or redis.call('PTTL', KEYS[3]) > 0 then return 'deleted' end
  redis.call('DEL', KEYS[3])
end
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 2 then return 'exists' end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'meta', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 'ok'
