"""Presence: who is in a topic, grouped by person, told to subscribers as coalesced diffs.

The one owner of presence state (reach it as ``manager.presence``; it is created on first use,
so apps that never use presence pay nothing). A session is *tracked* in a topic with a little
metadata; a topic lists people (``user_key``; a session without one is a person of its own)
with the metadata of each of their sessions. Sessions *subscribed* to a topic receive its
changes as one diff per ``presence_interval``:

- changes inside an interval are coalesced per session: a join and a leave of one session
  cancel out, and nothing is sent;
- a diff lists the sessions that joined and left, grouped by person, and says which people
  arrived (had no session before) and departed (have none now): a second tab joins the
  person's sessions, but is not an arrival of the person.

With a cluster registry (``RedisRegistry``) each worker keeps the whole cluster's presence in
memory: it publishes its own sessions' changes once per interval on the registry's existing
pub/sub channel, applies the others' as they come, and sends diffs to its own subscribers. A
lost worker's presences leave everywhere as one diff when the registry heals it.

Concurrency: every method runs on the event loop's tasks; the synchronous bookkeeping (what is
tracked, the limits) is done before the first ``await`` of each call. asyncio only (diffs are
sent from tasks created on the running loop). An interval's diffs are handed out (and its
changes published) only after the previous interval's, even when the next interval falls due
while a big fan-out is still under way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._delivery import deliver_all, to_message
from ._exceptions import InvalidMessage, LimitExceeded, RegistryUnavailable
from ._json import encode_json
from ._log import log_error
from ._session import Session
from ._timers import Timer, call_later

if TYPE_CHECKING:
    from ._manager import SessionManager

Meta = dict[str, Any]
"""One session's presence metadata: a JSON object."""

People = dict[str, dict[str, Meta]]
"""A topic's presence: person -> {session id: metadata}."""

PresenceChange = tuple[str, str, str, Meta | None]
"""``(topic, session_id, person, meta)`` as a registry stores and publishes it; ``meta`` is
``None`` for a leave."""


@dataclass(frozen=True, slots=True)
class PresenceDiff:
    """What changed in one topic over one ``presence_interval``.

    Attributes:
        topic: the topic.
        joins: person -> {session id: metadata} of the sessions that joined (a session whose
            metadata changed appears in ``leaves`` with the old and in ``joins`` with the new).
        leaves: person -> {session id: metadata} of the sessions that left.
        arrived: people who had no session in the topic at the previous diff and have one now.
        departed: people who had one and have none now.
    """

    topic: str
    joins: dict[str, dict[str, Meta]]
    leaves: dict[str, dict[str, Meta]]
    arrived: frozenset[str]
    departed: frozenset[str]


def default_render(diff: PresenceDiff) -> dict[str, Any]:
    """The message subscribers receive unless ``presence.render`` is replaced:
    ``{"type": "presence_diff", "topic": T, "joins": {PERSON: {SESSION_ID: META}}, "leaves":
    {...}, "arrived": [PERSON...], "departed": [PERSON...]}``."""
    return {
        "type": "presence_diff",
        "topic": diff.topic,
        "joins": diff.joins,
        "leaves": diff.leaves,
        "arrived": sorted(diff.arrived),
        "departed": sorted(diff.departed),
    }


class _Entry:
    """One tracked session in one topic (immutable once made: a re-track makes a new one)."""

    __slots__ = ("meta", "node", "person")

    def __init__(self, person: str, meta: Meta, node: str | None) -> None:
        self.person = person
        self.meta = meta
        self.node = node  # None: a session of this worker


class Presence:
    """Presence of sessions in topics, for one :class:`~wsession.SessionManager` (use
    ``manager.presence``; do not construct it yourself).

    Attributes:
        render: turns a :class:`PresenceDiff` into the data sent to subscribers (default
            :func:`default_render`); replace it to fit your protocol. Data as for
            ``manager.send``: a dict becomes JSON text.
    """

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager
        self.render: Callable[[PresenceDiff], Any] = default_render
        self._topics: dict[str, dict[str, dict[str, _Entry]]] = {}  # topic -> person -> sid
        self._where: dict[tuple[str, str], _Entry] = {}  # (topic, sid) -> entry
        self._sizes: dict[str, int] = {}  # topic -> sessions tracked in it
        self._local: dict[str, set[str]] = {}  # this worker's sid -> topics it is tracked in
        self._nodes: dict[str, set[tuple[str, str]]] = {}  # other worker -> its (topic, sid)
        self._subscribers: dict[str, dict[str, Session]] = {}  # topic -> sid -> session
        self._subscriptions: dict[str, set[str]] = {}  # sid -> topics it is subscribed to
        self._pending: dict[str, dict[str, _Entry | None]] = {}  # topic -> sid -> entry before
        self._outbox: list[PresenceChange] = []  # this worker's changes not yet published
        self._snapshots: dict[str, People] = {}  # topic -> as of its last diff (cached)
        self._timer: Timer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_send: asyncio.Task[None] | None = None  # the latest interval's sending
        self._loaded = False
        self._loading: asyncio.Lock | None = None
        self._touched: set[tuple[str, str]] | None = set()  # changed before the load finished

    # -- tracking ---------------------------------------------------------------------------

    async def track(
        self, session: Session, topic: str, meta: Mapping[str, Any] | None = None
    ) -> bool:
        """Track ``session`` (one of this worker's, open) in ``topic`` with ``meta``; tracking
        it again replaces its metadata. It leaves every topic when it ends.

        Returns False when the session is not live on this worker (ended, ending, another
        worker's).

        Raises:
            ValueError: ``topic`` is not a non-empty string.
            InvalidMessage: ``meta`` is not a JSON object (or holds ``NaN``, lone surrogates).
            LimitExceeded: ``topic`` is longer than ``max_group_name_length``, ``meta`` is over
                ``max_presence_meta_bytes``, the session is in ``max_presence_topics_per_session``
                topics, or ``topic`` has ``max_presence_members_per_topic`` sessions.
        """
        topic = self._check_topic(topic)
        stored = self._check_meta(meta)
        await self._ensure_loaded()
        # From here on no await: the checks and the change are one step.
        if not self._live(session):
            return False
        settings = self._manager.settings
        topics = self._local.get(session.id)
        limit = settings.max_presence_topics_per_session
        if topics is not None and topic not in topics and len(topics) >= limit:
            raise LimitExceeded(
                f"session {session.id} is tracked in {len(topics)} topics: "
                f"max_presence_topics_per_session ({limit}) reached"
            )
        key = (topic, session.id)
        if key not in self._where:
            size = self._sizes.get(topic, 0)
            if size >= settings.max_presence_members_per_topic:
                raise LimitExceeded(
                    f"topic {topic!r} has {size} sessions: max_presence_members_per_topic "
                    f"({settings.max_presence_members_per_topic}) reached"
                )
        person = session.user_key if session.user_key is not None else session.id
        self._put(topic, session.id, _Entry(person, stored, None))
        self._local.setdefault(session.id, set()).add(topic)
        self._outbox.append((topic, session.id, person, stored))
        return True

    async def untrack(self, session: Session | str, topic: str) -> bool:
        """Stop tracking a session of this worker (or its id) in ``topic``; False if it was not
        tracked there."""
        session_id = session if isinstance(session, str) else session.id
        return self._untrack(session_id, topic)

    def _untrack(self, session_id: str, topic: str) -> bool:
        topics = self._local.get(session_id)
        if topics is None or topic not in topics:
            return False
        topics.discard(topic)
        if not topics:
            del self._local[session_id]
        entry = self._drop(topic, session_id)
        if entry is not None:
            self._outbox.append((topic, session_id, entry.person, None))
        self._arm()
        return True

    # -- reading ----------------------------------------------------------------------------

    async def people(self, topic: str) -> People:
        """Who is in ``topic``: person (``user_key``, or the session id of a session without
        one) -> {session id: metadata}, cluster-wide with a cluster registry (this worker's
        view: while a cluster registry cannot reach its store, what it knew, plus the changes
        of this worker's sessions)."""
        await self._ensure_loaded()
        return {
            person: {sid: entry.meta for sid, entry in sessions.items()}
            for person, sessions in self._topics.get(topic, {}).items()
        }

    async def count(self, topic: str, *, sessions: bool = False) -> int:
        """How many people (or, with ``sessions=True``, sessions) are in ``topic``.

        Raises:
            RegistryUnavailable: as for :meth:`people`.
        """
        await self._ensure_loaded()
        return self._sizes.get(topic, 0) if sessions else len(self._topics.get(topic, ()))

    def topics(self, session: Session | str) -> frozenset[str]:
        """The topics a session of this worker is tracked in."""
        session_id = session if isinstance(session, str) else session.id
        return frozenset(self._local.get(session_id, ()))

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, session: Session, topic: str) -> People | None:
        """Send ``session`` (one of this worker's) the diffs of ``topic`` from now on, until it
        unsubscribes or ends.

        Returns the topic's people as of its last diff (same shape as :meth:`people`): the base
        the diffs that follow apply to, exactly (a change not yet sent in a diff is in the next
        one, never in this base; so a session's own track just before is in the next diff).
        Give it to the client with the subscription. Shared by every subscriber of the same
        interval: do not modify it. ``None`` when the session is not live on this worker.

        Raises:
            ValueError: ``topic`` is not a non-empty string.
            LimitExceeded: the session is subscribed to ``max_presence_topics_per_session``
                topics already, or ``topic`` is longer than ``max_group_name_length``.
        """
        topic = self._check_topic(topic)
        await self._ensure_loaded()
        if not self._live(session):
            return None
        limit = self._manager.settings.max_presence_topics_per_session
        topics = self._subscriptions.setdefault(session.id, set())
        if topic not in topics and len(topics) >= limit:
            raise LimitExceeded(
                f"session {session.id} is subscribed to {len(topics)} topics: "
                f"max_presence_topics_per_session ({limit}) reached"
            )
        topics.add(topic)
        self._subscribers.setdefault(topic, {})[session.id] = session
        return self._published(topic)

    def _published(self, topic: str) -> People:
        """The topic as of its last diff: now, with this interval's changes undone (cached
        until the next diff: every subscriber of one interval shares it)."""
        cached = self._snapshots.get(topic)
        if cached is not None:
            return cached
        people = {
            person: {sid: entry.meta for sid, entry in sessions.items()}
            for person, sessions in self._topics.get(topic, {}).items()
        }
        for session_id, before in self._pending.get(topic, {}).items():
            after = self._where.get((topic, session_id))
            if after is not None:
                _discard(people, after.person, session_id)
            if before is not None:
                people.setdefault(before.person, {})[session_id] = before.meta
        self._snapshots[topic] = people
        return people

    async def unsubscribe(self, session: Session | str, topic: str) -> bool:
        """Stop sending ``topic``'s diffs to a session; False if it was not subscribed."""
        session_id = session if isinstance(session, str) else session.id
        topics = self._subscriptions.get(session_id)
        if topics is None or topic not in topics:
            return False
        topics.discard(topic)
        if not topics:
            del self._subscriptions[session_id]
        _discard(self._subscribers, topic, session_id)
        return True

    # -- called by wsession -----------------------------------------------------------------

    def session_ended(self, session: Session) -> None:
        """Untrack and unsubscribe an ended session of this worker, everywhere (its teardown
        calls this once; a second call finds nothing to do)."""
        for topic in list(self._local.get(session.id, ())):
            self._untrack(session.id, topic)
        for topic in self._subscriptions.pop(session.id, ()):
            _discard(self._subscribers, topic, session.id)

    def apply_remote(
        self, node: str, changes: list[PresenceChange], *, announce: bool = True
    ) -> None:
        """Apply another worker's published changes (called by a cluster registry). With
        ``announce=False`` (what was there before this worker looked) they are not sent as a
        diff: they are part of every subscriber's base."""
        owned = self._nodes.setdefault(node, set())
        for topic, session_id, person, meta in changes:
            key = (topic, session_id)
            if self._touched is not None:
                self._touched.add(key)
            if meta is None:
                entry = self._where.get(key)
                if entry is not None and entry.node == node:
                    self._drop(topic, session_id)
                    owned.discard(key)
            else:
                self._put(topic, session_id, _Entry(person, meta, node), announce=announce)
                owned.add(key)
        if not owned:
            del self._nodes[node]

    def node_lost(self, node: str) -> None:
        """Every presence of a lost worker leaves (in the next diff of each topic; called by a
        cluster registry that healed it, or that was told so)."""
        for topic, session_id in self._nodes.pop(node, ()):
            entry = self._where.get((topic, session_id))
            if entry is not None and entry.node == node:
                self._drop(topic, session_id)

    def export(self, session_id: str) -> dict[str, Any] | None:
        """What a session of this worker is tracked in (topic and metadata) and subscribed to,
        as JSON-ready data, or ``None`` for neither (stored when it detaches with a durable
        resumption store, so a resume on another worker keeps it: see :meth:`adopt`)."""
        topics = self._local.get(session_id, ())
        subscribed = self._subscriptions.get(session_id, ())
        if not topics and not subscribed:
            return None
        tracked = [
            [topic, entry.meta]
            for topic in sorted(topics)
            if (entry := self._where.get((topic, session_id))) is not None
        ]
        return {"t": tracked, "s": sorted(subscribed)}

    async def adopt(self, session: Session, exported: Mapping[str, Any]) -> None:
        """A session resumed on this worker from another: track and subscribe it as it was
        there (:meth:`export`). Other workers see its entries move here, not a leave and a
        join; a topic where it was no longer known (its worker died) sees it join."""
        await self._ensure_loaded()
        person = session.user_key if session.user_key is not None else session.id
        for topic, meta in exported.get("t", ()):
            key = (str(topic), session.id)
            old = self._where.get(key)
            if old is not None and old.node is not None:
                _discard_member(self._nodes, old.node, key)
            self._put(key[0], session.id, _Entry(person, meta, None), announce=old is None)
            self._local.setdefault(session.id, set()).add(key[0])
            self._outbox.append((key[0], session.id, person, meta))
        for topic in exported.get("s", ()):
            self._subscriptions.setdefault(session.id, set()).add(str(topic))
            self._subscribers.setdefault(str(topic), {})[session.id] = session
        self._arm()

    def hand_over(self, session_id: str, node: str) -> list[tuple[str, str]]:
        """A session this worker held was resumed on worker ``node``: its entries are
        ``node``'s from now on (no leave), its subscriptions end here. Returns its ``(topic,
        session id)`` entries, which the cluster registry drops from this worker's store."""
        moved: list[tuple[str, str]] = []
        for topic in self._local.pop(session_id, ()):
            key = (topic, session_id)
            entry = self._where.get(key)
            if entry is not None:
                self._put(topic, session_id, _Entry(entry.person, entry.meta, node), announce=False)
                self._nodes.setdefault(node, set()).add(key)
            moved.append(key)
        for topic in self._subscriptions.pop(session_id, ()):
            _discard(self._subscribers, topic, session_id)
        return moved

    def tracked_here(self) -> list[PresenceChange]:
        """This worker's tracked sessions, as changes that write them in full (a cluster
        registry writing its state again after an outage or under a new node id)."""
        return [
            (topic, sid, entry.person, entry.meta)
            for sid, topics in self._local.items()
            for topic in topics
            if (entry := self._where.get((topic, sid))) is not None
        ]

    async def wait_idle(self) -> None:
        """Wait until the diffs already flushed have been handed to their subscribers (for
        tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    def _live(self, session: Session) -> bool:
        return self._manager.local.get(session.id) is session and session.end_reason is None

    def _check_topic(self, topic: str) -> str:
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty string, got {topic!r}")
        limit = self._manager.settings.max_group_name_length
        if len(topic) > limit:
            raise LimitExceeded(
                f"topic name of {len(topic)} characters exceeds max_group_name_length ({limit})"
            )
        return topic

    def _check_meta(self, meta: Mapping[str, Any] | None) -> Meta:
        if meta is None:
            return {}
        if not isinstance(meta, Mapping):
            raise InvalidMessage(f"presence meta must be a JSON object, got {type(meta).__name__}")
        encoded = encode_json(dict(meta))
        limit = self._manager.settings.max_presence_meta_bytes
        size = len(encoded.encode("utf-8"))
        if size > limit:
            raise LimitExceeded(
                f"presence meta of {size} bytes exceeds max_presence_meta_bytes ({limit})"
            )
        stored: Meta = json.loads(encoded)  # a copy: later changes by the caller do not leak
        return stored

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if self._loaded:
                return
            try:
                loaded = await self._manager.registry.load_presence()
            except RegistryUnavailable:
                return  # local presence works meanwhile; the next call tries again
            touched = self._touched or set()
            for node, changes in loaded.items():
                fresh = [c for c in changes if (c[0], c[1]) not in touched]
                if fresh:
                    self.apply_remote(node, fresh, announce=False)
            self._loaded, self._touched = True, None

    def _put(self, topic: str, session_id: str, entry: _Entry, *, announce: bool = True) -> None:
        key = (topic, session_id)
        old = self._where.get(key)
        if old is not None:
            _discard(self._topics[topic], old.person, session_id)
        else:
            self._sizes[topic] = self._sizes.get(topic, 0) + 1
        if announce:
            self._note(topic, session_id, old)
        else:
            self._snapshots.pop(topic, None)
        self._where[key] = entry
        self._topics.setdefault(topic, {}).setdefault(entry.person, {})[session_id] = entry

    def _drop(self, topic: str, session_id: str) -> _Entry | None:
        entry = self._where.pop((topic, session_id), None)
        if entry is None:
            return None
        self._note(topic, session_id, entry)
        people = self._topics[topic]
        _discard(people, entry.person, session_id)
        if not people:
            del self._topics[topic]
            del self._sizes[topic]
        else:
            self._sizes[topic] -= 1
        return entry

    def _note(self, topic: str, session_id: str, before: _Entry | None) -> None:
        """Remember what a session was in ``topic`` at the start of this interval."""
        pending = self._pending.setdefault(topic, {})
        if session_id not in pending:
            pending[session_id] = before
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and (self._pending or self._outbox):
            self._timer = call_later(self._manager.settings.presence_interval, _flush_due, self)

    def _flush(self) -> None:
        """Publish this worker's changes and send each changed topic's diff to its local
        subscribers (one message per topic, through the ordered outbound path of each)."""
        self._timer = None
        pending, self._pending = self._pending, {}
        for topic in pending:
            self._snapshots.pop(topic, None)
        outbox, self._outbox = self._outbox, []
        sends: list[tuple[list[Session], Any]] = []
        for topic, before in pending.items():
            subscribers = self._subscribers.get(topic)
            if not subscribers:
                continue
            diff = self._diff(topic, before)
            if diff is not None:
                sends.append((list(subscribers.values()), self.render(diff)))
        if not sends and not outbox:
            return
        previous = self._last_send
        task = asyncio.get_running_loop().create_task(self._send(sends, outbox, previous))
        self._last_send = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        sends: list[tuple[list[Session], Any]],
        outbox: list[PresenceChange],
        previous: asyncio.Task[None] | None,
    ) -> None:
        manager = self._manager
        if previous is not None and not previous.done():
            # The last interval's diffs are still being handed out (a big fan-out under load):
            # wait for them, so that no topic's diff overtakes its predecessor and the changes
            # are published in the order they were made.
            await asyncio.wait([previous])
        try:
            for targets, data in sends:
                await deliver_all(manager, targets, to_message(data), None)
            if outbox:
                await manager.registry.publish_presence(outbox)
        except Exception:
            log_error(None, "presence: sending a diff failed", exc=True)

    def _diff(self, topic: str, pending: dict[str, _Entry | None]) -> PresenceDiff | None:
        joins: dict[str, dict[str, Meta]] = {}
        leaves: dict[str, dict[str, Meta]] = {}
        for session_id, before in pending.items():
            after = self._where.get((topic, session_id))
            if before is after or (
                before is not None
                and after is not None
                and before.person == after.person
                and before.meta == after.meta
            ):
                continue  # joined and left (or re-tracked unchanged) inside the interval
            if before is not None:
                leaves.setdefault(before.person, {})[session_id] = before.meta
            if after is not None:
                joins.setdefault(after.person, {})[session_id] = after.meta
        if not joins and not leaves:
            return None
        people = self._topics.get(topic, {})
        arrived, departed = set(), set()
        for person in joins.keys() | leaves.keys():
            now = len(people.get(person, ()))
            before_count = now - len(joins.get(person, ())) + len(leaves.get(person, ()))
            if now and not before_count:
                arrived.add(person)
            elif before_count and not now:
                departed.add(person)
        return PresenceDiff(topic, joins, leaves, frozenset(arrived), frozenset(departed))


def _flush_due(presence: Presence) -> None:
    """The interval timer's callback (module-level: the timer holds only the presence)."""
    presence._flush()


def _discard(index: dict[str, dict[str, Any]], key: str, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(member, None)
        if not members:
            del index[key]


def _discard_member(
    index: dict[str, set[tuple[str, str]]], key: str, member: tuple[str, str]
) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]
