"""Validated settings: a bad value fails at construction with a message naming the setting."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._delivery import SlowConsumerPolicy
from ._exceptions import ConfigurationError

M = TypeVar("M", bound=BaseModel)


class Settings(BaseModel):
    """Tunable behaviour of a :class:`~wsession.SessionManager`.

    Every field can be passed to ``SessionManager(...)`` (or ``WSessionMiddleware(...)``) as a
    keyword argument.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout: float | None = Field(
        default=10.0,
        gt=0,
        description="Seconds all connect hooks together may take; past it the connection is "
        "refused (label 'hook_timeout'). None: no limit.",
    )
    disconnect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds one async disconnect hook may take before it is abandoned and "
        "logged; the other hooks still run.",
    )
    max_backlog: int = Field(
        default=256,
        ge=1,
        description="Out-of-band messages (send by id, group, user, broadcast) one session may "
        "have waiting while its client does not read; past it, slow_consumer applies.",
    )
    slow_consumer: SlowConsumerPolicy = Field(
        default=SlowConsumerPolicy.CLOSE,
        description="What happens when a backlog is full: close, drop or wait.",
    )
    slow_consumer_code: int = Field(
        default=1013,
        ge=1000,
        le=4999,
        description="Close code used for a slow consumer (1013 try again later, or 1008).",
    )
    send_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a sender waits for backlog room under the 'wait' policy.",
    )
    close_timeout: float = Field(
        default=5.0,
        ge=0,
        description="Seconds an app gets to end after wsession closed its session (kick); then "
        "its task is cancelled and the disconnect hooks run.",
    )
    error_status: int = Field(
        default=500,
        ge=500,
        le=599,
        description="HTTP status of the denial response when a connect hook raises "
        "something other than Refuse (close code 1011 where denial is not supported).",
    )


def validate_model(model: type[M], owner: str, values: dict[str, Any]) -> M:
    """Build ``model`` from ``values``; turn pydantic's error into a :class:`ConfigurationError`
    whose message names each bad setting."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or owner}: {err['msg']}"
            f" (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid {owner} setting: {problems}") from None
