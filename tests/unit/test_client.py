"""The HTTP client without a server: what it sends, and how it reports errors (sync and async alike)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import pytest

from mpserve.client import AsyncMPServeClient, MPServeClient, MPServeError


class FakeApi:
    """A mock transport handler that remembers requests and answers each from what it asked.

    The answers are computed from the request (the version of a prediction is its number of inputs, a rollback
    says it left the version two above the one asked for, the batch label route answers per item...), so what
    the client returns can only be right if it sent the right request and decoded (and unpacked) the answer.
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        if path == "/predict":
            n = len(body["inputs"])
            return httpx.Response(200, json={"model": body.get("model", "fashion"), "version": n, "predictions": [
                {"id": f"r{i}", "label": body["labels"][i], "probabilities": [0.1] * 10} for i in range(n)]})
        if path == "/label" and "labels" in body:
            return httpx.Response(200, json={"model": "fashion", "results": [
                {"id": item["id"], "status": "ok", "code": 200, "existing_label": None,
                 "detail": f"label {item['label']}"} for item in body["labels"]]})
        if path == "/label":
            other = body["label"] + 1
            return httpx.Response(409, json={"detail": f"prediction {body['id']!r} already has label {other}",
                                             "existing_label": other})
        if path == "/admin/reconcile":
            return httpx.Response(409, json={"detail": "too few records: have 0, need 16"})
        if path == "/admin/rollback":
            return httpx.Response(200, json={"model": "fashion", "version": body["version"],
                                             "previous": body["version"] + 2})
        if path == "/models":
            return httpx.Response(200, json={"models": [{"name": "fashion", "version": len(self.requests)}]})
        if path == "/metrics":
            return httpx.Response(200, text=f"# TYPE x counter\nx {len(self.requests)}\n")
        if path == "/readyz":
            return httpx.Response(503, json={"status": "not ready", "reasons": ["Redis is unreachable"]})
        return httpx.Response(404, json={"detail": "no such route"})


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("predict", (np.zeros((2, 1, 2, 2), np.float32),), {"labels": np.array([1, 2]), "model": "fashion"}),
    ("label", ("abc", 2), {}),
    ("label_many", ([("a", 1), {"id": "b", "label": np.int64(2)}],), {}),
    ("reconcile", (), {}),
    ("rollback", (1,), {}),
    ("models", (), {}),
    ("metrics", (), {}),
    ("ready", (), {}),
]


def run_sync() -> tuple[FakeApi, list[Any]]:
    rec, out = FakeApi(), []
    with MPServeClient("http://api", admin_token="tok", transport=httpx.MockTransport(rec)) as c:
        for name, args, kwargs in CALLS:
            try:
                out.append(getattr(c, name)(*args, **kwargs))
            except MPServeError as exc:
                out.append(exc)
    return rec, out


async def run_async() -> tuple[FakeApi, list[Any]]:
    rec, out = FakeApi(), []
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
                         ("POST", "/admin/rollback"), ("GET", "/models"), ("GET", "/metrics"), ("GET", "/readyz")]
        bodies = [json.loads(r.content) if r.content else None for r in rec.requests]
        assert bodies[0] == {"inputs": np.zeros((2, 1, 2, 2)).tolist(), "labels": [1, 2], "model": "fashion"}
        assert bodies[1] == {"id": "abc", "label": 2}
        assert bodies[2] == {"labels": [{"id": "a", "label": 1}, {"id": "b", "label": 2}]}
        assert bodies[3] == {} and bodies[4] == {"version": 1}
        auth = [r.headers.get("authorization") for r in rec.requests]
        assert auth == [None, None, None, "Bearer tok", "Bearer tok", None, None, None]  # the token only goes to admin

        predict, label, many, reconcile, rollback, models, metrics, ready = out
        # the decoded answers, each computed by the fake API from the request the client sent
        assert predict["version"] == 2 and [p["label"] for p in predict["predictions"]] == [1, 2]
        assert isinstance(label, MPServeError) and label.status == 409 and "label 3" in label.detail
        assert label.body == {"detail": "prediction 'abc' already has label 3", "existing_label": 3}
        assert [(r["id"], r["code"], r["detail"]) for r in many] == [("a", 200, "label 1"), ("b", 200, "label 2")]
        assert isinstance(reconcile, MPServeError) and reconcile.status == 409 and "too few" in reconcile.detail
        assert rollback == {"model": "fashion", "version": 1, "previous": 3}
        assert models == [{"name": "fashion", "version": 6}]  # unpacked from {"models": [...]}
        assert metrics == "# TYPE x counter\nx 7\n"  # text, not JSON
        assert isinstance(ready, MPServeError) and ready.status == 503
        assert ready.body == {"status": "not ready", "reasons": ["Redis is unreachable"]}
        assert str(ready) == "HTTP 503: {'status': 'not ready', 'reasons': ['Redis is unreachable']}"
    assert [str(e) for e in out_s if isinstance(e, MPServeError)] == [
        str(e) for e in out_a if isinstance(e, MPServeError)]


def test_non_json_error_still_raises_a_typed_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="Bad Gateway")

    with MPServeClient("http://api", transport=httpx.MockTransport(handler)) as c, pytest.raises(MPServeError) as e:
        c.health()
    assert e.value.status == 502 and e.value.detail == "Bad Gateway" and e.value.body is None
