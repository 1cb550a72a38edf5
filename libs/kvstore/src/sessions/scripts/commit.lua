-- The compare-and-set write. KEYS = record, tokens, then ARGV[6] blob keys, then the
-- expired blob keys; ARGV = version read, token bytes then, meta, appended token bytes,
-- TTL in ms, blob count, the blobs. Returns the new version; when the stored version or
-- token length differs, {version, meta, tokens} as stored; false without a record or
-- its tokens (a session exists while both do: see create.lua).
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return false end
local tokens = redis.call('GET', KEYS[2])
if not tokens then return false end
if v ~= ARGV[1] or #tokens ~= tonumber(ARGV[2]) then
  return {v, redis.call('HGET', KEYS[1], 'meta'), tokens}
end
local next = tostring(tonumber(v) + 1)
redis.call('APPEND', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'v', next, 'meta', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local n = tonumber(ARGV[6])
for i = 1, n do redis.call('SET', KEYS[2 + i], ARGV[6 + i], 'PX', ARGV[5]) end
for i = 3 + n, #KEYS do redis.call('UNLINK', KEYS[i]) end
return next
