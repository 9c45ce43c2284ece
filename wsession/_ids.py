"""Connection ids: random, URL-safe, never taken from the client."""

from __future__ import annotations

import secrets

ID_BYTES = 16  # 128 bits: collisions are not a practical concern


def new_connection_id() -> str:
    """Return a fresh connection id: 128 bits from :mod:`secrets`, URL-safe base64 (22 chars)."""
    return secrets.token_urlsafe(ID_BYTES)
