"""The server variants ``make bench`` compares; the first is the baseline of every ratio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One server configuration.

    Attributes:
        name: the column heading in the table.
        app: ``module:factory`` of the ASGI app (see bench/apps.py).
        workers: uvicorn worker processes; CPU and RSS are summed over the whole process tree.
        targets: whether the targets in BENCHMARKS.md apply to it (the baseline has none).
        default: whether ``make bench`` runs it without ``--variants``.
    """

    name: str
    app: str
    workers: int = 1
    targets: bool = True
    default: bool = True

    def unavailable(self) -> str | None:
        """Why this variant cannot run here (a missing service, ...), or None."""
        return None


BASELINE = Variant("bare", "bench.apps:bare_app", targets=False)

VARIANTS: list[Variant] = [
    BASELINE,
    # The baseline again, as a control: its ratio against the baseline shows how much of any
    # ratio in the same table is the method's own noise (an A/A test).
    Variant("bare-again", "bench.apps:bare_app", targets=False),
    Variant("wsession", "bench.apps:wsession_app"),
    # REDIS VARIANT GOES HERE, when wsession's Redis registry lands. Something like
    #
    #     RedisVariant("wsession-redis-2w", "bench.apps:wsession_redis_app", workers=2),
    #
    # where RedisVariant.unavailable() reports a missing redis-server binary, and the runner
    # (bench/runner.py, see "services") starts a redis-server on a free 127.0.0.1 port for it
    # and passes its URL as BENCH_REDIS_URL. Broadcast is triggered on one worker and must
    # reach connections held by both, which the client measures without any change.
]


def by_name(names: list[str]) -> list[Variant]:
    """The variants called ``names``, the baseline always first."""
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [BASELINE, *(known[n] for n in names if n != BASELINE.name)]
