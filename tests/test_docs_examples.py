"""The testing guide's examples (docs/testing.md) are the files in tests/docs_examples/, which
run as tests: this checks the guide shows each of them verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "tests" / "docs_examples").glob("test_*.py"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"test_starlette_example.py", "test_fastapi_example.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_testing_guide_shows_the_example_verbatim(example: Path) -> None:
    guide = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    block = "```python\n" + example.read_text(encoding="utf-8") + "```\n"
    assert block in guide, f"docs/testing.md does not show {example.name} as it is: copy it again"
