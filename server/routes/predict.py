"""POST /predict: validate against the model, batch, answer with the version that served it."""

from __future__ import annotations

from fastapi import APIRouter

from server.access import ACCESS_ERRORS, ClientDep
from server.errors import learning_off
from server.inference import check_input_count, infer
from server.jsonbody import StrictJSONRoute
from server.schemas import BODY_ERRORS, Prediction, PredictRequest, PredictResponse, error_responses
from server.state import StateDep
from server.validation import inputs_array, labels_array

router = APIRouter(tags=["inference"], route_class=StrictJSONRoute)

ERRORS = error_responses({
    404: "unknown model",
    409: "the model changed shape or classes while the request waited; or labels given, but learning is off on "
         "this server",
    413: "body larger than max_body_bytes, or more inputs than max_inputs_per_request",
    422: "malformed inputs or labels (shape, NaN or infinity, types)",
    503: "model not loaded, Redis unavailable, or overloaded",
}, BODY_ERRORS, ACCESS_ERRORS)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)  # type: ignore[arg-type]
async def predict(body: PredictRequest, state: StateDep, client: ClientDep) -> PredictResponse:
    """Predict a class for each input; each one is served on one balanced vendor path and recorded.

    Labels given here are attached at once (with their loss) and feed the next reconciliation. With
    learning off the server serves the leader, records nothing and answers ``id: null``.
    """
    ctx = state.model(body.model)
    if body.labels is not None and not state.settings.learning:
        raise learning_off("labels")
    check_input_count(state.settings, len(body.inputs))
    spec = ctx.served().loaded.spec
    x = inputs_array(body.inputs, spec.input_shape)
    labels = labels_array(body.labels, len(x), spec.num_classes)
    out = await infer(ctx, x, labels, client)
    return PredictResponse(model=ctx.name, version=out.version, predictions=[
        Prediction(id=rid, label=int(p.argmax()), probabilities=p.tolist())
        for rid, p in zip(out.ids, out.probabilities, strict=True)])
