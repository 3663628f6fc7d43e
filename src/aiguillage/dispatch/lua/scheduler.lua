-- The shared scheduler's state changes, each one atomic (docs/dispatch.md, "Redis engine").
-- ARGV[1] operation, ARGV[2] key prefix, ARGV[3] calling replica, ARGV[4] lease TTL (ms).
-- Every reply is {status, a, b, in-flight counts (flat), grants for the caller (flat), version,
-- circuits not closed (flat: backend, ms left open, 0 when half-open)}.
local op, P, replica, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local SEP = '\t'
local SNAPSHOT = 2000 -- tickets looked at per pump

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(text, sep)
  local parts = {}
  for part in string.gmatch(text, '([^' .. sep .. ']+)') do parts[#parts + 1] = part end
  return parts
end

local function inflight(backend)
  return tonumber(redis.call('HGET', P .. 'in', backend) or '0')
end

local function add_inflight(backend, delta)
  local n = redis.call('HINCRBY', P .. 'in', backend, delta)
  if n < 0 then redis.call('HSET', P .. 'in', backend, 0) end
end

local function prefs_of(text) -- "backend\tlimit\town\n..." in the replica's order of preference
  local prefs = {}
  for line in string.gmatch(text, '([^\n]+)') do
    local f = split(line, SEP)
    prefs[#prefs + 1] = {f[1], tonumber(f[2]), f[3] == '1'}
  end
  return prefs
end

-- Circuits: 'fails' counts each backend's failures in a row (any replica's; a success resets
-- it); at the threshold 'circ' maps the backend to the end of its open time. Past it it is
-- half-open: one trial lease at a time, whichever replica asks ('trial:<backend>' holds it,
-- expiring with the lease); the trial's success closes the circuit for every replica, its
-- failure opens it again.
local function circuit_admits(backend)
  local until_ms = redis.call('HGET', P .. 'circ', backend)
  if not until_ms then return true end
  return tonumber(until_ms) <= now_ms() and redis.call('EXISTS', P .. 'trial:' .. backend) == 0
end

local function open_circuit(backend, open_ms)
  redis.call('HSET', P .. 'circ', backend, now_ms() + open_ms)
  redis.call('DEL', P .. 'trial:' .. backend)
end

local function new_lease(backend, owner)
  add_inflight(backend, 1)
  local member = redis.call('INCR', P .. 'lseq') .. '.' .. now_ms() .. SEP .. backend .. SEP .. owner
  local trial = redis.call('HEXISTS', P .. 'circ', backend) == 1 -- admitted while half-open
  if trial then member = member .. SEP .. 'trial' end
  redis.call('ZADD', P .. 'leases', now_ms() + ttl, member)
  if trial then redis.call('SET', P .. 'trial:' .. backend, member, 'PX', ttl) end
  return member
end

local function first_with_room(prefs, only_own)
  for _, pref in ipairs(prefs) do
    if (pref[3] or not only_own) and inflight(pref[1]) < pref[2] and circuit_admits(pref[1]) then
      return pref[1]
    end
  end
  return nil
end

-- the queue: levels by priority; per level a ring of organisations served in turn
local function level(model, priority) return model .. SEP .. priority end
local function fifo_key(model, priority, org) return P .. 'f:' .. level(model, priority) .. SEP .. org end

local function push(id, model, priority, org, seq)
  redis.call('ZADD', P .. 'lv:' .. model, priority, priority)
  local fifo = fifo_key(model, priority, org)
  if redis.call('ZCARD', fifo) == 0 then redis.call('RPUSH', P .. 'ring:' .. level(model, priority), org) end
  redis.call('ZADD', fifo, seq, id)
end

local function index_of(list, value)
  for i, v in ipairs(list) do if v == value then return i - 1 end end
  return nil
end

local function remove(id, model, priority, org)
  local fifo = fifo_key(model, priority, org)
  if redis.call('ZREM', fifo, id) == 0 then return false end
  if redis.call('ZCARD', fifo) == 0 then
    local ring_key, cursor_key = P .. 'ring:' .. level(model, priority), P .. 'cur:' .. level(model, priority)
    local ring = redis.call('LRANGE', ring_key, 0, -1)
    local index = index_of(ring, org)
    redis.call('LREM', ring_key, 1, org)
    local cursor = tonumber(redis.call('GET', cursor_key) or '0')
    if index < cursor then cursor = cursor - 1 end
    if cursor >= #ring - 1 then cursor = 0 end
    if #ring == 1 then
      redis.call('ZREM', P .. 'lv:' .. model, priority)
      redis.call('DEL', ring_key, cursor_key)
    else
      redis.call('SET', cursor_key, cursor)
    end
  end
  return true
end

local function served(model, priority, org)
  if redis.call('EXISTS', fifo_key(model, priority, org)) == 1 then
    local ring = redis.call('LRANGE', P .. 'ring:' .. level(model, priority), 0, -1)
    redis.call('SET', P .. 'cur:' .. level(model, priority), (index_of(ring, org) + 1) % #ring)
  end
end

local function in_order(model) -- ticket ids in serving order: priority, then organisations in turn, then seq
  local ids = {}
  for _, priority in ipairs(redis.call('ZREVRANGE', P .. 'lv:' .. model, 0, -1)) do
    local ring = redis.call('LRANGE', P .. 'ring:' .. level(model, priority), 0, -1)
    local cursor = tonumber(redis.call('GET', P .. 'cur:' .. level(model, priority)) or '0')
    local fifos, deepest = {}, 0
    for i = 0, #ring - 1 do
      local org = ring[((cursor + i) % #ring) + 1]
      local fifo = redis.call('ZRANGE', fifo_key(model, priority, org), 0, SNAPSHOT)
      fifos[#fifos + 1] = fifo
      if #fifo > deepest then deepest = #fifo end
    end
    for depth = 1, deepest do
      for _, fifo in ipairs(fifos) do
        if fifo[depth] then
          ids[#ids + 1] = fifo[depth]
          if #ids >= SNAPSHOT then return ids end
        end
      end
    end
  end
  return ids
end

local function forget_waiting(model, key)
  if redis.call('HINCRBY', P .. 'wk:' .. model, key, -1) <= 0 then redis.call('HDEL', P .. 'wk:' .. model, key) end
end

local grants = {} -- the caller's own grants; other replicas' go out on their channels

local function hand_over(id, t, backend, model)
  local member = new_lease(backend, t.replica)
  remove(id, model, t.priority, t.org)
  served(model, t.priority, t.org)
  forget_waiting(model, t.key)
  redis.call('HSET', P .. 't:' .. id, 'g', member)
  redis.call('EXPIRE', P .. 't:' .. id, 120)
  if t.replica == replica then
    grants[#grants + 1] = id
    grants[#grants + 1] = member
  else
    redis.call('PUBLISH', P .. 'g:' .. t.replica, id .. SEP .. member)
  end
end

local function pump(model)
  local maxima = redis.call('HGETALL', P .. 'mb:' .. model)
  local function has_room()
    for i = 1, #maxima, 2 do
      if inflight(maxima[i]) < tonumber(maxima[i + 1]) then return true end
    end
    return false
  end
  if not has_room() then return end
  local ids, loaded = in_order(model), {}
  local function load(id) -- tickets are read only as far as the pump gets
    if loaded[id] == nil then
      local f = redis.call('HMGET', P .. 't:' .. id, 'p', 'o', 'r', 'k', 'prefs', 'g')
      loaded[id] = (f[1] and not f[6])
        and {id = id, priority = f[1], org = f[2], replica = f[3], key = f[4], prefs = prefs_of(f[5])}
        or false
    end
    return loaded[id]
  end
  local granted = {}
  if redis.call('SISMEMBER', P .. 'owned', model) == 1 then
    for _, id in ipairs(ids) do -- coupe-file: an organisation goes first on what it hosts
      if not has_room() then return end
      local t = load(id)
      local backend = t and first_with_room(t.prefs, true)
      if backend then
        hand_over(id, t, backend, model)
        granted[id] = true
      end
    end
  end
  for _, id in ipairs(ids) do
    if not granted[id] then
      if not has_room() then return end
      local t = load(id)
      local backend = t and first_with_room(t.prefs, false)
      if backend then hand_over(id, t, backend, model) end
    end
  end
end

local function pump_backend(backend)
  for _, model in ipairs(redis.call('SMEMBERS', P .. 'bm:' .. backend)) do pump(model) end
end

local function end_lease(member)
  if redis.call('ZREM', P .. 'leases', member) == 1 then
    local backend = split(member, SEP)[2]
    add_inflight(backend, -1)
    return backend
  end
  return nil
end

local function reply(status, a, b) -- the version orders replies that arrive out of order
  local version = redis.call('INCR', P .. 'v')
  local circuits, now = {}, now_ms() -- circuits not closed: milliseconds left open (0: half-open)
  local open = redis.call('HGETALL', P .. 'circ')
  for i = 1, #open, 2 do
    circuits[#circuits + 1] = open[i]
    circuits[#circuits + 1] = math.max(0, tonumber(open[i + 1]) - now)
  end
  return {status, a or '', b or '', redis.call('HGETALL', P .. 'in'), grants, version, circuits}
end

if op == 'acquire' then
  -- ARGV: 5 model, 6 priority, 7 org, 8 key, 9 threshold, 10 seq (0: new), 11 prefs
  if redis.call('EXISTS', P .. 'reg') == 0 then return reply('unregistered') end -- lost its data
  if redis.call('EXISTS', P .. 'recovering') == 1 then return reply('recovering') end
  local model, priority, org, key = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local seq = tonumber(ARGV[10])
  if seq == 0 then seq = redis.call('INCR', P .. 'seq') end
  local prefs = prefs_of(ARGV[11])
  if redis.call('ZCARD', P .. 'lv:' .. model) == 0 then -- nobody waits: place now or queue
    local backend = first_with_room(prefs, false)
    if backend then return reply('granted', seq, new_lease(backend, replica)) end
  end
  if tonumber(redis.call('HGET', P .. 'wk:' .. model, key) or '0') >= tonumber(ARGV[9]) then
    return reply('full', seq)
  end
  local id = redis.call('INCR', P .. 'tid') .. '.' .. now_ms() -- unique across restarts
  redis.call('HSET', P .. 't:' .. id, 'm', model, 'p', priority, 'o', org, 'r', replica, 'k', key, 'prefs', ARGV[11])
  redis.call('HINCRBY', P .. 'wk:' .. model, key, 1)
  push(id, model, priority, org, seq)
  pump(model)
  return reply('queued', seq, id)
elseif op == 'release' then
  -- ARGV[5] lease, ARGV[6] how it went ('ok', 'failed' or '-': unknown), ARGV[7] failures in a
  -- row that open the backend's circuit, ARGV[8] its open time (ms)
  local member, outcome = ARGV[5], ARGV[6]
  local name = split(member, SEP)[2]
  local was_trial = redis.call('GET', P .. 'trial:' .. name) == member
  local backend = end_lease(member)
  if outcome == 'ok' then -- as in one process: a success closes the circuit
    redis.call('HDEL', P .. 'circ', name)
    redis.call('HDEL', P .. 'fails', name)
    redis.call('DEL', P .. 'trial:' .. name)
    backend = name
  elseif outcome == 'failed' then -- counted whichever replica saw it; a failed trial reopens
    if redis.call('HINCRBY', P .. 'fails', name, 1) >= tonumber(ARGV[7]) or was_trial then
      open_circuit(name, tonumber(ARGV[8]))
      redis.call('HDEL', P .. 'fails', name)
    end
  elseif was_trial then -- the trial ended without a verdict: another may try
    redis.call('DEL', P .. 'trial:' .. name)
    backend = name
  end
  if backend then pump_backend(backend) end
  return reply('released')
elseif op == 'cancel' then -- ARGV[5] ticket id, ARGV[6] '1' to take it out of the queue
  local id = ARGV[5]
  local f = redis.call('HMGET', P .. 't:' .. id, 'm', 'p', 'o', 'k', 'g')
  if not f[1] then return reply('missing') end
  if f[5] then return reply('granted', id, f[5]) end
  if ARGV[6] == '1' then
    remove(id, f[1], f[2], f[3])
    forget_waiting(f[1], f[4])
    redis.call('DEL', P .. 't:' .. id)
    return reply('removed')
  end
  return reply('waiting')
elseif op == 'refresh' then -- ARGV[5..]: pairs (ticket id, prefs) of the caller's waiting tickets, then pump
  local models = {}
  for i = 5, #ARGV, 2 do
    local key = P .. 't:' .. ARGV[i]
    if redis.call('HEXISTS', key, 'g') == 0 and redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'prefs', ARGV[i + 1])
      models[redis.call('HGET', key, 'm')] = true
    end
  end
  for model in pairs(models) do pump(model) end
  return reply('refreshed')
elseif op == 'renew' then -- ARGV[5..]: the caller's live leases; ones Redis lost are put back
  local deadline = now_ms() + ttl
  for i = 5, #ARGV do
    local name = split(ARGV[i], SEP)[2]
    if not redis.call('ZSCORE', P .. 'leases', ARGV[i]) then add_inflight(name, 1) end
    redis.call('ZADD', P .. 'leases', deadline, ARGV[i])
    if redis.call('GET', P .. 'trial:' .. name) == ARGV[i] then redis.call('PEXPIRE', P .. 'trial:' .. name, ttl) end
  end
  return reply('renewed', redis.call('EXISTS', P .. 'reg'))
elseif op == 'reap' then -- leases whose replica stopped renewing them; circuits turned half-open
  local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now_ms(), 'LIMIT', 0, 1000)
  local touched = {}
  for _, member in ipairs(expired) do
    local backend = end_lease(member)
    if backend then touched[backend] = true end
  end
  local circuits = redis.call('HGETALL', P .. 'circ') -- half-open ones: time for a trial
  for i = 1, #circuits, 2 do
    if circuit_admits(circuits[i]) then touched[circuits[i]] = true end
  end
  for backend in pairs(touched) do pump_backend(backend) end
  return reply('reaped', #expired)
elseif op == 'waiting' then -- ARGV[5..]: models; for each, the tickets waiting at every replica
  local counts = {}
  for i = 5, #ARGV do
    local waiting = 0
    for _, n in ipairs(redis.call('HVALS', P .. 'wk:' .. ARGV[i])) do waiting = waiting + tonumber(n) end
    counts[#counts + 1] = waiting
  end
  return reply('waiting', table.concat(counts, SEP))
elseif op == 'register' then
  -- ARGV[5] recovery window (ms, 0: none), then model, whether an organisation hosts one of
  -- its backends (1/0, for the owners' pass), count, count pairs (backend, max_concurrency).
  -- After a restart that lost the data, nothing is placed until every replica's renewal had
  -- time to put its live leases back: caps keep counting requests already in progress.
  if tonumber(ARGV[5]) > 0 and redis.call('EXISTS', P .. 'reg') == 0 then
    redis.call('SET', P .. 'recovering', 1, 'PX', ARGV[5])
  end
  local i = 6
  while i <= #ARGV do
    local model, owned, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    redis.call(owned == '1' and 'SADD' or 'SREM', P .. 'owned', model)
    redis.call('DEL', P .. 'mb:' .. model)
    for j = 0, count - 1 do
      local backend = ARGV[i + 3 + 2 * j]
      redis.call('HSET', P .. 'mb:' .. model, backend, ARGV[i + 4 + 2 * j])
      redis.call('SADD', P .. 'bm:' .. backend, model)
    end
    i = i + 3 + 2 * count
  end
  redis.call('SET', P .. 'reg', 1)
  return reply('registered')
end
return redis.error_reply('unknown operation ' .. op)
