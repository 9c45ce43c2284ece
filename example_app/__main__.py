"""``python -m example_app``: serve the example on 127.0.0.1:$PORT (default 8000).

The launcher is where the server-side caps live that the app cannot set itself; see
``uvicorn_options``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import uvicorn

from wsession import ConfigurationError

from .limits import Limits, env_number

SHUTDOWN_MARGIN = 2.0
"""Seconds uvicorn's graceful shutdown may take after the manager's drain: time for the last
closes and disconnect hooks before uvicorn cancels what is left."""


def uvicorn_options(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """uvicorn settings of the example, from the environment.

    - ``ws_max_size``: ``WSESSION_MAX_MESSAGE`` (default 65536 bytes); a larger message is
      closed with 1009 by the protocol layer before it is buffered whole.
    - ``proxy_headers``/``forwarded_allow_ips``: off unless ``WSESSION_FORWARDED_ALLOW_IPS``
      names the proxies (comma-separated addresses or networks, as uvicorn's
      ``--forwarded-allow-ips``). uvicorn's own default trusts ``X-Forwarded-For`` from
      127.0.0.1, so with no proxy in front any local process could claim any client address
      and walk past the per-IP limit.
    - ``timeout_graceful_shutdown``: ``WSESSION_GRACEFUL_SHUTDOWN`` seconds (default
      ``SHUTDOWN_MARGIN``). Without it uvicorn waits for every connection to finish, for ever
      when a client never reads; with it, what is still running is cancelled and the process
      exits. uvicorn starts this wait only after the manager's drain, which runs in front of
      uvicorn's signal handler (``drain_on_signal``), so a shutdown takes at most
      ``WSESSION_DRAIN_TIMEOUT`` (default 10) plus this.
    - ``log_level``: ``WSESSION_LOG_LEVEL`` (default ``info``).
    - ``ws_per_message_deflate``: ``WSESSION_WS_DEFLATE`` (``1`` on, default off). With
      permessage-deflate every frame is compressed once per connection, so one presence diff
      sent to 2,000 subscribers costs 2,000 compressions: a join storm then took seconds per
      handshake (see BENCHMARKS.md, presence).

    Raises:
        ConfigurationError: a value is malformed.
    """
    limits = Limits.from_env(environ)
    proxies = environ.get("WSESSION_FORWARDED_ALLOW_IPS", "").strip()
    graceful = env_number(environ, "WSESSION_GRACEFUL_SHUTDOWN", SHUTDOWN_MARGIN, minimum=0)
    return {
        "ws_max_size": limits.max_message,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or None,
        "timeout_graceful_shutdown": graceful,
        "log_level": environ.get("WSESSION_LOG_LEVEL", "info"),
        "ws_per_message_deflate": _flag(environ, "WSESSION_WS_DEFLATE"),
    }


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{name} must be 1 or 0, got {raw!r}")


def main() -> None:
    """Run the example app under uvicorn; ``HOST`` and ``PORT`` override the address."""
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    options = uvicorn_options()
    print(f"wsession example app: open http://{host}:{port}/", flush=True)
    uvicorn.run("example_app.app:app", host=host, port=port, **options)


if __name__ == "__main__":
    main()
