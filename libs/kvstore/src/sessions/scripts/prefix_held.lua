-- Which shared prompt blocks the store holds: KEYS = their blob keys (one prompt family,
-- one slot). Returns 1 or 0 per key, in order.
local held = {}
for i, key in ipairs(KEYS) do
  held[i] = redis.call('EXISTS', key)
end
return held
