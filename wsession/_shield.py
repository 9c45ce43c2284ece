"""Run cleanup to completion even when the calling task is being cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


async def run_shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` to the end, shielded from cancellation of the caller; its result.

    If the caller is cancelled meanwhile, the cancellation is re-raised once ``coro`` finished,
    so the caller still ends as cancelled. On asyncio a separate task is used, because an anyio
    shield does not stop a native ``Task.cancel()`` (what uvicorn uses on shutdown timeouts).
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): its shielded scopes do the job
        with anyio.CancelScope(shield=True):
            return await coro
    task = loop.create_task(coro)
    cancelled: BaseException | None = None
    # The anyio shield stops anyio cancel scopes from re-delivering their cancellation on every
    # loop iteration (a busy loop here); the task and asyncio.shield survive a native cancel().
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.done():
                    break
                cancelled = exc  # keep waiting: cleanup must finish
    if cancelled is not None:
        raise cancelled
    return task.result()
