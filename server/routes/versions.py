"""GET /models/{m}/versions: per-version learning metrics; GET /dashboard: the page that plots them."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse

from common.names import MODEL_NAME_RE
from common.version_metrics import DEFAULT_LIMIT, MAX_LIMIT, ManifestSummaryCache, refused_entries
from model_store import IntegrityError
from server.errors import redis_op
from server.schemas import ErrorResponse, ModelVersions
from server.state import AppState, StateDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["models"])


def summary_cache(request: Request, state: AppState) -> ManifestSummaryCache:
    """The app's manifest summary cache (made on first use: it lives as long as the app)."""
    cache = getattr(request.app.state, "manifest_summaries", None)
    if cache is None or cache.store is not state.store:
        cache = request.app.state.manifest_summaries = ManifestSummaryCache(state.store)
    return cache  # type: ignore[no-any-return]


@router.get("/models/{name}/versions", response_model=ModelVersions, responses={
    404: {"model": ErrorResponse, "description": "unknown model"}, 503: {"model": ErrorResponse}})
async def model_versions(
    name: Annotated[str, Path(pattern=MODEL_NAME_RE.pattern)],
    request: Request,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="newest versions to list")] = DEFAULT_LIMIT,
) -> ModelVersions:
    """Per stored version (newest ``limit``): parent, records, online and validation metrics, whether it serves.

    Manifests are immutable, so each is read once and cached; a call costs a directory listing and two
    Redis reads. Candidates refused by the validation guard (history records) are listed apart.
    """
    ctx = state.model(name)
    async with redis_op("read the version history", state.settings.redis_timeout_s):
        target = await ctx.records.current_version()
        history = await ctx.records.history()
    if target is None:  # nothing published yet: replicas serve the store's base (see ModelRuntime._target_version)
        target = ctx.runtime.target
    rows, stored = await asyncio.to_thread(summary_cache(request, state).rows, ctx.name, limit)
    try:
        pins = await asyncio.to_thread(state.store.pins, ctx.name)
    except IntegrityError as exc:  # listed anyway: the pin file is the admin's to fix
        log.warning("%s: %s", ctx.name, exc)
        pins = []
    served = ctx.runtime.served
    return ModelVersions.model_validate({
        "model": ctx.name,
        "serving_version": target,
        "loaded_version": None if served is None else served.version,
        "stored": stored,
        "versions": [{**row, "serving": row["version"] == target, "pinned": row["version"] in pins} for row in rows],
        "pinned": pins,
        "refused": refused_entries(history, limit),
    })


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=True)
async def dashboard() -> HTMLResponse:
    """A page that plots every model's metrics against version and refreshes as versions are published."""
    page = resources.files("server") / "static" / "dashboard.html"
    return HTMLResponse(await asyncio.to_thread(page.read_text, encoding="utf-8"),
                        headers={"Cache-Control": "no-cache"})
