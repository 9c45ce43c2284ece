"""Sending to sessions from any code: ordered, bounded, never blocking the caller on a slow
client, and never raising the server's send-after-close errors.

The mechanics (one ordered outbound path per session) are in ``_outbound.py``; this module
applies the policies: what a full backlog means (``slow_consumer``), how results are counted,
and how wsession closes a session from outside its task.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from pydantic import BaseModel

from ._json import check_text, encode_json
from ._log import log_warning
from ._outbound import Offer, Outbound, carry, carry_soon
from ._session import RESUMABLE_ENDINGS, EndReason, Session, SessionState
from ._timers import call_later
from ._types import Message

if TYPE_CHECKING:
    from ._manager import SessionManager
    from ._resume import Journal


class SendResult(StrEnum):
    """What happened to one out-of-band send."""

    DELIVERED = "delivered"
    """Handed to the server (written to the connection)."""
    QUEUED = "queued"
    """Accepted into the session's bounded backlog; it will be written in order."""
    DROPPED = "dropped"
    """Not sent: the backlog was full and the policy is ``drop``."""
    GONE = "gone"
    """Not sent: unknown id, or the session is not open (or the slow-consumer policy closed it)."""


class SlowConsumerPolicy(StrEnum):
    """What to do when a session's backlog reaches ``max_backlog`` messages."""

    CLOSE = "close"
    """Close the session with ``slow_consumer_code`` (default 1013, "try again later")."""
    DROP = "drop"
    """Drop the new message (``SendResult.DROPPED``); the session stays open."""
    WAIT = "wait"
    """Make the sender wait up to ``send_timeout`` seconds for room, then close as ``close``."""


def to_message(data: Any) -> Message:
    """Build a ``websocket.send`` message: ``str`` as text, ``bytes`` as binary, anything else as
    JSON text (pydantic models at any depth).

    Raises:
        InvalidMessage: JSON with ``NaN``/``Infinity``, or text that is not valid UTF-8.
    """
    if isinstance(data, str):
        return {"type": "websocket.send", "text": check_text(data)}
    if isinstance(data, bytes | bytearray | memoryview):
        return {"type": "websocket.send", "bytes": bytes(data)}
    if isinstance(data, BaseModel):
        return {"type": "websocket.send", "text": check_text(data.model_dump_json())}
    return {"type": "websocket.send", "text": encode_json(data)}


def message_size(message: Message) -> int:
    """The payload size counted against ``max_backlog_bytes`` (characters for text)."""
    text = message.get("text")
    return len(text) if text is not None else len(message.get("bytes") or b"")


# Bound once: on Python 3.11 every ``SomeEnum.X`` is a Python call (``EnumType.__getattr__``),
# paid per message and per broadcast recipient on the paths below.
_OPEN = SessionState.OPEN
_WRITE, _QUEUED, _FULL, _GONE = Offer.WRITE, Offer.QUEUED, Offer.FULL, Offer.GONE
_DELIVERED_R, _QUEUED_R, _DROPPED_R, _GONE_R = (
    SendResult.DELIVERED,
    SendResult.QUEUED,
    SendResult.DROPPED,
    SendResult.GONE,
)


def _outbound(session: Session) -> Outbound | None:
    if session.state is not _OPEN:
        return None
    return session._outbound


async def deliver(manager: SessionManager, session: Session, message: Message) -> SendResult:
    """Send ``message`` on ``session`` from any task; see :class:`SendResult`. Never raises for
    a closed or vanished connection. Counted in ``stats.sends``."""
    result = await _deliver_one(manager, session, message, message_size(message))
    manager.stats.sends[result] += 1
    if result is _QUEUED_R:
        # Queued behind a pending write, perhaps without waiting at all: give the writer a
        # turn, or a loop of sends fills the backlog of a client that reads everything.
        await anyio.lowlevel.checkpoint()
    return result


async def _deliver_one(
    manager: SessionManager, session: Session, message: Message, nbytes: int
) -> SendResult:
    journal = session._resume
    if journal is not None and journal.durable:
        return (await journal.durable.record([session], message))[0]
    if journal is not None:
        result, outbound, stamped = offer_numbered(manager, session, journal, message)
        if outbound is None:
            assert result is not None
            return result
        carried = await carry([(outbound, stamped)])
        if carried.written:
            return SendResult.DELIVERED
        return SendResult.QUEUED  # pending, or kept for a resume
    deadline: float | None = None
    for _ in range(1000):  # bounded: each round waits for room or ends
        outbound = _outbound(session)
        if outbound is None:
            return _GONE_R
        offer = outbound.offer(message, nbytes)
        if offer is _WRITE:
            carried = await carry([(outbound, message)])
            if carried.written:
                return _DELIVERED_R
            return _QUEUED_R if carried.pending else _GONE_R
        if offer is not _FULL:
            return _QUEUED_R if offer is _QUEUED else _GONE_R
        policy = manager.settings.slow_consumer
        if policy is SlowConsumerPolicy.DROP:
            manager.stats.dropped += 1
            return SendResult.DROPPED
        if policy is SlowConsumerPolicy.WAIT:
            # One deadline for every round: room taken by a rival does not restart the wait.
            if deadline is None:
                deadline = anyio.current_time() + manager.settings.send_timeout
            if await outbound.wait_for_room(deadline - anyio.current_time()):
                continue
        close_slow_consumer(manager, session)
        return SendResult.GONE
    return SendResult.GONE


def try_deliver(manager: SessionManager, session: Session, message: Message) -> SendResult | None:
    """Send without awaiting anything: the result, or ``None`` when the ``wait`` policy must
    wait for room (nothing was sent then). A frame taken now is written soon, in order with
    every other frame for the session, so it reports ``queued``. Not counted in ``stats``."""
    journal = session._resume
    if journal is not None and journal.durable:
        journal.durable.record_soon([session], message)
        return SendResult.QUEUED
    if journal is not None:
        result, numbered_out, stamped = offer_numbered(manager, session, journal, message)
        if numbered_out is None:
            return result
        carry_soon([(numbered_out, stamped)])
        return SendResult.QUEUED
    return offer_unnumbered(manager, session, message)


def offer_unnumbered(
    manager: SessionManager, session: Session, message: Message
) -> SendResult | None:
    """:func:`try_deliver` without numbering (no journal, or a durable one that is
    unreachable)."""
    outbound = _outbound(session)
    if outbound is None:
        return SendResult.GONE
    offer = outbound.offer(message, message_size(message))
    if offer is Offer.WRITE:
        carry_soon([(outbound, message)])
        return SendResult.QUEUED
    if offer is not Offer.FULL:
        return SendResult.QUEUED if offer is Offer.QUEUED else SendResult.GONE
    policy = manager.settings.slow_consumer
    if policy is SlowConsumerPolicy.DROP:
        manager.stats.dropped += 1
        return SendResult.DROPPED
    if policy is SlowConsumerPolicy.WAIT:
        return None
    close_slow_consumer(manager, session)
    return SendResult.GONE


async def deliver_all(
    manager: SessionManager, targets: list[Session], message: Message, exclude: str | None
) -> int:
    """Send ``message`` to every session in ``targets`` but ``exclude``; return how many it
    reached (delivered or queued). A slow client never delays the others (except under the
    ``wait`` policy, which waits for room by design)."""
    nbytes = message_size(message)
    writes: list[tuple[Outbound, Message]] = []
    waiting: list[Session] = []
    queued = dropped = gone = 0
    policy = manager.settings.slow_consumer
    durable: list[Session] = []
    if exclude is not None:
        targets = [session for session in targets if session.id != exclude]
    for session in targets:
        journal = session._resume
        if journal is not None and journal.durable:
            durable.append(session)
            continue
        if journal is not None:
            result, numbered_out, stamped = offer_numbered(manager, session, journal, message)
            if numbered_out is not None:
                writes.append((numbered_out, stamped))
            elif result is SendResult.QUEUED:
                queued += 1
            elif result is SendResult.DROPPED:
                dropped += 1
            else:
                gone += 1
            continue
        outbound = session._outbound  # _outbound(session), inlined: this runs per recipient
        if session.state is not _OPEN or outbound is None:
            gone += 1
            continue
        offer = outbound.offer(message, nbytes)
        if offer is _WRITE:
            writes.append((outbound, message))
        elif offer is _QUEUED:
            queued += 1
        elif offer is _GONE:
            gone += 1
        elif policy is SlowConsumerPolicy.DROP:
            dropped += 1
        elif policy is SlowConsumerPolicy.CLOSE:
            close_slow_consumer(manager, session)
            gone += 1
        else:
            waiting.append(session)
    delivered = 0
    if durable:
        assert manager.resumption is not None and manager.resumption.store is not None
        for result in await manager.resumption.store.record(durable, message):
            delivered += result is SendResult.DELIVERED
            queued += result is SendResult.QUEUED
            gone += result is SendResult.GONE
    if writes:
        carried = await carry(writes)
        delivered += carried.written
        gone += carried.failed
        queued += carried.pending
    sends = manager.stats.sends
    for session in waiting:
        result = await _deliver_one(manager, session, message, nbytes)
        delivered += result is SendResult.DELIVERED
        queued += result is SendResult.QUEUED
        gone += result is SendResult.GONE
    # Counted once per call, not once per connection.
    for result, count in (
        (SendResult.DELIVERED, delivered),
        (SendResult.QUEUED, queued),
        (SendResult.GONE, gone),
        (SendResult.DROPPED, dropped),
    ):
        if count:
            sends[result] += count
    manager.stats.dropped += dropped
    if queued and not (durable or writes or waiting):
        await anyio.lowlevel.checkpoint()  # as in deliver(): let the writers have a turn
    return delivered + queued


def offer_numbered(
    manager: SessionManager, session: Session, journal: Journal, message: Message
) -> tuple[SendResult | None, Outbound | None, Message]:
    """Number ``message`` for a resumable session and take it (no ``await``): ``(None,
    outbound, numbered)`` when the caller holds the writer role and must carry it, else
    ``(result, None, message)``. A detached or resuming session keeps it for its replay; a
    full backlog gives the number back (``drop``) or closes (``close``); the ``wait`` policy is
    refused with resumption by the settings."""
    state = session.state
    if state is SessionState.DETACHED or (journal.held and state is not SessionState.CLOSED):
        journal.stamp(message)
        if journal.lost:
            if state is SessionState.DETACHED and manager.resumption is not None:
                manager.resumption.overflowed(session)
            return SendResult.GONE, None, message
        return SendResult.QUEUED, None, message
    outbound = _outbound(session)
    if outbound is None:
        return SendResult.GONE, None, message
    stamped = journal.stamp(message)
    offer = outbound.offer(stamped, message_size(stamped))
    if offer is Offer.WRITE:
        return None, outbound, stamped
    if offer is Offer.QUEUED:
        return SendResult.QUEUED, None, stamped
    if offer is Offer.GONE:
        # The connection is ending: if the session detaches, this message is in its replay.
        reason = session.end_reason
        if reason is None or session._may_detach or reason in RESUMABLE_ENDINGS:
            return SendResult.QUEUED, None, stamped
        return SendResult.GONE, None, stamped
    journal.unstamp()  # never written: the client must not see a gap in the numbers
    if manager.settings.slow_consumer is SlowConsumerPolicy.DROP:
        manager.stats.dropped += 1
        return SendResult.DROPPED, None, message
    close_slow_consumer(manager, session)
    return SendResult.GONE, None, message


def deliver_numbered(
    manager: SessionManager, session: Session, seq: int, message: Message
) -> SendResult:
    """Write message number ``seq`` (given by a durable journal, see ``ResumeStore``) on
    ``session``, in the order of the numbers: an earlier number not here yet is waited for (and
    read from the journal if it does not come soon); a number already written is dropped. While
    the session resumes (its replay not written yet) or is detached, nothing is written: the
    journal has it. Never awaits."""
    journal = session._resume
    if journal is None or session.state is SessionState.CLOSED:
        return SendResult.GONE
    if seq > journal.seq:
        journal.seq = seq
    if seq < journal.expected:
        return SendResult.QUEUED  # written already (a replay and a live copy met)
    if seq > journal.expected or journal.held or session.state is not SessionState.OPEN:
        if session.state is SessionState.DETACHED:
            return SendResult.QUEUED
        journal.stash[seq] = message
        if not journal.held and manager.resumption is not None:
            manager.resumption.watch_gap(session)
        return SendResult.QUEUED
    result = _write_numbered(manager, session, journal, seq, message)
    if journal.stash:
        write_stashed(manager, session)
    return result


def write_stashed(manager: SessionManager, session: Session) -> None:
    """Write the numbers waiting in the journal's stash that follow what was written, in order."""
    journal = session._resume
    assert journal is not None
    stash = journal.stash
    while journal.expected in stash and session.state is SessionState.OPEN:
        seq = journal.expected
        _write_numbered(manager, session, journal, seq, stash.pop(seq))
    if stash and manager.resumption is not None:
        manager.resumption.watch_gap(session)


def _write_numbered(
    manager: SessionManager, session: Session, journal: Journal, seq: int, message: Message
) -> SendResult:
    journal.expected = seq + 1
    outbound = session._outbound
    if outbound is None:
        return SendResult.GONE
    numbered = journal.numbered(message, seq)
    offer = outbound.offer(numbered, message_size(numbered))
    if offer is Offer.WRITE:
        carry_soon([(outbound, numbered)])
        return SendResult.QUEUED
    if offer is Offer.QUEUED or offer is Offer.GONE:
        return SendResult.QUEUED  # GONE: ending; the journal has it for a resume
    # Full: the number is given and recorded, so it cannot be dropped (the client would see a
    # gap): the session is closed as a slow consumer, under either policy.
    close_slow_consumer(manager, session)
    return SendResult.GONE


def close_slow_consumer(manager: SessionManager, session: Session) -> None:
    """Apply the ``close`` slow-consumer policy: count it, log it, close with
    ``slow_consumer_code`` behind what was already written."""
    manager.stats.slow_consumers += 1
    log_warning(session.id, "slow consumer %s: backlog full, closing", session.id)
    close_session(manager, session, manager.settings.slow_consumer_code, "slow consumer")


def close_session(
    manager: SessionManager,
    session: Session,
    code: int,
    reason: str,
    *,
    grace: float | None = None,
    end_reason: EndReason = EndReason.SERVER_CLOSED,
    resumable: bool = False,
) -> bool:
    """Close ``session`` from outside its task (kick, limits, slow consumer, drain).

    Records ``end_reason`` first (so disconnect hooks see it) and queues the close frame behind
    the write in progress, so a client that is slow (not dead) still reads why. A session not
    accepted yet is accepted first, so the client can read the code. The app's later sends fail
    like a client disconnect. If the app has not ended within ``grace`` seconds
    (``close_timeout`` by default) its task is cancelled; its disconnect hooks then run exactly
    once as for any other ending. ``resumable``: with ``resume_window`` the session detaches
    (its client may resume it) instead of ending (idle timeout). A detached session ends now
    (kick, revoke). Returns False when the session was already ending.
    """
    if session.state is SessionState.DETACHED:
        resumption = manager.resumption
        return resumption is not None and resumption.close(session, code, reason)
    if session.state not in (SessionState.OPEN, SessionState.CONNECTING):
        return False
    outbound = session._outbound
    if outbound is None:
        return False
    accept_first = session.state is SessionState.CONNECTING
    delay = manager.settings.close_timeout if grace is None else grace
    session._end(end_reason, code, reason)
    session._may_detach = resumable
    outbound.close(code, reason, accept_first=accept_first, timeout=delay)
    end_later(session, delay)
    return True


def end_later(session: Session, delay: float) -> None:
    """Give the app of an ending session ``delay`` seconds to return, then :func:`force_end`."""
    task = session._task
    if task is not None and not task.done():
        session._force_end = call_later(delay, force_end, session)


def force_end(session: Session) -> None:
    """End a session wsession has closed, now: stop waiting for a client that does not read
    its close frame, and cancel the app if it is still running, so its teardown runs."""
    outbound = session._outbound
    if outbound is not None and outbound.closing:
        outbound.shutdown()
    task = session._task
    if task is not None and not task.done() and session.state is not SessionState.CLOSED:
        session._forced = True
        task.cancel()
