"""How much traffic each phase makes: the full benchmark and the seconds-long smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Counts and durations of one run (every loop is bounded by these).

    Counts are per variant: each variant gets ``churn_connections`` connections in slices of
    ``churn_slice``, and ``echo_seconds`` of echo in slices of ``echo_slice`` seconds (each after
    ``echo_warmup`` seconds of unmeasured traffic).
    """

    repeats: int = 5
    churn_connections: int = 3000
    churn_concurrency: int = 50
    churn_warmup: int = 200
    churn_slice: int = 250
    echo_connections: int = 100
    echo_bytes: int = 32
    echo_warmup: float = 0.1
    echo_seconds: float = 5.0
    echo_slice: float = 0.5
    echo_limit: int = 5_000_000
    idle_connections: int = 2000
    idle_warmup: int = 50
    idle_settle: float = 0.5
    broadcast_connections: int = 1000
    broadcast_warmup: int = 3
    broadcast_rounds: int = 20
    broadcast_gap: float = 0.05
    open_concurrency: int = 50
    phase_timeout: float = 120.0
    settle_timeout: float = 15.0
    server_start_timeout: float = 30.0
    quiet_wait: float = 20.0


FULL = Settings()

SMOKE = Settings(
    repeats=1,
    churn_connections=40,
    churn_concurrency=8,
    churn_warmup=5,
    churn_slice=20,
    echo_connections=8,
    echo_warmup=0.05,
    echo_seconds=0.3,
    echo_slice=0.15,
    idle_connections=40,
    idle_warmup=5,
    idle_settle=0.1,
    broadcast_connections=16,
    broadcast_warmup=1,
    broadcast_rounds=3,
    broadcast_gap=0.01,
    phase_timeout=20.0,
    settle_timeout=10.0,
    quiet_wait=0.0,
)
