"""Helpers to test apps that use wsession: connections that know their server-side session,
the ways clients leave, a clock tests move by hand, and a recorder of hooks.

- :func:`connect` / :class:`SessionClient`: through Starlette's ``TestClient`` (sync tests).
- :class:`AsyncSessionClient`: the same for async tests (anyio), driving the app in process.
- :class:`ManualClock`: idle timeouts (and every wsession timer) without sleeping.
- :class:`HookRecorder`: which hooks ran, in what order, and how each session ended.

A pytest plugin (installed with wsession, used only when a test asks for its fixtures) offers
``wsession_app``, ``wsession_manager``, ``wsession_client``, ``wsession_clock`` and
``wsession_recorder``; see the guide, docs/testing.md.

Importing this module needs Starlette's test client (``httpx``), as any Starlette test does.
"""

from ._async import AsyncConnection, AsyncSessionClient, ClientDisconnected, HandshakeDenied
from ._capture import MARKER_HEADER
from ._clock import ManualClock
from ._discover import find_manager, find_managers
from ._recorder import Ending, HookCall, HookRecorder
from ._sync import LOST, SHUTDOWN, Connection, SessionClient, connect

__all__ = [
    "LOST",
    "MARKER_HEADER",
    "SHUTDOWN",
    "AsyncConnection",
    "AsyncSessionClient",
    "ClientDisconnected",
    "Connection",
    "Ending",
    "HandshakeDenied",
    "HookCall",
    "HookRecorder",
    "ManualClock",
    "SessionClient",
    "connect",
    "find_manager",
    "find_managers",
]
