-- Reads a session in one step: KEYS = record, tokens. Returns {{version, meta}, tokens},
-- each nil when absent. A script rather than a MULTI of reads: a cluster client follows
-- a script's MOVED and ASK (refreshing its slot map), where a transaction that meets
-- them only aborts.
return {redis.call('HMGET', KEYS[1], 'v', 'meta'), redis.call('GET', KEYS[2])}
