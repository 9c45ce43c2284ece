"""``python -m example_app``: serve the example on 127.0.0.1:$PORT (default 8000)."""

from __future__ import annotations

import os

import uvicorn


def main() -> None:
    """Run the example app under uvicorn; ``HOST`` and ``PORT`` override the address."""
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    print(f"wsession example app: open http://{host}:{port}/", flush=True)
    uvicorn.run("example_app.app:app", host=host, port=port)


if __name__ == "__main__":
    main()
