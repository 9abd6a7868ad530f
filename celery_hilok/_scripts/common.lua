-- Shared prelude, prepended to every script of celery_hilok.
--
-- Vocabulary. A *grant* is one (holder handle, mode, path) lock. Its *member* string is
-- "<handle>|<mode>|<canonical path>" with mode S (subtree read), X (subtree write) or
-- N (node-only read). A grant puts its member, scored by its expiry (server ms), into one
-- sorted set per node of its chain: the leaf gets the grant's own mark (LEAF_MARK) and every
-- ancestor an intention mark (INTENT_MARK). A member is live while its score is in the
-- future; expired members are ignored and swept lazily. The mark table (LEAF_MARK,
-- INTENT_MARK, BLOCK_SIZE, CONFLICTS, SELF_CONFLICT) is generated from
-- celery_hilok/_marks.py and prepended to this prelude.
--
-- Key blocks. Scripts receive, per tree, a block of tree keys (acquire: n, q, qx; release:
-- q, qx, c; refresh: none) and then, per grant, its holder hash followed by one block per
-- node of its chain, root first. A node's block starts with the key of the mark the grant
-- places there; for acquire it goes on with the keys of the other marks that conflict with
-- it (BLOCK_SIZE keys in all); release and refresh get the first key only.

local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local NOW_US = tonumber(t[1]) * 1000000 + tonumber(t[2])

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

-- the holder hash keeps, per grant ("<mode>|<path>"), "<token>|<expiry ms>|<nonce>": the
-- grant's fencing token, lease expiry, and the nonce of the acquire call that made it (so
-- that call, if its reply is lost, can undo exactly what it granted)
local function holder_entry(token, exp, nonce)
  return token .. '|' .. string.format('%d', exp) .. '|' .. nonce
end

local function split_entry(entry)
  local a = string.find(entry, '|', 1, true)
  local b = string.find(entry, '|', a + 1, true)
  return string.sub(entry, 1, a - 1), tonumber(string.sub(entry, a + 1, b - 1)),
         string.sub(entry, b + 1)
end

-- does the holder hash `hkey` hold a live grant? (expired entries are dropped on the way)
local function holds_live(hkey)
  local flat = redis.call('HGETALL', hkey)
  local live = false
  for i = 1, #flat, 2 do
    local _, exp = split_entry(flat[i + 1])
    if exp > NOW then live = true else redis.call('HDEL', hkey, flat[i]) end
  end
  return live
end

-- how long a holder hash outlives the lease it was last bumped for: while it is there, a
-- release can tell a lease that ran out (its entry is there, expired) from one that was
-- released already (its entry is gone)
local function holder_ttl(ttl)
  return ttl + math.max(ttl, 10000)
end

-- make key live at least ms more milliseconds (never shorter than it already lives: every
-- key outlives the longest lease it holds)
local function bump(key, ms)
  if redis.call('PEXPIRE', key, ms, 'NX') == 0 then redis.call('PEXPIRE', key, ms, 'GT') end
end

-- read the grants described by ARGV from position `pos`: each is mode, depth, tree index,
-- canonical path (and, when with_ttl, handle and ttl ms); `full` says whether node blocks
-- hold the conflicting marks' keys too (acquire) or only the grant's own mark (others)
local function read_grants(count, pos, first_key, with_ttl, full)
  local grants, k = {}, first_key
  for i = 1, count do
    local mode, depth = ARGV[pos], tonumber(ARGV[pos + 1])
    local g = { mode = mode, depth = depth, tree = tonumber(ARGV[pos + 2]), path = ARGV[pos + 3],
                hkey = KEYS[k], base = k + 1, isize = 1, lsize = 1 }
    if full then
      g.isize, g.lsize = BLOCK_SIZE[INTENT_MARK[mode]], BLOCK_SIZE[LEAF_MARK[mode]]
    end
    pos = pos + 4
    if with_ttl then g.handle = ARGV[pos]; g.ttl = tonumber(ARGV[pos + 1]); pos = pos + 2 end
    grants[i] = g
    k = k + 1 + g.isize * (depth - 1) + g.lsize
  end
  return grants, pos
end

-- index in KEYS of the block of `level` (1 = root) of grant g; its first key is g's own mark
local function block_of(g, level)
  return g.base + g.isize * (level - 1)
end

-- the mark index grant g places on `level`
local function mark_of(g, level)
  if level == g.depth then return LEAF_MARK[g.mode] end
  return INTENT_MARK[g.mode]
end

-- key i of the tree block of tree number `tree` (3 keys a tree)
local function tree_key(tree, i)
  return KEYS[3 * (tree - 1) + i]
end
