"""A small typed client of the mpserve HTTP API, blocking (:class:`MPServeClient`) and asyncio
(:class:`AsyncMPServeClient`).

Requests are described once, by :class:`_Calls` (method, path, body, whether the admin token goes
along), and answers are checked once, by :func:`_answer`; the two clients only differ in how they send.
Any non-2xx answer raises :class:`MPServeError` with the status and the server's ``detail``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast
from urllib.parse import quote, urlencode

import httpx
import numpy as np

__all__ = [
    "AsyncMPServeClient",
    "BatchLabelResponse",
    "HoldoutInfo",
    "LabelResult",
    "MPServeClient",
    "MPServeError",
    "ModelInfo",
    "PinResponse",
    "PredictResponse",
    "Prediction",
    "Readiness",
    "ReconcileResponse",
    "RollbackResponse",
]

DEFAULT_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------- answers
class Prediction(TypedDict):
    id: str | None  # None: the server runs with learning off (nothing recorded, nothing to label)
    label: int
    probabilities: list[float]


class PredictResponse(TypedDict):
    model: str
    version: int
    predictions: list[Prediction]


class LabelResult(TypedDict):
    id: str
    status: str  # ok | duplicate | conflict | not_found | invalid_label
    code: int
    existing_label: int | None
    detail: str | None


class BatchLabelResponse(TypedDict):
    model: str
    results: list[LabelResult]


class ReconcileResponse(TypedDict):
    model: str
    version: int
    parent: int | None
    stats: dict[str, Any]


class RollbackResponse(TypedDict):
    model: str
    version: int
    previous: int | None


class PinResponse(TypedDict):
    model: str
    version: int
    pinned: list[int]  # every pinned version of the model now


class HoldoutInfo(TypedDict):
    model: str
    size: int
    sha256: str
    classes: list[int]  # examples per class


class ModelInfo(TypedDict):
    name: str
    version: int | None
    target_version: int | None
    architecture: str | None
    input_shape: list[int] | None
    num_classes: int | None
    vendors: int | None
    probe_scale: float | None
    learning: bool
    error: str | None
    stored_versions: list[int]
    history: list[dict[str, Any]]


class Readiness(TypedDict):
    status: str
    redis: str
    models: dict[str, dict[str, Any]]
    reasons: list[str]


class MPServeError(Exception):
    """A non-2xx answer: ``status``, the server's ``detail``, and the whole JSON ``body`` when there is one."""

    def __init__(self, status: int, detail: Any, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.body = status, detail, body


# ---------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: Any = None
    admin: bool = False
    text: bool = False  # the answer is text (metrics), not JSON
    content: bytes | None = None  # a binary body (a .npy array), sent as ``content_type``
    content_type: str | None = None


def _plain(value: Any) -> Any:
    """Arrays (anything with ``tolist``) and sequences of them as nested lists, ready for JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _compact(value: Any) -> Any:
    """Like _plain, but a float array of whole numbers (images 0-255) goes as integers: JSON a third the size."""
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f" and value.size and \
            bool((value == value.round()).all()) and float(abs(value).max()) < 2**53:
        return value.astype("int64").tolist()
    return _plain(value)


def _model_query(model: str | None) -> str:
    return "" if model is None else f"?model={quote(model, safe='')}"


def _with_model(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    if model is not None:
        body["model"] = model
    return body


def _label_item(item: tuple[str, int] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return {"id": item["id"], "label": _plain(item["label"])}
    record_id, label = item
    return {"id": record_id, "label": _plain(label)}


class _Calls:
    """What each API method sends; no I/O here."""

    @staticmethod
    def predict(inputs: Any, labels: Sequence[int] | Any | None, model: str | None, binary: bool = False) -> _Call:
        if binary:  # one .npy array; the model and the labels ride in the query string
            query = {} if model is None else {"model": model}
            if labels is not None:
                query["labels"] = ",".join(str(int(y)) for y in _plain(labels))
            buf = io.BytesIO()
            np.save(buf, np.asarray(inputs, dtype=np.float32), allow_pickle=False)
            path = "/predict" + ("?" + urlencode(query) if query else "")
            return _Call("POST", path, content=buf.getvalue(), content_type="application/x-npy")
        body: dict[str, Any] = {"inputs": _plain(inputs)}
        if labels is not None:
            body["labels"] = _plain(labels)
        return _Call("POST", "/predict", _with_model(body, model))

    @staticmethod
    def label(record_id: str, label: int, model: str | None) -> _Call:
        return _Call("POST", "/label", _with_model({"id": record_id, "label": _plain(label)}, model))

    @staticmethod
    def label_many(items: Iterable[tuple[str, int] | Mapping[str, Any]], model: str | None) -> _Call:
        return _Call("POST", "/label", _with_model({"labels": [_label_item(i) for i in items]}, model))

    @staticmethod
    def reconcile(model: str | None) -> _Call:
        return _Call("POST", "/admin/reconcile", _with_model({}, model), admin=True)

    @staticmethod
    def rollback(version: int, model: str | None) -> _Call:
        return _Call("POST", "/admin/rollback", _with_model({"version": version}, model), admin=True)

    @staticmethod
    def pin(version: int, model: str | None, pinned: bool = True) -> _Call:
        return _Call("POST" if pinned else "DELETE", f"/admin/versions/{int(version)}/pin" + _model_query(model),
                     admin=True)

    @staticmethod
    def upload_holdout(inputs: Any, labels: Sequence[int] | Any, model: str | None) -> _Call:
        body = {"inputs": _compact(inputs), "labels": _plain(labels)}
        return _Call("PUT", "/admin/holdout", _with_model(body, model), admin=True)

    @staticmethod
    def holdout(model: str | None) -> _Call:
        return _Call("GET", "/admin/holdout" + _model_query(model), admin=True)

    @staticmethod
    def delete_holdout(model: str | None) -> _Call:
        return _Call("DELETE", "/admin/holdout" + _model_query(model), admin=True)

    @staticmethod
    def models() -> _Call:
        return _Call("GET", "/models")

    @staticmethod
    def model(name: str) -> _Call:
        return _Call("GET", f"/models/{quote(name, safe='')}")

    @staticmethod
    def versions(name: str, limit: int | None) -> _Call:
        query = "" if limit is None else f"?limit={int(limit)}"
        return _Call("GET", f"/models/{quote(name, safe='')}/versions{query}")

    @staticmethod
    def health() -> _Call:
        return _Call("GET", "/healthz")

    @staticmethod
    def ready() -> _Call:
        return _Call("GET", "/readyz")

    @staticmethod
    def metrics() -> _Call:
        return _Call("GET", "/metrics", text=True)


def _answer(call: _Call, response: httpx.Response) -> Any:
    """The decoded answer, or MPServeError for a non-2xx status."""
    if not response.is_success:
        try:
            body = response.json()
            detail = body.get("detail", body) if isinstance(body, dict) else body
        except ValueError:
            body, detail = None, response.text or response.reason_phrase
        raise MPServeError(response.status_code, detail, body)
    return response.text if call.text else response.json()


class _Base:
    def __init__(self, base_url: str, admin_token: str | None, timeout: float | httpx.Timeout,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._admin_token = admin_token
        self._api_key = api_key
        self._timeout = timeout

    def _request_kwargs(self, call: _Call) -> dict[str, Any]:
        headers = {}
        if self._api_key is not None:  # a server with API keys needs it on /predict and /label; others ignore it
            headers["X-API-Key"] = self._api_key
        if call.admin and self._admin_token is not None:
            headers["Authorization"] = f"Bearer {self._admin_token}"
        kwargs: dict[str, Any] = {"headers": headers}
        if call.json is not None:
            kwargs["json"] = call.json
        if call.content is not None:
            kwargs["content"] = call.content
            headers["Content-Type"] = call.content_type or "application/octet-stream"
        return kwargs


# ---------------------------------------------------------------------------------- clients
class MPServeClient(_Base):
    """Blocking client; use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str, admin_token: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None,
                 *, api_key: str | None = None) -> None:
        super().__init__(base_url, admin_token, timeout, api_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def _send(self, call: _Call) -> Any:
        return _answer(call, self._http.request(call.method, call.path, **self._request_kwargs(call)))

    def predict(self, inputs: Any, labels: Sequence[int] | Any | None = None, model: str | None = None,
                binary: bool = False) -> PredictResponse:
        """Predict each input (nested lists or an array of shape (n, *input_shape)); labels are recorded.

        ``binary``: send the inputs as one .npy array (``application/x-npy``) instead of JSON lists: the server
        decodes it with a copy instead of parsing text, the cheaper request for large or many inputs.
        """
        return cast(PredictResponse, self._send(_Calls.predict(inputs, labels, model, binary)))

    def label(self, id: str, label: int, model: str | None = None) -> LabelResult:
        """Attach a label; raises MPServeError 404 (unknown id), 409 (other label), 422 (bad class)."""
        return cast(LabelResult, self._send(_Calls.label(id, label, model)))

    def label_many(self, items: Iterable[tuple[str, int] | Mapping[str, Any]], model: str | None = None
                   ) -> list[LabelResult]:
        """Attach many labels; one result (status, code) per item, in order."""
        return cast(BatchLabelResponse, self._send(_Calls.label_many(items, model)))["results"]

    def reconcile(self, model: str | None = None) -> ReconcileResponse:
        """Admin: reconcile now; MPServeError 409 says why nothing was published."""
        return cast(ReconcileResponse, self._send(_Calls.reconcile(model)))

    def rollback(self, version: int, model: str | None = None) -> RollbackResponse:
        """Admin: serve a stored (older) version from now on."""
        return cast(RollbackResponse, self._send(_Calls.rollback(version, model)))

    def pin(self, version: int, model: str | None = None) -> PinResponse:
        """Keep a stored version through any number of updates (retention never deletes it)."""
        return cast(PinResponse, self._send(_Calls.pin(version, model)))

    def unpin(self, version: int, model: str | None = None) -> PinResponse:
        return cast(PinResponse, self._send(_Calls.pin(version, model, pinned=False)))

    def upload_holdout(self, inputs: Any, labels: Sequence[int] | Any, model: str | None = None) -> HoldoutInfo:
        """Admin: replace the model's holdout set (the validation guard checks candidates on it)."""
        return cast(HoldoutInfo, self._send(_Calls.upload_holdout(inputs, labels, model)))

    def holdout(self, model: str | None = None) -> HoldoutInfo:
        """Admin: describe the uploaded holdout set; MPServeError 404 when there is none."""
        return cast(HoldoutInfo, self._send(_Calls.holdout(model)))

    def delete_holdout(self, model: str | None = None) -> dict[str, Any]:
        """Admin: remove the uploaded holdout set; MPServeError 404 when there is none."""
        return cast(dict[str, Any], self._send(_Calls.delete_holdout(model)))

    def models(self) -> list[ModelInfo]:
        return cast(list[ModelInfo], self._send(_Calls.models())["models"])

    def model(self, name: str) -> ModelInfo:
        return cast(ModelInfo, self._send(_Calls.model(name)))

    def versions(self, name: str, limit: int | None = None) -> dict[str, Any]:
        """Per-version metrics of the newest ``limit`` stored versions, the serving one and refused candidates."""
        return cast(dict[str, Any], self._send(_Calls.versions(name, limit)))

    def health(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._send(_Calls.health()))

    def ready(self) -> Readiness:
        """Readiness; MPServeError 503 (with the reasons in ``body``) when not ready."""
        return cast(Readiness, self._send(_Calls.ready()))

    def metrics(self) -> str:
        return cast(str, self._send(_Calls.metrics()))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MPServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMPServeClient(_Base):
    """asyncio client; use as an async context manager or await :meth:`aclose`."""

    def __init__(self, base_url: str, admin_token: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, *, api_key: str | None = None) -> None:
        super().__init__(base_url, admin_token, timeout, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def _send(self, call: _Call) -> Any:
        return _answer(call, await self._http.request(call.method, call.path, **self._request_kwargs(call)))

    async def predict(self, inputs: Any, labels: Sequence[int] | Any | None = None, model: str | None = None,
                      binary: bool = False) -> PredictResponse:
        return cast(PredictResponse, await self._send(_Calls.predict(inputs, labels, model, binary)))

    async def label(self, id: str, label: int, model: str | None = None) -> LabelResult:
        return cast(LabelResult, await self._send(_Calls.label(id, label, model)))

    async def label_many(self, items: Iterable[tuple[str, int] | Mapping[str, Any]], model: str | None = None
                         ) -> list[LabelResult]:
        return cast(BatchLabelResponse, await self._send(_Calls.label_many(items, model)))["results"]

    async def reconcile(self, model: str | None = None) -> ReconcileResponse:
        return cast(ReconcileResponse, await self._send(_Calls.reconcile(model)))

    async def rollback(self, version: int, model: str | None = None) -> RollbackResponse:
        return cast(RollbackResponse, await self._send(_Calls.rollback(version, model)))

    async def pin(self, version: int, model: str | None = None) -> PinResponse:
        return cast(PinResponse, await self._send(_Calls.pin(version, model)))

    async def unpin(self, version: int, model: str | None = None) -> PinResponse:
        return cast(PinResponse, await self._send(_Calls.pin(version, model, pinned=False)))

    async def upload_holdout(self, inputs: Any, labels: Sequence[int] | Any, model: str | None = None
                             ) -> HoldoutInfo:
        return cast(HoldoutInfo, await self._send(_Calls.upload_holdout(inputs, labels, model)))

    async def holdout(self, model: str | None = None) -> HoldoutInfo:
        return cast(HoldoutInfo, await self._send(_Calls.holdout(model)))

    async def delete_holdout(self, model: str | None = None) -> dict[str, Any]:
        return cast(dict[str, Any], await self._send(_Calls.delete_holdout(model)))

    async def models(self) -> list[ModelInfo]:
        return cast(list[ModelInfo], (await self._send(_Calls.models()))["models"])

    async def model(self, name: str) -> ModelInfo:
        return cast(ModelInfo, await self._send(_Calls.model(name)))

    async def versions(self, name: str, limit: int | None = None) -> dict[str, Any]:
        return cast(dict[str, Any], await self._send(_Calls.versions(name, limit)))

    async def health(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._send(_Calls.health()))

    async def ready(self) -> Readiness:
        return cast(Readiness, await self._send(_Calls.ready()))

    async def metrics(self) -> str:
        return cast(str, await self._send(_Calls.metrics()))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMPServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
