"""The example's own size caps, read from the environment (see docs/production.md, "Limits and
hostile input")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wsession import ConfigurationError

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_MAX_MESSAGE = 64 * 1024


def env_number(environ: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    """``environ[name]`` as a number of at least ``minimum``, or ``default`` when unset.

    Raises:
        ConfigurationError: the value is not a number or is below ``minimum``.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigurationError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """Size caps of the example app.

    Attributes:
        max_body: bytes of an ``/api`` request body (``WSESSION_MAX_BODY``); more is 413.
        max_message: bytes of one WebSocket message (``WSESSION_MAX_MESSAGE``); more closes
            the connection with 1009.
    """

    max_body: int = DEFAULT_MAX_BODY
    max_message: int = DEFAULT_MAX_MESSAGE

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Limits:
        """The caps from ``environ``, defaults where unset.

        Raises:
            ConfigurationError: a value is not a whole number of at least 1.
        """
        return cls(
            max_body=int(env_number(environ, "WSESSION_MAX_BODY", DEFAULT_MAX_BODY, minimum=1)),
            max_message=int(
                env_number(environ, "WSESSION_MAX_MESSAGE", DEFAULT_MAX_MESSAGE, minimum=1)
            ),
        )

    def message_too_big(self, text: str) -> bool:
        """Whether ``text`` takes more than ``max_message`` bytes as UTF-8."""
        if len(text) > self.max_message:
            return True  # at least one byte per character: no need to encode
        return len(text) * 4 > self.max_message and len(text.encode()) > self.max_message
