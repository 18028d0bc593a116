"""What each model serves, and how a replica moves to a new version without dropping a request.

``mp:{m}:version`` in Redis is the one source of truth. A replica learns that it changed from the
``mp:{m}:events`` channel at once and, as a fallback, by polling the key. A change is prepared off the
request path (file read and hash check on a worker thread; materialize and warmup on the engine
thread, between batches) and then swapped in by reference: a batch holds the :class:`Served` it
started with, so in-flight batches finish on the old weights and every answer names its version.
A version that cannot be loaded (missing, corrupt, non-finite outputs) is logged and the replica keeps
serving the last good one; the reason shows in /readyz. A replica that starts while the current version
cannot be loaded serves its newest loadable ancestor (ready, the reason in /readyz); with none, it is
not ready and /readyz says why. With learning off a replica still follows the serving version, but
materializes its leader only (V=1): plain inference, no vendor paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from common.engine_thread import EngineThread
from common.faults import fault_point
from common.loading import LoadedVersion, fallback_base, load_version
from marketplace.engine import Engine, PerturbedWeights, leader_seeds
from marketplace.kernel_table import KernelTable
from model_store import ModelStore
from redis_io.connect import AsyncClient
from redis_io.events import EventSubscription
from redis_io.recordlog import AsyncRecordLog
from server.errors import ApiError, redis_op
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0  # a version that failed to load is tried again at most this often


@dataclass(frozen=True)
class Served:
    """A version ready to serve: as loaded from the store, its vendor weights on the device, its engine."""

    loaded: LoadedVersion
    weights: PerturbedWeights
    engine: Engine

    @property
    def version(self) -> int:
        return self.loaded.version


def _smoke_test(engine: Engine, weights: PerturbedWeights) -> None:
    """One forward on zeros: a version whose outputs are not finite must never be served."""
    x = np.zeros((1, *engine.spec.input_shape), np.float32)
    logits, _ = engine.forward(weights, x, np.random.default_rng(0))
    if not np.isfinite(logits).all():
        raise ValueError("the version produces non-finite logits")


class ModelRuntime:
    """One model of this replica: the version it serves and the loop that keeps it current."""

    def __init__(self, name: str, store: ModelStore, records: AsyncRecordLog, engine_thread: EngineThread,
                 metrics: ServerMetrics, max_batch: int, device: str | None, redis_timeout_s: float,
                 learning: bool = True, paired: bool = False, kernels: KernelTable | None = None) -> None:
        self.name, self.store, self.records, self.learning, self.paired = name, store, records, learning, paired
        self.kernels = kernels
        self.engine_thread, self.metrics = engine_thread, metrics
        self.max_batch, self.device, self.redis_timeout_s = max_batch, device, redis_timeout_s
        self.served: Served | None = None
        self.target: int | None = None  # what Redis said last
        self.error: str | None = None  # why the target is not what this replica serves, if it is not
        self._ancestor_of: int | None = None  # serving a fallback ancestor of this version (see _serve_ancestor)
        self._unset = False  # Redis named no serving version at the last look (see _target_version)
        self._seen_set = False  # Redis has named one since this replica started
        self._failed: dict[int, tuple[str, float]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ the loop
    def nudge(self) -> None:
        """Something may have changed: check Redis soon (coalesces with a check already due)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"runtime-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die: the next nudge tries again
                log.exception("model %s: version check failed", self.name)

    # ------------------------------------------------------------------------------ sync
    async def sync(self) -> None:
        """Serve the version Redis names; on failure keep serving the current one and say why."""
        async with self._lock:
            try:
                target = await self._target_version()
            except Exception as exc:
                error = f"cannot read the version to serve: {exc}"
                if error != self.error:  # once per outage, not once per poll
                    log.warning("model %s: %s", self.name, error)
                self.error = error
                return
            self.target = target
            if self.served is not None and self.served.version == target:
                self.error = None
                return
            failed = self._failed.get(target)
            if failed is not None and time.monotonic() - failed[1] < RETRY_FAILED_S:
                self.error = self._still_serving(failed[0])
                return
            started = time.perf_counter()
            try:
                served = await self._prepare(target)
            except Exception as exc:
                reason = f"version {target} cannot be served: {type(exc).__name__}: {exc}"
                self._failed[target] = (reason, time.monotonic())
                self.error = self._still_serving(reason)
                log.error("model %s: %s", self.name, self.error)
                self.metrics.swaps.labels(self.name, "failed").inc()
                if self.served is None:  # nothing to keep serving (a replica that starts now): fall back
                    await self._serve_ancestor(target, reason)
                    if self.served is None:  # the reason, until the next try, says no ancestor loads either
                        self._failed[target] = (self.error or reason, self._failed[target][1])
                return
            if self.served is not None:
                fault_point("before_swap")  # crash tests: loaded and warmed up, not swapped in
            previous = self.served
            self.served = served  # the swap: new batches take this one, running batches keep theirs
            self.error, self._ancestor_of = None, None
            self._failed.pop(target, None)
            self.metrics.version.labels(self.name).set(target)
            self.metrics.swaps.labels(self.name, "ok").inc()
            log.info("model %s: serving version %d (was %s), ready in %.2fs", self.name, target,
                     None if previous is None else previous.version, time.perf_counter() - started)

    async def _serve_ancestor(self, target: int, reason: str) -> None:
        """Serve the newest loadable ancestor of ``target``, the version other replicas most likely still serve.

        Used only when this replica serves nothing yet (it starts while the current version is corrupt
        or missing): running replicas keep their last good version instead. The parent comes from the
        manifest, or from the publish history in Redis when the manifest itself is unreadable.
        """
        tried: list[int] = []
        version: int | None = target
        while (version := await self._parent_of(version)) is not None and version not in tried:
            tried.append(version)
            try:
                served = await self._prepare(version)
            except Exception as exc:
                log.error("model %s: ancestor %d of version %d cannot be served either: %s: %s", self.name, version,
                          target, type(exc).__name__, exc)
                continue
            self.served, self._ancestor_of = served, target
            self.error = self._still_serving(reason)
            self.metrics.version.labels(self.name).set(version)
            self.metrics.swaps.labels(self.name, "ok").inc()
            log.warning("model %s: %s", self.name, self.error)
            return
        self.error = f"{reason}; no ancestor of it can be served either (tried {tried or 'none'})"
        log.error("model %s: %s", self.name, self.error)

    async def _parent_of(self, version: int) -> int | None:
        """The version ``version`` was built on (None: a root, or unknown)."""
        try:
            manifest = await asyncio.to_thread(self.store.read_manifest, self.name, version)
            return manifest["parent"]
        except Exception as exc:
            log.info("model %s: no readable manifest for version %d (%s); asking the publish history", self.name,
                     version, exc)
        try:
            async with redis_op("read the version history", self.redis_timeout_s):
                history = await self.records.history()
        except ApiError:
            return None
        parents = [h.get("parent") for h in history if h.get("type") == "publish" and h.get("version") == version]
        return parents[-1] if parents and isinstance(parents[-1], int) else None

    def _still_serving(self, reason: str) -> str:
        if self.served is None:
            return reason
        if self._ancestor_of is not None:
            return (f"{reason}; serving version {self.served.version} instead, the newest loadable ancestor of "
                    f"version {self._ancestor_of}")
        return f"{reason}; still serving version {self.served.version}"

    async def _target_version(self) -> int:
        """``mp:{m}:version``; a replica only reads it: the worker's publish and an operator's rollback set it.

        When it is unset (a deployment's first start, before the first publish; or Redis lost its data), a
        replica that serves a version keeps serving it, and one that serves nothing yet serves the store's
        newest published (or trained) version, the very base the worker builds its first update on
        (``fallback_base``), so the records it writes name the version the worker expects.
        """
        async with redis_op("read the serving version", self.redis_timeout_s):
            current = await self.records.current_version()
        if current is not None:
            self._unset, self._seen_set = False, True
            return current
        if self.served is not None:
            if not self._unset and self._seen_set:  # the key was there and is gone: say so, once
                log.warning("model %s: Redis names no serving version any more (did it lose its data?); still "
                            "serving version %d", self.name, self.served.version)
            self._unset = True
            return self.served.version
        async with redis_op("read the version history", self.redis_timeout_s):
            history = await self.records.history()
        published = {h.get("version") for h in history if h.get("type") == "publish"}
        base = await asyncio.to_thread(fallback_base, self.store, self.name, published)
        if base is None:
            raise ApiError(503, f"the model store has no version of {self.name!r}")
        log.info("model %s: Redis names no serving version yet; serving the store's version %d, the worker's base",
                 self.name, base)
        return base

    async def _prepare(self, version: int) -> Served:
        """Everything a swap needs, off the request path; the engine and its JIT are reused when they fit."""
        loaded = await asyncio.to_thread(load_version, self.store, self.name, version)
        vendors, seeds = (loaded.vendors, loaded.seeds) if self.learning else (1, leader_seeds(loaded.spec))
        prev = self.served
        reuse = (prev is not None and prev.loaded.spec.architecture == loaded.spec.architecture
                 and prev.engine.V == vendors)
        if reuse:
            assert prev is not None
            engine = prev.engine
        else:
            engine = await self.engine_thread.run(Engine, loaded.spec, vendors, self.max_batch, self.device,
                                                  kernels=self.kernels)
        weights = await self.engine_thread.run(engine.materialize, loaded.params, seeds, loaded.eps, loaded.version,
                                               loaded.antithetic and self.learning)
        if not reuse:
            for bucket in engine.buckets:  # one job per bucket, so request batches run in between
                await self.engine_thread.run(engine.warmup, weights, [bucket], self.paired)
        await self.engine_thread.run(_smoke_test, engine, weights)
        return Served(loaded, weights, engine)


class VersionWatcher:
    """Nudges the runtimes: on every event of their channel, and every ``poll_interval_s`` regardless."""

    def __init__(self, runtimes: dict[str, ModelRuntime], client: AsyncClient, poll_interval_s: float) -> None:
        self.runtimes, self.client, self.poll_interval_s = runtimes, client, poll_interval_s
        self.channels = {rt.records.keys.events: name for name, rt in runtimes.items()}
        self.subscribed = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="version-events"),
                       asyncio.create_task(self._poll(), name="version-poll")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _nudge_all(self) -> None:
        for rt in self.runtimes.values():
            rt.nudge()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self._nudge_all()

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with EventSubscription(self.client, self.channels) as events:
                    self.subscribed = True
                    backoff = 0.2
                    self._nudge_all()  # anything published while we were not listening
                    while True:
                        got = await events.next_message(timeout_s=1.0)
                        if got is None:
                            continue
                        channel, data = got
                        model = self.channels.get(channel)
                        if model is not None:
                            log.debug("event on %s: %s", channel, _describe(data))
                            self.runtimes[model].nudge()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed = False
                log.warning("version events: %r; resubscribing in %.1fs (polling meanwhile)", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.subscribed = False


def _describe(data: object) -> str:
    """The event, for the log only: the version key is what counts, whatever the message says."""
    try:
        return json.dumps(json.loads(data if isinstance(data, (str, bytes)) else ""))
    except ValueError:
        return repr(data)[:80]
