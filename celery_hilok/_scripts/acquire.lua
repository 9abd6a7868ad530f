-- acquire: grant every requested lock to one holder, atomically, or none of them.
--
-- KEYS: per tree {n, q, qx, qc, h, hx}; then per grant its holder's hash and its chain's node
--       blocks: full ones, or lean ones (flag 4).
-- ARGV: handle, ttl ms, flags (1: join the wait queue when refused; 2: a new holder, whose
--       first call this is: nothing of it exists yet; 4: lean, the node blocks hold only the
--       sets of LEAN_SETS), queue entry ttl ms,
--       tree count, grant count, nonce of this call, the caller's wake-up channel, then per
--       grant: mode, depth, tree index, canonical path.
-- Reply: {1, {token per grant}} when granted;
--        {0, blocker member, blocker remaining ms, 'held' | 'queued', holding} when refused,
--        holding 1 if the holder already holds a live grant in a tree of the request (it
--        then skips the queue, so that it never waits for a waiter that waits for it);
--        {2} from a lean call that needs the wait sets (somebody waits in a tree of the
--        request, or it is refused and would join the queue): nothing was done, the caller
--        asks again with full blocks.
--
-- Guarantees: a grant is made only if no live mark of another holder conflicts with it on
-- its chain and, unless the holder already holds a live grant in that tree, no earlier
-- waiting request of another holder conflicts with it (first come, first served). A
-- request refused with register = 1 waits: its wait marks go on its chain, and a release
-- that frees its way grants it the lock there and then (release.lua) or wakes it to ask
-- again. Re-acquiring a live grant (also one a release handed over) renews it and keeps its
-- token; a new grant gets a token larger than every token issued before in its tree.
-- Cost: O(depth) commands per grant (each O(log n)), whatever the number of waiters and
-- holders elsewhere in the tree.

local function acquire(keys, args)
  begin(keys, args, FULL_TREE)
  local handle, ttl = ARGV[1], tonumber(ARGV[2])
  local flags, qttl = tonumber(ARGV[3]), tonumber(ARGV[4])
  local register = flags % 2 == 1
  local new = flags % 4 >= 2  -- no grant or holder entry of this handle to look up
  local lean = flags >= 4
  local ntrees, ngrants = tonumber(ARGV[5]), tonumber(ARGV[6])
  local nonce, channel = ARGV[7], ARGV[8]
  local grants = read_grants(ngrants, 9, TREE_SIZE * ntrees + 1, false, lean and LEAN or FULL)
  local prefix = handle .. '|'

  for _, g in ipairs(grants) do g.member = prefix .. g.mode .. '|' .. g.path end

  -- Usually nobody waits in the request's trees and no set that could conflict exists at
  -- all: one EXISTS over the trees' queues and those sets settles both (steps 1 and 2 are
  -- then skipped); else each is asked on its own.
  local holds, waits = {}, {}
  for _, g in ipairs(grants) do conflict_sets(g, 0, holds) end
  local probe, seen = {}, {}
  for _, g in ipairs(grants) do
    if not seen[g.tree] then seen[g.tree] = true; probe[#probe + 1] = tree_key(g.tree, 'q') end
  end
  for _, key in ipairs(holds) do probe[#probe + 1] = key end
  local busy = any_exists(probe)

  local holding = 0
  local queued = {}   -- tree -> somebody waits there (its queue exists)
  local tickets = {}  -- tree -> this request's ticket there (false: not queued)
  for _, g in ipairs(grants) do
    if queued[g.tree] == nil then
      queued[g.tree] = busy and redis.call('EXISTS', tree_key(g.tree, 'q')) == 1
      if lean and queued[g.tree] then return { 2 } end
      tickets[g.tree] = queued[g.tree]
        and (tonumber(redis.call('ZSCORE', tree_key(g.tree, 'q'), g.member)) or false)
    end
  end

  -- does the holder hold something in the tree (so it skips the queue)? Asked only when
  -- somebody waits; a grant a release handed to it is not in its hash until renewed, but
  -- noted under its bare handle in the tree's table (release.lua)
  local held = {}
  local function held_in(tree)
    if held[tree] == nil then
      held[tree] = false
      if not new then
        held[tree] = noted(tree, handle)
        for _, g in ipairs(grants) do
          if g.tree == tree then held[tree] = held[tree] or holds_live(g.hl); break end
        end
      end
    end
    return held[tree]
  end

  local function join_queue()
    if not register then return end
    for _, g in ipairs(grants) do
      if held_in(g.tree) then holding = 1 end
    end
    local info = table.concat({ channel, nonce, ttl, ngrants, holding }, '|')
    for _, g in ipairs(grants) do
      local tree = g.tree
      local seq = tickets[tree]
      if not seq then
        seq = next_number(tree)
        tickets[tree] = seq
      end
      local q, qx, qc = tree_key(tree, 'q'), tree_key(tree, 'qx'), tree_key(tree, 'qc')
      sweep_queue(tree)
      redis.call('ZADD', q, 'NX', seq, g.member)
      redis.call('ZADD', qx, NOW + qttl, g.member)
      redis.call('HSET', qc, g.member, info)
      bump(q, qttl)
      bump(qx, qttl)
      bump(qc, qttl)
      for level = 1, g.depth do
        local key = wait_key(g, level, mark_of(g, level))
        redis.call('ZADD', key, 'NX', seq, g.member)
        bump(key, qttl)
      end
    end
  end

  -- 1. live holders (where any set that could conflict exists)
  for _, g in ipairs(grants) do
    if queued[g.tree] then conflict_sets(g, 4, waits) end
  end
  if busy and any_exists(holds) then
    for _, g in ipairs(grants) do
      local m, exp = holder_in_way(g, handle)
      if m then
        if lean and register then return { 2 } end
        join_queue()
        return { 0, m, exp - NOW, 'held', holding }
      end
    end
  end

  -- 2. earlier waiters on the request's chains, in trees where this holder holds nothing yet
  if #waits > 0 and any_exists(waits) then
    for _, g in ipairs(grants) do
      local w = queued[g.tree] and not held_in(g.tree)
        and waiter_in_way(g, handle, tickets[g.tree] or nil)
      if w then
        join_queue()
        local wexp = tonumber(redis.call('ZSCORE', tree_key(g.tree, 'qx'), w)) or NOW
        return { 0, w, wexp - NOW, 'queued', holding }
      end
    end
  end

  -- 3. grant. A key of another type at one of the names written below (put there by someone
  -- else) fails the call without leaving half a grant behind: what was added is taken back
  -- (a renewal's extended lease stays: the holder held it already) and the error raised.
  local exp = NOW + ttl
  local fresh = {}
  local tokens = {}
  local undo = {}
  local ok, err = pcall(function()
    for i, g in ipairs(grants) do
      local token, made_by, had = nil, nonce, FRESH
      -- a renewal (the grant is live) keeps its token. It keeps the nonce of the call that
      -- made it only if this is that call again (redis-py resending it, a waiter asking
      -- again): once another call of the holder renewed it, no call's cleanup may take
      -- it back (the holder has it through that call; a late cleanup of the call that made
      -- it, or this call's own, must leave it alone)
      if not new then
        local entry, handed, latest = entry_of(g.tree, g.hl, g.member)
        had = { latest = latest, handed = handed }
        if entry then
          local old_token, old_exp, old_nonce = split_entry(entry)
          if not handed then had.old = old_exp end
          if old_exp > NOW then
            token = old_token
            if old_nonce ~= nonce then made_by = '' end
          end
        end
      end
      if not token then
        token = fresh[g.tree]
        if token == nil then
          token = next_number(g.tree)
          fresh[g.tree] = token
        end
      end
      place(g, g.member, exp, token, made_by, ttl, undo, had)
      tokens[i] = tonumber(token)
    end
  end)
  if not ok then
    take_back(undo)
    error(err, 0)  -- as it came: Redis's error code (WRONGTYPE, OOM...) first
  end
  for _, g in ipairs(grants) do
    if tickets[g.tree] then unqueue(g, g.member) end
  end
  return { 1, tokens }
end
