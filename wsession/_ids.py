"""Connection ids: random, URL-safe, never taken from the client."""

from __future__ import annotations

import os
import secrets

ID_CHARS = 22  # 132 bits (6 per character): collisions are not a practical concern
_POOL_BYTES = 3072  # 4,096 characters: one getrandom() per 186 ids instead of one per id

# Ids made ahead, each handed out once. list.pop() and list.extend() are atomic, so threads
# need no lock: two that refill at once each add their own random ids.
_pool: list[str] = []


def new_connection_id() -> str:
    """Return a fresh connection id: 22 URL-safe base64 characters from :mod:`secrets`
    (132 random bits).

    Random bytes are drawn from ``secrets`` in 3 KiB blocks, encoded once and cut into ids,
    each handed out once; a forked child starts with none of its parent's, so processes never
    share ids.
    """
    try:
        return _pool.pop()
    except IndexError:
        return _refill()


def _refill() -> str:
    text = secrets.token_urlsafe(_POOL_BYTES)
    ids = [text[i : i + ID_CHARS] for i in range(0, len(text) - ID_CHARS + 1, ID_CHARS)]
    first = ids.pop()
    _pool.extend(ids)
    return first


def _forget_pool() -> None:
    _pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
