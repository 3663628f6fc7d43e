-- The shared scheduler's state changes, each run atomically by Redis.
--
-- Common part, prepended to every script (see redis_scheduler.py). ARGV[1] is the key
-- prefix; every key carries it in braces, so all of them hash to one Cluster slot.
--
--   {p}:inflight        HASH  backend -> requests holding a lease on it (all replicas)
--   {p}:leases          ZSET  lease id (the ticket's seq) -> deadline, ms (Redis TIME)
--   {p}:lease           HASH  lease id -> backend
--   {p}:bm:<backend>    SET   models served by the backend (whose queues a release pumps)
--   {p}:q:<model>       ZSET  waiting tickets: score (MAX - priority) * 2^32 + fair rank
--   {p}:tk              HASH  seq -> ticket (replica, key, level, rank, preferences)
--   {p}:w:<model>       HASH  key id -> waiting tickets (queue thresholds)
--   {p}:vt:<model>      HASH  priority -> rank of the last ticket served (virtual time)
--   {p}:of:<model>:<l>  HASH  organisation -> next rank (start-time fair queueing)
--   {p}:seq             STRING arrival counter
--   {p}:grant:<replica> channel: "seq backend" for each ticket granted from the queue

local p = ARGV[1]
local RANK_SPAN = 4294967296 -- 2^32

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The first preferred backend with room under the ticket's own limit there.
local function place(preferences)
  for _, pref in ipairs(preferences) do
    local held = tonumber(redis.call('HGET', p .. ':inflight', pref[1]) or '0')
    if held < pref[2] then
      return pref[1]
    end
  end
  return nil
end

local function grant(seq, backend, ttl_ms)
  redis.call('HINCRBY', p .. ':inflight', backend, 1)
  redis.call('ZADD', p .. ':leases', now_ms() + ttl_ms, seq)
  redis.call('HSET', p .. ':lease', seq, backend)
end

-- Remove a waiting ticket from its queue and its counters; returns the ticket or nil.
local function dequeue(model, seq)
  if redis.call('ZREM', p .. ':q:' .. model, seq) == 0 then
    return nil
  end
  local ticket = cjson.decode(redis.call('HGET', p .. ':tk', seq))
  redis.call('HDEL', p .. ':tk', seq)
  redis.call('HINCRBY', p .. ':w:' .. model, ticket.key, -1)
  return ticket
end

-- Give free capacity to waiting tickets of a model, in queue order, and tell their replicas.
local function pump(model, ttl_ms, scan)
  local queue = p .. ':q:' .. model
  local granted = {}
  for _, seq in ipairs(redis.call('ZRANGE', queue, 0, scan - 1)) do
    local ticket = cjson.decode(redis.call('HGET', p .. ':tk', seq))
    local backend = place(ticket.prefs)
    if backend then
      dequeue(model, seq)
      redis.call('HSET', p .. ':vt:' .. model, ticket.level, ticket.rank)
      grant(seq, backend, ttl_ms)
      redis.call('PUBLISH', p .. ':grant:' .. ticket.replica, seq .. ' ' .. backend)
      granted[seq] = backend
    end
  end
  return granted
end

-- End a lease if it still exists; pump the queues of the backend's models.
local function finish(seq, ttl_ms, scan)
  if redis.call('ZREM', p .. ':leases', seq) == 0 then
    return nil
  end
  local backend = redis.call('HGET', p .. ':lease', seq)
  redis.call('HDEL', p .. ':lease', seq)
  redis.call('HINCRBY', p .. ':inflight', backend, -1)
  for _, model in ipairs(redis.call('SMEMBERS', p .. ':bm:' .. backend)) do
    pump(model, ttl_ms, scan)
  end
  return backend
end

-- The in-flight counts of some backends, for the replica's strategies.
local function counts(first)
  local names = {}
  for i = first, #ARGV do
    names[#names + 1] = ARGV[i]
  end
  if #names == 0 then
    return {}
  end
  return redis.call('HMGET', p .. ':inflight', unpack(names))
end
