-- KEYS: lock, progress, done, stream
-- ARGV: consumer, lease_ms, ttl_ms, group, message_id, rank, state, [field, value]...
-- A job Redis knew nothing of (KEEP said 'gone'): its lock and progress made again, unless
-- something has claimed it since.
if redis.call('EXISTS', KEYS[3]) == 1 then return {'done', ''} end
local holder = redis.call('GET', KEYS[1]) or redis.call('HGET', KEYS[2], 'owner')
if holder and holder ~= ARGV[1] then return {'lost', holder} end
local entry = redis.pcall('XPENDING', KEYS[4], ARGV[4], ARGV[5], ARGV[5], 1)
if type(entry) == 'table' and entry[1] and entry[1][2] ~= ARGV[1] then
  return {'lost', entry[1][2]}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'message_id', ARGV[5], 'rank', ARGV[6],
           'state', ARGV[7])
redis.call('HSETNX', KEYS[2], 'deliveries', 1)
if #ARGV > 7 then redis.call('HSET', KEYS[2], unpack(ARGV, 8)) end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.pcall('XCLAIM', KEYS[4], ARGV[4], ARGV[1], 0, ARGV[5], 'JUSTID')
return {'ok', ''}
