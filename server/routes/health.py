"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from common.version_metrics import metrics_of
from redis_io.connect import ping
from server.errors import REDIS_DOWN
from server.schemas import Health, ModelReadiness, Readiness
from server.state import AppState, StateDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers (it says nothing about Redis or models: see /readyz)."""
    return Health(status="ok")


async def readiness(state: AppState) -> Readiness:
    """Whether Redis answers and every model has a version loaded, with the reasons when not (also /v2/health)."""
    reasons = []
    try:
        async with asyncio.timeout(state.settings.redis_timeout_s):
            await ping(state.redis)
        redis_status = "ok"
    except REDIS_DOWN as exc:
        redis_status = f"unreachable: {type(exc).__name__}: {exc}"
        reasons.append(f"Redis is {redis_status}")
    models = {}
    for name, ctx in state.models.items():
        rt = ctx.runtime
        served = rt.served
        models[name] = ModelReadiness(loaded=served is not None, version=None if served is None else served.version,
                                      target_version=rt.target, error=rt.error)
        if served is None:
            reasons.append(f"model {name!r} is not loaded: {rt.error or 'still starting'}")
    return Readiness(status="not ready" if reasons else "ready", redis=redis_status, models=models, reasons=reasons)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when Redis answers and every model has a version loaded; 503 with the reasons otherwise.

    A model that serves an older version because the target failed to load is ready, with the reason
    in its ``error``.
    """
    body = await readiness(state)
    return JSONResponse(body.model_dump(), status_code=503 if body.reasons else 200)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> PlainTextResponse:
    """Prometheus text format: requests, latency, batch sizes, versions, records, labels, backlog, retention."""
    m = state.metrics
    for name, ctx in state.models.items():
        m.stored_versions.labels(name).set(len(await asyncio.to_thread(state.store.versions, name)))
        served = ctx.runtime.served
        figures = metrics_of(served.loaded.manifest)[0] if served is not None else {}
        for answers, key in (("served", "online_accuracy"), ("leader", "leader_accuracy"),
                             ("probe", "probe_accuracy")):
            if figures.get(key) is None:
                m.version_accuracy.remove(name, answers)
            else:
                m.version_accuracy.labels(name, answers).set(figures[key])
        for weights, key in (("serving", "traffic_accuracy"), ("frozen", "traffic_anchor_accuracy")):
            if figures.get(key) is None:
                m.recent_accuracy.remove(name, weights)
            else:
                m.recent_accuracy.labels(name, weights).set(figures[key])
    try:
        async with asyncio.timeout(state.settings.redis_timeout_s):
            stats = {name: await ctx.records.stream_stats() for name, ctx in state.models.items()}
            deleted = {name: await ctx.records.retention_deleted_total() for name, ctx in state.models.items()}
        for name, s in stats.items():
            m.backlog.labels(name).set(s.backlog)
            m.retention_deleted.set(deleted[name], name)
        m.redis_up.set(1)
    except REDIS_DOWN as exc:
        log.debug("metrics: Redis unavailable: %r", exc)
        m.redis_up.set(0)
    return PlainTextResponse(m.render(), media_type=PROMETHEUS_TEXT)
