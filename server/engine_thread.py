"""The one thread of a process that touches tinygrad.

tinygrad is not thread-safe, so materialize, warmup and forward of every model run here, one at a
time, and the event loop only awaits their futures: it never blocks on the device.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class EngineThread:
    """A single-thread executor with an awaitable ``run``."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Let queued work finish (in-flight batches complete), then stop the thread."""
        self._executor.shutdown(wait=True, cancel_futures=False)
