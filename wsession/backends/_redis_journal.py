"""Resumption across workers with the Redis registry: the durable journal.

With ``resume_window`` and a :class:`~wsession.backends.redis.RedisRegistry`, Redis gives every
message for a session its number and appends it to the session's journal (a capped stream) in
one script, before the send returns; the worker holding the connection writes what it is given
in the order of the numbers (``_delivery.deliver_numbered``). So:

- a worker killed with ``kill -9`` loses nothing that a send reported: the survivors turn its
  sessions into detached ones (``CLAIM``), and their clients resume on any worker;
- a detached session waits in Redis owned by no worker; a resume moves it to the worker the
  client reached, in one script that reads the journal at that instant (one resume wins);
- pub/sub messages missed while a worker reconnects are read from the journals afterwards.

This worker's records go through one ordered queue (one pipeline per turn): numbers are given
in the order the sends were made, and a send's own frames stay in order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .._delivery import SendResult, deliver_numbered, offer_unnumbered
from .._exceptions import RegistryUnavailable
from .._log import log_warning
from .._session import EndReason, Session
from .._shield import run_shielded
from .._types import Message
from ._base import Claim
from ._redis_codec import encode_data, rebuild_session
from ._redis_link import Deadline
from ._redis_scripts import TOMBSTONE_SECONDS

if TYPE_CHECKING:
    from .._presence import PresenceChange
    from .redis import RedisRegistry

DETACHED_NODE = "~detached"
"""The node name under which presence entries of detached sessions whose worker has gone are
kept (a presence hash and the ``origin`` of their changes): moving them there when that worker
drains means no worker sees them leave; a resume moves them to the resuming worker, an ending
removes them."""

_JOURNAL_TTL_MARGIN = 60
"""Seconds a journal outlives its last write beyond the resume window (a safety net: the
session's removal deletes it)."""


class _Job:
    __slots__ = ("done", "message", "sessions")

    def __init__(
        self, sessions: list[Session], message: Message, done: asyncio.Future[Any] | None
    ) -> None:
        self.sessions = sessions
        self.message = message
        self.done = done


def encode_message(message: Message) -> str:
    """How a journal stores one message: ``{"t": text}`` or ``{"b": base64}``."""
    data = message.get("bytes")
    if data is not None:
        return json.dumps({"b": base64.b64encode(data).decode("ascii")}, separators=(",", ":"))
    return json.dumps({"t": message.get("text") or ""}, separators=(",", ":"))


def decode_message(raw: str) -> Message:
    """The message :func:`encode_message` stored."""
    fields = json.loads(raw)
    if "b" in fields:
        return {"type": "websocket.send", "bytes": base64.b64decode(fields["b"])}
    return {"type": "websocket.send", "text": fields["t"]}


class RedisJournal:
    """The :class:`~wsession.backends._base.ResumeStore` of a ``RedisRegistry`` (made by
    :meth:`RedisRegistry.resume_store`)."""

    def __init__(self, registry: RedisRegistry) -> None:
        self._registry = registry
        self._jobs: deque[_Job] = deque()
        self._flusher: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def _io(self) -> AsyncIterator[None]:
        """One of this module's Redis steps: through the journal's gate, then the registry's
        ``_bounded`` (a connection slot, then ``command_timeout``). Resumes, parks and endings
        come in bursts (every client of a dead worker at once): they take a quarter of the
        registry's connections at most, so the handshakes and sends of the same moment keep
        the rest. Waiting there is untimed, as in the registry's gate (a burst is load, not an
        outage), and ends with the same outage (see ``RedisRegistry._journal_gate``): steps
        waiting behind a hung Redis fail at once, not one ``command_timeout`` each in turn.
        The heartbeat (the sweep) and a task that holds a registry slot already (a kick:
        ``_close_detached``) skip this gate: the first must not queue behind a burst, the
        second would wait while holding a slot that the holders of this gate wait for."""
        registry = self._registry
        if registry._priority() or registry._gate.held():
            async with registry._bounded():
                yield
            return
        async with registry._journal_gate.slot(), registry._bounded():
            yield

    # -- settings ------------------------------------------------------------------------------

    def _window(self) -> float:
        return self._registry._bound().settings.resume_window

    def _cap(self) -> int:
        return self._registry._bound().settings.resume_buffer

    def _ttl(self) -> int:
        return int(self._window()) + _JOURNAL_TTL_MARGIN

    def _script(self, name: str) -> Any:
        return self._registry._scripts[name]

    # -- recording -----------------------------------------------------------------------------

    async def record(self, sessions: list[Session], message: Message) -> list[SendResult]:
        """Number, record, then write ``message`` for each of this worker's ``sessions``."""
        if not self._registry.available:
            return self._unnumbered(sessions, message)
        done: asyncio.Future[list[SendResult]] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(sessions, message, done))
        self._start()
        return await asyncio.shield(done)

    def record_soon(self, sessions: list[Session], message: Message) -> None:
        """:meth:`record` without waiting for it."""
        if not self._registry.available:
            self._unnumbered(sessions, message)
            return
        self._jobs.append(_Job(sessions, message, None))
        self._start()

    def _unnumbered(self, sessions: list[Session], message: Message) -> list[SendResult]:
        # Redis is unreachable: the message is written now, without a number (it cannot be
        # replayed; the client sees no gap, as it never saw a number for it).
        manager = self._registry._bound()
        return [offer_unnumbered(manager, s, message) or SendResult.GONE for s in sessions]

    def _start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Record the queued jobs, a pipeline per turn, in order; then write each."""
        manager = self._registry._bound()
        batch: list[_Job] = []
        try:
            while self._jobs:
                batch = list(self._jobs)
                self._jobs.clear()
                try:
                    replies: list[dict[str, int] | None] = await self._record(batch)
                except Exception as exc:
                    self._registry._fail(exc)
                    log_warning(None, "could not record messages in Redis: sent unnumbered")
                    replies = [None] * len(batch)
                for job, numbers in zip(batch, replies, strict=True):
                    results: list[SendResult] = []
                    for session in job.sessions:
                        seq = numbers.get(session.id) if numbers is not None else None
                        if seq is None:
                            results.append(
                                offer_unnumbered(manager, session, job.message) or SendResult.GONE
                            )
                        else:
                            results.append(deliver_numbered(manager, session, seq, job.message))
                    if job.done is not None and not job.done.done():
                        job.done.set_result(results)
        finally:
            self._flusher = None
            # Cancelled mid-way (shutdown): nobody is left to record them; no sender waits for
            # ever.
            for job in [*batch, *self._jobs]:
                if job.done is not None and not job.done.done():
                    job.done.set_result([SendResult.GONE] * len(job.sessions))
            self._jobs.clear()

    async def close(self) -> None:
        """Let the queued records finish (up to ``command_timeout`` seconds), then stop."""
        flusher = self._flusher
        if flusher is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._registry.command_timeout):
                await asyncio.shield(flusher)
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher

    async def _record(self, batch: list[_Job]) -> list[dict[str, int] | None]:
        registry = self._registry
        args = [
            [
                registry._keys.prefix,
                registry.node_id,
                registry._mode.publish_command,
                self._cap(),
                self._ttl(),
                encode_message(job.message),
                "",
                "ids",
                *(s.id for s in job.sessions),
            ]
            for job in batch
        ]
        script = self._script("RECORD")
        async with registry._bounded():
            # One job: a plain EVALSHA (redis-py's pipelines ask SCRIPT EXISTS first, a second
            # round trip). On a cluster always so: its pipelines refuse scripts.
            if len(args) == 1 or registry._mode.cluster:
                raw = [await script(keys=registry._route, args=a) for a in args]
            else:
                # A with block gives the connection back if SCRIPT EXISTS fails (see
                # RedisRegistry._script_batch).
                async with registry.redis.pipeline(transaction=False) as pipe:
                    for a in args:
                        await script(keys=registry._route, args=a, client=pipe)
                    raw = await pipe.execute()
        return [_numbers(reply) for reply in raw]

    async def record_for(
        self,
        message: Message,
        *,
        ids: list[str] | None = None,
        key: str | None = None,
        exclude: str | None = None,
    ) -> int:
        """Record ``message`` for the sessions ``ids``, or the members of the set ``key``
        (a group, a user, every session), wherever they are: other workers' get it published,
        this worker's are written here. Returns how many it recorded. The caller bounds it in
        time and handles Redis errors."""
        registry = self._registry
        mode, rest = ("set", [key]) if key is not None else ("ids", list(ids or ()))
        reply = await self._script("RECORD")(
            keys=registry._route,
            args=[
                registry._keys.prefix,
                registry.node_id,
                registry._mode.publish_command,
                self._cap(),
                self._ttl(),
                encode_message(message),
                exclude or "",
                mode,
                *rest,
            ],
        )
        manager = registry._bound()
        # This worker's sessions: one not indexed here (yet) gets it from its journal when
        # its resume catches up (see Resumption).
        for session_id, seq in _numbers(reply).items():
            session = registry._local.local_session(session_id)
            if session is not None:
                deliver_numbered(manager, session, seq, message)
        return int(reply[0])

    # -- detached sessions ----------------------------------------------------------------------

    async def park(
        self, session: Session, token: str, window: float, presence: dict[str, Any] | None
    ) -> float | None:
        """Detach ``session`` in Redis (see ``PARK``); this worker's index forgets it."""
        registry = self._registry
        registry._forget_parked(session)
        async with self._io():
            deadline = int(
                await self._script("PARK")(
                    keys=registry._route,
                    args=[
                        registry._keys.prefix,
                        session.id,
                        registry.node_id,
                        token,
                        int(window * 1000),
                        self._ttl(),
                        encode_data(session),
                        json.dumps(presence, separators=(",", ":")) if presence else "",
                    ],
                )
            )
        return deadline / 1000 if deadline else None

    async def claim(self, session_id: str, token: str, last: int, new_token: str) -> Claim:
        """Move a detached session here (see ``RESUME``)."""
        registry = self._registry
        try:
            async with self._io():
                reply = await self._script("RESUME")(
                    keys=registry._route,
                    args=[
                        registry._keys.prefix,
                        session_id,
                        token,
                        last,
                        new_token,
                        registry.node_id,
                    ],
                )
        except Exception as exc:
            registry._fail(exc)
            raise RegistryUnavailable(f"resume: Redis unavailable: {exc!r}") from exc
        outcome = str(reply[0])
        if outcome == "open":
            return Claim("open", owner=str(reply[1]))
        if outcome == "unknown":
            return Claim("unknown")
        stored = _fields(reply[1])
        session = self._rebuild(session_id, stored, reply[2], live=outcome == "ok")
        if outcome == "lost":
            async with self._io():
                await self._ended_here(session_id, stored)
            return Claim("lost", session)
        missed = [
            (int(str(entry).split("-", 1)[0]), decode_message(str(raw)))
            for entry, raw in zip(reply[5::2], reply[6::2], strict=True)
        ]
        session.node = registry.node_id
        presence = _presence_of(stored)
        if presence:  # its entries move here (Presence.adopt): not DETACHED_NODE's any more
            async with self._io():
                await self._forget_detached_presence(session_id, presence)
        return Claim(
            "ok",
            session,
            parker=str(stored.get("pk", "")),
            presence=presence,
            seq=int(reply[3]),
            deadline=int(reply[4]) / 1000,
            missed=missed,
        )

    async def take(self, owner: str, session_id: str) -> None:
        """Ask ``owner`` to close the session's connection (it detaches, then it is claimed)."""
        registry = self._registry
        async with self._io():
            await registry._publish(owner, "take", ids=[session_id])

    async def moved(self, parker: str, session_id: str) -> None:
        """Tell ``parker`` that the session it parked was resumed here."""
        if parker and parker != self._registry.node_id:
            registry = self._registry
            async with self._io():
                await registry._publish(parker, "moved", ids=[session_id], to=registry.node_id)

    async def end_detached(
        self, session_id: str, reason: EndReason, code: int | None, close_reason: str | None
    ) -> Session | None:
        """End a detached session if it still is (see ``END_DETACHED``). Without an answer
        (or when what follows fails), the registry ends it from its taken hash if Redis did
        (``RedisRegistry._collect_taken``); with one, that entry is deleted at once."""
        registry = self._registry
        how = json.dumps([reason.value, code, close_reason])
        registry._taken_asking(session_id)
        won = False
        try:
            async with self._io():
                reply = await self._script("END_DETACHED")(
                    keys=registry._route,
                    args=[
                        registry._keys.prefix,
                        session_id,
                        registry.node_id,
                        TOMBSTONE_SECONDS,
                        how,
                    ],
                )
                if reply:
                    await self._ended_here(session_id, _fields(reply[0]))
            won = bool(reply)
        finally:
            registry._taken_answered(session_id, won=won)
        if not reply:
            return None
        await registry._forget_taken(session_id)
        return self._rebuild(session_id, _fields(reply[0]), reply[1], live=False)

    async def missed(self, session_id: str, first: int, last: int) -> list[tuple[int, Message]]:
        """The journal's messages numbered ``first`` to ``last``."""
        if last < first:
            return []
        registry = self._registry
        async with self._io():
            reply = await self._script("JOURNAL")(
                keys=registry._route, args=[registry._keys.prefix, session_id, first, last]
            )
        return [
            (int(str(entry).split("-", 1)[0]), decode_message(str(raw)))
            for entry, raw in zip(reply[::2], reply[1::2], strict=True)
        ]

    async def count_detached(self) -> int:
        """Detached sessions in Redis (every worker's)."""
        registry = self._registry
        async with registry._cluster("count_detached"):
            return int(await registry.redis.zcard(f"{registry._keys.prefix}:detached"))

    def adopt(self, session: Session) -> None:
        """A resumed session is this worker's again."""
        self._registry._adopt(session)

    async def sweep(self, taken_ttl: int) -> int:
        """End detached sessions whose window ended a while ago and whose worker did not end
        them (it drained or died): each ended once in the cluster, by whichever worker's sweep
        takes it (up to 100 per call), into that worker's taken hash (see
        ``RedisRegistry._collect_taken``: their hooks run from there, off the heartbeat). One
        Redis step, shielded: the heartbeat calls it, and the read that follows must come
        after it. Returns how many it ended."""
        async with self._io():
            return await run_shielded(self._swept(taken_ttl))

    async def _swept(self, taken_ttl: int) -> int:
        registry = self._registry
        grace = int((registry.lease_ttl + registry.heartbeat) * 1000)
        async with Deadline(registry.command_timeout):  # (shielded from the caller's)
            ended = await self._script("SWEEP")(
                keys=registry._route,
                args=[registry._keys.prefix, grace, 100, registry.node_id, taken_ttl],
            )
        return int(ended)

    async def finish_swept(self, session_id: str, stored: dict[str, str]) -> None:
        """After :meth:`sweep`, off the heartbeat: tell the parking worker and drop the
        presence it left (see :meth:`_ended_here`). Raises Redis errors."""
        async with self._io():
            await self._ended_here(session_id, stored)

    def rebuild_swept(self, session_id: str, stored: dict[str, str], groups: list[str]) -> Session:
        """A swept session, rebuilt for its disconnect hooks."""
        return self._rebuild(session_id, stored, groups, live=False)

    async def catch_up(self, sessions: list[Session]) -> None:
        """After the pub/sub subscription was lost: write what was recorded for ``sessions``
        meanwhile (their journals hold it)."""
        registry = self._registry
        manager = registry._bound()
        durable = [s for s in sessions if s._resume is not None and s._resume.durable is self]
        for start in range(0, len(durable), 500):
            chunk = durable[start : start + 500]
            async with self._io():
                pipe = registry.redis.pipeline(transaction=False)
                for session in chunk:
                    pipe.hget(registry._keys.session(session.id), "rseq")
                numbers = await pipe.execute()
            for session, raw in zip(chunk, numbers, strict=True):
                journal = session._resume
                if raw is None or journal is None:
                    continue
                for seq, message in await self.missed(session.id, journal.expected, int(raw)):
                    deliver_numbered(manager, session, seq, message)

    async def _ended_here(self, session_id: str, stored: dict[str, str]) -> None:
        """A detached session was ended in Redis by this worker: its parking worker (if another)
        drops its copy and its presence leaves; entries it left under DETACHED_NODE leave too.
        The caller holds ``_bounded``."""
        registry = self._registry
        parker = stored.get("pk", "")
        if parker == registry.node_id:
            return  # this worker parked it: its own copy's teardown does the rest
        if parker:
            await registry._publish(parker, "ended", ids=[session_id])
        presence = _presence_of(stored)
        if presence:
            await self._forget_detached_presence(session_id, presence, announce=True)

    async def _forget_detached_presence(
        self, session_id: str, presence: dict[str, Any], *, announce: bool = False
    ) -> None:
        """Remove the session's entries under DETACHED_NODE (and, with ``announce``, tell every
        worker that they left: the session ended). The caller holds ``_bounded``."""
        registry = self._registry
        topics = [str(topic) for topic, _ in presence.get("t", ())]
        if not topics:
            return
        fields = [json.dumps([t, session_id], separators=(",", ":")) for t in topics]
        await registry.redis.hdel(registry._keys.presence(DETACHED_NODE), *fields)
        if announce:
            leaves: list[PresenceChange] = [(t, session_id, "", None) for t in topics]
            await registry._publish_presence_as(DETACHED_NODE, leaves)

    def _rebuild(
        self, session_id: str, stored: dict[str, str], groups: Any, *, live: bool
    ) -> Session:
        return rebuild_session(self._registry._bound(), session_id, stored, set(groups), live=live)


def _fields(flat: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}


def _presence_of(stored: dict[str, str]) -> dict[str, Any] | None:
    raw = stored.get("pr")
    return json.loads(raw) if raw else None


def _numbers(reply: Any) -> dict[str, int]:
    return {str(reply[i]): int(reply[i + 1]) for i in range(1, len(reply) - 1, 2)}
