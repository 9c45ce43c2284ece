"""The one JSON encoder for every path that sends (manager sends, ``Session.send_json``).

Compact, UTF-8 (non-ASCII kept as is), pydantic models at any depth, and nothing a browser's
``JSON.parse`` would reject: ``NaN``/``Infinity`` and text that is not valid UTF-8 (lone
surrogates) are refused with :class:`~wsession.InvalidMessage` before anything is sent.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from ._exceptions import InvalidMessage

_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=lambda o: _default(o)
)


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode_json(obj: Any) -> str:
    """Serialise ``obj`` for a text frame.

    Raises:
        InvalidMessage: ``obj`` holds ``NaN``/``Infinity``, an object JSON cannot represent, or
            text that is not valid UTF-8.
    """
    try:
        text = _encoder.encode(obj)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidMessage(f"cannot send as JSON: {exc}") from exc
    check_text(text)
    return text


def check_text(text: str) -> str:
    """Return ``text`` if it can be sent as a text frame (valid UTF-8).

    Raises:
        InvalidMessage: ``text`` holds a lone surrogate.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidMessage(f"text is not valid UTF-8 ({exc.reason} at {exc.start})") from exc
    return text
