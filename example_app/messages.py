"""Parsing what clients send the example: JSON objects only, shallow, and re-encodable.

Anything else is refused with ``UnusableMessage`` (its text is what the client is told), so a
hostile frame or body never reaches the handlers or the encoder: no ``RecursionError`` from
deep nesting, no ``NaN`` broadcast to browsers whose ``JSON.parse`` rejects it, no lone
surrogate that cannot be written as UTF-8.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 32
"""How deeply arrays and objects may nest in a message (the outer object is level 1)."""


class UnusableMessage(ValueError):
    """A message or body the example cannot use; ``str()`` is the error shown to the client."""


def _refuse_constant(name: str) -> Any:
    raise UnusableMessage(f"{name} is not JSON: numbers must be finite")


def parse_json_object(raw: str) -> dict[str, Any]:
    """The JSON object in ``raw``.

    Args:
        raw: the text of a WebSocket message or a request body.

    Raises:
        UnusableMessage: ``raw`` is not a JSON object, nests deeper than ``MAX_JSON_DEPTH``,
            contains ``NaN``/``Infinity``, or holds a string that is not valid Unicode (a lone
            surrogate such as ``"\\ud800"``).
    """
    try:
        message = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        # json's C scanner gives up near Python's recursion limit: far beyond our own cap.
        raise UnusableMessage(f"messages may nest at most {MAX_JSON_DEPTH} levels") from None
    except UnusableMessage:
        raise
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise UnusableMessage("messages must be JSON objects")
    _check_shape(message)
    return message


def _check_shape(message: dict[str, Any]) -> None:
    """Depth and Unicode checks in one walk without recursion (the depth is what is checked)."""
    pending: list[tuple[Any, int]] = [(message, 1)]
    while pending:  # each value is visited once: bounded by the message's size
        value, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise UnusableMessage(f"messages may nest at most {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                pending.append((item, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnusableMessage("text must be valid Unicode (no lone surrogates)") from None
