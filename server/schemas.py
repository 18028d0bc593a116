"""Request and response bodies of the HTTP contract (docs/DESIGN.md §5), with the OpenAPI schema they imply.

Requests forbid unknown fields, so a misspelt key is a 422 rather than silently ignored. The exact
shape of ``inputs`` depends on the model, so the schema says "nested arrays of numbers" and
:mod:`server.validation` checks the rest against the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag, WithJsonSchema

from common.names import MODEL_NAME_RE, RECORD_ID_RE
from model_store.manifest import MAX_VERSION

ModelName = Annotated[str, Field(pattern=MODEL_NAME_RE.pattern, description="model name; default: the server's",
                                 examples=["fashion"])]
RecordId = Annotated[str, Field(pattern=RECORD_ID_RE.pattern, description="id of a served prediction")]
Label = Annotated[StrictInt, Field(ge=0, description="class index, 0 <= label < num_classes")]
InputTensor = Annotated[
    list[Any],
    WithJsonSchema({
        "type": "array",
        "description": "one input: nested arrays of finite numbers in the model's input shape",
        "items": {"anyOf": [{"type": "number"}, {"type": "array", "items": {}}]},
    }),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------- /predict
class PredictRequest(_Request):
    model: ModelName | None = None
    inputs: list[InputTensor] = Field(min_length=1, description="inputs, each of the model's input shape")
    labels: list[Label] | None = Field(None, description="known labels, one per input: recorded at once")


class Prediction(BaseModel):
    id: str | None = Field(description="record id: label it later with POST /label (null: the server runs with "
                                       "learning off and recorded nothing)")
    label: int = Field(description="predicted class (argmax of the probabilities)")
    probabilities: list[float] = Field(description="softmax of the served logits, one per class")


class PredictResponse(BaseModel):
    model: str
    version: int = Field(description="the model version that produced these predictions")
    predictions: list[Prediction]


# ---------------------------------------------------------------------------------- /label
class LabelItem(_Request):
    id: RecordId
    label: Label


class SingleLabelRequest(LabelItem):
    model: ModelName | None = None


class BatchLabelRequest(_Request):
    model: ModelName | None = None
    labels: list[LabelItem] = Field(min_length=1)


def _label_kind(v: Any) -> str:
    """A body with "labels" is a batch; anything else is validated (and explained) as a single label."""
    if isinstance(v, dict):
        return "batch" if "labels" in v else "single"
    return "batch" if isinstance(v, BatchLabelRequest) else "single"


LabelRequest = Annotated[
    Annotated[SingleLabelRequest, Tag("single")] | Annotated[BatchLabelRequest, Tag("batch")],
    Discriminator(_label_kind),
]

LabelStatus = Literal["ok", "duplicate", "conflict", "not_found", "invalid_label"]


class LabelResult(BaseModel):
    id: str
    status: LabelStatus = Field(description="ok | duplicate (same label again: nothing new) | conflict | "
                                            "not_found (unknown or expired) | invalid_label")
    code: int = Field(description="the HTTP status this item alone would get")
    existing_label: int | None = Field(None, description="the label already attached (duplicate, conflict)")
    detail: str | None = None


class BatchLabelResponse(BaseModel):
    model: str
    results: list[LabelResult]


# ---------------------------------------------------------------------------------- admin
class ReconcileRequest(_Request):
    model: ModelName | None = None


class ReconcileResponse(BaseModel):
    model: str
    version: int = Field(description="the version just published")
    parent: int | None
    stats: dict[str, Any]


class RollbackRequest(_Request):
    model: ModelName | None = None
    version: StrictInt = Field(ge=0, lt=MAX_VERSION, description="a stored version to serve from now on")


class RollbackResponse(BaseModel):
    model: str
    version: int
    previous: int | None


class PinResponse(BaseModel):
    model: str
    version: int = Field(description="the version just pinned or unpinned")
    pinned: list[int] = Field(description="every pinned version of the model now, ascending: retention keeps them")


# ---------------------------------------------------------------------------------- models
class ModelInfo(BaseModel):
    name: str
    version: int | None = Field(description="the version this replica serves (null: none loaded)")
    target_version: int | None = Field(description="the version Redis says to serve")
    architecture: str | None
    input_shape: list[int] | None
    num_classes: int | None
    vendors: int | None = Field(description="vendors per group of the version (this replica serves only the leader "
                                            "when learning is off)")
    probe_scale: float | None
    learning: bool = Field(description="whether this replica learns (vendor paths, records, labels)")
    error: str | None = Field(None, description="why the target version is not served, if it is not")
    stored_versions: list[int] = Field(description="versions in the model store")
    history: list[dict[str, Any]] = Field(description="publish and rollback records, oldest first")


class ModelList(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------------------------- version metrics
class VersionMetrics(BaseModel):
    online_loss: float | None = Field(description="mean loss of the answers users got (the leader's with paired "
                                                  "probes) whose labels went into this version")
    online_accuracy: float | None = Field(description="accuracy of those answers: what users were served")
    leader_accuracy: float | None = Field(None, description="accuracy of the leader's answers among them (paired: "
                                                            "all; single path: inputs on the all-leader path)")
    probe_accuracy: float | None = Field(None, description="accuracy of the perturbed paths: leader − probe is "
                                                           "what exploration costs when users get the probe")
    validation_accuracy: float | None = Field(description="accuracy on the holdout set (version 0: its offline "
                                                          "test accuracy); null without one")
    validation_loss: float | None = Field(description="mean loss on the holdout set; null without one")
    holdout_size: int | None = Field(description="inputs in the holdout set")
    records: int | None = Field(description="labelled records reconciled into this version")
    traffic_accuracy: float | None = Field(None, description="accuracy of this version's leader on the recent "
                                                             "labelled inputs the guard judged it on")
    traffic_anchor_accuracy: float | None = Field(None, description="the anchor's (the model kept frozen) on the "
                                                                    "same inputs: what not learning would serve")


class VersionRow(BaseModel):
    version: int
    parent: int | None
    created: float | None = Field(description="when it was stored (Unix seconds)")
    records: int = Field(description="labelled records reconciled into this version")
    metrics: VersionMetrics
    source: Literal["metrics", "legacy", "unreadable"] = Field(
        description="metrics: the manifest's metrics block; legacy: a manifest written before it (loss.mean, "
                    "offline test accuracy); unreadable: the manifest could not be read")
    serving: bool = Field(description="whether this is the version Redis says to serve")
    pinned: bool = Field(description="whether an admin pinned it (POST /admin/versions/{n}/pin): retention keeps it")
    error: str | None = Field(None, description="why the manifest could not be read")


class RefusedCandidate(BaseModel):
    version: int = Field(description="the version number the refused candidate would have had")
    ts_ms: int | None
    metrics: VersionMetrics | None
    reason: str | None


class ModelVersions(BaseModel):
    model: str
    serving_version: int | None = Field(description="the version Redis says to serve")
    loaded_version: int | None = Field(description="the version this replica has loaded")
    stored: int = Field(description="versions in the store (the listing shows the newest `limit`)")
    versions: list[VersionRow] = Field(description="the newest stored versions, ascending")
    pinned: list[int] = Field(description="versions pinned in the store, ascending (a worker's own "
                                          "MPSERVE_PIN_VERSIONS are kept too, but not listed here)")
    refused: list[RefusedCandidate] = Field(description="candidates the validation guard refused, oldest first")


# ---------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok"]


class ModelReadiness(BaseModel):
    loaded: bool
    version: int | None
    target_version: int | None
    error: str | None


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    redis: str
    models: dict[str, ModelReadiness]
    reasons: list[str]


class ErrorResponse(BaseModel):
    detail: Any = Field(description="a message, or a list of {loc, msg, type} for malformed input")


# ---------------------------------------------------------------------------------- admin: holdout set
class HoldoutUpload(_Request):
    model: ModelName | None = None
    inputs: list[InputTensor] = Field(min_length=1, description="holdout inputs, each of the model's input shape")
    labels: list[Label] = Field(min_length=1, description="their true classes, one per input")


class HoldoutInfo(BaseModel):
    model: str
    size: int = Field(description="examples in the holdout set")
    sha256: str = Field(description="sha256 of the stored set; manifests name the holdout they were checked on by it")
    classes: list[int] = Field(description="examples per class, indexed by class")


class HoldoutDeleted(BaseModel):
    model: str
    deleted: bool
def error_responses(why: Mapping[int, str], *shared: Mapping[int | str, dict[str, Any]]
                    ) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI ``responses``: the ``shared`` tables, then its own codes, each an ErrorResponse saying why."""
    out: dict[int | str, dict[str, Any]] = {}
    for table in shared:
        out.update(table)
    out.update({code: {"model": ErrorResponse, "description": text} for code, text in why.items()})
    return out


#: What any route with a JSON body may answer before it runs (server.middleware, server.jsonbody).
BODY_ERRORS = error_responses({
    413: "request body larger than max_body_bytes",
    422: "malformed body: not UTF-8 JSON, NaN or Infinity, nested too deeply, or not the request schema",
})
