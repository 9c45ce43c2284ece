"""Find the server-side Session of a connection a test opens."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .._manager import SessionManager
from .._session import Session

MARKER_HEADER = "x-wsession-testing"
"""The header the testing helpers add to each handshake they open, so the connection's own
server-side :class:`~wsession.Session` can be found (the app sees it in ``session.headers``)."""

_hooks_lock = threading.Lock()  # connections opened from several threads edit the same tuple


@contextmanager
def capture_session(manager: SessionManager) -> Iterator[tuple[str, list[Session]]]:
    """Yield ``(marker, found)``: while inside, the session whose handshake carries ``marker``
    in :data:`MARKER_HEADER` is appended to ``found`` once its connect hooks completed (a
    temporary last connect hook, so the capture never races the app's own end)."""
    marker = secrets.token_hex(8)
    found: list[Session] = []

    def wsession_testing_capture(session: Session) -> None:
        if session.headers.get(MARKER_HEADER) == marker:
            found.append(session)

    with _hooks_lock:
        manager.connect_hooks = (*manager.connect_hooks, wsession_testing_capture)
    try:
        yield marker, found
    finally:
        with _hooks_lock:
            manager.connect_hooks = tuple(
                h for h in manager.connect_hooks if h is not wsession_testing_capture
            )


def wait_gone(manager: SessionManager, session: Session, timeout: float) -> bool:
    """Wait (from a thread that is not the app's) until ``session`` is gone from the manager:
    its app returned and its disconnect hooks ran. False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while manager.local.get(session.id) is session:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)  # the app runs on another thread: poll a flag, bounded by deadline
    return True
