"""The results table (Markdown): medians per variant, ratios against the baseline, targets."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .settings import Settings
from .variants import Variant

if TYPE_CHECKING:
    from .runner import RunResult


@dataclass(frozen=True)
class Row:
    """One metric of the table.

    ``compare``: ``ratio`` (variant / baseline) or ``delta`` (variant - baseline).
    ``limit``: the target on that comparison (at most), or None for an informational row.
    """

    key: str
    label: str
    unit: str
    compare: Literal["ratio", "delta"] = "ratio"
    limit: float | None = None


def rows(s: Settings) -> list[Row]:
    return [
        Row(
            "conn_cpu_us",
            f"server CPU per connection (open, handshake, close; {s.churn_connections:,}, "
            f"{s.churn_concurrency} at once)",
            "µs",
            limit=1.10,
        ),
        Row(
            "echo_cpu_us",
            f"server CPU per echoed message ({s.echo_bytes} B text, {s.echo_connections} "
            f"connections, {s.echo_seconds:g} s)",
            "µs",
            limit=1.03,
        ),
        Row(
            "idle_rss_kib",
            f"idle RSS per open connection ({s.idle_connections:,} held open)",
            "KiB",
            compare="delta",
            limit=1.5,
        ),
        Row(
            "bcast_wall_ms",
            f"broadcast to {s.broadcast_connections:,}: trigger to last receipt "
            f"(median of {s.broadcast_rounds})",
            "ms",
            limit=0.8,
        ),
        Row("bcast_loop_ms", "  broadcast: the send loop alone, timed in the server", "ms"),
        Row("bcast_cpu_ms", "  broadcast: server CPU per broadcast, HTTP trigger included", "ms"),
        Row("conn_rate", "  connections per second (wall clock)", "/s"),
        Row("echo_rate", "  echoes per second (wall clock)", "/s"),
        Row("client_conn_cpu_us", "  load client CPU per connection", "µs"),
        Row("client_echo_cpu_us", "  load client CPU per echo", "µs"),
    ]


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    median = statistics.median(values)
    if len(values) == 1:
        return _fmt(median)
    return f"{_fmt(median)} ({_fmt(min(values))}-{_fmt(max(values))})"


def _target_text(row: Row) -> str:
    if row.limit is None:
        return ""
    if row.compare == "delta":
        return f"<= bare + {row.limit:g} {row.unit}"
    return f"<= {row.limit:.2f}x"


def render_table(
    variants: list[Variant],
    results: list[RunResult],
    settings: Settings,
    env: dict[str, Any],
    skipped: dict[str, str],
) -> str:
    baseline, others = variants[0], variants[1:]
    repeats = sorted({r.repeat for r in results})

    def runs_of(variant: Variant) -> dict[int, RunResult]:
        return {r.repeat: r for r in results if r.variant == variant.name}

    base_runs = runs_of(baseline)
    header = ["metric", "unit", *(v.name for v in variants)]
    for other in others:
        header.append(f"{other.name} vs {baseline.name}")
    header.append("target")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    verdicts: list[str] = []
    for row in rows(settings):
        cells = [row.label, row.unit]
        for variant in variants:
            runs = runs_of(variant)
            values = [r.metrics[row.key] for r in runs.values() if row.key in r.metrics]
            na = any(row.key in r.not_available for r in runs.values())
            cells.append(_cell(values) if values else ("n/a" if na else "error"))
        for other in others:
            runs = runs_of(other)
            pairs = [
                (runs[i].metrics[row.key], base_runs[i].metrics[row.key])
                for i in repeats
                if i in runs
                and i in base_runs
                and row.key in runs[i].metrics
                and row.key in base_runs[i].metrics
            ]
            if not pairs:
                cells.append("n/a")
                continue
            if row.compare == "delta":
                change = statistics.median(v - b for v, b in pairs)
                text = f"{change:+.2f} {row.unit}"
            else:
                change = statistics.median(v / b for v, b in pairs if b)
                text = f"{change:.3f}x"
            if row.limit is not None and other.targets:
                met = change <= row.limit
                if met:
                    text += " met"
                else:
                    over = change - row.limit
                    unit = f" {row.unit}" if row.compare == "delta" else "x"
                    text += f" MISSED by {over:.3f}{unit}"
                verdicts.append(f"{other.name}: {row.key} {'met' if met else 'MISSED'}")
            cells.append(text)
        cells.append(_target_text(row))
        lines.append("| " + " | ".join(cells) + " |")

    first = [r for r in results if r.variant == baseline.name]  # one per repeat
    foreign = [c for r in first for c in r.foreign.values()]
    waited = sum(r.waited for r in first)
    notes = [
        "",
        f"Command: `{env['command']}`; {settings.repeats} interleaved repeat(s); "
        "cells: median (min-max); ratios: median of per-repeat ratios (same repeat's baseline).",
        f"Source: {env['source']}. Machine: {env['machine']}; Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        f"Other processes used {statistics.median(foreign or [0]):.2f} cores (median over "
        f"phases; max {max(foreign, default=0):.2f}) of {env['cores']} while we measured; "
        f"{waited:.0f} s spent waiting for quiet; finished "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}.",
    ]
    for name, why in skipped.items():
        notes.append(f"Skipped variant {name}: {why}.")
    for result in results:
        for phase, error in result.errors.items():
            notes.append(f"ERROR {result.variant} repeat {result.repeat + 1} {phase}: {error}")
    return "\n".join(lines + notes)
