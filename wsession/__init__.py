"""wsession: WebSocket session management for ASGI apps (Starlette, FastAPI).

A pure-ASGI middleware gives every WebSocket connection an unguessable id and a
:class:`Session`; connect hooks may refuse it before the app sees it; disconnect hooks run
exactly once however it ends; a registry lists and reaches live sessions.
"""

from ._client_script import client_script_path, client_script_route
from ._config import Settings
from ._context import SCOPE_KEY, connection_id, current_session, get_current_session, get_session
from ._delivery import SendResult, SlowConsumerPolicy
from ._exceptions import (
    ConfigurationError,
    InvalidMessage,
    LimitExceeded,
    Refuse,
    RegistryUnavailable,
    SessionClosed,
    SessionNotAvailable,
    SessionStateError,
    WSessionError,
)
from ._expiry import RefreshHook
from ._ids import new_connection_id
from ._manager import Hook, SessionManager
from ._middleware import WSessionMiddleware
from ._presence import Presence, PresenceDiff
from ._session import EndReason, Session, SessionState
from ._stats import Stats
from .backends import MemoryRegistry, SessionRegistry

__all__ = [
    "SCOPE_KEY",
    "ConfigurationError",
    "EndReason",
    "Hook",
    "InvalidMessage",
    "LimitExceeded",
    "MemoryRegistry",
    "Presence",
    "PresenceDiff",
    "RefreshHook",
    "Refuse",
    "RegistryUnavailable",
    "SendResult",
    "Session",
    "SessionClosed",
    "SessionManager",
    "SessionNotAvailable",
    "SessionRegistry",
    "SessionState",
    "SessionStateError",
    "Settings",
    "SlowConsumerPolicy",
    "Stats",
    "WSessionError",
    "WSessionMiddleware",
    "client_script_path",
    "client_script_route",
    "connection_id",
    "current_session",
    "get_current_session",
    "get_session",
    "new_connection_id",
]

__version__ = "0.1.0"
