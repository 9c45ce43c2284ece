"""Counters a SessionManager keeps about its own process."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

HOOK_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
"""Upper bounds (seconds) of the hook-duration histogram buckets; a last bucket is +Inf."""


@dataclass(slots=True)
class Histogram:
    """A fixed-bucket histogram (Prometheus style): per-bucket counts, sum and count."""

    buckets: tuple[float, ...] = HOOK_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(HOOK_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        running, out = 0, []
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


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
        sends: out-of-band sends split by :class:`~wsession.SendResult` value.
        hook_seconds: duration histograms of hooks, keyed ``"connect"`` and ``"disconnect"``.
        expired: sessions closed because their ``expires_at`` (plus ``expiry_grace``) passed.
        refreshes: ``manager.refresh`` outcomes, keyed ``"ok"`` and ``"failed"`` (a failed one
            closed its session).
        revocations: ``revoke_user`` / ``revoke_session`` calls made here, keyed ``"user"`` and
            ``"session"``.
        revoked: sessions those calls closed (on any worker; another worker's counted once its
            worker was told).
        detached: times a session's connection was lost and the session detached
            (``resume_window``) instead of ending.
        resumed: times a new connection resumed a detached session (not counted in
            ``accepted``: it is the same session).
        resume_failed: resume attempts that got a new session instead, by why: ``"invalid"``
            (a token this secret did not sign), ``"unknown"`` (no such detached session here:
            used, expired, ended or another worker's), ``"replay_lost"`` (its buffer no longer
            holds what the client missed), ``"refused"`` (a resume hook refused; no session).
    """

    accepted: int = 0
    refused: int = 0
    ended: int = 0
    hook_errors: int = 0
    dropped: int = 0
    slow_consumers: int = 0
    refused_by: Counter[str] = field(default_factory=Counter)
    ended_by: Counter[str] = field(default_factory=Counter)
    sends: Counter[str] = field(default_factory=Counter)
    hook_seconds: dict[str, Histogram] = field(
        default_factory=lambda: {"connect": Histogram(), "disconnect": Histogram()}
    )
    expired: int = 0
    refreshes: Counter[str] = field(default_factory=Counter)
    revocations: Counter[str] = field(default_factory=Counter)
    revoked: int = 0
    detached: int = 0
    resumed: int = 0
    resume_failed: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters (histograms as count and sum)."""
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "ended": self.ended,
            "hook_errors": self.hook_errors,
            "dropped": self.dropped,
            "slow_consumers": self.slow_consumers,
            "refused_by": dict(self.refused_by),
            "ended_by": dict(self.ended_by),
            "sends": dict(self.sends),
            "expired": self.expired,
            "refreshes": dict(self.refreshes),
            "revocations": dict(self.revocations),
            "revoked": self.revoked,
            "detached": self.detached,
            "resumed": self.resumed,
            "resume_failed": dict(self.resume_failed),
            "hook_seconds": {
                phase: {"count": h.count, "sum": h.total} for phase, h in self.hook_seconds.items()
            },
        }
