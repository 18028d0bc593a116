"""The long-lived objects of one replica, built at startup and handed to routes by dependency injection."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from common.device import select_device
from common.engine_thread import EngineThread
from common.loading import seed_default_model
from marketplace.kernel_table import table_for
from model_store import ModelStore
from redis_io.connect import AsyncClient, LazyClient, api_client, blocking_client, events_client
from redis_io.recordlog import AsyncRecordLog
from server.access import ClientAccess
from server.batcher import MicroBatcher
from server.errors import ApiError
from server.metrics import ServerMetrics
from server.runtime import ModelRuntime, Served, VersionWatcher
from server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass
class ModelContext:
    """One served model: its Redis records, its runtime (version) and its batcher."""

    name: str
    records: AsyncRecordLog
    runtime: ModelRuntime
    batcher: MicroBatcher

    def served(self) -> Served:
        """The version being served, or a 503 that says why there is none."""
        served = self.runtime.served
        if served is None:
            raise ApiError(503, f"model {self.name!r} is not loaded: {self.runtime.error or 'still starting'}",
                           {"Retry-After": "1"})
        return served


@dataclass
class AppState:
    settings: ServerSettings
    store: ModelStore
    redis: AsyncClient  # requests: every call bounded by redis_timeout_s
    events_redis: AsyncClient  # pub/sub: a long-lived read without a socket timeout
    blocking_redis: LazyClient  # the worker's trigger runs on a thread with a blocking client
    engine_thread: EngineThread
    metrics: ServerMetrics
    models: dict[str, ModelContext]
    watcher: VersionWatcher
    access: ClientAccess  # API keys, disabled clients, rate limits of /predict and /label

    def model(self, name: str | None) -> ModelContext:
        """The named model (default: the server's), or a 404 naming the ones served."""
        name = name or self.settings.default_model
        ctx = self.models.get(name)
        if ctx is None:
            raise ApiError(404, f"unknown model {name!r}: this server serves {sorted(self.models)}")
        return ctx

    @classmethod
    async def start(cls, settings: ServerSettings, metrics: ServerMetrics | None = None) -> AppState:
        """Connect, load every model's serving version (failures leave it not ready), start the loops."""
        t = settings.redis_timeout_s
        client = api_client(settings.redis_url, t)
        events = events_client(settings.redis_url, t)
        blocking = LazyClient(lambda: blocking_client(settings.redis_url, t, settings.reconcile_timeout_s + 10))
        store = ModelStore(settings.store_dir)
        if settings.seed_default:
            await asyncio.to_thread(seed_default_model, store, settings.default_model)
        device = select_device(settings.device)  # CUDA:PTX -> CUDA, with the PTX renderer chosen
        engine_thread = EngineThread()
        # on the engine thread, as everything tinygrad: its disk cache is one sqlite connection, of the first thread
        kernels = await engine_thread.run(table_for, settings.kernel_table, device)  # None: tinygrad's heuristics
        metrics = metrics or ServerMetrics()
        models: dict[str, ModelContext] = {}
        for name in settings.models:
            records = AsyncRecordLog(client, name, settings.label_window_s,
                                     replay_size=settings.replay_size,  # moves what other replicas kept too
                                     replay_window_s=settings.replay_window_s)
            paired = settings.learning and settings.exploration == "paired"
            runtime = ModelRuntime(name, store, records, engine_thread, metrics, settings.max_batch,
                                   device, t, settings.learning, paired, kernels)
            batcher = MicroBatcher(runtime, records, engine_thread, metrics, settings.max_batch,
                                   settings.max_wait_ms, t, settings.learning, paired,
                                   settings.replay_share if settings.replay_size else 0.0)
            models[name] = ModelContext(name, records, runtime, batcher)
        watcher = VersionWatcher({m: c.runtime for m, c in models.items()}, events, settings.poll_interval_s)
        access = ClientAccess(settings.api_keys, settings.disabled_clients, settings.rate_limit_per_s,
                              settings.rate_limit_burst)
        state = cls(settings, store, client, events, blocking, engine_thread, metrics, models, watcher, access)
        await asyncio.gather(*(c.runtime.sync() for c in models.values()))
        for c in models.values():
            c.runtime.start()
            c.batcher.start()
        watcher.start()
        if access.enabled:  # names only: secrets are never logged
            log.info("API keys required on /predict and /label: clients %s, disabled %s, rate limit %s",
                     sorted(settings.api_keys), sorted(access.disabled),
                     f"{settings.rate_limit_per_s:g}/s burst {settings.rate_limit_burst} per replica"
                     if access.bucket else "off")
        log.info("serving %s (default %s); versions %s", sorted(models), settings.default_model,
                 {m: (c.runtime.served.version if c.runtime.served else None) for m, c in models.items()})
        return state

    async def close(self) -> None:
        """Stop watching, drain batches, stop the engine thread, close connections."""
        await self.watcher.stop()
        for c in self.models.values():
            await c.runtime.stop()
            await c.batcher.stop()
        await asyncio.to_thread(self.engine_thread.shutdown)
        for client in (self.redis, self.events_redis):
            await client.aclose()
        self.blocking_redis.close()


async def get_state(request: Request) -> AppState:
    """Async on purpose: FastAPI runs a plain ``def`` dependency on its thread pool, a thread hop per request."""
    return request.app.state.mp  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(get_state)]
