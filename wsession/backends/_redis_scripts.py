"""The Lua scripts the Redis registry runs: every change that must not interleave with another
worker's is one script, so Redis applies it atomically.

Key layout under a prefix ``p`` (see :class:`~wsession.backends._redis_codec.Keys`):

- ``p:s:ID`` hash: one session (``node`` owns it, metadata, data); ``p:sg:ID`` set: its groups;
- ``p:sessions`` set: every live id; ``p:g:GROUP`` and ``p:u:USER`` sets: ids;
- ``p:nodes`` set: workers that may own sessions; ``p:n:NODE:s`` set: the ids a worker owns;
- ``p:lease:NODE`` string with a TTL: a token the worker changes at every heartbeat;
- ``p:dead:NODE`` string with a TTL: the tombstone of a worker declared lost.

Empty sets vanish by themselves in Redis, so nothing grows past the live sessions and workers
(plus tombstones, which expire).
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

REGISTER = """
-- ARGV: prefix, node, id, user_key ('' for none), n, group_1..group_n, field, value, ...
-- Writes (or rewrites) a session of ``node``. -1: ``node`` was declared lost; 0: ``node`` holds
-- no lease (Redis restarted, or it lapsed): renew it first, else the others would take the node
-- for dead; -2: the id belongs to another worker; 1: done.
local p, node, sid, uk = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', p .. ':dead:' .. node) == 1 then return -1 end
if redis.call('EXISTS', p .. ':lease:' .. node) == 0 then return 0 end
local sk = p .. ':s:' .. sid
local owner = redis.call('HGET', sk, 'node')
if owner and owner ~= node then return -2 end
"""
REGISTER += _CLEANUP.replace("local sk = p .. ':s:' .. sid\n", "")
REGISTER += """
local n = tonumber(ARGV[5])
for i = 6, 5 + n do
  redis.call('SADD', p .. ':g:' .. ARGV[i], sid)
  redis.call('SADD', p .. ':sg:' .. sid, ARGV[i])
end
local fields = {}
for i = 6 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', sk, unpack(fields))
if uk ~= '' then redis.call('SADD', p .. ':u:' .. uk, sid) end
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
REMOVE += _CLEANUP + "\nreturn 1\n"

CLAIM = """
-- ARGV: prefix, id, lost node. Only the caller whose SREM succeeds gets the session back (its
-- fields and groups), so the node-lost disconnect hooks run once in the cluster.
local p, sid, node = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SREM', p .. ':n:' .. node .. ':s', sid) == 0 then return false end
if redis.call('HGET', p .. ':s:' .. sid, 'node') ~= node then return false end
local fields = redis.call('HGETALL', p .. ':s:' .. sid)
local groups = redis.call('SMEMBERS', p .. ':sg:' .. sid)
"""
CLAIM += _CLEANUP + "\nreturn {fields, groups}\n"

HEARTBEAT = """
-- ARGV: prefix, node, token, ttl_ms. Renews the lease. -1: the worker was declared lost (it must
-- not write its old sessions again); 0: the lease had lapsed (or Redis lost its data): the
-- worker writes its sessions again; 1: renewed.
local p, node = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. ':dead:' .. node) == 1 then return -1 end
local had = redis.call('EXISTS', p .. ':lease:' .. node)
redis.call('SET', p .. ':lease:' .. node, ARGV[3], 'PX', ARGV[4])
redis.call('SADD', p .. ':nodes', node)
return had
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
-- ARGV: prefix, id, envelope. Publishes to the worker owning ``id``, in one round trip.
-- Returns {owner, receivers}, or false for an unknown id.
local p, sid = ARGV[1], ARGV[2]
local owner = redis.call('HGET', p .. ':s:' .. sid, 'node')
if not owner then return false end
return {owner, redis.call('PUBLISH', p .. ':ch:' .. owner, ARGV[3])}
"""
