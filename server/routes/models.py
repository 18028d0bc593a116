"""GET /models, GET /models/{m}: what each model serves here, what Redis says to serve, its history."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path

from common.names import MODEL_NAME_RE
from server.errors import redis_op
from server.schemas import ErrorResponse, ModelInfo, ModelList
from server.state import AppState, ModelContext, StateDep

router = APIRouter(tags=["models"])


async def describe(state: AppState, ctx: ModelContext) -> ModelInfo:
    async with redis_op("read the version history", state.settings.redis_timeout_s):
        target = await ctx.records.current_version()
        history = await ctx.records.history()
    if target is None:  # nothing published yet: replicas serve the store's base (see ModelRuntime._target_version)
        target = ctx.runtime.target
    stored = await asyncio.to_thread(state.store.versions, ctx.name)
    served = ctx.runtime.served
    loaded = served.loaded if served is not None else None
    return ModelInfo(
        name=ctx.name,
        version=None if loaded is None else loaded.version,
        target_version=target,
        architecture=None if loaded is None else loaded.spec.name,
        input_shape=None if loaded is None else list(loaded.spec.input_shape),
        num_classes=None if loaded is None else loaded.spec.num_classes,
        vendors=None if loaded is None else loaded.vendors,
        probe_scale=None if loaded is None else loaded.eps,
        learning=state.settings.learning,
        error=ctx.runtime.error,
        stored_versions=stored,
        history=history,
    )


@router.get("/models", response_model=ModelList, responses={503: {"model": ErrorResponse}})
async def list_models(state: StateDep) -> ModelList:
    """Every model this server serves."""
    return ModelList(models=[await describe(state, ctx) for ctx in state.models.values()])


@router.get("/models/{name}", response_model=ModelInfo, responses={
    404: {"model": ErrorResponse, "description": "unknown model"}, 503: {"model": ErrorResponse}})
async def get_model(name: Annotated[str, Path(pattern=MODEL_NAME_RE.pattern)], state: StateDep) -> ModelInfo:
    """One model: serving version, shapes, vendors, probe scale, stored versions and history."""
    return await describe(state, state.model(name))
