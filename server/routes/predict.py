"""POST /predict: validate against the model, batch, answer with the version that served it."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from common.names import MODEL_NAME_RE
from server.access import ACCESS_ERRORS, ClientDep
from server.errors import learning_off
from server.inference import check_input_count, infer
from server.jsonbody import StrictJSONRoute
from server.npybody import NPY_TYPE, matches_npy, npy_inputs, query_labels
from server.schemas import BODY_ERRORS, Prediction, PredictRequest, PredictResponse, error_responses
from server.state import ModelContext, StateDep
from server.validation import inputs_array, labels_array

router = APIRouter(tags=["inference"], route_class=StrictJSONRoute)

ERRORS = error_responses({
    400: "an application/x-npy body that is not a readable .npy array (or an object array, never unpickled)",
    404: "unknown model",
    409: "the model changed shape or classes while the request waited; or labels given, but learning is off on "
         "this server",
    413: "body larger than max_body_bytes, or more inputs than max_inputs_per_request",
    422: "malformed inputs or labels (shape, NaN or infinity, types)",
    503: "model not loaded, Redis unavailable, or overloaded",
}, BODY_ERRORS, ACCESS_ERRORS)


NPY_BODY = {"requestBody": {"content": {NPY_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}


class NpyRoute(APIRoute):
    """``POST /predict`` whose body is a ``.npy`` array: it matches only that content type, so a JSON body
    goes on to the JSON route at the same path, untouched (one path, the body's type picks the decoder)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        return matches_npy(match, scope), child


async def predict_npy(request: Request, state: StateDep, client: ClientDep,
                      model: Annotated[str | None, Query(pattern=MODEL_NAME_RE.pattern)] = None,
                      labels: Annotated[str | None, Query(max_length=65536)] = None) -> PredictResponse:
    """``/predict`` with the inputs as one ``.npy`` array (n, *input_shape); the model and the labels (comma-
    separated) ride in the query string. Same checks, same records, same answer as a JSON body."""
    ctx = state.model(model)
    given = query_labels(labels)
    if given is not None and not state.settings.learning:
        raise learning_off("labels")
    spec = ctx.served().loaded.spec
    x = npy_inputs(await request.body(), spec.input_shape)
    check_input_count(state.settings, len(x))
    return await answer(ctx, x, labels_array(given, len(x), spec.num_classes), client)


router.add_api_route("/predict", predict_npy, methods=["POST"], response_model=PredictResponse,
                     include_in_schema=False, route_class_override=NpyRoute)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS,  # type: ignore[arg-type]
             openapi_extra=NPY_BODY)
async def predict(body: PredictRequest, state: StateDep, client: ClientDep) -> PredictResponse:
    """Predict a class for each input; each one is served on one balanced vendor path and recorded.

    Labels given here are attached at once (with their loss) and feed the next reconciliation. With
    learning off the server serves the leader, records nothing and answers ``id: null``.

    Inputs may also come as one ``.npy`` array of shape (n, *input_shape) (``numpy.save``; float, int or
    uint8) with ``Content-Type: application/x-npy``; then ``?model=`` and ``?labels=3,1,4`` (one per input)
    ride in the query string. It skips the JSON text of every pixel, the larger cost of a request.
    """
    ctx = state.model(body.model)
    if body.labels is not None and not state.settings.learning:
        raise learning_off("labels")
    check_input_count(state.settings, len(body.inputs))
    spec = ctx.served().loaded.spec
    x = inputs_array(body.inputs, spec.input_shape)
    return await answer(ctx, x, labels_array(body.labels, len(x), spec.num_classes), client)


async def answer(ctx: ModelContext, x: np.ndarray, labels: np.ndarray | None, client: str | None
                 ) -> PredictResponse:
    """Run validated inputs and shape the answer (both body types)."""
    out = await infer(ctx, x, labels, client)
    return PredictResponse(model=ctx.name, version=out.version, predictions=[
        Prediction(id=rid, label=int(p.argmax()), probabilities=p.tolist())
        for rid, p in zip(out.ids, out.probabilities, strict=True)])
