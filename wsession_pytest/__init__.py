"""The wsession pytest plugin: fixtures for testing apps that use wsession.

Registered through the ``pytest11`` entry point, so installing wsession makes the fixtures
available; nothing else changes. This module lives outside the ``wsession`` package and imports
nothing but pytest: wsession (and Starlette's test client) are imported only when a test asks
for one of the fixtures, so test runs that never use them pay nothing.

Fixtures (see ``wsession.testing`` for the objects they yield):

- ``wsession_app``: the ASGI app under test. Override it in a ``conftest.py`` (return your app),
  or set ``wsession_app = "package.module:app"`` in the pytest configuration.
- ``wsession_manager``: the app's :class:`wsession.SessionManager` (found in its middleware;
  override it when the app has several).
- ``wsession_client``: a :class:`wsession.testing.SessionClient` (Starlette's ``TestClient``
  with ``connect``) entered for the test, so the app's lifespan runs.
- ``wsession_clock``: a :class:`wsession.testing.ManualClock` installed for the test.
- ``wsession_recorder``: a :class:`wsession.testing.HookRecorder` on ``wsession_manager``,
  detached after the test.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from wsession import SessionManager
    from wsession.testing import HookRecorder, ManualClock, SessionClient

_INI = "wsession_app"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``wsession_app`` configuration value."""
    parser.addini(
        _INI,
        "import path ('package.module:attribute') of the ASGI app the wsession fixtures test",
        default="",
    )


def _load(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        pytest.fail(f"{_INI} = {spec!r}: expected 'package.module:attribute'", pytrace=False)
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture
def wsession_app(request: pytest.FixtureRequest) -> Any:
    """The ASGI app under test: ``wsession_app`` from the pytest configuration (override this
    fixture to return your app instead)."""
    spec = str(request.config.getini(_INI) or "")
    if not spec:
        pytest.fail(
            "the wsession fixtures need your app: define a `wsession_app` fixture that returns "
            f"it, or set `{_INI} = 'package.module:app'` in the pytest configuration",
            pytrace=False,
        )
    return _load(spec)


@pytest.fixture
def wsession_manager(wsession_app: Any) -> SessionManager:
    """The :class:`wsession.SessionManager` the app's middleware uses."""
    from wsession.testing import find_manager

    return find_manager(wsession_app)


@pytest.fixture
def wsession_client(wsession_app: Any, wsession_manager: SessionManager) -> Iterator[SessionClient]:
    """A :class:`wsession.testing.SessionClient` for the app, its lifespan running."""
    from wsession.testing import SessionClient

    with SessionClient(wsession_app, manager=wsession_manager) as client:
        yield client


@pytest.fixture
def wsession_clock() -> Iterator[ManualClock]:
    """A :class:`wsession.testing.ManualClock` installed for the test (request it before
    opening the connections it should govern)."""
    from wsession.testing import ManualClock

    with ManualClock() as clock:
        yield clock


@pytest.fixture
def wsession_recorder(wsession_manager: SessionManager) -> Iterator[HookRecorder]:
    """A :class:`wsession.testing.HookRecorder` on the app's manager for the test."""
    from wsession.testing import HookRecorder

    with HookRecorder(wsession_manager) as recorder:
        yield recorder
