"""The Open Inference Protocol (KServe v2 REST) routes, end to end: a real uvicorn replica, a real redis-server.

The client side is written from the protocol, not from the server's code: bodies are built by hand (JSON
with ``httpx``, binary tensor data with NumPy's little-endian bytes), so a server that drifted from the
protocol fails here. The replica requires an API key, as /predict and /label do when keys are configured.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from model_store import ModelStore
from redis_io.keys import ModelKeys
from tests.bad_inputs import OIP_HEADER_LENGTH, bad_oip_requests, oip_tensor
from tests.helpers import ApiProcess, RedisProcess, api_args, metric, serving_version, wait_until

MODEL = "fashion"
SHAPE = [1, 28, 28]  # tests.helpers.make_store: an mlp on 1x28x28 images, 10 classes
CLASSES = 10
MAX_INPUTS = 8
MAX_BODY = 64 * 1024
KEY = "oip-test-key-0123456789abcdef0123"
AUTH = {"X-API-Key": KEY}
KEYS = ModelKeys(MODEL)
HEADER_LENGTH = OIP_HEADER_LENGTH


@pytest.fixture(scope="module")
def server(redis_proc: RedisProcess, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ApiProcess]:
    args = api_args(redis_proc.url, str(store.root), "--max-inputs-per-request", str(MAX_INPUTS),
                    "--max-body-bytes", str(MAX_BODY))
    with ApiProcess(args, tmp_path_factory.mktemp("logs") / "server.log",
                    env={"MPSERVE_API_KEYS": f"oip-client:{KEY}"}) as api:
        yield api


# ---------------------------------------------------------------------------------- the client side, by hand
def images(n: int, seed: int) -> np.ndarray:
    """``n`` images of integer pixel values in [0, 255], as float32."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE)).astype(np.float32)


def binary_body(x: np.ndarray, datatype: str = "FP32", **request: Any) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension: the JSON header, then the raw little-endian tensor bytes."""
    raw = x.astype("<f4" if datatype == "FP32" else "u1").tobytes()
    header = json.dumps({**request, "inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype,
                                                "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}


def infer(server: ApiProcess, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
          model: str = MODEL, auth: bool = True) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(AUTH if auth else {}), **(headers or {})}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=content, headers=hdrs, timeout=60)


def outputs(resp: httpx.Response) -> dict[str, dict[str, Any]]:
    assert resp.status_code == 200, resp.text[:500]
    return {o["name"]: o for o in resp.json()["outputs"]}


def probabilities(resp: httpx.Response) -> np.ndarray:
    out = outputs(resp)["probabilities"]
    assert out["datatype"] == "FP32"
    return np.array(out["data"], dtype=np.float64).reshape(out["shape"])


def redis_snapshot(r: redis.Redis) -> tuple[int, int]:
    return int(r.dbsize()), int(r.xlen(KEYS.feedback))


def engine_batches(server: ApiProcess) -> float:
    return metric(httpx.get(server.url + "/metrics", timeout=30).text, "mpserve_batch_size_count", model=MODEL)


def assert_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and len(body["error"]) > 5, body
    assert len(resp.content) < 2_000  # errors never echo the input
    return str(body["error"])


# ---------------------------------------------------------------------------------- health, metadata
def test_health_and_server_metadata(server: ApiProcess) -> None:
    live = httpx.get(server.url + "/v2/health/live", timeout=30)
    assert live.status_code == 200 and live.json()["live"] is True
    ready = httpx.get(server.url + "/v2/health/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    meta = httpx.get(server.url + "/v2", timeout=30).json()
    assert meta["name"] == "mpserve" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness_match_the_served_model(server: ApiProcess, store: ModelStore,
                                                             r: redis.Redis) -> None:
    resp = httpx.get(f"{server.url}/v2/models/{MODEL}", timeout=30)
    assert resp.status_code == 200, resp.text
    meta = resp.json()
    native = httpx.get(f"{server.url}/models/{MODEL}", timeout=30).json()
    assert meta["name"] == MODEL and meta["platform"] == "mpserve-tinygrad"
    assert meta["versions"] == [str(serving_version(r, MODEL, store))] == [str(native["version"])]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, *SHAPE]}]
    assert native["input_shape"] == SHAPE and native["num_classes"] == CLASSES
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, CLASSES]), "label": ("INT64", [-1]), "id": ("BYTES", [-1])}
    ready = httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"name": MODEL, "ready": True}
    for path in ("/v2/models/digits", "/v2/models/digits/ready"):
        assert "digits" in assert_error(httpx.get(server.url + path, timeout=30), 404)
    assert "digits" in assert_error(infer(server, {"inputs": [oip_tensor(images(1, seed=0))]}, model="digits"), 404)
    # paths and methods no route matches answer in the protocol's shape too (versioned paths are not offered)
    assert_error(httpx.post(f"{server.url}/v2/models/{MODEL}/versions/0/infer", json={}, timeout=30), 404)
    assert_error(httpx.get(f"{server.url}/v2/models/{MODEL}/infer", timeout=30), 405)
    native = httpx.get(f"{server.url}/no/such/path", timeout=30)
    assert native.status_code == 404 and set(native.json()) == {"detail"}  # the native routes keep theirs


# ---------------------------------------------------------------------------------- inference
def test_infer_json_echoes_the_id_names_the_version_and_records_each_prediction(
        server: ApiProcess, store: ModelStore, r: redis.Redis) -> None:
    x = images(3, seed=1)
    before = int(r.xlen(KEYS.feedback))
    resp = infer(server, {"id": "request-42", "inputs": [oip_tensor(x)]})
    body = resp.json()
    version = serving_version(r, MODEL, store)
    assert body["id"] == "request-42" and body["model_name"] == MODEL and body["model_version"] == str(version)
    out = outputs(resp)
    probs = probabilities(resp)
    assert probs.shape == (3, CLASSES) and np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    assert out["label"]["datatype"] == "INT64" and out["label"]["shape"] == [3]
    assert out["label"]["data"] == probs.argmax(axis=1).tolist()
    ids = out["id"]["data"]
    assert out["id"]["datatype"] == "BYTES" and out["id"]["shape"] == [3] and len(set(ids)) == 3
    for rid in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        stored = r.hgetall(KEYS.pred(rid))
        assert int(stored[b"version"]) == version and b"label" not in stored
        assert stored[b"client"] == b"oip-client"  # the API key's client, as /predict records it
    assert int(r.xlen(KEYS.feedback)) == before  # no labels, no feedback

    # the same path as the native /predict: the same answer for the same images
    native = httpx.post(server.url + "/predict", json={"inputs": x.tolist()}, headers=AUTH, timeout=60).json()
    np.testing.assert_allclose(probs, [p["probabilities"] for p in native["predictions"]], rtol=1e-5, atol=1e-6)
    # parameters are open key/value pairs: one the server does not know is ignored
    extra = infer(server, {"inputs": [{**oip_tensor(x), "parameters": {"content_type": "np"}}],
                           "parameters": {"priority": 1}, "outputs": [{"name": "label", "parameters": {"x": 1}}]})
    assert outputs(extra)["label"]["data"] == out["label"]["data"]
    # data nested as the shape, and only the outputs asked for, in their order
    nested = infer(server, {"inputs": [oip_tensor(x, nested=True)], "outputs": [{"name": "label"}]})
    assert [o["name"] for o in nested.json()["outputs"]] == ["label"]
    assert outputs(nested)["label"]["data"] == out["label"]["data"]
    assert "id" not in nested.json()  # no request id, none echoed


def test_infer_binary_data_gives_the_json_answer(server: ApiProcess) -> None:
    x = images(4, seed=2)
    as_json = probabilities(infer(server, {"inputs": [oip_tensor(x)]}))
    for datatype in ("FP32", "UINT8"):
        body, headers = binary_body(x, datatype, id="binary")
        assert len(body) == int(headers[HEADER_LENGTH]) + x.size * (4 if datatype == "FP32" else 1)
        resp = infer(server, body, headers)
        assert resp.json()["id"] == "binary"
        np.testing.assert_allclose(probabilities(resp), as_json, rtol=1e-5, atol=1e-6)
        assert outputs(resp)["label"]["data"] == as_json.argmax(axis=1).tolist()
    uint8_json = probabilities(infer(server, {"inputs": [oip_tensor(x, "UINT8")]}))
    np.testing.assert_allclose(uint8_json, as_json, rtol=1e-5, atol=1e-6)


def binary_answer(resp: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON part, each output's values): binary outputs read from the bytes after the JSON, in order."""
    assert resp.status_code == 200, resp.text[:500]
    n = int(resp.headers[HEADER_LENGTH])
    head, raw = json.loads(resp.content[:n]), resp.content[n:]
    values: dict[str, Any] = {}
    for out in head["outputs"]:
        if "data" in out:
            values[out["name"]] = out["data"]
            continue
        size = out["parameters"]["binary_data_size"]
        chunk, raw = raw[:size], raw[size:]
        if out["datatype"] == "BYTES":
            items = []
            while chunk:
                (length,) = struct.unpack("<I", chunk[:4])
                items.append(chunk[4:4 + length].decode())
                chunk = chunk[4 + length:]
            values[out["name"]] = items
        else:
            values[out["name"]] = np.frombuffer(chunk, {"FP32": "<f4", "INT64": "<i8"}[out["datatype"]]).tolist()
    assert raw == b""  # every byte belongs to an output
    return head, values


def test_binary_outputs_carry_the_json_answer(server: ApiProcess, r: redis.Redis) -> None:
    x = images(3, seed=9)
    as_json = outputs(infer(server, {"inputs": [oip_tensor(x)]}))
    body, headers = binary_body(x, "UINT8", id="b", parameters={"binary_data_output": True})
    head, values = binary_answer(infer(server, body, headers))
    assert head["id"] == "b" and [o["name"] for o in head["outputs"]] == ["probabilities", "label", "id"]
    assert all("data" not in o for o in head["outputs"])
    np.testing.assert_allclose(values["probabilities"], as_json["probabilities"]["data"], rtol=1e-6)
    assert values["label"] == as_json["label"]["data"]
    assert len(values["id"]) == 3 and all(r.exists(KEYS.pred(rid)) for rid in values["id"])
    asked = [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}]
    mixed = infer(server, {"inputs": [oip_tensor(x)], "outputs": asked})
    head, values = binary_answer(mixed)
    assert [("data" in o) for o in head["outputs"]] == [False, True]
    assert values["label"] == as_json["label"]["data"]
    np.testing.assert_allclose(values["probabilities"], as_json["probabilities"]["data"], rtol=1e-6)


def test_a_returned_id_is_labelled_with_the_native_label_route(server: ApiProcess, r: redis.Redis) -> None:
    body, headers = binary_body(images(2, seed=3))
    first, second = outputs(infer(server, body, headers))["id"]["data"]
    before = int(r.xlen(KEYS.feedback))
    resp = httpx.post(server.url + "/label", json={"model": MODEL, "id": first, "label": 7}, headers=AUTH, timeout=30)
    assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text
    assert int(r.hget(KEYS.pred(first), "label")) == 7 and r.hget(KEYS.pred(second), "label") is None
    assert int(r.xlen(KEYS.feedback)) == before + 1
    (_, fields), = r.xrevrange(KEYS.feedback, count=1)
    assert fields[b"id"].decode() == first and int(fields[b"label"]) == 7
    again = httpx.post(server.url + "/label", json={"id": first, "label": 8}, headers=AUTH, timeout=30)
    assert again.status_code == 409  # the native rules hold for these ids too


def test_infer_needs_the_api_key_as_predict_does(server: ApiProcess, r: redis.Redis) -> None:
    before, batches = redis_snapshot(r), engine_batches(server)
    resp = infer(server, {"inputs": [oip_tensor(images(1, seed=4))]}, auth=False)
    assert "API key" in assert_error(resp, 401) and resp.headers["www-authenticate"] == "Bearer"
    wrong = infer(server, {"inputs": [oip_tensor(images(1, seed=4))]}, {"X-API-Key": KEY + "x"}, auth=False)
    assert_error(wrong, 401)
    assert redis_snapshot(r) == before and engine_batches(server) == batches
    bearer = infer(server, {"inputs": [oip_tensor(images(1, seed=4))]}, {"Authorization": f"Bearer {KEY}"}, auth=False)
    assert bearer.status_code == 200 and len(outputs(bearer)["id"]["data"]) == 1


# ---------------------------------------------------------------------------------- bad input
BAD = bad_oip_requests(MAX_INPUTS, MAX_BODY)  # the /v2 table (tests/bad_inputs.py)


def test_errors_name_the_fix(server: ApiProcess) -> None:
    """A few messages, read as a user would: they say what is wrong and what the server takes."""
    def error(case: str) -> str:
        return assert_error(infer(server, BAD[case].body, BAD[case].headers), BAD[case].status)

    assert HEADER_LENGTH in error("binary: no header length")
    assert "[N, 1, 28, 28]" in error("wrong image shape")
    assert "unknown field" in error("unknown field")
    assert "783 values" in error("data shorter than the shape")
    assert "NaN is not a JSON number" in error("NaN literal")
    assert "the limit is 8" in error("more images than allowed")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_4xx_that_touches_nothing(case: str, server: ApiProcess, r: redis.Redis) -> None:
    bad = BAD[case]
    before, batches = redis_snapshot(r), engine_batches(server)
    assert_error(infer(server, bad.body, bad.headers), bad.status)
    assert redis_snapshot(r) == before
    assert engine_batches(server) == batches  # nothing reached the engine


# ---------------------------------------------------------------------------------- other replicas
@pytest.fixture(scope="module")
def static(redis_proc: RedisProcess, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ApiProcess]:
    """A replica with learning off: it records nothing, so it has no ids to give."""
    with ApiProcess(api_args(redis_proc.url, str(store.root), "--no-learning"),
                    tmp_path_factory.mktemp("logs") / "static.log") as api:
        yield api


def test_a_static_replica_answers_without_ids_and_records_nothing(static: ApiProcess, r: redis.Redis) -> None:
    meta = httpx.get(f"{static.url}/v2/models/{MODEL}", timeout=30).json()
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    before = redis_snapshot(r)
    resp = infer(static, {"inputs": [oip_tensor(images(2, seed=10))]}, auth=False)
    assert list(outputs(resp)) == ["probabilities", "label"] and probabilities(resp).shape == (2, CLASSES)
    assert redis_snapshot(r) == before
    asked = infer(static, {"inputs": [oip_tensor(images(1, seed=10))], "outputs": [{"name": "id"}]}, auth=False)
    assert "'id'" in assert_error(asked, 400)


def test_a_replica_without_its_model_is_live_but_not_ready(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """An empty store: the model never loads; every route says so with a 503, and liveness still holds."""
    api = ApiProcess(api_args(redis_proc.url, str(tmp_path / "empty-store")), tmp_path / "unloaded.log").start()
    try:
        wait_until(lambda: api.readyz() is not None, timeout=120, interval=0.1, what="the replica answers")
        assert httpx.get(api.url + "/v2/health/live", timeout=30).json() == {"live": True}
        ready = httpx.get(api.url + "/v2/health/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["ready"] is False and MODEL in ready.json()["error"]
        model_ready = httpx.get(f"{api.url}/v2/models/{MODEL}/ready", timeout=30)
        assert model_ready.status_code == 503 and model_ready.json()["ready"] is False
        assert "not loaded" in assert_error(httpx.get(f"{api.url}/v2/models/{MODEL}", timeout=30), 503)
        resp = infer(api, {"inputs": [oip_tensor(images(1, seed=11))]}, auth=False)
        assert "not loaded" in assert_error(resp, 503) and resp.headers["retry-after"] == "1"
    finally:
        api.stop()
