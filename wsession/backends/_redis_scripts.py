"""The Lua scripts the Redis registry runs: every change that must not interleave with another
worker's is one script, so Redis applies it atomically.

Key layout under a prefix ``p`` (see :class:`~wsession.backends._redis_codec.Keys`; on a Redis
Cluster ``p`` is the hash tag ``{prefix}``, so every key below hashes to one slot: the scripts
take ``p`` as an argument and one key, ``p:nodes``, in KEYS only to route them to that slot):

- ``p:s:ID`` hash: one session (``node`` owns it, metadata, data); ``p:sg:ID`` set: its groups;
- ``p:sessions`` set: every live id; ``p:g:GROUP`` and ``p:u:USER`` sets: ids;
- ``p:nodes`` set: workers that may own sessions; ``p:n:NODE:s`` set: the ids a worker owns;
- ``p:lease:NODE`` string with a TTL: ``INCARNATION/TOKEN``; the worker changes the token at every
  heartbeat; the incarnation is random per start, so a restart under a fixed node id (a pod name)
  is told apart from the process it replaces;
- ``p:dead:NODE`` string with a TTL: the tombstone of a worker declared lost; ``p:dead:NODE/INC``:
  the tombstone of one incarnation that a restart under the same node id replaced.

Empty sets vanish by themselves in Redis, so nothing grows past the live sessions and workers
(plus tombstones, which expire). Group and user sets also get a TTL (``index_ttl``), renewed on
every write and by their owners' heartbeats: a safety net, should an entry ever outlive its
session, for sets nobody writes any more.
"""

from __future__ import annotations

TOMBSTONE_SECONDS = 24 * 3600
"""How long a lost worker's tombstone is kept: if that worker was only stalled and comes back
within this time, it learns it was declared lost instead of registering its sessions again."""

# Removes one session's keys and index entries. Shared by REMOVE and CLAIM (not a script alone).
_CLEANUP = """
local sk = p .. ':s:' .. sid
local stored_uk = redis.call('HGET', sk, 'user_key')
if stored_uk and stored_uk ~= '' then redis.call('SREM', p .. ':u:' .. stored_uk, sid) end
for _, g in ipairs(redis.call('SMEMBERS', p .. ':sg:' .. sid)) do
  redis.call('SREM', p .. ':g:' .. g, sid)
end
redis.call('DEL', sk, p .. ':sg:' .. sid)
redis.call('SREM', p .. ':sessions', sid)
"""

# Whether the lease of ``node`` (``lk``) is held by incarnation ``inc``: sets ``mine`` (nil when
# there is no lease, false when another incarnation holds it).
_LEASE_OWNER = """
local lk = p .. ':lease:' .. node
local cur = redis.call('GET', lk)
local mine = nil
if cur then mine = string.sub(cur, 1, #inc + 1) == inc .. '/' end
"""

REGISTER = (
    """
-- ARGV: prefix, node, incarnation, index ttl (s), id, user_key ('' for none), n,
-- group_1..group_n, field, value, ... Writes (or rewrites) a session of ``node``. -1: ``node``
-- was declared lost (or another incarnation holds its lease); 0: ``node`` holds no lease (Redis
-- restarted, or it lapsed): renew it first, else the others would take the node for dead; -2:
-- the id belongs to another worker; 1: done.
local p, node, inc, ttl, sid, uk = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', p .. ':dead:' .. node) == 1 then return -1 end
"""
    + _LEASE_OWNER
    + """
if mine == nil then return 0 end
if not mine then return -1 end
local sk = p .. ':s:' .. sid
local owner = redis.call('HGET', sk, 'node')
if owner and owner ~= node then return -2 end
local rseq = redis.call('HGET', sk, 'rseq')
"""
)
REGISTER += _CLEANUP.replace("local sk = p .. ':s:' .. sid\n", "")
REGISTER += """
local n = tonumber(ARGV[7])
for i = 8, 7 + n do
  redis.call('SADD', p .. ':g:' .. ARGV[i], sid)
  redis.call('EXPIRE', p .. ':g:' .. ARGV[i], ttl)
  redis.call('SADD', p .. ':sg:' .. sid, ARGV[i])
end
local fields = {}
for i = 8 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', sk, unpack(fields))
if rseq and tonumber(rseq) > tonumber(redis.call('HGET', sk, 'rseq') or '0') then
  redis.call('HSET', sk, 'rseq', rseq)
end
if uk ~= '' then
  redis.call('SADD', p .. ':u:' .. uk, sid)
  redis.call('EXPIRE', p .. ':u:' .. uk, ttl)
end
redis.call('SADD', p .. ':sessions', sid)
redis.call('SADD', p .. ':n:' .. node .. ':s', sid)
redis.call('SADD', p .. ':nodes', node)
return 1
"""

REMOVE = """
-- ARGV: prefix, id, node. Forgets a session of ``node`` (nothing if another worker owns it now).
local p, sid, node = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('HGET', p .. ':s:' .. sid, 'node')
if owner and owner ~= node then return 0 end
redis.call('SREM', p .. ':n:' .. node .. ':s', sid)
"""
REMOVE += (
    _CLEANUP
    + """
redis.call('DEL', p .. ':j:' .. sid)
redis.call('ZREM', p .. ':detached', sid)
return 1
"""
)

CLAIM = (
    """
-- ARGV: prefix, lost node, resume window (ms; 0 without resumption), claimer, taken ttl (s),
-- id_1..id_n. Claims those of the ids the lost node still owns. Only the caller whose SREM
-- succeeds gets a session (its fields and groups), so the node-lost disconnect hooks run once in
-- the cluster. A resumable session (one with a resume token) is not ended: it becomes detached,
-- owned by no worker, for the window (its client may resume it on any worker). What the hooks
-- need goes to the claimer's taken hash ({fields, groups, detached} as JSON), not in the reply:
-- a reply can be lost, and the claimer reads the hash until it got it. Returns how many it took.
local p, node, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
local taken = p .. ':taken:' .. ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local claimed = 0
for i = 6, #ARGV do
  local sid = ARGV[i]
  if redis.call('SREM', p .. ':n:' .. node .. ':s', sid) == 1
    and redis.call('HGET', p .. ':s:' .. sid, 'node') == node then
    local fields = redis.call('HGETALL', p .. ':s:' .. sid)
    local groups = redis.call('SMEMBERS', p .. ':sg:' .. sid)
    if window > 0 and redis.call('HEXISTS', p .. ':s:' .. sid, 'rt') == 1 then
      redis.call('HSET', p .. ':s:' .. sid, 'st', 'detached', 'node', '', 'rdl', now + window)
      redis.call('ZADD', p .. ':detached', now + window, sid)
      redis.call('HSET', taken, sid, cjson.encode({fields, groups, 1}))
      claimed = claimed + 1
    else
"""
    + _CLEANUP
    + """
      redis.call('DEL', p .. ':j:' .. sid)
      redis.call('HSET', taken, sid, cjson.encode({fields, groups, 0}))
      claimed = claimed + 1
    end
  end
end
if claimed > 0 then redis.call('EXPIRE', taken, ARGV[5]) end
return claimed
"""
)

ADOPT_TAKEN = """
-- ARGV: prefix, lost node, claimer, taken ttl (s). Moves what a lost worker took to end and had
-- not read yet (see CLAIM) to the claimer's taken hash: those hooks run there. Returns how many.
local p = ARGV[1]
local from, to = p .. ':taken:' .. ARGV[2], p .. ':taken:' .. ARGV[3]
local entries = redis.call('HGETALL', from)
for i = 1, #entries, 2 do
  redis.call('HSET', to, entries[i], entries[i + 1])
end
if #entries > 0 then
  redis.call('EXPIRE', to, ARGV[4])
  redis.call('DEL', from)
end
return #entries / 2
"""

HEARTBEAT = (
    """
-- ARGV: prefix, node, incarnation, token, ttl_ms. Renews the lease. -1: the worker was declared
-- lost, or a restart under its node id took over (it must not write its old sessions again);
-- 0: the lease had lapsed (or Redis lost its data): the worker writes its sessions again;
-- 1: renewed.
local p, node, inc = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', p .. ':dead:' .. node) == 1 then return -1 end
if redis.call('EXISTS', p .. ':dead:' .. node .. '/' .. inc) == 1 then return -1 end
"""
    + _LEASE_OWNER
    + """
if mine == false then return -1 end
redis.call('SET', lk, inc .. '/' .. ARGV[4], 'PX', ARGV[5])
redis.call('SADD', p .. ':nodes', node)
if mine then return 1 end
return 0
"""
)

TAKE_OVER = """
-- ARGV: prefix, node, expected lease ('' when there was none), incarnation, token, ttl_ms,
-- tombstone seconds. A worker starting under a fixed node id replaces the incarnation that ran
-- before it (crashed, or stalled past judgement): takes the lease unless it changed since the
-- caller looked, tombstones the old incarnation, and returns how many sessions the old one left
-- (the caller claims them as node lost). -1: the lease changed (that incarnation is alive);
-- -2: the node was declared lost by the cluster (its sessions were healed already).
local p, node, expected, inc = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', p .. ':dead:' .. node) == 1 then return -2 end
local lk = p .. ':lease:' .. node
local cur = redis.call('GET', lk)
if cur and cur ~= expected then return -1 end
if cur then
  local old = string.match(cur, '^(.*)/')
  if old and old ~= inc then
    redis.call('SET', p .. ':dead:' .. node .. '/' .. old, inc, 'EX', ARGV[7])
  end
end
redis.call('SET', lk, inc .. '/' .. ARGV[5], 'PX', ARGV[6])
redis.call('SADD', p .. ':nodes', node)
return redis.call('SCARD', p .. ':n:' .. node .. ':s')
"""

JOIN = """
-- ARGV: prefix, id, group, index ttl (s). Adds a live session to a group, atomically with its
-- existence (a join racing the session's removal never leaves an entry behind). Returns the
-- owner node, or false when the session is unknown.
local p, sid, g = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('HGET', p .. ':s:' .. sid, 'node')
if not owner then return false end
redis.call('SADD', p .. ':g:' .. g, sid)
redis.call('EXPIRE', p .. ':g:' .. g, ARGV[4])
redis.call('SADD', p .. ':sg:' .. sid, g)
return owner
"""

LEAVE = """
-- ARGV: prefix, id, group. Removes a session from a group. Returns {owner or '', removed}.
local p, sid, g = ARGV[1], ARGV[2], ARGV[3]
local removed = redis.call('SREM', p .. ':g:' .. g, sid)
redis.call('SREM', p .. ':sg:' .. sid, g)
local owner = redis.call('HGET', p .. ':s:' .. sid, 'node')
return {owner or '', removed}
"""

LIVE_MEMBERS = """
-- KEYS: none. ARGV: prefix, set key. The ids of a group or user set whose session is live;
-- drops any other (a safety net: no write path leaves one, but a set must never list an id
-- that ``get`` does not know).
local p, key = ARGV[1], ARGV[2]
local live = {}
for _, sid in ipairs(redis.call('SMEMBERS', key)) do
  if redis.call('SISMEMBER', p .. ':sessions', sid) == 1 then
    live[#live + 1] = sid
  else
    redis.call('SREM', key, sid)
  end
end
return live
"""

DECLARE_LOST = """
-- ARGV: prefix, node, expected lease token ('' when the lease must be gone), claimer, tombstone
-- seconds. Declares ``node`` lost unless its lease changed since the caller looked (it is alive):
-- drops the lease and leaves a tombstone, atomically with respect to its heartbeat. 1: lost.
local p, node, expected = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('GET', p .. ':lease:' .. node)
if current and current ~= expected then return 0 end
redis.call('DEL', p .. ':lease:' .. node)
redis.call('SET', p .. ':dead:' .. node, ARGV[4], 'EX', ARGV[5])
return 1
"""

FORGET_NODE = """
-- ARGV: prefix, node. Removes a lost worker from the node set once it owns nothing. 1: removed.
local p, node = ARGV[1], ARGV[2]
if redis.call('SCARD', p .. ':n:' .. node .. ':s') > 0 then return 0 end
redis.call('SREM', p .. ':nodes', node)
return 1
"""

SEND = """
-- ARGV: prefix, id, envelope, publish command (PUBLISH, or SPUBLISH for sharded pub/sub).
-- Publishes to the worker owning ``id``, in one round trip. Returns {owner, receivers}, or false
-- for an unknown id.
local p, sid = ARGV[1], ARGV[2]
local owner = redis.call('HGET', p .. ':s:' .. sid, 'node')
if not owner then return false end
return {owner, redis.call(ARGV[4], p .. ':ch:' .. owner, ARGV[3])}
"""
