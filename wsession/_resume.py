"""Session resumption: a session outlives a dropped connection for ``resume_window`` seconds.

Three parts, one per class:

- :class:`Journal` (one per session, only with ``resume_window``): every message wsession
  delivers to the session gets the next sequence number and is kept in a bounded ring, so a
  client that comes back with the last number it processed gets exactly what followed it.
- resume tokens: ``session_id.nonce.mac``; the nonce is random and replaced on every resume
  (single use), the MAC (HMAC-SHA256 with ``resume_secret``) rejects forged tokens before any
  lookup.
- :class:`Resumption` (one per manager): this worker's *detached* sessions, claiming one for a
  new connection (one winner: the claim has no ``await``), releasing its replay, and ending it
  when its window runs out, its journal overflows or it is closed while detached.

The connection code decides *when* (``_connection.py``); this module owns the state.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import anyio

from . import _timers
from ._delivery import close_session, deliver_numbered, message_size, write_stashed
from ._exceptions import RegistryUnavailable
from ._lifecycle import count_ending, run_disconnect_hooks, unregister
from ._log import log_error, log_warning
from ._outbound import spawn
from ._session import RESUMABLE_ENDINGS, EndReason, Session, SessionState
from ._shield import run_shielded
from ._timers import Timer, call_later
from ._types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._manager import SessionManager
    from ._outbound import Outbound
    from .backends._base import ResumeStore

_GAP_WAIT = 0.25
"""Seconds a durable journal's later number waits for an earlier one before it is read from the
store (numbers from this worker and from others' pub/sub messages may arrive out of order)."""

_OWNER_WAIT = 10.0
"""Seconds a durable resume waits for the session's old connection to end (its worker closes it
when asked; a worker that died is noticed by the others within two heartbeats)."""

TAKEN_OVER = 4409
"""Close code for a connection whose session a new connection resumed (with its token) before
the old one noticed that its client was gone."""


class Journal:
    """One session's sequence numbers, replay ring and resume token (see the module docstring).

    ``pinned``: while the session is detached (or resuming), the number after which nothing may
    be dropped from the ring: the client may need all of it. A message that would push such an
    entry out marks the journal ``lost`` instead (the session then ends: never a partial replay).
    """

    __slots__ = (
        "client_last",
        "deadline",
        "durable",
        "entries",
        "expected",
        "field",
        "gap_timer",
        "held",
        "lost",
        "max_bytes",
        "max_messages",
        "nbytes",
        "next_token",
        "nonce",
        "parked",
        "pinned",
        "seq",
        "stash",
        "timer",
        "token",
    )

    def __init__(self, max_messages: int, max_bytes: int, field: str | None) -> None:
        self.seq = 0  # the last number given
        self.entries: deque[tuple[int, Message, int]] = deque()
        self.nbytes = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.field = field
        self.pinned: int | None = None
        self.lost = False
        self.held = False  # resuming: numbered messages wait in the ring until the replay
        self.client_last = 0
        self.nonce = ""
        self.token = ""
        self.next_token = ""  # a durable resume: the token the store gave the session
        self.timer: Timer | None = None  # the window, while detached
        self.deadline = 0.0  # when the window ends (clock time), while detached
        self.parked: anyio.Event | None = None  # set when it detaches (a take-over waits)
        # With a durable store (RedisRegistry) the store numbers and keeps the messages; this
        # journal then only writes them in order: the next number to write, those that came
        # early, and the timer that reads a missing one from the store.
        self.durable: ResumeStore | None = None
        self.expected = 1
        self.stash: dict[int, Message] = {}
        self.gap_timer: Timer | None = None

    def stamp(self, message: Message) -> Message:
        """Number a ``websocket.send`` message and keep it; returns what to write (with the
        ``resume_seq_field`` added to a JSON object's text). Other messages pass unchanged.

        The ring keeps the message as given, not the numbered copy: a broadcast's one message
        is shared by every recipient's ring, and the number is added again on a replay."""
        if message.get("type") != "websocket.send":
            return message
        self.seq = seq = self.seq + 1
        size = message_size(message)
        self.entries.append((seq, message, size))
        self.nbytes += size
        self._trim()
        return self.numbered(message, seq)

    def numbered(self, message: Message, seq: int) -> Message:
        """``message`` as written with number ``seq`` (``resume_seq_field`` spliced into a JSON
        object's text)."""
        field = self.field
        if field is None:
            return message
        text = message.get("text")
        if text is None or len(text) < 2 or text[0] != "{" or text[-1] != "}":
            return message
        rest = text[1:]
        sep = "," if rest.strip() != "}" else ""
        return {"type": "websocket.send", "text": f'{{"{field}":{seq}{sep}{rest}'}

    def unstamp(self) -> None:
        """Take back the last :meth:`stamp` (its message was dropped before anyone saw it)."""
        _, _, size = self.entries.pop()
        self.nbytes -= size
        self.seq -= 1

    def _trim(self) -> None:
        entries = self.entries
        while len(entries) > self.max_messages or (
            self.nbytes > self.max_bytes and len(entries) > 1
        ):
            if self.pinned is not None and entries[0][0] > self.pinned:
                self.lost = True  # everything left may still be needed: keep it, and end
                return
            _, _, size = entries.popleft()
            self.nbytes -= size

    def since(self, last: int) -> list[Message] | None:
        """Every kept message numbered after ``last``, in order; ``None`` when the ring no
        longer holds all of them (or ``last`` is a number never given)."""
        if last < 0 or last > self.seq or self.lost:
            return None
        first = self.entries[0][0] if self.entries else self.seq + 1
        if last + 1 < first:
            return None
        return [self.numbered(message, seq) for seq, message, _ in self.entries if seq > last]


# -- tokens ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(secret: bytes, session_id: str, nonce: str) -> str:
    digest = hmac.new(secret, f"{session_id}.{nonce}".encode(), hashlib.sha256).digest()
    return _b64(digest[:18])


def make_token(secret: bytes, session_id: str, nonce: str) -> str:
    """The resume token for ``session_id`` with ``nonce``."""
    return f"{session_id}.{nonce}.{_mac(secret, session_id, nonce)}"


def read_token(secret: bytes | None, token: str) -> tuple[str, str] | None:
    """``(session_id, nonce)`` of a token this secret signed, else ``None``. With ``secret``
    ``None`` only the form is checked (a durable store compares the whole token)."""
    if len(token) > 512:
        return None
    parts = token.rsplit(".", 2)
    if len(parts) != 3:
        return None
    session_id, nonce, mac = parts
    if secret is not None and not hmac.compare_digest(mac, _mac(secret, session_id, nonce)):
        return None
    return session_id, nonce


# -- the manager's part ----------------------------------------------------------------------------


class Resumption:
    """This worker's detached sessions and the rules for detaching, claiming and ending them
    (made by the manager when ``resume_window`` is set)."""

    def __init__(self, manager: SessionManager, secret: bytes) -> None:
        self._manager = manager
        self._secret = secret
        self._detached: dict[str, Session] = {}
        # Parked here, their end asked of the durable store without an answer: the store may
        # have ended them, and then hands them back (end_unanswered) for their hooks.
        self._unanswered: dict[str, Session] = {}
        self.closed = False  # the manager is shutting down: nothing detaches any more
        self.check_mac = True
        """Whether a token's MAC is checked before anything else (off only with a durable store
        and no ``resume_secret``: each worker's random secret differs, and the store compares
        the whole token, which is as unguessable)."""
        self.store: ResumeStore | None = None
        """The registry's durable journal (``RedisRegistry``), set by the manager: messages are
        numbered and kept there, and detached sessions wait there for a resume on any worker."""

    @property
    def detached(self) -> Mapping[str, Session]:
        """This worker's detached sessions by id (read-only)."""
        return MappingProxyType(self._detached)

    async def count_detached(self) -> int:
        """Detached sessions: this worker's, or the durable store's (every worker's)."""
        if self.store is not None:
            return await self.store.count_detached()
        return len(self._detached)

    # -- a new session --------------------------------------------------------------------

    def start(self, session: Session) -> None:
        """Give an admitted session its journal and first token."""
        settings = self._manager.settings
        journal = Journal(
            settings.resume_buffer, settings.resume_buffer_bytes, settings.resume_seq_field
        )
        journal.durable = self.store
        session._resume = journal
        self._new_token(session, journal)

    def _new_token(self, session: Session, journal: Journal) -> None:
        journal.nonce = _b64(secrets.token_bytes(16))
        journal.token = make_token(self._secret, session.id, journal.nonce)

    def requested(self, scope: Scope) -> tuple[str, str] | None:
        """``(token, last)`` from the handshake's query string, if it asks to resume."""
        settings = self._manager.settings
        query = scope.get("query_string", b"")
        if not query or settings.resume_token_param.encode() not in query:
            return None
        from starlette.datastructures import QueryParams

        params = QueryParams(query)
        token = params.get(settings.resume_token_param)
        if not token:
            return None
        return token, params.get(settings.resume_last_param, "")

    # -- resuming --------------------------------------------------------------------------

    async def claim(self, token: str, last_text: str) -> Session | str:
        """Take the detached session ``token`` names for a new connection, or say why not:
        ``"invalid"`` (not a token of ours, or ``last`` is not a number), ``"unknown"`` (not
        detached here: used token, ended, another worker's) or ``"replay_lost"`` (``last``
        older than the buffer or newer than any number given: that session ends now, its token
        being used). The check and the take have no ``await`` between them: of two claims of one
        session exactly one wins.

        If the session's old connection has not noticed yet that its client is gone (a dropped
        TCP connection is often seen late, or only at the next write), the token proves the new
        connection is the same client: the old one is closed with ``TAKEN_OVER`` (its client,
        if any is left, should not reconnect) and the session detaches first, as if dropped.
        """
        read = read_token(self._secret if self.check_mac else None, token)
        if read is None:
            return "invalid"
        session_id, nonce = read
        try:
            last = int(last_text)
        except ValueError:
            return "invalid"  # without the last number it processed nothing can be replayed
        if self.store is not None:
            try:
                return await self._claim_from_store(self.store, session_id, token, last)
            except RegistryUnavailable:
                return "unavailable"
        live = self._manager.local.get(session_id)
        if live is not None and _holds(live, nonce):
            await self._take_from_connection(live)
        return self._take(session_id, nonce, last)

    async def _claim_from_store(
        self, store: ResumeStore, session_id: str, token: str, last: int
    ) -> Session | str:
        """:meth:`claim` with a durable store: the store moves the session to this worker, in
        one step that any worker may race (one wins), and gives the messages it missed."""
        new_token = make_token(self._secret, session_id, _b64(secrets.token_bytes(16)))
        give_up = time.monotonic() + _OWNER_WAIT
        asked = False
        pause = 0.02
        while True:  # bounded by give_up
            found = await store.claim(session_id, token, last, new_token)
            if found.outcome != "open":
                break
            live = self._manager.local.get(session_id)
            if live is not None and live._resume is not None and live._resume.token == token:
                await self._take_from_connection(live)
            elif found.owner and not asked:
                await store.take(found.owner, session_id)
                asked = True
            if time.monotonic() > give_up:
                return "unknown"
            # Another worker closes the old connection, or the cluster notices that its worker
            # died: nothing here can wait on that, so the store is asked again.
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
        # (A copy whose end got no answer is one too: the store had not ended it after all.)
        cached = self._detached.get(session_id) or self._unanswered.pop(session_id, None)
        if cached is not None:
            self._take_timer(cached)  # ours now (or ended): its window no longer runs here
        if found.outcome == "unknown" or found.session is None:
            return "unknown"
        session = cached if cached is not None else found.session
        if found.outcome == "lost":
            session._end_detached(EndReason.REPLAY_LOST, None, None)
            spawn(self._end, session)
            return "replay_lost"
        session.groups = set(found.session.groups)
        journal = session._resume
        if journal is None:
            settings = self._manager.settings
            journal = Journal(0, 0, settings.resume_seq_field)
            session._resume = journal
        journal.durable = store
        journal.token = token
        journal.nonce = token.rsplit(".", 2)[1]
        journal.next_token = new_token
        journal.seq = found.seq
        journal.client_last = last
        journal.expected = last + 1
        journal.stash = dict(found.missed)
        journal.deadline = found.deadline
        journal.held = True
        session.state = SessionState.DETACHED
        # Indexed here at once (no await since the claim): from now on every message recorded
        # for it is written here, in order, after the replay...
        store.adopt(session)
        # ...and one recorded after the claim but handled before this line is in its journal.
        later = await store.missed(session_id, found.seq + 1, found.seq + 1_000_000)
        for seq, message in later:
            deliver_numbered(self._manager, session, seq, message)
        if cached is None and found.presence:
            await self._manager.presence.adopt(session, found.presence)
        if cached is None and found.parker:
            try:
                await store.moved(found.parker, session_id)
            except Exception:  # its copy then ends quietly at the end of the window
                log_warning(session_id, "could not tell %s that %s moved", found.parker, session_id)
        return session

    async def _take_from_connection(self, live: Session) -> None:
        journal = live._resume
        assert journal is not None
        if journal.parked is None:
            journal.parked = anyio.Event()
        parked = journal.parked
        close_session(
            self._manager, live, TAKEN_OVER, "resumed by a new connection", resumable=True
        )
        with anyio.move_on_after(self._manager.settings.close_timeout + 1):
            await parked.wait()

    def _take(self, session_id: str, nonce: str, last: int) -> Session | str:
        session = self._detached.get(session_id)
        if session is None or not _holds(session, nonce):
            return "unknown"
        journal = session._resume
        assert journal is not None
        del self._detached[session_id]
        if journal.timer is not None:
            journal.timer.cancel()
            journal.timer = None
        if journal.since(last) is None:
            # The client cannot get everything it missed: it starts afresh, and this session
            # (whose token it has used) ends now rather than at the end of its window.
            self._end_soon(session, EndReason.REPLAY_LOST)
            return "replay_lost"
        journal.pinned = journal.client_last = last
        journal.held = True
        return session

    def unclaim(self, session: Session) -> None:
        """A resume hook refused the new connection: the session waits again, for the rest of
        its window, with the same token."""
        journal = session._resume
        assert journal is not None
        journal.held = False
        session.state = SessionState.DETACHED
        if journal.durable is not None:
            journal.stash.clear()
            spawn(self._park_in_store, session, max(0.0, journal.deadline - time.time()))
            return
        self._park(session, journal, journal.deadline - _timers.clock.now())

    def resumed(self, session: Session) -> None:
        """The new connection was admitted: the session is its own again, with a new token."""
        journal = session._resume
        assert journal is not None
        if journal.durable is not None:
            journal.token = journal.next_token  # the store holds it already
            journal.nonce = journal.token.rsplit(".", 2)[1]
        else:
            self._new_token(session, journal)
        self._manager.stats.resumed += 1

    def wrap(
        self, session: Session, outbound: Outbound, send: Send, receive: Receive
    ) -> tuple[Send, Receive]:
        """The app's ``send``/``receive`` for a resumed connection: the missed messages are
        written right after the app's first frame after its accept (its welcome), or when the
        app waits for the client without having sent one."""
        journal = session._resume
        assert journal is not None

        async def send_then_replay(message: Message) -> None:
            await send(message)
            if journal.held and outbound.accepted and message["type"] == "websocket.send":
                self.release(session, outbound)

        async def replay_then_receive() -> Message:
            if journal.held and outbound.accepted:
                self.release(session, outbound)
            return await receive()

        return send_then_replay, replay_then_receive

    def release(self, session: Session, outbound: Outbound) -> None:
        """Write the missed messages (and those numbered while resuming), then live traffic."""
        journal = session._resume
        assert journal is not None
        journal.held = False
        if journal.durable is not None:
            write_stashed(self._manager, session)
            return
        missed = journal.since(journal.client_last)
        journal.pinned = None
        if missed is None:  # the ring overflowed while resuming: never a partial replay
            log_warning(session.id, "replay of %s lost while resuming: closing", session.id)
            close_session(self._manager, session, 1011, "replay lost")
            return
        outbound.replay(missed)

    # -- detaching ---------------------------------------------------------------------------

    def should_detach(self, session: Session, accepted: bool) -> bool:
        """Whether a connection that just ended leaves its session detached (waiting for its
        client) rather than ended."""
        if self.closed or not accepted or session._resume is None or session._resume.lost:
            return False
        if self._manager.draining and self.store is None:
            return False  # this process is going away and its detached sessions with it
        if not (session.end_reason in RESUMABLE_ENDINGS or session._may_detach):
            return False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False  # trio: the window's timer needs asyncio; the session ends as before
        return True

    def detach(self, session: Session) -> None:
        """The session's connection ended resumably: from now on messages for it are kept
        (it becomes claimable with :meth:`park`, once its detach hooks ran)."""
        journal = session._resume
        assert journal is not None
        journal.pinned = journal.seq
        session.state = SessionState.DETACHED
        journal.stash.clear()  # a durable store has them
        if journal.gap_timer is not None:
            journal.gap_timer.cancel()
            journal.gap_timer = None
        journal.deadline = _timers.clock.now() + self._manager.settings.resume_window
        self._manager.stats.detached += 1

    def park(self, session: Session) -> None:
        """Make a detached session claimable for the rest of its window (or end it, if its
        journal overflowed or the manager shut down meanwhile)."""
        journal = session._resume
        assert journal is not None
        if journal.durable is not None:
            spawn(self._park_in_store, session, self._manager.settings.resume_window)
            return
        if journal.lost:
            self._end_soon(session, EndReason.REPLAY_LOST)
        elif self.closed:
            self._end_soon(session, EndReason.SERVER_SHUTDOWN)
        else:
            self._park(session, journal, journal.deadline - _timers.clock.now())
        parked, journal.parked = journal.parked, None
        if parked is not None:
            parked.set()  # a take-over waits for this

    async def _park_in_store(self, session: Session, window: float) -> None:
        """Park a detached session in the durable store (any worker may resume it from there)
        and keep it here too, so that a resume on this worker keeps its live data; this
        worker's timer ends it when its window runs out (unless it was resumed elsewhere)."""
        journal = session._resume
        assert journal is not None and journal.durable is not None
        deadline: float | None = None
        failed = False
        presence = self._manager.presence_if_used
        exported = presence.export(session.id) if presence is not None else None
        try:
            deadline = await journal.durable.park(session, journal.token, window, exported)
        except Exception:
            failed = True
            log_error(session.id, "could not park %s in the store: ending it", session.id, exc=True)
        finally:
            parked, journal.parked = journal.parked, None
            if parked is not None:
                parked.set()  # a take-over waits for this
        if failed:
            self._end_soon(
                session, EndReason.SERVER_SHUTDOWN if self.closed else EndReason.RESUME_EXPIRED
            )
            return
        if deadline is None:
            # Not this worker's any more: the cluster declared it lost (it was cut off) and
            # made the session detached there; whoever resumes or ends it runs its hooks.
            session._resume = None
            if presence is not None:
                presence.session_ended(session)
            return
        journal.deadline = deadline
        if self.closed:
            return  # this worker is going away: the store keeps it, another worker ends it
        self._detached[session.id] = session
        journal.timer = call_later(window, self._expire, session)

    def _park(self, session: Session, journal: Journal, delay: float) -> None:
        self._detached[session.id] = session
        journal.timer = call_later(max(0.0, delay), self._expire, session)

    def _expire(self, session: Session) -> None:
        if self._detached.get(session.id) is session:
            self._end_soon(session, EndReason.RESUME_EXPIRED)

    async def _end_in_store(
        self, session: Session, reason: EndReason, code: int | None, close_reason: str | None
    ) -> None:
        """End a detached session held in the durable store, if this worker wins it (it may
        have been resumed elsewhere meanwhile: then nothing runs here)."""
        journal = session._resume
        assert journal is not None and journal.durable is not None
        try:
            won = await journal.durable.end_detached(session.id, reason, code, close_reason)
        except Exception:
            log_error(session.id, "could not end detached %s in the store", session.id, exc=True)
            # No answer: the store may have ended it (then it hands it back, end_unanswered),
            # or not (then its sweep ends it, hooks once, on whichever worker wins it).
            self._unanswered[session.id] = session
            return
        if won is None:
            session._resume = None
            return
        session._end_detached(reason, code, close_reason)
        await self._end(session)

    def watch_gap(self, session: Session) -> None:
        """A durable journal's number came before an earlier one: look again soon, and read
        the missing ones from the store if they have not come by then."""
        journal = session._resume
        if journal is not None and journal.gap_timer is None:
            journal.gap_timer = call_later(_GAP_WAIT, self._gap_due, session)

    def _gap_due(self, session: Session) -> None:
        journal = session._resume
        if journal is None:
            return
        journal.gap_timer = None
        if not journal.stash or journal.held:
            return
        state = session.state
        if state is SessionState.CONNECTING:
            self.watch_gap(session)  # written once the app accepts
        elif state is SessionState.OPEN:
            if journal.expected in journal.stash:
                write_stashed(self._manager, session)
            else:
                spawn(self._fill_gap, session)

    async def _fill_gap(self, session: Session) -> None:
        journal = session._resume
        if journal is None or journal.durable is None or not journal.stash:
            return
        first, last = journal.expected, min(journal.stash) - 1
        try:
            found = await journal.durable.missed(session.id, first, last)
        except Exception:
            log_warning(session.id, "could not read missed messages of %s", session.id)
            found = []
        for seq, message in found:
            deliver_numbered(self._manager, session, seq, message)
        if journal.expected <= last and session.state is SessionState.OPEN:
            log_warning(
                session.id, "messages %d-%d of %s are lost: closing", first, last, session.id
            )
            close_session(self._manager, session, 1011, "replay lost")

    def overflowed(self, session: Session) -> None:
        """A detached session's journal is full: it can no longer be resumed in full."""
        if self._detached.get(session.id) is session:
            log_warning(session.id, "replay buffer of detached %s full: ending it", session.id)
            self._end_soon(session, EndReason.REPLAY_LOST)

    def close(self, session: Session, code: int, reason: str) -> bool:
        """Close (kick, revoke) a detached session: it ends now. False if not detached here."""
        if self._detached.get(session.id) is not session:
            return False
        if session._resume is not None and session._resume.durable is not None:
            self._take_timer(session)
            spawn(self._end_in_store, session, EndReason.SERVER_CLOSED, code, reason)
            return True
        self._take_out(session, EndReason.SERVER_CLOSED, code, reason)
        spawn(self._end, session)
        return True

    def end_unanswered(
        self, session_id: str, reason: EndReason, code: int | None, close_reason: str | None
    ) -> bool:
        """The durable store ended a session this worker parked and asked it to end without
        getting an answer: end this worker's copy now (its hooks, with its live data). False
        when there is no such copy here."""
        session = self._unanswered.pop(session_id, None)
        if session is None:
            return False
        session._end_detached(reason, code, close_reason)
        spawn(self._end, session)
        return True

    def drop(self, session_id: str) -> Session | None:
        """A session this worker parked was resumed or ended on another worker: forget this
        copy (no hooks: the session lives on there, or ended there). Returns the copy."""
        session = self._detached.get(session_id) or self._unanswered.pop(session_id, None)
        if session is not None:
            self._take_timer(session)
            session._resume = None
        return session

    def _take_timer(self, session: Session) -> None:
        self._detached.pop(session.id, None)
        journal = session._resume
        if journal is not None and journal.timer is not None:
            journal.timer.cancel()
            journal.timer = None

    def _end_soon(self, session: Session, reason: EndReason) -> None:
        journal = session._resume
        if journal is not None and journal.durable is not None and session.id in self._detached:
            self._take_timer(session)
            spawn(self._end_in_store, session, reason, None, None)
            return
        self._take_out(session, reason, None, None)
        spawn(self._end, session)

    def _take_out(
        self, session: Session, reason: EndReason, code: int | None, close_reason: str | None
    ) -> None:
        self._detached.pop(session.id, None)
        journal = session._resume
        if journal is not None and journal.timer is not None:
            journal.timer.cancel()
            journal.timer = None
        session._end_detached(reason, code, close_reason)

    async def end_all(self) -> None:
        """End every detached session now and wait for their disconnect hooks (shutdown:
        nobody can resume them any more, and nothing detaches from now on)."""
        self.closed = True
        for session in list(self._detached.values()):
            if session._resume is not None and session._resume.durable is not None:
                # In the durable store: a worker that stays (or starts) resumes or ends it.
                self._take_timer(session)
                continue
            self._take_out(session, EndReason.SERVER_SHUTDOWN, None, None)
            await self._end(session)

    async def _end(self, session: Session) -> None:
        """The detached session's teardown: disconnect hooks once, then unregistered."""
        manager = self._manager
        count_ending(manager, session)
        try:
            await run_shielded(run_disconnect_hooks(manager, session))
        finally:
            try:
                await unregister(manager, session)
            finally:
                manager._end_presence(session)
                session._resume = None


def _holds(session: Session, nonce: str) -> bool:
    """Whether ``session``'s current token has ``nonce`` (compared in constant time)."""
    journal = session._resume
    return journal is not None and hmac.compare_digest(nonce, journal.nonce)
