"""A replica with learning off (``--no-learning``): real uvicorn, real Redis, a real model store.

It must serve the leader (the unperturbed version, V=1), answer ``id: null``, write no record or
feedback entry to Redis, and refuse labels with a 409 that says why.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis

from common.loading import load_version
from marketplace.engine import Engine, leader_seeds
from model_store import ModelStore
from redis_io.keys import ModelKeys
from server.main import settings_from_args
from tests.helpers import ApiProcess, RedisProcess

MODEL = "fashion"
SHAPE = (1, 28, 28)
KEYS = ModelKeys(MODEL)


@pytest.fixture(scope="module")
def server(redis_proc: RedisProcess, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ApiProcess]:
    with ApiProcess(["--redis-url", redis_proc.url, "--store-dir", str(store.root), "--max-batch", "16",
                     "--max-wait-ms", "5"], tmp_path_factory.mktemp("logs") / "server-static.log",
                    env={"MPSERVE_LEARNING": "false"}) as proc:  # the env form; the flag form is below
        yield proc


def record_keys(r: redis.Redis) -> list[bytes]:
    """Every mp:* key other than the serving version (which a static replica may initialize)."""
    return sorted(k for k in r.scan_iter(match="mp:*") if k != KEYS.version.encode())


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE)).astype(np.float32)


def test_flag_and_env_switch_learning_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args([]).learning is True
    assert settings_from_args(["--no-learning"]).learning is False
    monkeypatch.setenv("MPSERVE_LEARNING", "false")
    assert settings_from_args([]).learning is False
    assert settings_from_args(["--learning"]).learning is True


def test_predictions_are_the_leaders_and_leave_nothing_in_redis(server: ApiProcess, store: ModelStore,
                                                                 r: redis.Redis) -> None:
    x = images(5)
    reply = httpx.post(server.url + "/predict", json={"inputs": x.tolist()}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == MODEL and body["version"] == 0  # the store's base: nothing published yet
    assert r.get(KEYS.version) is None  # and a replica never writes the version pointer
    preds = body["predictions"]
    assert len(preds) == 5 and all(p["id"] is None for p in preds)

    loaded = load_version(store, MODEL, 0)
    engine = Engine(loaded.spec, 1, buckets=[8])
    weights = engine.materialize(loaded.params, leader_seeds(loaded.spec), loaded.eps)
    logits, _ = engine.forward(weights, x, np.random.default_rng(0))
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = z / z.sum(axis=1, keepdims=True)
    got = np.array([p["probabilities"] for p in preds])
    np.testing.assert_allclose(got, expected, atol=1e-5)  # the leader, not a perturbed vendor path
    assert [p["label"] for p in preds] == expected.argmax(axis=1).tolist()
    assert record_keys(r) == []


def test_labels_are_refused_with_a_clear_409(server: ApiProcess, r: redis.Redis) -> None:
    x = images(2, seed=1)
    attempts = [
        ("/predict", {"inputs": x.tolist(), "labels": [1, 2]}),
        ("/label", {"id": "0" * 32, "label": 1}),
        ("/label", {"labels": [{"id": "0" * 32, "label": 1}]}),
    ]
    for path, payload in attempts:
        reply = httpx.post(server.url + path, json=payload, timeout=30)
        assert reply.status_code == 409, (path, reply.text)
        assert "learning is off" in reply.json()["detail"]
    assert record_keys(r) == []


def test_models_say_learning_is_off(server: ApiProcess) -> None:
    info = httpx.get(server.url + f"/models/{MODEL}", timeout=30).json()
    assert info["learning"] is False and info["version"] == 0
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    id_schema = schema["components"]["schemas"]["Prediction"]["properties"]["id"]
    assert {"type": "null"} in id_schema["anyOf"]  # the contract says a null id is possible

