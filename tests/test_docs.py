"""The README's quickstarts run as printed, and the API reference lists every public name.

The quickstarts are taken from README.md itself (its ```python blocks under "## Starlette" and
"## FastAPI"), executed, and driven through Starlette's TestClient; the same code is on the
documentation site's getting-started page, which must carry identical copies.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
REFERENCE = ROOT / "docs" / "reference"


def python_block(markdown: str, heading: str) -> str:
    """The first ```python block after ``## heading`` (and before the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match is not None, f"no '## {heading}' section"
    block = re.search(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)
    assert block is not None, f"no python block under '## {heading}'"
    return block.group(1)


def run_snippet(source: str, name: str) -> dict[str, Any]:
    """Execute a snippet as a module of its own and return its globals."""
    namespace: dict[str, Any] = {"__name__": name}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("heading", ["Starlette", "FastAPI"])
def test_quickstart_is_the_same_in_readme_and_docs(heading: str) -> None:
    readme = python_block(README.read_text(), heading)
    docs = python_block(GETTING_STARTED.read_text(), heading)
    assert readme == docs


def test_starlette_quickstart_runs() -> None:
    snippet = run_snippet(python_block(README.read_text(), "Starlette"), "readme_starlette")
    with TestClient(snippet["app"]) as client:
        with client.websocket_connect("/ws?token=letmein") as ws:
            session_id = ws.receive_json()["id"]
            ws.send_text("hello")
            assert ws.receive_json() == {"from": session_id, "text": "hello"}
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws?token=wrong"):
            pass  # refused by the connect hook before the app runs
    stats = snippet["sessions"].stats
    assert (stats.accepted, stats.refused, stats.ended) == (1, 1, 1)


def test_fastapi_quickstart_runs() -> None:
    snippet = run_snippet(python_block(README.read_text(), "FastAPI"), "readme_fastapi")
    with TestClient(snippet["app"]) as client, client.websocket_connect("/ws") as ws:
        session_id = ws.receive_json()["id"]
        assert isinstance(session_id, str)
        assert len(session_id) >= 22


def documented_names() -> set[str]:
    """Every ``::: dotted.name`` the reference pages render."""
    names: set[str] = set()
    for page in REFERENCE.glob("*.md"):
        names.update(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    return names


@pytest.mark.parametrize(
    ("module", "prefix"),
    [("wsession", "wsession"), ("wsession.backends", "wsession.backends")],
)
def test_reference_lists_every_public_name(module: str, prefix: str) -> None:
    exported: ModuleType = importlib.import_module(module)
    documented = documented_names()
    # The registries are re-exported by wsession and documented once, under wsession.backends.
    missing = {
        f"{prefix}.{name}"
        for name in exported.__all__
        if f"{prefix}.{name}" not in documented and f"wsession.backends.{name}" not in documented
    }
    assert not missing, f"add these to docs/reference/: {sorted(missing)}"


@pytest.mark.parametrize("module", ["wsession.metrics", "wsession.admin"])
def test_reference_renders_whole_modules(module: str) -> None:
    # These pages render the module with `filters: public`, so every name in __all__ shows.
    assert module in documented_names()


def test_redis_registry_is_in_the_reference() -> None:
    assert "wsession.backends.redis.RedisRegistry" in documented_names()
