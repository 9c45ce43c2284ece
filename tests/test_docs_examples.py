"""The README's testing examples are the files in tests/docs_examples/, which run as tests:
this checks the README shows each of them verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "tests" / "docs_examples").glob("test_*.py"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"test_starlette_example.py", "test_fastapi_example.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_readme_shows_the_example_verbatim(example: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = "```python\n" + example.read_text(encoding="utf-8") + "```\n"
    assert block in readme, f"README.md does not show {example.name} as it is: copy it again"
