-- refresh: extend the leases of live grants, of any number of holders, in one call.
--
-- KEYS: per grant {holder hash, its mark's key on each chain node} (no tree keys).
-- ARGV: grant count, then per grant: mode, depth, tree index (unused), path, handle, ttl ms.
-- Reply: per grant 1 (renewed for ttl from now) or 0 (lost: expired or not held; its
--        leftover marks are removed).
--
-- A grant whose lease already ran out is never revived, even if nobody else took the lock
-- yet: expiry is final, so a holder can trust "refresh succeeded" to mean "never lapsed".

local grants = read_grants(tonumber(ARGV[1]), 2, 1, true, false)
local result = {}
for i, g in ipairs(grants) do
  local member = g.handle .. '|' .. g.mode .. '|' .. g.path
  local leaf = KEYS[block_of(g, g.depth)]
  local score = tonumber(redis.call('ZSCORE', leaf, member))
  if score and score > NOW then
    local exp = NOW + g.ttl
    for level = 1, g.depth do
      local key = KEYS[block_of(g, level)]
      redis.call('ZADD', key, exp, member)
      bump(key, g.ttl)
    end
    local field = g.mode .. '|' .. g.path
    local entry = redis.call('HGET', g.hkey, field)
    if entry then
      local token, _, nonce = split_entry(entry)
      redis.call('HSET', g.hkey, field, holder_entry(token, exp, nonce))
    end
    bump(g.hkey, holder_ttl(g.ttl))
    result[i] = 1
  else
    for level = 1, g.depth do redis.call('ZREM', KEYS[block_of(g, level)], member) end
    redis.call('HDEL', g.hkey, g.mode .. '|' .. g.path)
    result[i] = 0
  end
end
return result
