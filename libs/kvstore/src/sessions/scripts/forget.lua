-- Drops keys the janitor found gone from its index: KEYS = the index; ARGV = the time
-- of the look (ms), then the keys. A key indexed again since (a lease taken anew: its
-- score is in the future) stays.
local looked = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= looked then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 1
