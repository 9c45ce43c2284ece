"""The Lua scripts behind resumption with the Redis registry (see ``_redis_journal.py``).

Keys under the prefix ``p`` (hash-tagged on a cluster, as every key of the registry):

- ``p:s:ID`` (the session's hash) gains ``rseq`` (the last sequence number given), ``rt`` (its
  current resume token), ``st`` (``open`` or ``detached``), ``rdl`` (when a detached
  session's window ends, ms of Redis time), ``pk`` (the worker that parked it, which keeps
  a copy until it is resumed or ends) and ``pr`` (its presence, for a resume elsewhere);
- ``p:j:ID`` stream: the session's journal, entry ``SEQ-0`` holding one message (``m``, JSON
  ``{"t": text}`` or ``{"b": base64}``), capped at the replay buffer's size, expiring a while
  after its last write;
- ``p:detached`` sorted set: detached ids by the end of their window.

Redis gives every number (``HINCRBY rseq``) in the same script that appends the message to the
journal, so a number exists only for a recorded message, and a resume on any worker reads the
journal as it was at the instant it moved the session (no message is numbered twice or lost
between the old owner and the new one).
"""

from __future__ import annotations

# Removes a session's keys and index entries; its journal and detached entry too.
_FORGET = """
local function forget(p, sid)
  local sk = p .. ':s:' .. sid
  local owner = redis.call('HGET', sk, 'node')
  if owner and owner ~= '' then redis.call('SREM', p .. ':n:' .. owner .. ':s', sid) end
  local uk = redis.call('HGET', sk, 'user_key')
  if uk and uk ~= '' then redis.call('SREM', p .. ':u:' .. uk, sid) end
  for _, g in ipairs(redis.call('SMEMBERS', p .. ':sg:' .. sid)) do
    redis.call('SREM', p .. ':g:' .. g, sid)
  end
  redis.call('DEL', sk, p .. ':sg:' .. sid, p .. ':j:' .. sid)
  redis.call('SREM', p .. ':sessions', sid)
  redis.call('ZREM', p .. ':detached', sid)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

RECORD = """
-- ARGV: prefix, origin node, publish command, journal cap, journal ttl (s), message JSON,
-- exclude id ('' for none), mode ('ids' or 'set'), then the ids, or one set key (a group, a
-- user, all sessions). Numbers the message for every resumable session named and appends it to
-- its journal. Sessions owned by ``origin`` are returned for the caller to deliver; open
-- sessions of other workers get it published to their worker ('rsend', with the numbers);
-- detached ones keep it in the journal only. Returns {recorded count, id_1, seq_1, id_2,
-- seq_2, ...} for the caller's own sessions.
local p, origin, pub, cap, ttl, msg, exclude, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local ids
if mode == 'set' then ids = redis.call('SMEMBERS', ARGV[9]) else
  ids = {}
  for i = 9, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local mine = {0}
local remote = {}
local count = 0
for _, sid in ipairs(ids) do
  local sk = p .. ':s:' .. sid
  if sid ~= exclude then
    local f = redis.call('HMGET', sk, 'node', 'st', 'rt')
    local owner, st = f[1], f[2]
    if f[3] then
      local seq = redis.call('HINCRBY', sk, 'rseq', 1)
      local jk = p .. ':j:' .. sid
      redis.call('XADD', jk, 'MAXLEN', cap, seq .. '-0', 'm', msg)
      redis.call('EXPIRE', jk, ttl)
      count = count + 1
      if owner == origin then
        mine[#mine + 1] = sid
        mine[#mine + 1] = seq
      elseif st == 'open' and owner and owner ~= '' then
        if not remote[owner] then remote[owner] = {} end
        local items = remote[owner]
        items[#items + 1] = {sid, seq}
      end
    end
  end
end
for owner, items in pairs(remote) do
  local envelope = '{"op":"rsend","items":' .. cjson.encode(items) .. ',' ..
    string.sub(msg, 2)
  redis.call(pub, p .. ':ch:' .. owner, envelope)
end
mine[1] = count
return mine
"""

PARK = (
    _FORGET
    + """
-- ARGV: prefix, id, node, token, window (ms), journal ttl (s), data JSON, presence JSON ('' for
-- none: see Presence.export). The session's
-- connection on ``node`` ended resumably: it waits for its client until its window ends, owned by
-- no worker (any worker may resume it). Returns the deadline (ms, Redis time), 0 when the session
-- is not ``node``'s any more (its worker was declared lost meanwhile).
local p, sid, node, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local sk = p .. ':s:' .. sid
local owner = redis.call('HGET', sk, 'node')
if owner ~= node then return 0 end
local deadline = now_ms() + tonumber(ARGV[5])
redis.call('HSET', sk, 'st', 'detached', 'node', '', 'rt', token, 'rdl', deadline,
  'data', ARGV[7], 'pk', node, 'pr', ARGV[8])
redis.call('SREM', p .. ':n:' .. node .. ':s', sid)
redis.call('ZADD', p .. ':detached', deadline, sid)
redis.call('EXPIRE', p .. ':j:' .. sid, ARGV[6])
return deadline
"""
)

RESUME = (
    _FORGET
    + """
-- ARGV: prefix, id, presented token, last, new token, claiming node. Moves a detached session to
-- ``node`` if the token is its current one and its journal holds every number after ``last``.
-- Returns:
--   {'ok', fields, groups, rseq, deadline, seq_1, msg_1, ...}: the session is ``node``'s now,
--     with its new token; the messages numbered after ``last``, in order;
--   {'open', owner}: its connection has not ended yet (``owner`` '' while it parks);
--   {'lost', fields, groups}: the token was good but the journal cannot give everything after
--     ``last``: the session is ended and removed here (the caller runs its hooks);
--   {'unknown'}: no such session, or not its current token.
local p, sid, token, last, new, node = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5],
  ARGV[6]
local sk = p .. ':s:' .. sid
local f = redis.call('HMGET', sk, 'rt', 'st', 'node', 'rseq', 'rdl')
if not f[1] or f[1] ~= token then return {'unknown'} end
if f[2] ~= 'detached' then return {'open', f[3] or ''} end
local rseq = tonumber(f[4] or '0')
local ok = last >= 0 and last <= rseq
local entries = {}
if ok and last < rseq then
  entries = redis.call('XRANGE', p .. ':j:' .. sid, (last + 1) .. '-0', '+')
  ok = #entries == rseq - last
end
local fields = redis.call('HGETALL', sk)
local groups = redis.call('SMEMBERS', p .. ':sg:' .. sid)
if not ok then
  forget(p, sid)
  return {'lost', fields, groups}
end
redis.call('ZREM', p .. ':detached', sid)
redis.call('HSET', sk, 'st', 'open', 'node', node, 'rt', new)
redis.call('SADD', p .. ':n:' .. node .. ':s', sid)
redis.call('SADD', p .. ':nodes', node)
local reply = {'ok', fields, groups, rseq, f[5] or '0'}
for _, entry in ipairs(entries) do
  reply[#reply + 1] = entry[1]
  reply[#reply + 1] = entry[2][2]
end
return reply
"""
)

END_DETACHED = (
    _FORGET
    + """
-- ARGV: prefix, id, caller, taken ttl (s), how it ends (JSON: reason, code, close reason). Ends a
-- detached session (its window ran out, or it was closed) if it is still detached: exactly one
-- caller wins. The caller's taken hash gets it too ({fields, groups, 3, how}; see CLAIM): if the
-- reply is lost, the caller ends it from there. Returns {fields, groups}, or false.
local p, sid = ARGV[1], ARGV[2]
if redis.call('ZREM', p .. ':detached', sid) == 0 then return false end
local fields = redis.call('HGETALL', p .. ':s:' .. sid)
local groups = redis.call('SMEMBERS', p .. ':sg:' .. sid)
forget(p, sid)
local taken = p .. ':taken:' .. ARGV[3]
redis.call('HSET', taken, sid, cjson.encode({fields, groups, 3, ARGV[5]}))
redis.call('EXPIRE', taken, ARGV[4])
return {fields, groups}
"""
)

SWEEP = (
    _FORGET
    + """
-- ARGV: prefix, grace (ms), limit, sweeper, taken ttl (s). Ends detached sessions whose window
-- ended more than ``grace`` ago (the worker that parked them is gone, or a worker crashed with
-- them), each once in the cluster. What their hooks need goes to the sweeper's taken hash
-- ({fields, groups, 2} as JSON; see CLAIM), not in the reply, which can be lost. Returns how
-- many it ended.
local p, grace, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local taken = p .. ':taken:' .. ARGV[4]
local due = redis.call('ZRANGEBYSCORE', p .. ':detached', '-inf', now_ms() - grace,
  'LIMIT', 0, limit)
for _, sid in ipairs(due) do
  local fields = redis.call('HGETALL', p .. ':s:' .. sid)
  local groups = redis.call('SMEMBERS', p .. ':sg:' .. sid)
  forget(p, sid)
  redis.call('HSET', taken, sid, cjson.encode({fields, groups, 2}))
end
if #due > 0 then redis.call('EXPIRE', taken, ARGV[5]) end
return #due
"""
)

JOURNAL = """
-- ARGV: prefix, id, first, last. The journal's messages numbered first..last:
-- {seq_1, msg_1, ...} (fewer when some were trimmed).
local entries = redis.call('XRANGE', ARGV[1] .. ':j:' .. ARGV[2], ARGV[3] .. '-0', ARGV[4] .. '-0')
local reply = {}
for _, entry in ipairs(entries) do
  reply[#reply + 1] = entry[1]
  reply[#reply + 1] = entry[2][2]
end
return reply
"""

ALL = ("RECORD", "PARK", "RESUME", "END_DETACHED", "SWEEP", "JOURNAL")
