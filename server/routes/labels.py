"""POST /label: attach late labels to served predictions.

The loss is computed here from the logits that were served (one round trip to fetch them; with paired probes
the leader's loss on the same input too, see `redis_io.protocol.label_item`), then every
label is attached atomically by the Lua script (one round trip for the whole request).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from redis_io.protocol import LabelItem, label_item
from server.access import ACCESS_ERRORS, ClientDep
from server.errors import ApiError, learning_off, redis_op
from server.jsonbody import StrictJSONRoute
from server.schemas import (
    BODY_ERRORS,
    BatchLabelRequest,
    BatchLabelResponse,
    LabelRequest,
    LabelResult,
    SingleLabelRequest,
    error_responses,
)
from server.state import AppState, ModelContext, StateDep

router = APIRouter(tags=["feedback"], route_class=StrictJSONRoute)

CODES = {"ok": 200, "duplicate": 200, "conflict": 409, "not_found": 404, "invalid_label": 422}


def _result(record_id: str, status: str, existing: int | None = None, detail: str | None = None) -> LabelResult:
    return LabelResult(id=record_id, status=status, code=CODES[status], existing_label=existing,  # type: ignore[arg-type]
                       detail=detail)


async def attach(state: AppState, ctx: ModelContext, items: list[tuple[str, int]],
                 client: str | None = None) -> list[LabelResult]:
    """Per item: the loss from the stored logits, then the atomic attach (by ``client``); statuses in item order."""
    num_classes = ctx.served().loaded.spec.num_classes
    results: list[LabelResult | None] = [None] * len(items)
    wanted = []
    for i, (rid, label) in enumerate(items):
        if label >= num_classes:
            results[i] = _result(rid, "invalid_label",
                                 detail=f"label {label} is outside the model's classes [0, {num_classes})")
        else:
            wanted.append(i)
    timeout = state.settings.redis_timeout_s
    if wanted:
        async with redis_op("read the served logits", timeout):
            stored = await ctx.records.fetch_logits(list(dict.fromkeys(items[i][0] for i in wanted)))
    to_attach: list[tuple[int, LabelItem]] = []
    for i in wanted:
        rid, label = items[i]
        pred = stored[rid]
        if pred is None:
            results[i] = _result(rid, "not_found", detail=f"no prediction {rid!r} (unknown, or older than the "
                                                          f"label window of {state.settings.label_window_s}s)")
        elif label >= len(pred.logits):
            results[i] = _result(rid, "invalid_label", detail=f"label {label} is outside the classes "
                                                              f"[0, {len(pred.logits)}) of version {pred.version}")
        else:
            to_attach.append((i, label_item(rid, label, pred.logits, pred.leader_logits)))
    if to_attach:
        async with redis_op("attach labels", timeout):
            attached = await ctx.records.attach_labels_detailed([t for _, t in to_attach], client=client)
        for (i, (rid, *_)), res in zip(to_attach, attached, strict=True):
            detail = None
            if res.status == "conflict":
                detail = f"prediction {rid!r} already has label {res.existing_label}; a label cannot change"
            elif res.status == "not_found":
                detail = f"no prediction {rid!r} (it expired just now)"
            results[i] = _result(rid, res.status, res.existing_label, detail)
    final = [r for r in results if r is not None]
    for r in final:
        state.metrics.labels.labels(ctx.name, r.status).inc()
    return final


@router.post(
    "/label",
    response_model=LabelResult | BatchLabelResponse,
    responses=error_responses({
        404: "single label: unknown or expired id (or unknown model)",
        409: "single label: a different label is already attached; or learning is off on this server",
        413: "body larger than max_body_bytes, or more labels than max_inputs_per_request",
        422: "malformed body, or a label outside the model's classes",
        503: "Redis unavailable or model not loaded",
    }, BODY_ERRORS, ACCESS_ERRORS),
)
async def label(body: Annotated[LabelRequest, Body()], state: StateDep,
                client: ClientDep) -> LabelResult | BatchLabelResponse:
    """Attach a label (``{"id", "label"}``) or many (``{"labels": [...]}``) to served predictions.

    The same label again is a success that adds nothing. A single label answers with the item's own
    status code; a batch answers 200 with a status and code per item.
    """
    ctx = state.model(body.model)
    if not state.settings.learning:
        raise learning_off("labels")
    if isinstance(body, BatchLabelRequest):
        limit = state.settings.max_inputs_per_request
        if len(body.labels) > limit:
            raise ApiError(413, f"{len(body.labels)} labels in one request; the limit is {limit} "
                                "(max_inputs_per_request): split the request")
        results = await attach(state, ctx, [(it.id, it.label) for it in body.labels], client)
        return BatchLabelResponse(model=ctx.name, results=results)
    assert isinstance(body, SingleLabelRequest)
    (result,) = await attach(state, ctx, [(body.id, body.label)], client)
    if result.code != 200:
        raise ApiError(result.code, result.detail, extra={
            "id": result.id, "status": result.status, "existing_label": result.existing_label})
    return result

