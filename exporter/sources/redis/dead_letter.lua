-- KEYS: stream, dead_letter, lock, progress
-- ARGV: group, message_id, consumer, maxlen, [field, value]...
if redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2]) ~= 1 then return false end
redis.pcall('XDEL', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
-- A new message for the job (the producer's retry) counts its deliveries afresh.
if redis.call('HGET', KEYS[4], 'message_id') == ARGV[2] then
  redis.call('HDEL', KEYS[4], 'deliveries')
end
return id
