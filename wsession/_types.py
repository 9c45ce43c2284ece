"""ASGI type aliases, shared with Starlette so ``Middleware(WSessionMiddleware, ...)`` type-checks.

``ASGIApp`` is declared to return ``None``, but wsession always hands back whatever the wrapped
app returned (uvicorn acts on it).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]
