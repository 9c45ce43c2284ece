"""``python -m bench``: see bench/runner.py and BENCHMARKS.md."""

from __future__ import annotations

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
