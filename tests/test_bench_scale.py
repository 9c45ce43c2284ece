"""The pure parts of ``bench.scale``: which N fit the file limit, how connections are spread
over client processes, and the verdicts (leak, targets). ``make bench-scale-smoke`` runs the
harness end to end (in CI)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from bench.scale import FD_RESERVE, Point, ScaleError, _spread, leaks, plan, targets

pytestmark = pytest.mark.timeout(10)


def test_plan_skips_what_the_hard_limit_cannot_hold_and_measures_the_largest_that_fits() -> None:
    run, skipped = plan((1_000, 10_000, 50_000, 100_000), 20_000)
    assert run == [1_000, 10_000, 19_000]
    assert sorted(skipped) == [50_000, 100_000]
    assert "20,000" in skipped[100_000] and "ulimit -Hn" in skipped[100_000]


def test_plan_runs_every_n_when_the_limit_allows() -> None:
    run, skipped = plan((1_000, 100_000), 100_000 + FD_RESERVE)
    assert run == [1_000, 100_000]
    assert skipped == {}


def _clients(*held: int) -> list[Any]:
    return [cast(Any, SimpleNamespace(held=h, index=i)) for i, h in enumerate(held)]


def test_spread_deals_round_robin_to_clients_with_room() -> None:
    assert _spread(5, _clients(0, 8, 10), capacity=10) == [3, 2, 0]


def test_spread_never_exceeds_capacity_and_raises_when_full() -> None:
    shares = _spread(12, _clients(0, 8, 10), capacity=10)
    assert sum(shares) == 12
    assert all(h + s <= 10 for h, s in zip((0, 8, 10), shares, strict=True))
    with pytest.raises(ScaleError):
        _spread(13, _clients(0, 8, 10), capacity=10)


def _point(variant: str, n: int, **values: float) -> Point:
    base = dict.fromkeys(
        (
            "rss_per_conn_kib",
            "connect_cpu_us",
            "lookup_ns",
            "count_ns",
            "send_ns",
            "join_ns",
            "bcast_cpu_ns",
            "objects_after_close",
            "blocks_after_close",
        ),
        1.0,
    )
    point = Point(variant, n)
    for key, value in {**base, **values}.items():
        setattr(point, key, value)
    return point


def test_leaks_are_what_grows_with_n_not_what_stays_at_every_n() -> None:
    fixed = [
        _point(v, n, objects_after_close=2_450.0 if v == "wsession" else -2.0)
        for v in ("bare", "wsession")
        for n in (200, 1_000)
    ]
    assert leaks(fixed) == {"bare": (0.0, 0.0), "wsession": (0.0, 0.0)}
    growing = [
        _point(v, n, objects_after_close=6.0 * n if v == "wsession" else 0.0)
        for v in ("bare", "wsession")
        for n in (200, 1_000)
    ]
    assert leaks(growing) == {"bare": (0.0, 0.0), "wsession": (6.0, 0.0)}
    # str and bytes are not GC-tracked: a leak of those shows in pymalloc blocks only.
    strings = [
        _point(v, n, objects_after_close=0.0, blocks_after_close=3.0 * n if v == "bare" else 0.0)
        for v in ("bare", "wsession")
        for n in (200, 1_000)
    ]
    assert leaks(strings) == {"bare": (0.0, 3.0), "wsession": (0.0, 0.0)}


def test_targets_flag_growth_above_ten_percent_and_the_memory_budget() -> None:
    points = [
        _point("bare", 1_000, rss_per_conn_kib=25.0),
        _point("wsession", 1_000, rss_per_conn_kib=27.0),
        _point("bare", 19_000, rss_per_conn_kib=25.0),
        _point("wsession", 19_000, rss_per_conn_kib=27.0, join_ns=1.5, count_ns=1.05),
    ]
    lines = "\n".join(targets(points))
    assert "wsession group join: 1.00 → 1.50 (x1.50) MISSED" in lines
    assert "wsession count(): 1.00 → 1.05 (x1.05) met" in lines
    assert "bare + 2.00 KiB (target <= + 1.5) MISSED" in lines
