"""``python -m bench``: see bench/runner.py and BENCHMARKS.md."""

from __future__ import annotations

import sys

from .runner import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every server was stopped", file=sys.stderr)
        sys.exit(130)
