"""Admin routes: reconcile now (asking the leading worker), roll back, pin versions against retention,
the validation guard's holdout set.

Bearer token only; with no token configured they are closed (403).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.loading import load_version
from common.names import MODEL_NAME_RE
from model_store import Holdout, IntegrityError, ModelStoreError, VersionNotFound
from model_store.manifest import MAX_VERSION
from redis_io.admin_queue import NoLeader, ReconcileTimeout, ask_leader
from redis_io.connect import ping
from server.errors import REDIS_DOWN, ApiError, RedisUnavailable, redis_op
from server.jsonbody import StrictJSONRoute
from server.schemas import (
    BODY_ERRORS,
    ErrorResponse,
    HoldoutDeleted,
    HoldoutInfo,
    HoldoutUpload,
    PinResponse,
    ReconcileRequest,
    ReconcileResponse,
    RollbackRequest,
    RollbackResponse,
)
from server.state import AppState, ModelContext, StateDep
from server.validation import inputs_array, labels_array

log = logging.getLogger(__name__)

_bearer = HTTPBearer(scheme_name="AdminToken", auto_error=False,
                     description="the server's admin token (MPSERVE_ADMIN_TOKEN)")


def require_admin(state: StateDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """403 when admin is disabled (no token configured: never open); 401 for a missing or wrong token."""
    token = state.settings.admin_token
    if token is None:
        raise ApiError(403, "admin endpoints are disabled: the server has no admin token (MPSERVE_ADMIN_TOKEN)")
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "admin endpoints need an 'Authorization: Bearer <token>' header", challenge)
    if not hmac.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "invalid admin token", challenge)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   route_class=StrictJSONRoute, responses={
    **BODY_ERRORS,
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    403: {"model": ErrorResponse, "description": "admin disabled: no token configured"},
    404: {"model": ErrorResponse, "description": "unknown model or version"},
    503: {"model": ErrorResponse, "description": "Redis unavailable"},
})


@router.post("/reconcile", response_model=ReconcileResponse, responses={
    409: {"model": ErrorResponse, "description": "nothing published, and why (e.g. too few records)"},
    503: {"model": ErrorResponse, "description": "Redis unavailable, or no reconciler worker leads the model "
                                                 "(start one: python -m worker)"},
    504: {"model": ErrorResponse, "description": "no outcome within the timeout"},
})
async def reconcile(body: ReconcileRequest, state: StateDep) -> ReconcileResponse:
    """Ask the worker that leads the model to reconcile its labelled records now and publish the new version.

    The API runs no reconciler itself: with no worker holding the model's lease the answer is a 503 that
    says so (start one with ``python -m worker``; ``mpserve up`` runs one).
    """
    ctx = state.model(body.model)
    settings = state.settings
    async with redis_op("reconcile", settings.redis_timeout_s):  # fail fast: the waiting client waits long
        await ping(state.redis)
    try:
        outcome = await asyncio.to_thread(  # the blocking client is made on this thread, on first use
            lambda: ask_leader(state.blocking_redis.get(), ctx.name, settings.reconcile_timeout_s))
    except NoLeader as exc:
        raise ApiError(503, str(exc)) from exc
    except ReconcileTimeout as exc:
        raise ApiError(504, f"reconciliation of {ctx.name!r} gave no outcome in time: {exc}") from exc
    except REDIS_DOWN as exc:
        raise RedisUnavailable("reconcile", exc) from exc
    if not outcome.get("published"):
        raise ApiError(409, outcome.get("reason") or "nothing was published")
    ctx.runtime.nudge()  # the event does it too; this replica need not wait for it
    log.info("admin: reconciled %s into version %s", ctx.name, outcome.get("version"))
    return ReconcileResponse(model=ctx.name, version=outcome["version"], parent=outcome.get("parent"),
                             stats=outcome.get("stats") or {})


@router.post("/rollback", response_model=RollbackResponse, responses={
    409: {"model": ErrorResponse, "description": "the version exists but cannot be served (corrupt)"},
})
async def rollback(body: RollbackRequest, state: StateDep) -> RollbackResponse:
    """Point every replica at a stored version (typically an older one); they swap on the event."""
    ctx = state.model(body.model)
    if not await asyncio.to_thread(state.store.has_version, ctx.name, body.version):
        raise ApiError(404, f"model {ctx.name!r} has no stored version {body.version}")
    try:  # refuse to point every replica at a file none of them could load
        await asyncio.to_thread(load_version, state.store, ctx.name, body.version)
    except (ModelStoreError, ValueError, KeyError) as exc:
        raise ApiError(409, f"version {body.version} cannot be served: {exc}") from exc
    timeout = state.settings.redis_timeout_s
    async with redis_op("roll back", timeout):
        previous = await ctx.records.current_version()
        await ctx.records.rollback(body.version, {"from": previous, "by": "admin"})
    ctx.runtime.nudge()
    log.warning("admin: rolled %s back from version %s to %d", ctx.name, previous, body.version)
    return RollbackResponse(model=ctx.name, version=body.version, previous=previous)


ModelQuery = Annotated[str | None, Query(pattern=MODEL_NAME_RE.pattern,
                                         description="model name; default: the server's")]


# ---------------------------------------------------------------------------------- pins
VersionPath = Annotated[int, Path(ge=0, lt=MAX_VERSION, description="a version of the model")]
PIN_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "the store's pin file is unreadable (fix or remove it)"}}


async def _change_pins(change: Callable[[str, int], list[int]], ctx: ModelContext, version: int) -> PinResponse:
    """Run a store pin change in a thread; an unknown version is a 404, an unreadable pin file a 409."""
    try:
        pins = await asyncio.to_thread(change, ctx.name, version)
    except VersionNotFound as exc:
        raise ApiError(404, f"model {ctx.name!r} has no stored version {version}") from exc
    except IntegrityError as exc:
        raise ApiError(409, str(exc)) from exc
    return PinResponse(model=ctx.name, version=version, pinned=pins)


@router.post("/versions/{version}/pin", response_model=PinResponse, responses=PIN_ERRORS)
async def pin_version(version: VersionPath, state: StateDep, model: ModelQuery = None) -> PinResponse:
    """Pin a stored version: retention keeps it however many versions follow (a known-good rollback target).

    Idempotent; the pins live in the model store (``{store}/{model}/pins.json``), so every worker sees them.
    """
    ctx = state.model(model)
    answer = await _change_pins(state.store.pin, ctx, version)
    log.warning("admin: pinned %s version %d (pins now %s)", ctx.name, version, answer.pinned)
    return answer


@router.delete("/versions/{version}/pin", response_model=PinResponse, responses=PIN_ERRORS)
async def unpin_version(version: VersionPath, state: StateDep, model: ModelQuery = None) -> PinResponse:
    """Unpin a version: retention may delete it again once nothing else keeps it. Idempotent for a stored one."""
    ctx = state.model(model)
    answer = await _change_pins(state.store.unpin, ctx, version)
    log.warning("admin: unpinned %s version %d (pins now %s)", ctx.name, version, answer.pinned)
    return answer


# ---------------------------------------------------------------------------------- holdout set


def _describe(model: str, holdout: Holdout, num_classes: int | None) -> HoldoutInfo:
    width = max(num_classes or 0, int(holdout.labels.max()) + 1)
    return HoldoutInfo(model=model, size=len(holdout), sha256=holdout.sha256,
                       classes=np.bincount(holdout.labels, minlength=width).tolist())


async def _stored(state: AppState, ctx: ModelContext) -> Holdout:
    try:
        holdout = await asyncio.to_thread(state.store.read_holdout, ctx.name)
    except (ModelStoreError, ValueError) as exc:
        raise ApiError(409, f"the stored holdout set of {ctx.name!r} cannot be read ({exc}); upload it again "
                            "or delete it") from exc
    if holdout is None:
        raise ApiError(404, f"model {ctx.name!r} has no uploaded holdout set")
    return holdout


@router.put("/holdout", response_model=HoldoutInfo, responses={
    413: {"model": ErrorResponse, "description": "request body too large (max_body_bytes)"},
    422: {"model": ErrorResponse, "description": "malformed inputs or labels: nothing was written"},
    503: {"model": ErrorResponse, "description": "the model is not loaded (its shape and classes are unknown)"},
})
async def put_holdout(body: HoldoutUpload, state: StateDep) -> HoldoutInfo:
    """Replace the model's holdout set: every candidate version must hold its accuracy on it before it serves.

    Inputs and labels are checked exactly like those of /predict, against the served version's input
    shape and classes; a malformed set is a 422 and nothing is written. The set is kept in the model
    store under a fixed name, replaces any earlier upload atomically, and takes precedence over a
    worker's own file (MPSERVE_HOLDOUT_PATH). The reconciler picks it up at its next reconciliation.

    Size: the request body limit (max_body_bytes, 8 MiB by default) bounds an upload. A Fashion-MNIST
    image sent as compact JSON integers 0-255 takes about 2.3 KB, so about 3,500 images fit in 8 MiB
    (`mpserve holdout upload` sends whole numbers as integers); scaled to floats in [0, 1] it takes
    about 9.8 KB, so about 850. Raise max_body_bytes for a larger set, or give the worker a file
    (MPSERVE_HOLDOUT_PATH) instead.
    """
    ctx = state.model(body.model)
    spec = ctx.served().loaded.spec
    x = inputs_array(body.inputs, spec.input_shape)
    y = labels_array(body.labels, len(x), spec.num_classes)
    assert y is not None
    try:
        holdout = await asyncio.to_thread(state.store.write_holdout, ctx.name, x, y)
    except ModelStoreError as exc:
        raise ApiError(422, f"holdout set refused: {exc}") from exc
    log.warning("admin: holdout set of %s replaced: %d examples (sha256 %s)", ctx.name, len(holdout),
                holdout.sha256[:12])
    return _describe(ctx.name, holdout, spec.num_classes)


@router.get("/holdout", response_model=HoldoutInfo, responses={
    409: {"model": ErrorResponse, "description": "the stored holdout set is unreadable"},
})
async def get_holdout(state: StateDep, model: ModelQuery = None) -> HoldoutInfo:
    """Describe the model's uploaded holdout set (404 if there is none)."""
    ctx = state.model(model)
    holdout = await _stored(state, ctx)
    served = ctx.runtime.served
    return _describe(ctx.name, holdout, served.loaded.spec.num_classes if served else None)


@router.delete("/holdout", response_model=HoldoutDeleted)
async def delete_holdout(state: StateDep, model: ModelQuery = None) -> HoldoutDeleted:
    """Remove the model's uploaded holdout set (404 if there is none); a worker's own file still applies."""
    ctx = state.model(model)
    if not await asyncio.to_thread(state.store.delete_holdout, ctx.name):
        raise ApiError(404, f"model {ctx.name!r} has no uploaded holdout set")
    log.warning("admin: holdout set of %s deleted", ctx.name)
    return HoldoutDeleted(model=ctx.name, deleted=True)
