from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


from .redis_support import own_redis_server, redis_server  # noqa: E402,F401  (fixtures)
