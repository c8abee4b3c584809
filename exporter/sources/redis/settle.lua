-- KEYS: lock, progress, done, stream, results
-- ARGV: consumer, group, message_id, ttl_ms, maxlen, outcome, finished_at, [field, value]...
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.pcall('XACK', KEYS[4], ARGV[2], ARGV[3])
  redis.pcall('XDEL', KEYS[4], ARGV[3])
  if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return {'duplicate', redis.call('HGET', KEYS[3], 'result_id') or ''}
end
local id = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 8))
redis.call('HSET', KEYS[3], 'outcome', ARGV[6], 'message_id', ARGV[3], 'consumer', ARGV[1],
           'result_id', id, 'finished_at', ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.pcall('XACK', KEYS[4], ARGV[2], ARGV[3])
redis.pcall('XDEL', KEYS[4], ARGV[3])
redis.call('DEL', KEYS[1], KEYS[2])
return {'published', id}
