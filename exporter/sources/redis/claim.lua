-- KEYS: lock, progress, done, stream
-- ARGV: consumer, lease_ms, message_id, ttl_ms, running (1|0), max_deliveries, group
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'done', '', redis.call('HGET', KEYS[3], 'message_id') or ''}
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return {'busy', holder, redis.call('HGET', KEYS[2], 'message_id') or ''}
end
if ARGV[5] == '1' then
  return {'running', ARGV[1], redis.call('HGET', KEYS[2], 'message_id') or ''}
end
-- A delivery: the job's first claim, or a takeover from another consumer. A consumer that
-- claims its own job again (restarted: a deploy, a crash, a Redis outage) delivers nothing.
local owner = redis.call('HGET', KEYS[2], 'owner')
local deliveries = tonumber(redis.call('HGET', KEYS[2], 'deliveries') or '0')
if owner ~= ARGV[1] or deliveries == 0 then deliveries = deliveries + 1 end
if deliveries > tonumber(ARGV[6]) then
  return {'exhausted', owner or '', '', 'deliveries', tostring(deliveries)}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'message_id', ARGV[3], 'deliveries', deliveries)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
-- The message's idle time starts with the lease, so neither outlives the other.
redis.pcall('XCLAIM', KEYS[4], ARGV[7], ARGV[1], 0, ARGV[3], 'JUSTID')
local reply = {'mine', holder or '', ARGV[3]}
for _, value in ipairs(redis.call('HGETALL', KEYS[2])) do reply[#reply + 1] = value end
-- A takeover: the consumer it was taken from (not stored).
if owner and owner ~= ARGV[1] then
  reply[#reply + 1] = 'taken_from'
  reply[#reply + 1] = owner
end
return reply
