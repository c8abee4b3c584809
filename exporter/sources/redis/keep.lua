-- KEYS: lock, progress, done, stream
-- ARGV: consumer, lease_ms, ttl_ms, group, message_id, rank, state, [field, value]...
if redis.call('EXISTS', KEYS[3]) == 1 then return {'done', ''} end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {'lost', holder} end
if not holder then
  local owner = redis.call('HGET', KEYS[2], 'owner')
  if not owner then
    -- Nothing says who has the job: another consumer's pending message would; otherwise
    -- Redis has lost what it knew (flushed, restarted empty, a failover that lost writes).
    local entry = redis.pcall('XPENDING', KEYS[4], ARGV[4], ARGV[5], ARGV[5], 1)
    if type(entry) == 'table' and entry[1] and entry[1][2] ~= ARGV[1] then
      return {'lost', entry[1][2]}
    end
    return {'gone', ''}
  end
  if owner ~= ARGV[1] then return {'lost', owner} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[6] ~= '' then
  -- A resumed job passes through earlier states again: the state never goes back.
  if tonumber(ARGV[6]) >= tonumber(redis.call('HGET', KEYS[2], 'rank') or '0') then
    redis.call('HSET', KEYS[2], 'rank', ARGV[6], 'state', ARGV[7])
  end
  if #ARGV > 7 then redis.call('HSET', KEYS[2], unpack(ARGV, 8)) end
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.pcall('XCLAIM', KEYS[4], ARGV[4], ARGV[1], 0, ARGV[5], 'JUSTID')
return {'ok', ''}
