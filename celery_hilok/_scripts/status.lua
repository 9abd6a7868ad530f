-- status: the live marks on every node of one chain and the tree's wait queue.
--
-- KEYS: {n, q, qx, qc, h, hx} of the tree, then 4 mark keys (is, ix, s, x) per chain node.
-- ARGV: depth.
-- Reply: {levels, queue} where levels[i] = 4 flat lists {member, remaining ms, ...} (is, ix,
--        s, x) for node i, root first, and queue = {member, ticket, remaining ms, ...} in
--        queue order. Read-only.

local function status(keys, args)
  begin(keys, args, FULL_TREE)
  local depth = tonumber(ARGV[1])
  local levels = {}
  for level = 1, depth do
    local marks = {}
    for idx = 1, 4 do
      local key = KEYS[6 + 4 * (level - 1) + idx]
      local live = redis.call('ZRANGEBYSCORE', key, string.format('(%d', NOW), '+inf', 'WITHSCORES')
      for i = 2, #live, 2 do live[i] = tonumber(live[i]) - NOW end
      marks[idx] = live
    end
    levels[level] = marks
  end
  local queue = {}
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    local exp = tonumber(redis.call('ZSCORE', KEYS[3], entries[i]))
    if exp and exp > NOW then
      queue[#queue + 1] = entries[i]
      queue[#queue + 1] = entries[i + 1]
      queue[#queue + 1] = exp - NOW
    end
  end
  return { levels, queue }
end
