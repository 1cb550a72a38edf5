-- Hands an entry back at once if `trainer` holds it (a trainer stopping gracefully):
-- KEYS = queue; ARGV = group, trainer, entry, deliveries. Its delivery time goes back to
-- the epoch, so the next claim takes it without waiting for a lease, and its delivery
-- count back by one, so that claim does not count this stop as a crash. Returns 1 when
-- handed back.
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #held == 0 then return 0 end
local count = math.max(tonumber(ARGV[4]) - 1, 0)
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'TIME', 1, 'RETRYCOUNT', count, 'JUSTID')
return 1
