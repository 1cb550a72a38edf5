-- Records a model version once: KEYS = names, versions; ARGV = name, version, body.
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
