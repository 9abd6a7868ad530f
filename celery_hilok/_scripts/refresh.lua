-- refresh: extend the leases of live grants, of any number of holders, in one call.
--
-- KEYS: per tree {h, hx}; then per grant its holder's hash and its own mark's key on each
--       chain node.
-- ARGV: tree count, grant count, then per grant: mode, depth, tree index, path, handle,
--       ttl ms.
-- Reply: per grant 1 (renewed for ttl from now) or 0 (lost: expired or not held; its
--        leftover marks are removed).
--
-- A grant whose lease already ran out is never revived, even if nobody else took the lock
-- yet: expiry is final, so a holder can trust "refresh succeeded" to mean "never lapsed".

local function refresh(keys, args)
  begin(keys, args, HOLDER_TREE)
  local ntrees = tonumber(ARGV[1])
  local grants = read_grants(tonumber(ARGV[2]), 3, TREE_SIZE * ntrees + 1, true, OWN)
  local result = {}
  for i, g in ipairs(grants) do
    local member = g.handle .. '|' .. g.mode .. '|' .. g.path
    local entry, handed, latest = entry_of(g.tree, g.hl, member)
    local token, exp, nonce
    if entry then token, exp, nonce = split_entry(entry) end
    if entry and exp > NOW then
      local old = not handed and exp or nil
      exp = NOW + g.ttl
      for level = 1, g.depth do
        local key = own_key(g, level)
        redis.call('ZADD', key, exp, member)  -- (acquires, which add members, sweep)
        bump_kept(key, g.ttl)
      end
      put_entry(g.tree, g.hl, member, token, exp, nonce, g.ttl,
                { latest = latest, old = old, handed = handed, kept = not handed })
      result[i] = 1
    else
      for level = 1, g.depth do redis.call('ZREM', own_key(g, level), member) end
      if entry then drop_entry(g.tree, g.hl, member, exp, latest, handed) end
      result[i] = 0
    end
  end
  return result
end
