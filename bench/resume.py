"""``python -m bench.resume`` (``make bench-resume``): what session resumption costs, with the
memory registry and with ``RedisRegistry`` (issue 14).

Four configurations side by side: resumption off (memory registry), on with the memory
registry, off with a ``RedisRegistry``, on with a ``RedisRegistry`` (every numbered message
recorded in Redis before the send returns). The Redis ones use a private redis-server on a free
loopback port, started and stopped here; without ``redis-server`` installed they are skipped
(said so) and the rest is measured.

- **per-message cost**: an in-process connection (no server, no network, as in
  ``bench.inproc``) whose app answers every message through ``session.send_text``, CPU time of
  this process per message (a long connection minus an empty one); ``manager.send`` and
  ``session.send_text`` called one after the other on one open session: CPU per call, in this
  process and in the redis-server, and each call's wall time (Redis adds a round trip).
- **resume latency**: real uvicorn servers on 127.0.0.1 and a ``websockets`` client: the client
  drops its TCP connection, ``--missed`` messages are sent to its detached session, and the
  time from the start of the resume handshake to the last replayed message is measured
  (``--resumes`` rounds). With Redis: two workers (two managers and servers in this process,
  one Redis, one ``resume_secret``), the client resuming on the worker it left and on the other.
- **memory per session**: ``--sessions`` in-process sessions open and idle, detached, and
  detached with ``--missed-memory`` broadcasts missed: ``tracemalloc`` bytes per session in this
  process and, with Redis, ``INFO used_memory`` per session and ``MEMORY USAGE`` of one
  session's keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wsession import SessionManager

from . import resume_measure as m
from .resume_redis import PrivateRedis, private_redis, redis_maker, redis_store

ON: dict[str, Any] = {"resume_window": 120.0, "resume_seq_field": "seq"}


@dataclass
class Variant:
    """One configuration: how to make its managers, whether each message waits for Redis
    (then it runs ``--redis-messages``), and the other process whose CPU it reads."""

    name: str
    make: m.Make
    redis: bool = False
    other: m.CpuReader = m._never
    echo: list[float] = field(default_factory=list)
    calls: dict[str, list[m.Calls]] = field(default_factory=dict)


def _variants(redis: PrivateRedis | None) -> list[Variant]:
    found = [
        Variant("off", lambda: SessionManager()),
        Variant("on, memory", lambda: SessionManager(**ON)),
    ]
    if redis is not None:
        found += [
            Variant("off, Redis", redis_maker(redis.url, "bench-off", {}), other=redis.cpu),
            Variant(
                "on, Redis", redis_maker(redis.url, "bench-on", ON), redis=True, other=redis.cpu
            ),
        ]
    return found


async def per_message(variants: list[Variant], rounds: int, messages: int, slow: int) -> list[str]:
    for _ in range(rounds):
        for v in variants:  # alternate, so drift hits all alike
            count = slow if v.redis else messages
            v.echo.append((await m.echo_cost(v.make, count, v.other))[0])
            for via in ("manager", "session", "burst"):
                calls = await m.send_calls(v.make, count, via, v.other)
                v.calls.setdefault(via, []).append(calls)
    base = variants[0]

    def row(label: str, value: Callable[[Variant], list[float]], diff: bool = True) -> str:
        cells = []
        for v in variants:
            data = value(v)
            if not data:
                cells.append("-")
                continue
            text = f"{statistics.median(data):.2f}"
            if diff and v is not base:
                paired = zip(data, value(base), strict=True)
                text += f" ({statistics.median(a - b for a, b in paired):+.2f})"
            cells.append(text)
        return f"| {label} | " + " | ".join(cells) + " |"

    def wall(via: str, q: float) -> Callable[[Variant], list[float]]:
        return lambda v: [_quantile([w for c in v.calls[via] for w in c.wall], q)]

    def redis_cpu(via: str) -> Callable[[Variant], list[float]]:
        return lambda v: [c.other_cpu for c in v.calls[via]] if v.other is not m._never else []

    lines = [
        "| per message | " + " | ".join(v.name for v in variants) + " |",
        "|---|" + "---|" * len(variants),
        row("CPU µs here: echo via `session.send_text`", lambda v: v.echo),
        row("CPU µs here: `manager.send`", lambda v: [c.cpu for c in v.calls["manager"]]),
        row("CPU µs here: `session.send_text`", lambda v: [c.cpu for c in v.calls["session"]]),
        row(
            f"CPU µs here: `manager.send`, {m.BURST} at once",
            lambda v: [c.cpu for c in v.calls["burst"]],
        ),
        row("CPU µs in redis-server: `manager.send`", redis_cpu("manager"), diff=False),
        row("CPU µs in redis-server: `session.send_text`", redis_cpu("session"), diff=False),
        row(f"CPU µs in redis-server: {m.BURST} at once", redis_cpu("burst"), diff=False),
        row("wall µs p50: `manager.send`", wall("manager", 0.5), diff=False),
        row("wall µs p99: `manager.send`", wall("manager", 0.99), diff=False),
        row("wall µs p50: `session.send_text`", wall("session", 0.5), diff=False),
        row("wall µs p99: `session.send_text`", wall("session", 0.99), diff=False),
    ]
    counts = f"{messages:,} messages"
    if any(v.redis for v in variants):
        counts += f" ({slow:,} where each waits for Redis)"
    lines += [
        "",
        f"Medians of {rounds} alternating rounds of {counts}; in brackets the median of the "
        "paired differences from `off`. Wall: quantiles over every call of every round.",
    ]
    return lines


def _quantile(data: list[float], q: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- resume latency ------------------------------------------------------------------------------


async def resume_latency(redis: PrivateRedis | None, rounds: int, missed: int) -> list[str]:
    results: dict[str, list[tuple[float, float]]] = {}
    memory = "memory registry, same worker"
    async with m.workers(lambda: SessionManager(**ON), 1) as (only,):
        results[memory] = [await m.resume_round(only, only, missed) for _ in range(rounds)]
    if redis is not None:
        same, other = "Redis, same worker", "Redis, other worker"
        results[same], results[other] = [], []
        async with m.workers(redis_maker(redis.url, "bench-resume", ON), 2) as (a, b):
            for _ in range(rounds):  # alternate, so drift hits both alike
                results[same].append(await m.resume_round(a, a, missed))
                results[other].append(await m.resume_round(a, b, missed))
    lines = [
        f"| resume + replay of {missed} missed (uvicorn, loopback) | to the welcome p50 "
        "| to the last message p50 | p99 | max | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for label, timings in results.items():
        welcome = [w for w, _ in timings]
        done = [d for _, d in timings]
        lines.append(
            f"| {label} | {statistics.median(welcome):.1f} ms | {statistics.median(done):.1f} ms "
            f"| {_quantile(done, 0.99):.1f} ms | {max(done):.1f} ms | {len(done)} |"
        )
    return lines


# -- memory ---------------------------------------------------------------------------------------


async def session_memory(redis: PrivateRedis | None, count: int, missed: int) -> list[str]:
    results = {
        "memory registry": await m.session_memory(lambda: SessionManager(**ON), count, missed)
    }
    if redis is not None:
        prefix = "bench-memory"
        async with redis_store(redis.url, prefix) as store:
            results["Redis"] = await m.session_memory(
                redis_maker(redis.url, prefix, ON), count, missed, store
            )
    labels = ["open, idle", "detached", f"detached, {missed} missed"]
    lines = [
        f"| KiB per session ({count:,} sessions) | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, memory in results.items():
        lines.append(
            f"| {name}: worker (tracemalloc) | "
            + " | ".join(f"{memory.worker[k] / 1024:.2f}" for k in labels)
            + " |"
        )
        if name == "Redis":
            lines.append(
                "| Redis: `INFO used_memory` | "
                + " | ".join(f"{memory.store[k] / 1024:.2f}" for k in labels)
                + " |"
            )
            lines.append(
                "| Redis: `MEMORY USAGE` of one session's hash / group set / journal (bytes) | "
                + " | ".join(
                    " / ".join(str(memory.keys[k].get(kind, 0)) for kind in ("s", "sg", "j"))
                    for k in labels
                )
                + " |"
            )
    lines += [
        "",
        f"Missed: {missed} broadcasts of a {len(json.dumps(m.PAYLOAD)) + 8}-byte JSON message "
        "to every detached session. Worker bytes include the harness's own per-connection objects "
        "(the same in every row).",
    ]
    return lines


async def _main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    print("## Resumption (bench.resume)\n")
    with private_redis() as redis:
        if redis is None:
            print(
                "redis-server not found (apt-get install redis-server): the Redis rows are "
                "skipped; the memory registry's are measured.\n"
            )
        else:
            print(f"Redis {redis.version}, private, on {redis.url} (stopped at the end).\n")
        variants = _variants(redis)
        lines = await per_message(variants, args.rounds, args.messages, args.redis_messages)
        print("\n".join(lines), end="\n\n", flush=True)
        print("\n".join(await resume_latency(redis, args.resumes, args.missed)), end="\n\n")
        lines = await session_memory(redis, args.sessions, args.missed_memory)
        print("\n".join(lines), end="\n\n")
    print(f"({time.monotonic() - started:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--redis-messages", type=int, default=5_000, help="per round where Redis is waited for"
    )
    parser.add_argument("--resumes", type=int, default=100)
    parser.add_argument("--missed", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--missed-memory", type=int, default=10)
    asyncio.run(_main(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
