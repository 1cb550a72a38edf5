-- Takes an entry: KEYS = queue; ARGV = group, trainer, lease in ms. A lapsed entry
-- first, else a new one. Returns {entry, job, deliveries}, or false.
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)
local entries = claimed[2]
if #entries == 0 then
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if not read then return false end
  entries = read[1][2]
end
local entry = entries[1]
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
return {entry[1], entry[2][2], pending[1][4]}
