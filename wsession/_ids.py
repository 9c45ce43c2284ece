"""Connection ids: random, URL-safe, never taken from the client."""

from __future__ import annotations

import base64
import os
import secrets
import threading

ID_BYTES = 16  # 128 bits: collisions are not a practical concern
_POOL_BYTES = 4096  # one getrandom() per 256 ids instead of one per id

_lock = threading.Lock()
_pool = b""
_offset = 0


def new_connection_id() -> str:
    """Return a fresh connection id: 128 bits from :mod:`secrets`, URL-safe base64 (22 chars).

    Random bytes are drawn from ``secrets`` in 4 KiB blocks (each byte used once); a forked
    child starts with a fresh block, so processes never share ids.
    """
    global _pool, _offset
    with _lock:
        if _offset + ID_BYTES > len(_pool):
            _pool, _offset = secrets.token_bytes(_POOL_BYTES), 0
        chunk = _pool[_offset : _offset + ID_BYTES]
        _offset += ID_BYTES
    return base64.urlsafe_b64encode(chunk).rstrip(b"=").decode("ascii")


def _forget_pool() -> None:
    global _pool, _offset, _lock
    _pool, _offset, _lock = b"", 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
