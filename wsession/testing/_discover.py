"""Find the SessionManager an ASGI app's wsession middleware uses."""

from __future__ import annotations

from typing import Any

from .._exceptions import WSessionError
from .._manager import SessionManager
from .._middleware import WSessionMiddleware

_MAX_DEPTH = 32  # apps nest a few levels (middleware, mounts, routes); cycles are cut by id


def find_managers(app: Any) -> list[SessionManager]:
    """Every distinct :class:`SessionManager` used by a :class:`WSessionMiddleware` in ``app``.

    Looks through Starlette/FastAPI apps (their middleware list, built or not), routers,
    routes (per-route middleware), mounts and middleware that keep the wrapped app in ``.app``.
    """
    found: list[SessionManager] = []
    seen: set[int] = set()

    def add(manager: Any) -> None:
        if isinstance(manager, SessionManager) and all(m is not manager for m in found):
            found.append(manager)

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth > _MAX_DEPTH or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, WSessionMiddleware):
            add(obj.manager)
        # Starlette's Middleware(cls, *args, **kwargs) entries, before the stack is built.
        for entry in getattr(obj, "user_middleware", None) or ():
            if getattr(entry, "cls", None) is WSessionMiddleware:
                kwargs = getattr(entry, "kwargs", {}) or {}
                args = getattr(entry, "args", ()) or ()
                add(kwargs.get("manager", args[0] if args else None))
        for route in getattr(obj, "routes", None) or ():
            visit(route, depth + 1)
        for attr in ("middleware_stack", "router", "app"):
            visit(getattr(obj, attr, None), depth + 1)

    visit(app, 0)
    return found


def find_manager(app: Any) -> SessionManager:
    """The one :class:`SessionManager` ``app`` uses (see :func:`find_managers`).

    Raises:
        WSessionError: none or several were found (pass ``manager=`` explicitly then).
    """
    managers = find_managers(app)
    if len(managers) == 1:
        return managers[0]
    if not managers:
        raise WSessionError(
            "no WSessionMiddleware with a SessionManager found in this app: pass manager="
        )
    raise WSessionError(f"this app uses {len(managers)} SessionManagers: pass manager=")
