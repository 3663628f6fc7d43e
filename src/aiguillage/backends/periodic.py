"""A background task that repeats an action on an interval until stopped (probes, scrapes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs `action` now and then every `interval_s`, in one task; `stop()` cancels it."""

    def __init__(self, name: str, action: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self._name = name
        self._action = action
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._action()
            await asyncio.sleep(self._interval)
