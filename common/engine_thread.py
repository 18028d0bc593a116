"""The one thread of a process that touches tinygrad.

tinygrad is not thread-safe (its kernel cache is one sqlite connection, usable only from the thread that opened
it), so every model's materialize, warmup and forward run here, one at a time: the API's event loop only awaits
their futures and never blocks on the device; the worker's threads, one per model, wait on theirs.
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
    """A single-thread executor with an awaitable ``run`` and a blocking ``call``."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the thread and wait for it (the worker's blocking threads)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        """Let queued work finish (in-flight batches complete), then stop the thread."""
        self._executor.shutdown(wait=True, cancel_futures=False)
