"""The HTTP client without a server: what it sends, and how it reports errors (sync and async alike)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import pytest

from mpserve.client import AsyncMPServeClient, MPServeClient, MPServeError


class Recorder:
    """A mock transport handler that remembers requests and answers from a table."""

    def __init__(self, answers: dict[str, tuple[int, Any]]) -> None:
        self.answers, self.requests = answers, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.get(request.url.path, (404, {"detail": "no such route"}))
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)


ANSWERS: dict[str, tuple[int, Any]] = {
    "/predict": (200, {"model": "fashion", "version": 3, "predictions": []}),
    "/label": (409, {"detail": "prediction 'x' already has label 2", "existing_label": 2}),
    "/admin/reconcile": (409, {"detail": "too few records: have 0, need 16"}),
    "/admin/rollback": (200, {"model": "fashion", "version": 1, "previous": 3}),
    "/metrics": (200, "# TYPE x counter\nx 1\n"),
    "/readyz": (503, {"status": "not ready", "reasons": ["Redis is unreachable"]}),
}


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("predict", (np.zeros((2, 1, 2, 2), np.float32),), {"labels": np.array([1, 2]), "model": "fashion"}),
    ("label", ("abc", 2), {}),
    ("label_many", ([("a", 1), {"id": "b", "label": np.int64(2)}],), {}),
    ("reconcile", (), {}),
    ("rollback", (1,), {}),
    ("metrics", (), {}),
    ("ready", (), {}),
]


def run_sync() -> tuple[Recorder, list[Any]]:
    rec, out = Recorder(ANSWERS), []
    with MPServeClient("http://api", admin_token="tok", transport=httpx.MockTransport(rec)) as c:
        for name, args, kwargs in CALLS:
            try:
                out.append(getattr(c, name)(*args, **kwargs))
            except MPServeError as exc:
                out.append(exc)
    return rec, out


async def run_async() -> tuple[Recorder, list[Any]]:
    rec, out = Recorder(ANSWERS), []
    async with AsyncMPServeClient("http://api", admin_token="tok", transport=httpx.MockTransport(rec)) as c:
        for name, args, kwargs in CALLS:
            try:
                out.append(await getattr(c, name)(*args, **kwargs))
            except MPServeError as exc:
                out.append(exc)
    return rec, out


def test_sync_and_async_clients_send_the_same_requests_and_raise_the_same_errors() -> None:
    (rec_s, out_s), (rec_a, out_a) = run_sync(), asyncio.run(run_async())
    for rec, out in ((rec_s, out_s), (rec_a, out_a)):
        paths = [(r.method, r.url.path) for r in rec.requests]
        assert paths == [("POST", "/predict"), ("POST", "/label"), ("POST", "/label"), ("POST", "/admin/reconcile"),
                         ("POST", "/admin/rollback"), ("GET", "/metrics"), ("GET", "/readyz")]
        bodies = [json.loads(r.content) if r.content else None for r in rec.requests]
        assert bodies[0] == {"inputs": np.zeros((2, 1, 2, 2)).tolist(), "labels": [1, 2], "model": "fashion"}
        assert bodies[1] == {"id": "abc", "label": 2}
        assert bodies[2] == {"labels": [{"id": "a", "label": 1}, {"id": "b", "label": 2}]}
        assert bodies[3] == {} and bodies[4] == {"version": 1}
        auth = [r.headers.get("authorization") for r in rec.requests]
        assert auth == [None, None, None, "Bearer tok", "Bearer tok", None, None]  # the token only goes to admin

        predict, label, _, reconcile, rollback, metrics, ready = out
        assert predict["version"] == 3
        assert isinstance(label, MPServeError) and label.status == 409 and "label 2" in label.detail
        assert label.body["existing_label"] == 2
        assert isinstance(reconcile, MPServeError) and reconcile.status == 409 and "too few" in reconcile.detail
        assert rollback == {"model": "fashion", "version": 1, "previous": 3}
        assert metrics.startswith("# TYPE")
        assert isinstance(ready, MPServeError) and ready.status == 503 and ready.body["reasons"]
    assert [str(e) for e in out_s if isinstance(e, MPServeError)] == [
        str(e) for e in out_a if isinstance(e, MPServeError)]


def test_non_json_error_still_raises_a_typed_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="Bad Gateway")

    with MPServeClient("http://api", transport=httpx.MockTransport(handler)) as c, pytest.raises(MPServeError) as e:
        c.health()
    assert e.value.status == 502 and e.value.detail == "Bad Gateway" and e.value.body is None
