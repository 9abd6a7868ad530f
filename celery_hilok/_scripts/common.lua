-- Shared prelude, prepended to every script of celery_hilok.
--
-- Vocabulary. A *grant* is one (holder handle, mode, path) lock. Its *member* string is
-- "<handle>|<mode>|<canonical path>" with mode S (subtree read), X (subtree write) or
-- N (node-only read). A grant puts its member, scored by its expiry (server ms), into one
-- sorted set per node of its chain: the leaf gets the grant's own mark (LEAF_MARK) and every
-- ancestor an intention mark (INTENT_MARK). A member is live while its score is in the
-- future; expired members are ignored, and swept a bounded number at a time from every set a
-- script writes. The mark table (LEAF_MARK, INTENT_MARK, CONFLICTS, CONFLICTING) is
-- generated from celery_hilok/_marks.py and prepended to this prelude.
--
-- A *waiting request* (an acquire that was refused and waits) places the same marks, scored
-- by its ticket (its place in the tree's first-come-first-served order), in the node's four
-- wait sets. So the waiters that stand in front of a request are found the way conflicting
-- holders are: on the request's own chain, in the sets of the marks that conflict with its
-- own, earliest ticket first; nobody else is ever looked at.
--
-- Keys. Every script gets, per tree, a block of tree keys: n (token and ticket counter),
-- q (queue entry -> ticket), qx (queue entry -> expiry), qc (queue entry -> "<channel>|<nonce>|
-- <ttl ms>|<grants in its request>|<1 if its holder held something in the tree>"), h (the
-- table of grants a release handed over: member -> "<token>|<expiry>|<nonce>", and notes)
-- and hx (member -> when its h entry may go), or the slice of them it needs. Then, per
-- grant, its holder's hash in the tree (hl) and one block per chain node, root first: all
-- eight sets of the node (hold is, ix, s, x, then wait is, ix, s, x: FULL, for acquire and
-- release), or only the set of the grant's own mark (OWN: refresh, and a lean release),
-- or the hold sets LEAN_SETS names for the mark the grant places there (LEAN: a lean
-- acquire). A call is lean where its client thinks nobody waits in the tree; it needs no
-- wait set then, and if it finds it does after all, it does nothing and says so.

-- Per call. The scripts are loaded once as one library of Redis Functions (FCALL), or run
-- one by one (EVALSHA, where a server refuses functions); either way each entry point
-- starts with begin(), which sets these for the call: the call's KEYS and ARGV, the
-- server's clock (NOW in ms, NOW_US in us) and the layout of its tree key blocks.
local KEYS, ARGV, NOW, NOW_US, TREE_NAMES, TREE_SIZE

-- the tree key blocks: all six keys (acquire, release, status), or h and hx (refresh)
local FULL_TREE = { n = 1, q = 2, qx = 3, qc = 4, h = 5, hx = 6, size = 6 }
local HOLDER_TREE = { h = 1, hx = 2, size = 2 }

local function begin(keys, args, layout)
  KEYS, ARGV, TREE_NAMES, TREE_SIZE = keys, args, layout, layout.size
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  NOW_US = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- most expired members one write sweeps from a set (bounded work per call; a set written
-- often is kept clean, one written rarely expires with its key's TTL)
local SWEEP = 64

-- a is an ancestor of b or b itself (canonical paths, '/' separated)
local function covers(a, b)
  return a == b or (#b > #a and string.sub(b, 1, #a + 1) == a .. '/')
end

-- do grants (mode m1 on p1) and (mode m2 on p2) of different holders conflict? Only on the
-- node of the upper one: its leaf mark against the mark the other places there (the other's
-- leaf mark on the same node, else its intention mark). Unrelated paths never conflict.
local function conflict(m1, p1, m2, p2)
  if not covers(p1, p2) then
    if not covers(p2, p1) then return false end
    m1, p1, m2, p2 = m2, p2, m1, p1
  end
  local other = p1 == p2 and LEAF_MARK[m2] or INTENT_MARK[m2]
  return CONFLICTS[LEAF_MARK[m1]][other]
end

-- split a member into handle, mode, path
local function parse_member(m)
  local a = string.find(m, '|', 1, true)
  return string.sub(m, 1, a - 1), string.sub(m, a + 1, a + 1), string.sub(m, a + 3)
end

-- the '|'-separated fields of text
local function fields(text)
  local out, start = {}, 1
  while true do
    local bar = string.find(text, '|', start, true)
    if not bar then out[#out + 1] = string.sub(text, start); return out end
    out[#out + 1] = string.sub(text, start, bar - 1)
    start = bar + 1
  end
end

-- a holder entry: the grant's fencing token, lease expiry, and the nonce of the acquire call
-- that made it (so that call, if its reply is lost, can undo exactly what it granted)
local function holder_entry(token, exp, nonce)
  return token .. '|' .. string.format('%d', exp) .. '|' .. nonce
end

local function split_entry(entry)
  local token, exp, nonce = string.match(entry, '^([^|]*)|([^|]*)|?(.*)$')
  return token, tonumber(exp), nonce
end

-- how long a holder entry outlives the lease it was last renewed for: while it is there, a
-- release can tell a lease that ran out (its entry is there, expired) from one that was
-- released already (its entry is gone)
local function grace(ttl)
  return math.max(ttl, 10000)
end

-- make key live at least ms more milliseconds (never shorter than it already lives: every
-- key outlives the longest lease it holds). True if it had a TTL already (so, as every key
-- of ours gets one at once, it is not one the caller just made)
local function bump(key, ms)
  if redis.call('PEXPIRE', key, ms, 'NX') == 1 then return false end
  redis.call('PEXPIRE', key, ms, 'GT')
  return true
end

-- bump() for a key that surely has a TTL already (refresh): usually one command
local function bump_kept(key, ms)
  if redis.call('PEXPIRE', key, ms, 'GT') == 0 then redis.call('PEXPIRE', key, ms, 'NX') end
end

-- drop up to `most` (default SWEEP) members of `key` whose score (an expiry) has passed
local function sweep(key, most)
  local dead = redis.call('ZRANGEBYSCORE', key, '-inf', NOW, 'LIMIT', 0, most or SWEEP)
  if #dead > 0 then redis.call('ZREM', key, unpack(dead)) end
end

-- read the grants described by ARGV from position `pos`: each is mode, depth, tree index,
-- canonical path (and, when with_ttl, handle and ttl ms). `blocks` says what each node
-- block of a grant's chain holds: FULL (all eight sets of the node: acquire, release), OWN
-- (only the grant's own mark: refresh, and a release in a tree where nobody waits) or LEAN
-- (the hold sets of LEAN_SETS for the mark the grant places there: an acquire in such a
-- tree). g.size is the size of a block (for LEAN, of an ancestor's: the leaf's comes last)
local FULL, OWN, LEAN = 8, 1, 0
local function read_grants(count, pos, first_key, with_ttl, blocks)
  local grants, k = {}, first_key
  for i = 1, count do
    local mode, depth = ARGV[pos], tonumber(ARGV[pos + 1])
    local g = { mode = mode, depth = depth, tree = tonumber(ARGV[pos + 2]), path = ARGV[pos + 3],
                hl = KEYS[k], base = k + 1, size = blocks, blocks = blocks }
    pos = pos + 4
    if with_ttl then g.handle = ARGV[pos]; g.ttl = tonumber(ARGV[pos + 1]); pos = pos + 2 end
    grants[i] = g
    if blocks == LEAN then
      -- every ancestor's block is that of the intention mark, the leaf's that of its own
      g.size = #LEAN_SETS[INTENT_MARK[mode]]
      k = k + 1 + g.size * (depth - 1) + #LEAN_SETS[LEAF_MARK[mode]]
    else
      k = k + 1 + blocks * depth
    end
  end
  return grants, pos
end

-- the mark grant g places on `level` (1 = root)
local function mark_of(g, level)
  if level == g.depth then return LEAF_MARK[g.mode] end
  return INTENT_MARK[g.mode]
end

-- the key of g's set of `mark` on `level` of its chain: a hold set (kind 0) or a wait set
-- (kind 4, FULL blocks only)
local function set_key(g, level, mark, kind)
  if g.blocks == LEAN then
    return KEYS[g.base + g.size * (level - 1) + LEAN_POS[mark_of(g, level)][mark] - 1]
  end
  return KEYS[g.base + g.size * (level - 1) + kind + mark - 1]
end

local function wait_key(g, level, mark)
  return set_key(g, level, mark, 4)
end
-- the set of g's own mark on `level`
local function own_key(g, level)
  if g.blocks == OWN then return KEYS[g.base + level - 1] end
  return set_key(g, level, mark_of(g, level), 0)
end

-- key `name` of the tree block of tree number `tree` (TREE_NAMES: the layout of the
-- call's blocks, see begin())
local function tree_key(tree, name)
  return KEYS[TREE_SIZE * (tree - 1) + TREE_NAMES[name]]
end

-- -- the holder table ---------------------------------------------------------------------
--
-- Every holder keeps the entries of its grants in a tree in a hash of its own, the grant's
-- first key ("<tree>::hl:<handle>": member -> token|expiry|nonce), which lives as long as
-- its longest entry's grace: an acquire writes its holder's entry in one command, a release
-- drops it in one, and nothing of it is ever swept (it goes with its key, or its release).
-- The hash's field LATEST, when there, is the latest expiry of its entries (the expiry of
-- one of them): so "does the holder hold a live grant in the tree" is one HGET. A change
-- that may lower it (the release of the entry it names, a renewal to a shorter lease)
-- drops it instead, and the next such question reads the hash once to find it again.
--
-- A release that hands a lock to a waiter cannot name that holder's hash (a key not in its
-- KEYS), so it writes the entry into the tree's table h (member -> entry, and hx: member ->
-- when the entry may go) and notes the grant there under the bare handle (handle ->
-- expiry, gone with the hand-off lease), until the holder renews the grant into its hash.

local LATEST = '@'  -- (members always have a '|')
local FRESH = { fresh = true }  -- put_entry's `had` for a new holder

-- does the holder of hash `hl` hold a live grant in the tree?
local function holds_live(hl)
  local latest = tonumber(redis.call('HGET', hl, LATEST))
  if not latest then  -- unknown since the entry it named went: find it again
    local entries = redis.call('HVALS', hl)
    if #entries == 0 then return false end
    latest = 0
    for _, entry in ipairs(entries) do
      local _, exp = split_entry(entry)
      if exp and exp > latest then latest = exp end
    end
    redis.call('HSET', hl, LATEST, string.format('%d', latest))
  end
  return latest > NOW
end

-- `member`'s entry: from its holder's hash `hl`, else (a grant a release handed over) from
-- the tree's table; then whether it came from the table, and the hash's LATEST (nil:
-- unknown, or no hash)
local function entry_of(tree, hl, member)
  local latest
  if hl then
    local got = redis.call('HMGET', hl, member, LATEST)
    latest = tonumber(got[2])
    if got[1] then return got[1], false, latest end
  end
  local entry = redis.call('HGET', tree_key(tree, 'h'), member)
  if entry then return entry, true, latest end
  return nil, false, latest
end

-- make the tree's table live long enough for an entry of `ttl`
local function bump_table(tree, ttl)
  bump(tree_key(tree, 'h'), ttl + grace(ttl))
  bump(tree_key(tree, 'hx'), ttl + grace(ttl))
end

-- note a grant a release handed to `handle` (see above), until `exp`
local function note_grant(tree, handle, exp)
  redis.call('HSET', tree_key(tree, 'h'), handle, string.format('%d', exp))
  redis.call('ZADD', tree_key(tree, 'hx'), exp, handle)
end

-- does a release's note say that `handle` holds a live grant in the tree?
local function noted(tree, handle)
  return (tonumber(redis.call('HGET', tree_key(tree, 'h'), handle)) or 0) > NOW
end

-- drop `key` (a member, or a bare handle's note) from the tree's table. 1 if it was there
local function drop_from_table(tree, key)
  if redis.call('HDEL', tree_key(tree, 'h'), key) == 0 then return 0 end
  redis.call('ZREM', tree_key(tree, 'hx'), key)
  return 1
end

-- drop a handed grant's entry `member` from the tree's table and, if it was there, its
-- holder's note: the grant is in its holder's hash now, or no longer held
local function drop_handed(tree, member)
  if drop_from_table(tree, member) == 1 then
    drop_from_table(tree, string.match(member, '^[^|]*'))
  end
end

-- write holder entry `member` into the holder's hash `hl` or, with no `hl`, into the tree's
-- table (a grant a release hands over). `had` says what was known of the hash before:
-- { fresh = true } (a new holder: the hash is empty), else latest (its LATEST, nil if
-- unknown), old (the entry's expiry before, if it had one), handed (the entry was in the
-- tree's table, which it leaves now: the grant is in its holder's hash) and kept (the hash
-- surely exists, with a TTL). 1 if the grant's entry is new.
local function put_entry(tree, hl, member, token, exp, nonce, ttl, had)
  local entry = holder_entry(token, exp, nonce)
  if not hl then
    local new = redis.call('HSET', tree_key(tree, 'h'), member, entry)
    redis.call('ZADD', tree_key(tree, 'hx'), exp + grace(ttl), member)
    bump_table(tree, ttl)
    return new
  end
  local new
  if had.fresh then
    redis.call('HSET', hl, member, entry, LATEST, string.format('%d', exp))
    new = 1
  elseif had.latest and exp >= had.latest then  -- (LATEST is there: counts 0)
    new = redis.call('HSET', hl, member, entry, LATEST, string.format('%d', exp))
  else
    new = redis.call('HSET', hl, member, entry)
    -- the entry LATEST named now expires earlier: LATEST is unknown
    if had.latest and had.old and had.old >= had.latest then redis.call('HDEL', hl, LATEST) end
  end
  if had.kept then bump_kept(hl, ttl + grace(ttl)) else bump(hl, ttl + grace(ttl)) end
  if had.handed then drop_handed(tree, member); return 0 end
  return new
end

-- drop holder entry `member`, whose expiry is `exp` (nil: unknown), from its holder's hash
-- `hl` (whose LATEST is `latest`, nil: unknown) or, if `handed` or with no `hl`, from the
-- tree's table (with its holder's note, given `hl`: a handed grant released)
local function drop_entry(tree, hl, member, exp, latest, handed)
  if hl and not handed then
    if latest and exp and exp < latest then redis.call('HDEL', hl, member)
    else redis.call('HDEL', hl, member, LATEST) end  -- it may be the one LATEST names
    return
  end
  if hl then drop_handed(tree, member) else drop_from_table(tree, member) end
end

-- drop up to `most` entries and notes of the tree's table whose time has passed
local function sweep_entries(tree, most)
  local dead = redis.call('ZRANGEBYSCORE', tree_key(tree, 'hx'), '-inf', NOW, 'LIMIT', 0, most)
  if #dead > 0 then
    redis.call('HDEL', tree_key(tree, 'h'), unpack(dead))
    redis.call('ZREM', tree_key(tree, 'hx'), unpack(dead))
  end
end

-- -- the wait queue -----------------------------------------------------------------------

-- remove queue entry `member` from the tree's queue keys (not from the node wait sets:
-- callers do that where they have the keys, the rest is swept when met)
local function drop_queued(tree, member)
  redis.call('ZREM', tree_key(tree, 'q'), member)
  redis.call('ZREM', tree_key(tree, 'qx'), member)
  redis.call('HDEL', tree_key(tree, 'qc'), member)
end

-- is queue entry `member` still live (its waiter renewed it lately)? A dead one is dropped
-- from the queue keys
local function queued_live(tree, member)
  local exp = tonumber(redis.call('ZSCORE', tree_key(tree, 'qx'), member))
  if exp and exp > NOW then return true end
  drop_queued(tree, member)
  return false
end

-- drop up to SWEEP queue entries whose waiters stopped renewing them
local function sweep_queue(tree)
  local dead = redis.call('ZRANGEBYSCORE', tree_key(tree, 'qx'), '-inf', NOW, 'LIMIT', 0, SWEEP)
  for _, member in ipairs(dead) do drop_queued(tree, member) end
end

-- take g's waiting request (member) off g's chain: its wait marks and queue entry
local function unqueue(g, member)
  if redis.call('ZREM', tree_key(g.tree, 'q'), member) == 0 then return 0 end
  redis.call('ZREM', tree_key(g.tree, 'qx'), member)
  redis.call('HDEL', tree_key(g.tree, 'qc'), member)
  for level = 1, g.depth do redis.call('ZREM', wait_key(g, level, mark_of(g, level)), member) end
  return 1
end

-- the first live waiter of another holder than `handle` in front of ticket `before` (nil:
-- anywhere) in wait set `key`, with its ticket; dead ones met on the way are swept
local function waiter_in_front(tree, key, handle, before)
  local prefix = handle .. '|'
  -- (string.format, not '..': Lua writes a number with 14 digits, a ticket has 16)
  local upper = before and string.format('(%d', before) or '+inf'
  local start, dead = 0, 0
  while true do
    local batch = redis.call('ZRANGEBYSCORE', key, '-inf', upper, 'WITHSCORES', 'LIMIT', start, 16)
    if #batch == 0 then return nil end
    for i = 1, #batch, 2 do
      local m = batch[i]
      if string.sub(m, 1, #prefix) ~= prefix then
        if queued_live(tree, m) or dead >= SWEEP then return m, tonumber(batch[i + 1]) end
        redis.call('ZREM', key, m)
        dead = dead + 1
        start = start - 1
      end
    end
    start = start + 16
  end
end

-- the first live hold mark of another holder than `handle` in set `key`, with its expiry
local function holder_in(key, handle)
  local prefix = handle .. '|'
  local start, size = 0, 16
  while true do
    local batch = redis.call('ZRANGEBYSCORE', key, string.format('(%d', NOW), '+inf', 'WITHSCORES', 'LIMIT', start, size)
    if #batch == 0 then return nil end
    for i = 1, #batch, 2 do
      if string.sub(batch[i], 1, #prefix) ~= prefix then return batch[i], tonumber(batch[i + 1]) end
    end
    start = start + size
    size = math.min(size * 4, 4096)
  end
end

-- the sets where a conflicting mark of somebody else would stand in g's way, on every node
-- of its chain: hold (kind 0) or wait (kind 4) sets; a mark that conflicts with itself (a
-- write's) makes its own set one of them
local function conflict_sets(g, kind, out)
  for level = 1, g.depth do
    for _, m in ipairs(CONFLICTING[mark_of(g, level)]) do
      out[#out + 1] = set_key(g, level, m, kind)
    end
  end
  return out
end

-- the first live holder of another handle than `handle` in grant g's way: member, expiry
local function holder_in_way(g, handle)
  for _, key in ipairs(conflict_sets(g, 0, {})) do
    local m, exp = holder_in(key, handle)
    if m then return m, exp end
  end
  return nil
end

-- the first live waiter of another handle, in front of ticket `before` (nil: anywhere), in
-- grant g's way
local function waiter_in_way(g, handle, before)
  for _, key in ipairs(conflict_sets(g, 4, {})) do
    local w = waiter_in_front(g.tree, key, handle, before)
    if w then return w end
  end
  return nil
end

-- (in slices: Lua's unpack() returns at most about 8000 values, LUAI_MAXCSTACK)
local function any_exists(keys)
  for i = 1, #keys, 1000 do
    if redis.call('EXISTS', unpack(keys, i, math.min(i + 999, #keys))) > 0 then return true end
  end
  return false
end

-- grant g (as `member`): its marks (expiring at exp) on its chain and its holder entry, in
-- the holder's hash g.hl (or, with no g.hl, in the tree's table: a grant a release hands
-- over; `had`: what is known of the holder's hash, see put_entry). What it adds (not what it
-- only renews) is noted in `undo`, for take_back().
--
-- Sweeping: each grant placed sweeps one of the sets it writes, in turn (by the server's
-- clock), of up to SWEEP x depth expired members (at most SWEEP_MOST): as much as sweeping
-- every one each time, in one command instead of depth. Sets its ZADD just made (nothing in
-- them can have expired) are left out, so a grant in a quiet part of a tree sweeps nothing.
-- One placed in the tree's table sweeps that table too.
local SWEEP_MOST = 256
local function place(g, member, exp, token, nonce, ttl, undo, had)
  local old = {}  -- the sets that were there before
  for level = 1, g.depth do
    local key = own_key(g, level)
    if redis.call('ZADD', key, exp, member) == 1 then undo[#undo + 1] = { key, member } end
    if bump(key, ttl) then old[#old + 1] = key end
  end
  if #old > 0 then sweep(old[NOW_US % #old + 1], math.min(SWEEP * g.depth, SWEEP_MOST)) end
  if not g.hl then sweep_entries(g.tree, SWEEP) end
  if put_entry(g.tree, g.hl, member, token, exp, nonce, ttl, had) == 1 then
    undo[#undo + 1] = { false, g.tree, g.hl, member }
  end
end

-- take back what place() added, newest first (a call failing half-way, on a key of another
-- type that somebody else put at one of our names, leaves no half grant behind)
local function take_back(undo)
  for i = #undo, 1, -1 do
    local u = undo[i]
    if u[1] then redis.call('ZREM', u[1], u[2]) else drop_entry(u[2], u[3], u[4]) end
  end
end

-- a new fencing token of the tree: larger than every token (and ticket) issued before in it.
-- Usually the server's clock in us is: one SET that also returns the number before; only
-- when that was as large (two numbers in one us, or a clock set back) a second SET.
local NUMBER_TTL = 604800000
local function next_number(tree)
  local n = tree_key(tree, 'n')
  local value = string.format('%d', NOW_US)
  local before = tonumber(redis.call('SET', n, value, 'PX', NUMBER_TTL, 'GET'))
  if before and before >= NOW_US then
    value = string.format('%d', before + 1)
    redis.call('SET', n, value, 'PX', NUMBER_TTL)
  end
  return value
end
