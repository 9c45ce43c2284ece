from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


from .redis_support import (  # noqa: E402,F401  (fixtures)
    any_redis,
    own_redis_server,
    redis_cluster,
    redis_server,
)
