"""A process whose SIGTERM handler was the default action when the manager was entered.

Writes ``entered``, ``manager-exited`` (after ``async with manager`` unwound) and ``atexit``
lines to the file named by ``argv[1]``, and prints ``ready`` once the manager is entered.
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import sys

from wsession import SessionManager

MARKER = sys.argv[1]


def _mark(line: str) -> None:
    with open(MARKER, "a", encoding="utf-8") as marker:
        marker.write(line + "\n")


async def main() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    manager = SessionManager(drain_timeout=1)
    try:
        async with manager:
            _mark("entered")
            print("ready", flush=True)
            await asyncio.Event().wait()  # until the signal ends the process
    finally:
        _mark("manager-exited")


if __name__ == "__main__":
    atexit.register(_mark, "atexit")
    asyncio.run(main())
