-- refresh: extend the leases of live grants, of any number of holders, in one call.
--
-- KEYS: per tree {n, q, qx, c}; then per grant {holder hash, 4 mark keys per chain node}.
-- ARGV: tree count, grant count, then per grant: mode, depth, tree index, path, handle,
--       ttl ms.
-- Reply: per grant 1 (renewed for ttl from now) or 0 (lost: expired or not held; its
--        leftover marks are removed).
--
-- A grant whose lease already ran out is never revived, even if nobody else took the lock
-- yet: expiry is final, so a holder can trust "refresh succeeded" to mean "never lapsed".

local ntrees, ngrants = tonumber(ARGV[1]), tonumber(ARGV[2])
local grants = read_grants(ngrants, 3, 4 * ntrees + 1, true)
local result = {}
for i, g in ipairs(grants) do
  local member = g.handle .. '|' .. g.mode .. '|' .. g.path
  local leaf = mark_key(g, g.depth, LEAF_MARK[g.mode])
  local score = tonumber(redis.call('ZSCORE', leaf, member))
  if score and score > NOW then
    local exp = NOW + g.ttl
    for level = 1, g.depth do
      local key = mark_key(g, level, mark_of(g, level))
      redis.call('ZADD', key, exp, member)
      bump(key, g.ttl)
    end
    local field = g.mode .. '|' .. g.path
    local entry = redis.call('HGET', g.hkey, field)
    if entry then redis.call('HSET', g.hkey, field, holder_entry(entry_token(entry), exp)) end
    bump(g.hkey, g.ttl)
    result[i] = 1
  else
    for level = 1, g.depth do redis.call('ZREM', mark_key(g, level, mark_of(g, level)), member) end
    redis.call('HDEL', g.hkey, g.mode .. '|' .. g.path)
    result[i] = 0
  end
end
return result
