"""Connection ids: random, URL-safe, never taken from the client."""

from __future__ import annotations

import os
import secrets
import threading

ID_CHARS = 22  # 132 bits (6 per character): collisions are not a practical concern
_POOL_BYTES = 3072  # 4,096 characters: one getrandom() per 186 ids instead of one per id

_lock = threading.Lock()
_pool = ""
_offset = 0


def new_connection_id() -> str:
    """Return a fresh connection id: 22 URL-safe base64 characters from :mod:`secrets`
    (132 random bits).

    Random bytes are drawn from ``secrets`` in 3 KiB blocks, encoded once, and each id is the
    next 22 characters (each used once); a forked child starts with a fresh block, so processes
    never share ids.
    """
    global _pool, _offset
    with _lock:
        start = _offset
        if start + ID_CHARS > len(_pool):
            _pool, start = secrets.token_urlsafe(_POOL_BYTES), 0
        _offset = start + ID_CHARS
        return _pool[start : start + ID_CHARS]


def _forget_pool() -> None:
    global _pool, _offset, _lock
    _pool, _offset, _lock = "", 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
