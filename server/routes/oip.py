"""The Open Inference Protocol (KServe v2 REST) beside the native routes: health, metadata and inference.

``POST /v2/models/{model}/infer`` decodes its tensors (:mod:`server.oip_tensors`) and then runs
:func:`server.inference.infer`, the very path of ``/predict``: same batcher, same engine, same records in
Redis, so the ids it returns are labelled with the native ``POST /label``. Every error body here is the
protocol's ``{"error": "..."}`` (the native routes answer ``{"detail": ...}``): :class:`OipRoute`
rewrites whatever a dependency or the handler raised.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from redis_io.connect import CONNECTION_ERRORS
from server.access import ClientDep
from server.errors import ApiError, RedisUnavailable
from server.inference import check_input_count, infer
from server.oip_outputs import encode, wanted
from server.oip_schemas import (
    InferRequest,
    InferResponse,
    Live,
    ModelMetadata,
    ModelReady,
    OipError,
    Ready,
    ServerMetadata,
    TensorMetadata,
)
from server.oip_tensors import HEADER_LENGTH, INPUT_NAME, check_shape, input_array, parse_request, split_body
from server.routes.health import readiness
from server.state import ModelContext, StateDep

log = logging.getLogger(__name__)

PLATFORM = "mpserve-tinygrad"
EXTENSIONS = ["binary_tensor_data"]


def _message(detail: Any) -> str:
    """An error's detail as one sentence: a list of ``{loc, msg}`` (shared validators) is joined."""
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                         if isinstance(e, dict) else str(e) for e in detail[:5])
    return str(detail)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


class OipRoute(APIRoute):
    """A route whose errors are ``{"error": "..."}`` (the protocol's), whatever raised them."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def oip_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return _error(exc.status, _message(exc.detail), exc.headers)
            except RequestValidationError as exc:
                return _error(400, _message(exc.errors()))
            except StarletteHTTPException as exc:
                return _error(exc.status_code, _message(exc.detail), exc.headers)
            except CONNECTION_ERRORS as exc:  # an outage that escaped a redis_op is still a 503
                log.warning("Redis unavailable: %r", exc)
                error = RedisUnavailable("request", exc)
                return _error(error.status, _message(error.detail), error.headers)

        return oip_handler


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=OipRoute)


def _responses(why: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OipError, "description": text} for code, text in why.items()}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` substituted, for a request body OpenAPI cannot infer."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)  # type: ignore[no-any-return]


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(InferRequest.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "binary tensor data extension: the JSON header "
                                                           "(Inference-Header-Content-Length bytes), then the "
                                                           "raw little-endian tensor bytes"}},
}}}


# ---------------------------------------------------------------------------------- server
@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name="mpserve", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Live)
async def live() -> Live:
    """The process answers (as /healthz)."""
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(state: StateDep) -> JSONResponse:
    """Ready when Redis answers and every model has a version loaded (as /readyz); 503 with the reasons."""
    body = await readiness(state)
    if body.reasons:
        return JSONResponse(Ready(ready=False, error="; ".join(body.reasons)).model_dump(), status_code=503)
    return JSONResponse(Ready(ready=True).model_dump(exclude_none=True))


# ---------------------------------------------------------------------------------- models
def _served_spec(ctx: ModelContext) -> tuple[int, tuple[int, ...], int]:
    served = ctx.served()  # a 503 when none is loaded
    return served.version, tuple(served.loaded.spec.input_shape), served.loaded.spec.num_classes


@router.get("/models/{model}", response_model=ModelMetadata,
            responses=_responses({404: "unknown model", 503: "model not loaded"}))
async def model_metadata(model: str, state: StateDep) -> ModelMetadata:
    """The served version, and the tensors: images of pixel values in; probabilities, label and id out."""
    ctx = state.model(model)
    version, input_shape, classes = _served_spec(ctx)
    outputs = [TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, classes]),
               TensorMetadata(name="label", datatype="INT64", shape=[-1])]
    if state.settings.learning:  # a static replica records nothing, so it has no ids to give
        outputs.append(TensorMetadata(name="id", datatype="BYTES", shape=[-1]))
    return ModelMetadata(name=ctx.name, versions=[str(version)], platform=PLATFORM,
                         inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, *input_shape])],
                         outputs=outputs)


@router.get("/models/{model}/ready", response_model=ModelReady,
            responses={404: {"model": OipError, "description": "unknown model"},
                       503: {"model": ModelReady, "description": "model not loaded"}})
async def model_ready(model: str, state: StateDep) -> JSONResponse:
    """200 while the model has a version loaded; 503 with the reason otherwise."""
    ctx = state.model(model)
    if ctx.runtime.served is None:
        body = ModelReady(name=ctx.name, ready=False, error=ctx.runtime.error or "still starting")
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(ModelReady(name=ctx.name, ready=True).model_dump(exclude_none=True))


# ---------------------------------------------------------------------------------- inference
@router.post("/models/{model}/infer", response_model=InferResponse, openapi_extra=INFER_BODY,
             responses={200: {"content": {"application/octet-stream": {"schema": {
                 "type": "string", "format": "binary", "description": "binary tensor data asked for: the JSON "
                 "answer (Inference-Header-Content-Length bytes), then the outputs' raw bytes"}}}}} | _responses({
                 400: "malformed request: not JSON, not the schema, wrong input name, datatype or shape, data that "
                      "do not match the shape, NaN or infinity, bad binary data",
                 401: "API keys are configured and the request has no valid one",
                 403: "the client of this key is disabled",
                 404: "unknown model",
                 413: "body larger than max_body_bytes, or more images than max_inputs_per_request",
                 429: "the client's rate limit is exceeded (see Retry-After)",
                 503: "model not loaded, Redis unavailable, or overloaded",
             }))
async def model_infer(model: str, request: Request, state: StateDep, client: ClientDep) -> Response:
    """Classify a batch of images ``[N, *input_shape]`` (FP32 or UINT8 pixel values, JSON or binary).

    Outputs: ``probabilities`` FP32 [N, classes], ``label`` INT64 [N], and ``id`` BYTES [N], the record id
    of each prediction, to label later with ``POST /label`` (absent on a replica with learning off); as JSON,
    or as binary tensor data when asked (``binary_data_output``, or an output's ``binary_data``).
    """
    ctx = state.model(model)
    value, tail = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    body = parse_request(value)
    outputs = wanted(body, state.settings.learning)
    _, input_shape, _ = _served_spec(ctx)
    n = check_shape(body.inputs[0], input_shape)[0]
    check_input_count(state.settings, n)
    x = input_array(body, tail, input_shape)
    result = await infer(ctx, x, None, client)
    head: dict[str, Any] = {"model_name": ctx.name, "model_version": str(result.version)}
    if body.id is not None:
        head["id"] = body.id
    content, header_length = encode(head, result, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(header_length)})
