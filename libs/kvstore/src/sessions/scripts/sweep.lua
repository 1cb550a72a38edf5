-- The janitor's look at one key it indexed, a tombstone or a lease (each holds its expiry,
-- ms of the server's clock, first): KEYS = the key. Deletes it once expired. Returns the
-- ms it has left, 0 when it is gone.
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
local until_ms = tonumber(string.match(held, '^(%d+)'))
-- Written by an earlier version with a Redis TTL: it expires by itself.
if not until_ms or redis.call('PTTL', KEYS[1]) > 0 then return 0 end
local t = redis.call('TIME')
local left = until_ms - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if left > 0 then return left end
redis.call('DEL', KEYS[1])
return 0
