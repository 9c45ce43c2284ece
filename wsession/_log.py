"""The library's logger. Every record it writes carries ``record.connection_id`` (``None`` for
lines about no single connection, such as a drain summary)."""

from __future__ import annotations

import logging

logger = logging.getLogger("wsession")


def log_error(connection_id: str | None, message: str, *args: object, exc: bool = False) -> None:
    """Log at ERROR with the connection id in the record (``extra``), so any formatter,
    JSON ones included, can print it."""
    logger.error(message, *args, exc_info=exc, extra={"connection_id": connection_id})


def log_warning(connection_id: str | None, message: str, *args: object) -> None:
    """Log at WARNING with the connection id in the record."""
    logger.warning(message, *args, extra={"connection_id": connection_id})


def log_info(connection_id: str | None, message: str, *args: object) -> None:
    """Log at INFO with the connection id in the record."""
    logger.info(message, *args, extra={"connection_id": connection_id})
