"""Counters a SessionManager keeps about its own process."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Stats:
    """Lifetime counters of one process (one worker).

    Attributes:
        accepted: connections whose connect hooks completed (and were registered).
        refused: connections refused before the app ran (by a hook, a limit, ...).
        ended: sessions whose disconnect hooks ran; equals ``accepted`` minus live ones.
        hook_errors: hooks that raised (other than ``Refuse``) or timed out.
        dropped: out-of-band messages dropped by the ``drop`` slow-consumer policy.
        slow_consumers: sessions closed because their backlog was full.
        refused_by: ``refused`` split by label (``"refused"``, ``"hook_error"``, ...).
        ended_by: ``ended`` split by :class:`~wsession.EndReason` value.
    """

    accepted: int = 0
    refused: int = 0
    ended: int = 0
    hook_errors: int = 0
    dropped: int = 0
    slow_consumers: int = 0
    refused_by: Counter[str] = field(default_factory=Counter)
    ended_by: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters."""
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "ended": self.ended,
            "hook_errors": self.hook_errors,
            "dropped": self.dropped,
            "slow_consumers": self.slow_consumers,
            "refused_by": dict(self.refused_by),
            "ended_by": dict(self.ended_by),
        }
