-- acquire: grant every requested lock to one holder, atomically, or none of them.
--
-- KEYS: per tree {n, q, qx}; then per grant {holder hash, a full block per chain node}.
-- ARGV: handle, ttl ms, register (1: join the wait queue when refused), queue entry ttl ms,
--       tree count, grant count, nonce of this call, then per grant: mode, depth, tree
--       index, canonical path.
-- Reply: {1, {token per grant}} when granted;
--        {0, blocker member, blocker remaining ms, 'held' | 'queued', holding} when refused,
--        holding 1 if the holder already holds a live grant in a tree of the request (it
--        then skips the queue, so releases wake it wherever it stands in the queue).
--
-- Guarantees: a grant is made only if no live mark of another holder conflicts with it on
-- its chain and, unless the holder already holds a live grant in that tree, no earlier queued
-- request of another holder conflicts with it (first come, first served). Re-acquiring a
-- live grant renews it and keeps its token; a new grant gets a token larger than every
-- token issued before in its tree.

local handle, ttl = ARGV[1], tonumber(ARGV[2])
local register, qttl = ARGV[3] == '1', tonumber(ARGV[4])
local ntrees, ngrants = tonumber(ARGV[5]), tonumber(ARGV[6])
local nonce = ARGV[7]
local grants = read_grants(ngrants, 8, 3 * ntrees + 1, false, true)
local prefix = handle .. '|'
local plen = #prefix

for _, g in ipairs(grants) do g.member = prefix .. g.mode .. '|' .. g.path end

-- first live mark of another holder in `key`, with its expiry
local function foreign(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', NOW)
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', key, start, start + 15, 'WITHSCORES')
    if #batch == 0 then return nil end
    for i = 1, #batch, 2 do
      if string.sub(batch[i], 1, plen) ~= prefix then return batch[i], tonumber(batch[i + 1]) end
    end
    start = start + 16
  end
end

local holding = 0
local function join_queue()
  if not register then return end
  local seqs = {}
  for _, g in ipairs(grants) do
    local q, qx = tree_key(g.tree, 2), tree_key(g.tree, 3)
    local seq = seqs[g.tree]
    if seq == nil then
      if holds_live(g.hkey) then holding = 1 end
      seq = redis.call('ZSCORE', q, g.member)
      if not seq then
        local n = tree_key(g.tree, 1)
        seq = math.max((tonumber(redis.call('GET', n)) or 0) + 1, NOW_US)
        redis.call('SET', n, string.format('%d', seq), 'PX', 604800000)
      end
      seqs[g.tree] = seq
    end
    redis.call('ZADD', q, 'NX', seq, g.member)
    redis.call('ZADD', qx, NOW + qttl, g.member)
    bump(q, qttl)
    bump(qx, qttl)
  end
end

-- 1. live holders. Usually none of the sets that could conflict exists at all: one EXISTS
-- over all of them settles that; otherwise each is swept and searched.
local suspects = {}
for _, g in ipairs(grants) do
  for level = 1, g.depth do
    local first = block_of(g, level)
    local size = level == g.depth and g.lsize or g.isize
    -- a mark that conflicts with itself (a write's) makes its own key a suspect too
    for k = (SELF_CONFLICT[mark_of(g, level)] and first or first + 1), first + size - 1 do
      suspects[#suspects + 1] = KEYS[k]
    end
  end
end
-- (in slices: Lua's unpack() returns at most about 8000 values, LUAI_MAXCSTACK)
local function any_exists(keys)
  for i = 1, #keys, 1000 do
    if redis.call('EXISTS', unpack(keys, i, math.min(i + 999, #keys))) > 0 then return true end
  end
  return false
end
if any_exists(suspects) then
  for _, key in ipairs(suspects) do
    local m, exp = foreign(key)
    if m then
      join_queue()
      return { 0, m, exp - NOW, 'held', holding }
    end
  end
end

-- 2. earlier waiters, in trees where this holder holds nothing yet
local queued = {}  -- tree -> number of queue entries
for _, g in ipairs(grants) do
  local tree = g.tree
  if queued[tree] == nil then
    local q, qx = tree_key(tree, 2), tree_key(tree, 3)
    queued[tree] = redis.call('ZCARD', q)
    if queued[tree] > 0 and not holds_live(g.hkey) then
      local dead = redis.call('ZRANGEBYSCORE', qx, '-inf', NOW)
      for _, m in ipairs(dead) do redis.call('ZREM', q, m) end
      if #dead > 0 then redis.call('ZREMRANGEBYSCORE', qx, '-inf', NOW) end
      local seq = redis.call('ZSCORE', q, g.member)
      local earlier
      if seq then
        earlier = redis.call('ZRANGEBYSCORE', q, '-inf', '(' .. seq)
      else
        earlier = redis.call('ZRANGE', q, 0, -1)
      end
      for _, w in ipairs(earlier) do
        local wh, wm, wp = parse_member(w)
        if wh ~= handle then
          for _, h in ipairs(grants) do
            if h.tree == tree and conflict(wm, wp, h.mode, h.path) then
              join_queue()
              local wexp = tonumber(redis.call('ZSCORE', qx, w)) or NOW
              return { 0, w, wexp - NOW, 'queued', holding }
            end
          end
        end
      end
    end
  end
end

-- 3. grant. A key of another type at one of the names written below (put there by someone
-- else) must fail the call without leaving half a grant behind: every command from here on
-- runs through try(), which on an error takes back the marks and holder entries this call
-- added (a renewal's extended score stays: the holder held it already) and then fails.
local added_marks, added_entries = {}, {}
local function try(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    for _, m in ipairs(added_marks) do redis.call('ZREM', m[1], m[2]) end
    for _, e in ipairs(added_entries) do redis.call('HDEL', e[1], e[2]) end
    error(reply)
  end
  return reply
end
local exp = NOW + ttl
local fresh = {}
local tokens = {}
for i, g in ipairs(grants) do
  local field = g.mode .. '|' .. g.path
  local token, made_by = nil, nonce
  -- a renewal (the grant is live) keeps its token and the nonce of the call that made it
  local entry = try('HGET', g.hkey, field)
  if entry then
    local leaf = KEYS[block_of(g, g.depth)]
    local score = tonumber(try('ZSCORE', leaf, g.member))
    if score and score > NOW then
      local old_token, _, old_nonce = split_entry(entry)
      token, made_by = old_token, old_nonce
    end
  end
  if not token then
    token = fresh[g.tree]
    if token == nil then
      local n = tree_key(g.tree, 1)
      token = string.format('%d', math.max((tonumber(try('GET', n)) or 0) + 1, NOW_US))
      redis.call('SET', n, token, 'PX', 604800000)
      fresh[g.tree] = token
    end
  end
  for level = 1, g.depth do
    local key = KEYS[block_of(g, level)]
    if try('ZADD', key, exp, g.member) == 1 then added_marks[#added_marks + 1] = { key, g.member } end
    bump(key, ttl)
  end
  if try('HSET', g.hkey, field, holder_entry(token, exp, made_by)) == 1 then
    added_entries[#added_entries + 1] = { g.hkey, field }
  end
  bump(g.hkey, holder_ttl(ttl))
  if queued[g.tree] > 0 and redis.call('ZREM', tree_key(g.tree, 2), g.member) == 1 then
    try('ZREM', tree_key(g.tree, 3), g.member)
  end
  tokens[i] = tonumber(token)
end
return { 1, tokens }
