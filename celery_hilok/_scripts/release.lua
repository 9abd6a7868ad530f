-- release: drop grants of one holder and withdraw its queued requests for them.
--
-- KEYS: per tree {q, qx, c}; then per grant {holder hash, its mark's key on each chain node}.
-- ARGV: handle, scope, tree count, grant count, then per grant: mode, depth, tree index,
--       path. Scope "" releases the grants; "-" leaves them alone (only the wait queue is
--       left); any other value is the nonce of an acquire call whose reply was lost, and
--       releases only grants made by that call (not renewed by it).
-- Reply: per grant 1 (a live grant was released), 2 (its lease had already run out: its
--        marks or its holder entry say so), 0 (not held: never granted, or already
--        released, say through another copy of its lease or by a call whose reply was lost
--        and that redis-py sent again).
--
-- Only members carrying the caller's handle are touched, so nobody can release another
-- holder's lock. Releasing twice is harmless. When anyone waits in the tree, the released
-- path is published on the tree's channel so that waiters retry at once: the message is
-- "<path>\n<handle> <handle>...", the handles of the queue's front (the waiters that no
-- earlier waiter stands in front of). Only those, and waiters that already hold something
-- in the tree, retry; the rest would only be refused again. With more than FRONT_SCAN
-- waiters in the queue the message is the path alone, and every waiter on its line retries.

local handle, scope = ARGV[1], ARGV[2]
local ntrees, ngrants = tonumber(ARGV[3]), tonumber(ARGV[4])
local grants = read_grants(ngrants, 5, 3 * ntrees + 1, false, false)
local result = {}
local notify = {}
for i, g in ipairs(grants) do
  local member = handle .. '|' .. g.mode .. '|' .. g.path
  local leaf = KEYS[block_of(g, g.depth)]
  local field = g.mode .. '|' .. g.path
  local score = tonumber(redis.call('ZSCORE', leaf, member))
  if score == nil then
    -- its marks are gone: released (0), unless its holder entry shows it ran out (2)
    local entry = redis.call('HGET', g.hkey, field)
    result[i] = (entry and select(2, split_entry(entry)) <= NOW) and 2 or 0
  elseif score > NOW then result[i] = 1 else result[i] = 2 end
  local keep = scope == '-'
  if not keep and scope ~= '' then
    local entry = redis.call('HGET', g.hkey, field)
    keep = not entry or select(3, split_entry(entry)) ~= scope
  end
  if keep then
    result[i] = 0
  else
    for level = 1, g.depth do redis.call('ZREM', KEYS[block_of(g, level)], member) end
    redis.call('HDEL', g.hkey, field)
  end
  local q = tree_key(g.tree, 1)
  if redis.call('EXISTS', q) == 1 then  -- somebody waits in this tree
    local withdrawn = redis.call('ZREM', q, member)
    if withdrawn == 1 then redis.call('ZREM', tree_key(g.tree, 2), member) end
    if (result[i] == 1 or withdrawn == 1) and redis.call('EXISTS', q) == 1 then
      notify[#notify + 1] = g
    end
  end
end
local FRONT_SCAN = 64

-- the handles at the front of tree's queue, space separated (nil: too many waiters to look)
local function front(tree)
  local q, qx = tree_key(tree, 1), tree_key(tree, 2)
  local dead = redis.call('ZRANGEBYSCORE', qx, '-inf', NOW)
  for _, m in ipairs(dead) do redis.call('ZREM', q, m) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', qx, '-inf', NOW) end
  local entries = redis.call('ZRANGE', q, 0, FRONT_SCAN)
  if #entries > FRONT_SCAN then return nil end
  local earlier, behind, order = {}, {}, {}
  for _, m in ipairs(entries) do  -- in ticket order: entries of one request are adjacent
    local h, md, p = parse_member(m)
    if behind[h] == nil then behind[h] = false; order[#order + 1] = h end
    for _, e in ipairs(earlier) do
      if e[1] ~= h and conflict(e[2], e[3], md, p) then behind[h] = true; break end
    end
    earlier[#earlier + 1] = { h, md, p }
  end
  local out = {}
  for _, h in ipairs(order) do if not behind[h] then out[#out + 1] = h end end
  return table.concat(out, ' ')
end

local fronts = {}
for _, g in ipairs(notify) do
  local f = fronts[g.tree]
  if f == nil then f = front(g.tree) or false; fronts[g.tree] = f end
  local message = g.path
  if f then message = message .. '\n' .. f end
  redis.call('PUBLISH', tree_key(g.tree, 3), message)
end
return result
