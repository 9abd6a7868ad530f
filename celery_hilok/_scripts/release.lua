-- release: drop grants of one holder, withdraw its waiting requests for them, and hand the
-- freed locks on to the waiters next in line.
--
-- KEYS: per tree {n, q, qx, qc, h, hx}; then per grant its holder's hash and its chain's node
--       blocks: full ones, or (lean) only the set of the grant's own mark.
-- ARGV: handle, scope, tree count, grant count, hand-off lease ms, 1 if lean else 0, then
--       per grant: mode, depth, tree index, path. Scope "" releases the grants; "-" leaves
--       them alone (only waiting requests are withdrawn); any other value is the nonce of
--       an acquire call (whose reply was lost, or which gave up waiting), and releases only
--       grants made by that call (not renewed by it, nor renewed since by another call of
--       the holder) and withdraws only a waiting request of that call.
-- Reply: per grant 1 (a live grant was released), 2 (its lease had already run out: its
--        marks or its holder entry say so), 0 (not held: never granted, or already
--        released, say through another copy of its lease or by a call whose reply was lost
--        and that redis-py sent again); -1 for every grant from a lean call in a request
--        where somebody waits in a tree (it needs the wait sets): nothing was done, the
--        caller asks again with full blocks.
--
-- Only members carrying the caller's handle are touched, so nobody can release another
-- holder's lock. Releasing twice is harmless.
--
-- Hand-off. The waiters a released grant may have kept out are those whose wait marks
-- conflict with its marks: on its own chain, in the same sets a conflicting holder would
-- be in. They are taken earliest ticket first (FRONT per set, so the work is bounded); a
-- waiter is *in front* if no earlier one of them, still waiting, conflicts with it. A waiter
-- in front whose request is one lock on the released chain (the released node or an
-- ancestor: every key it needs is here) and that nothing else stands in the way of (no live
-- conflicting holder, no earlier conflicting waiter) is granted the lock here and now, for a
-- short first lease (the hand-off lease, at most its own ttl: a waiter that died meanwhile
-- does not keep it long), and the next ones are looked at as if it held it (readers go in
-- together, a writer after them waits). A waiter in front that cannot be granted here (a
-- lock below the released node, or several locks) is told to ask again. Each waiter told
-- hears it on its own process's channel, one word each: "<handle>" (ask again) or, for a
-- waiter granted here, "<handle>/<nonce>/<token>/<lease ms>" (the grant its call of that
-- nonce asked for, with its fencing token and how long it lasts from now: a waiter that
-- keeps its lease alive takes it from the message, without a call). Until the holder renews
-- it into its own hash, the grant's entry is in the tree's table, and noted there under the
-- bare handle (its expiry), so that the holder's next acquires in the tree see it holds
-- something there.

local function release(keys, args)
  begin(keys, args, FULL_TREE)
  local handle, scope = ARGV[1], ARGV[2]
  local ntrees, ngrants = tonumber(ARGV[3]), tonumber(ARGV[4])
  local handoff, lean = tonumber(ARGV[5]), ARGV[6] == '1'
  local grants = read_grants(ngrants, 7, TREE_SIZE * ntrees + 1, false, lean and OWN or FULL)
  local FRONT = 16

  -- withdraw the holder's waiting request for g; a release scoped to a call's nonce only
  -- withdraws the one that call made (not a later call's of the same holder, which took
  -- its place in the queue over)
  local function withdraw(g, member)
    if scope ~= '' and scope ~= '-' then
      local info = redis.call('HGET', tree_key(g.tree, 'qc'), member)
      if info and fields(info)[2] ~= scope then return 0 end
    end
    return unqueue(g, member)
  end

  local result = {}
  local freed = {}
  local waiting = {}  -- tree -> somebody waits there (its queue exists)
  if lean then
    for tree = 1, ntrees do
      if redis.call('EXISTS', tree_key(tree, 'q')) == 1 then
        for i = 1, ngrants do result[i] = -1 end
        return result
      end
      waiting[tree] = false
    end
  end
  for i, g in ipairs(grants) do
    local member = handle .. '|' .. g.mode .. '|' .. g.path
    -- 1 while its entry says its lease lasts, 2 once it ran out; with no entry, its marks
    -- tell (none: 0, never granted or released already)
    local entry, handed, latest = entry_of(g.tree, g.hl, member)
    local _, exp, made_by
    if entry then
      _, exp, made_by = split_entry(entry)
    else
      exp = tonumber(redis.call('ZSCORE', own_key(g, g.depth), member))
    end
    if exp == nil then result[i] = 0 elseif exp > NOW then result[i] = 1 else result[i] = 2 end
    local keep = scope == '-' or (scope ~= '' and made_by ~= scope)
    if keep then
      result[i] = 0
    else
      for level = 1, g.depth do redis.call('ZREM', own_key(g, level), member) end
      if entry then drop_entry(g.tree, g.hl, member, exp, latest, handed) end
    end
    if waiting[g.tree] == nil then
      waiting[g.tree] = redis.call('EXISTS', tree_key(g.tree, 'q')) == 1
    end
    -- nobody waits in the tree: nothing to withdraw, nobody to hand on to
    if waiting[g.tree] and (withdraw(g, member) == 1 or result[i] == 1) then
      freed[#freed + 1] = g
    end
  end

  local told = {}    -- channel -> handles to tell
  local order = {}   -- channels in the order first told
  local function notify(channel, who)
    if told[channel] == nil then told[channel] = {}; order[#order + 1] = channel end
    table.insert(told[channel], who)
  end

  -- can waiter c (one lock on g's chain) be granted now? 'held': a live holder of another
  -- handle is in its way; 'queued': an earlier waiter is (ticket false: c's holder held
  -- something in the tree when it queued, so it skips the queue)
  local function grantable(c, who, ticket)
    if holder_in_way(c, who) then return 'held' end
    if ticket ~= false and waiter_in_way(c, who, ticket) then return 'queued' end
    return 'yes'
  end

  local function hand_on(g)
    local sets = conflict_sets(g, 4, {})
    if not any_exists(sets) then return end
    local tree = g.tree
    local qc = tree_key(tree, 'qc')
    local candidates, seen, cutoff = {}, {}, math.huge
    for _, key in ipairs(sets) do
      local batch = redis.call('ZRANGE', key, 0, FRONT - 1, 'WITHSCORES')
      for i = 1, #batch, 2 do
        local m = batch[i]
        if not seen[m] then
          seen[m] = true
          candidates[#candidates + 1] = { member = m, ticket = tonumber(batch[i + 1]), key = key }
        end
      end
      -- past the last entry read from a full batch, an unread earlier waiter may exist
      if #batch == 2 * FRONT then cutoff = math.min(cutoff, tonumber(batch[#batch])) end
    end
    table.sort(candidates, function(a, b)
      return a.ticket < b.ticket or (a.ticket == b.ticket and a.member < b.member)
    end)
    local ahead = {}  -- waiters in front of the rest, still waiting: {handle, mode, path}
    for _, c in ipairs(candidates) do
      if c.ticket > cutoff then break end
      local who, mode, path = parse_member(c.member)
      local info = fields(redis.call('HGET', qc, c.member) or '||0|0|0')
      local channel, nonce, ttl, count = info[1], info[2], tonumber(info[3]), tonumber(info[4])
      local holding = info[5] == '1'  -- its holder held something in the tree: it skips the queue
      local behind = false
      if not holding then
        for _, a in ipairs(ahead) do
          if a[1] ~= who and conflict(a[2], a[3], mode, path) then behind = true; break end
        end
      end
      if behind then
        ahead[#ahead + 1] = { who, mode, path }  -- it keeps its place in front of later ones
      elseif not queued_live(tree, c.member) then
        redis.call('ZREM', c.key, c.member)  -- gone: its other wait marks go when met
      else
        local granted = false
        local here = count == 1 and covers(path, g.path)
        if here then
          local _, slashes = string.gsub(path, '/', '')
          local lock = { mode = mode, depth = slashes + 1, tree = tree, path = path,
                         base = g.base, size = g.size, blocks = g.blocks }
          local ticket = c.ticket
          if holding then ticket = false end
          local verdict = grantable(lock, who, ticket)
          if verdict == 'yes' then
            local lease = math.min(ttl, handoff)
            local token = next_number(tree)
            place(lock, c.member, NOW + lease, token, nonce, lease, {})
            unqueue(lock, c.member)
            note_grant(tree, who, NOW + lease)
            granted = who .. '/' .. nonce .. '/' .. token .. '/' .. string.format('%d', lease)
          elseif verdict == 'queued' then
            here = false  -- its holder may hold something in the tree by now: let it ask
          end
        end
        if channel ~= '' and (granted or not here) then notify(channel, granted or who) end
        if not granted then ahead[#ahead + 1] = { who, mode, path } end
      end
    end
  end

  for _, g in ipairs(freed) do hand_on(g) end
  for _, channel in ipairs(order) do
    redis.call('PUBLISH', channel, table.concat(told[channel], ' '))
  end
  return result
end
