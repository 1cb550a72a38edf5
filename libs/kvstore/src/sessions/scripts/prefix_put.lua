-- Keeps shared prompt blocks' blobs: KEYS = their keys (one prompt family, one slot),
-- ARGV = the TTL in ms, then one blob per key. A key already there holds the same bytes
-- (its address is its content): the write renews its TTL.
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
end
return #KEYS
