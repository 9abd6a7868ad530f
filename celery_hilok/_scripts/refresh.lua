-- refresh: extend the leases of live grants, of any number of holders, in one call.
--
-- KEYS: per tree {h, hx}; then per grant its holder index and its own mark's key on each
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
  local grants = read_grants(tonumber(ARGV[2]), 3, TREE_SIZE * ntrees + 1, true, false)
  local result = {}
  local longest = {}  -- tree -> the longest ttl renewed there (its holder table outlives it)
  for i, g in ipairs(grants) do
    local member = g.handle .. '|' .. g.mode .. '|' .. g.path
    local score = tonumber(redis.call('ZSCORE', own_key(g, g.depth), member))
    local entry = redis.call('HGET', tree_key(g.tree, 'h'), member)
    if score and score > NOW and entry then
      local exp = NOW + g.ttl
      for level = 1, g.depth do
        local key = own_key(g, level)
        redis.call('ZADD', key, exp, member)  -- (acquires, which add members, sweep)
        bump_kept(key, g.ttl)
      end
      local token, _, nonce = split_entry(entry)
      put_entry(g.tree, g.hl, member, token, exp, nonce, g.ttl)
      longest[g.tree] = math.max(longest[g.tree] or 0, g.ttl)
      result[i] = 1
    else
      for level = 1, g.depth do redis.call('ZREM', own_key(g, level), member) end
      drop_entry(g.tree, g.hl, member)
      result[i] = 0
    end
  end
  for tree, ttl in pairs(longest) do bump_table(tree, ttl) end
  return result
end
