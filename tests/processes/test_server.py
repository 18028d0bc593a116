"""The API end to end: real uvicorn processes on loopback, a real redis-server, a real model store.

Two replicas share one Redis and one store for the whole module: A has an admin token, B has none.
Tests that change the serving version read the current one instead of assuming it, so their order
does not matter.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from bench.balancer import Nginx
from common.loading import load_version, write_next_version
from marketplace.deltas import path_params
from marketplace.engine import Engine, leader_logits
from marketplace.reconcile import cross_entropy
from model_store import ModelStore
from mpserve.client import AsyncMPServeClient, MPServeClient, MPServeError
from redis_io.keys import ModelKeys
from redis_io.recordlog import RecordLog
from server.main import settings_from_args
from server.settings import ServerSettings
from tests.bad_inputs import SERVER, bad_requests, predict_body, sent_by, zeros
from tests.helpers import (
    ApiProcess,
    ChildProcess,
    RedisProcess,
    clean_env,
    free_port,
    metric,
    numpy_mlp,
    start_redis,
    wait_until,
    worker_args,
)

MODEL = "fashion"
TOKEN = "s3cret-admin-token"
SHAPE = (1, 28, 28)
CLASSES = 10
MAX_INPUTS = 64
MAX_BODY = 256 * 1024
REDIS_TIMEOUT_S = 0.5
KEYS = ModelKeys(MODEL)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """This module's own Redis (AOF always: the outage test restarts it without losing the version)."""
    proc = start_redis(tmp_path_factory.mktemp("redis-api"), appendonly=True, appendfsync="always")
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGCONT)
        proc.stop()


@pytest.fixture(scope="module")
def servers(redis_proc: RedisProcess, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ApiProcess, ApiProcess]]:
    """Replica A (admin token; keeps no input) and replica B (no token; keeps every labelled input, the newest 6,
    for the guard's replay: fewer than the worker's guard_traffic_min, so this module's guard never judges on
    recent traffic, and what the stream holds does not depend on which inputs a random share would keep)."""
    logs = tmp_path_factory.mktemp("logs")
    common = ["--redis-url", redis_proc.url, "--store-dir", str(store.root), "--max-batch", "32",
              "--max-wait-ms", "20", "--max-inputs-per-request", str(MAX_INPUTS), "--max-body-bytes", str(MAX_BODY),
              "--poll-interval-s", "0.5", "--redis-timeout-s", str(REDIS_TIMEOUT_S), "--log-level", "info"]
    a = ApiProcess([*common, "--admin-token", TOKEN, "--replay-share", "0"], logs / "server-a.log")
    b = ApiProcess([*common, "--replay-share", "1", "--replay-size", "6"], logs / "server-b.log")
    try:
        for s in (a, b):
            s.start()
        for s in (a, b):
            s.wait_ready()
        yield a, b
    finally:
        for s in (a, b):
            s.stop()


@pytest.fixture(scope="module")
def worker(redis_proc: RedisProcess, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ChildProcess]:
    """The worker that answers POST /admin/reconcile (the API runs no reconciler), set for a small reconcile.

    It never reconciles by itself: no timer (worker_args), and a min_records it never reaches; an admin request is a
    forced reconciliation, which needs only min_cohort usable records. The guard acts only while a holdout set is
    uploaded. Every group learns, and the head from its probes' logits, so a step of a dozen records moves the
    holdout's closest calls (with the head alone, or with the replay head damped along the holdout's features, such
    a step may leave all of them as they were, and the guard's tests would have nothing to judge).
    """
    w = ChildProcess("worker", worker_args(redis_proc.url, store.root, MODEL, "w", 100_000, "--min-cohort", "4",
                                           "--max-cohort-age", "1000", "--guard-tolerance", "0",
                                           "--lease-ttl-ms", "10000", "--learn-groups", "all",
                                           "--head-gradient", "logits"),
                     tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield w.start()
    finally:
        w.stop()


@pytest.fixture
def leader(worker: ChildProcess, r: redis.Redis) -> ChildProcess:
    """The worker, once it holds the model's lease (at its start, or again after the Redis outage test)."""
    def leads() -> bool:
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        return r.get(KEYS.lock) is not None
    wait_until(leads, timeout=60, interval=0.05, what="the worker leads")
    return worker


@pytest.fixture(scope="module")
def server(servers: tuple[ApiProcess, ApiProcess]) -> ApiProcess:
    return servers[0]


@pytest.fixture(scope="module")
def replica(servers: tuple[ApiProcess, ApiProcess]) -> ApiProcess:
    return servers[1]


@pytest.fixture(scope="module")
def client(server: ApiProcess) -> Iterator[MPServeClient]:
    with MPServeClient(server.url, admin_token=TOKEN, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client_b(replica: ApiProcess) -> Iterator[MPServeClient]:
    with MPServeClient(replica.url, admin_token=TOKEN, timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------- helpers
def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE)).astype(np.float32)


def serving(r: redis.Redis) -> int:
    """What replicas serve; until a publish or rollback sets the pointer, the store's base (version 0 here)."""
    current = RecordLog(r, MODEL).current_version()
    return 0 if current is None else current


def xlen(r: redis.Redis) -> int:
    return int(r.xlen(KEYS.feedback))


def engine_batches(c: MPServeClient) -> float:
    return metric(c.metrics(), "mpserve_batch_size_count", model=MODEL)


def publish_new_version(store: ModelStore, r: redis.Redis, corrupt: bool = False, antithetic: bool = False) -> int:
    """What the worker does: store version n+1 of the serving version, then publish it (fenced script)."""
    parent = load_version(store, MODEL, serving(r))
    version = (store.latest(MODEL) or 0) + 1
    params = {k: v + np.float32(0.01) for k, v in parent.params.items()}
    write_next_version(store, parent, version, params, {"records": 0}, 0.5, np.random.default_rng(version),
                       antithetic=antithetic)
    if corrupt:
        path = store.root / MODEL / "versions" / f"{version:08d}.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    token = int(r.get(KEYS.fence) or 0)
    RecordLog(r, MODEL).publish(token, version, {"parent": parent.version, "by": "test"}, [],
                                expected_version=RecordLog(r, MODEL).current_version())
    return version


def predicted_version(c: MPServeClient) -> int:
    return c.predict(images(1))["version"]


def post_raw(url: str, body: bytes | str, content_type: str = "application/json", **kw: Any) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": content_type}, timeout=30, **kw)


def redis_snapshot(r: redis.Redis) -> tuple[int, int]:
    return int(r.dbsize()), xlen(r)


def assert_clear_4xx(resp: httpx.Response, status: int | None = None) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    if status is not None:
        assert resp.status_code == status, resp.text[:500]
    detail = resp.json()["detail"]
    if isinstance(detail, list):
        assert detail and all(e["msg"] and "loc" in e for e in detail), detail
        assert len(resp.content) < 20_000  # errors never echo the (possibly huge) input
    else:
        assert isinstance(detail, str) and len(detail) > 5, detail


# ---------------------------------------------------------------------------------- predict
def test_predict_answers_in_order_and_records_each_input(client: MPServeClient, r: redis.Redis) -> None:
    before = xlen(r)
    x = images(3, seed=1)
    out = client.predict(x)
    assert out["model"] == MODEL and out["version"] == serving(r)
    preds = out["predictions"]
    assert len(preds) == 3 and len({p["id"] for p in preds}) == 3
    for p in preds:
        probs = np.array(p["probabilities"])
        assert probs.shape == (CLASSES,) and abs(probs.sum() - 1) < 1e-6 and (probs >= 0).all()
        assert p["label"] == int(probs.argmax())
        assert re.fullmatch(r"[0-9a-f]{32}", p["id"])
        stored = r.hgetall(KEYS.pred(p["id"]))
        assert int(stored[b"version"]) == out["version"] and b"label" not in stored
        path = [int(v) for v in stored[b"path"].decode().split(",")]
        assert len(path) == 2 and all(0 <= v < 4 for v in path)  # mlp(32): 2 groups, 4 vendors
        assert np.frombuffer(stored[b"logits"], dtype="<f4").shape == (CLASSES,)  # the probe path's
        leader = np.frombuffer(stored[b"leader"], dtype="<f4")  # paired probes (default): users get the leader's
        z = np.exp(leader - leader.max())
        np.testing.assert_allclose(z / z.sum(), probs, rtol=1e-5, atol=1e-7)
        assert 0 < r.pttl(KEYS.pred(p["id"])) <= 86400 * 1000
    assert xlen(r) == before  # no labels, no feedback


def test_predict_with_labels_records_loss_in_the_feedback_stream(client: MPServeClient, r: redis.Redis) -> None:
    before = xlen(r)
    labels = [3, 7, 0, 9]
    out = client.predict(images(4, seed=2), labels=labels, model=MODEL)
    assert xlen(r) == before + 4
    entries = r.xrevrange(KEYS.feedback, count=4)[::-1]
    for p, y, (_, fields) in zip(out["predictions"], labels, entries, strict=True):
        assert fields[b"id"].decode() == p["id"] and int(fields[b"label"]) == y
        assert int(fields[b"version"]) == out["version"]
        # paired probes: the user got the leader's answer, whose loss is the baseline; the loss is the probe's
        assert float(fields[b"base"]) == pytest.approx(-math.log(p["probabilities"][y]), rel=1e-5)
        probe = np.frombuffer(r.hget(KEYS.pred(p["id"]), "logits"), dtype="<f4")
        assert float(fields[b"loss"]) == pytest.approx(float(cross_entropy(probe[None], np.array([y]))[0]), rel=1e-5)
        assert int(r.hget(KEYS.pred(p["id"]), "label")) == y


def test_labelled_inputs_a_replica_keeps_reach_the_capped_replay_stream(client: MPServeClient,
                                                                        client_b: MPServeClient,
                                                                        r: redis.Redis) -> None:
    def replay() -> list[tuple[str, int, bytes]]:
        return [(f[b"id"].decode(), int(f[b"label"]), f[b"x"]) for _, f in r.xrevrange(KEYS.replay, count=100)]

    x = images(8, seed=12)
    out = client_b.predict(x, labels=[i % 10 for i in range(8)], model=MODEL)
    ids = [p["id"] for p in out["predictions"]]
    assert replay() == [(ids[i], i % 10, x[i].tobytes()) for i in range(7, 1, -1)]  # the newest 6, newest first
    later = client_b.predict(x[:2], model=MODEL)["predictions"]
    assert replay()[0][0] == ids[7] and r.exists(KEYS.kept_input(later[1]["id"])) == 1  # kept until labelled
    assert client_b.label(later[1]["id"], 5)["status"] == "ok"
    assert replay()[0] == (later[1]["id"], 5, x[1].tobytes()) and r.exists(KEYS.kept_input(later[1]["id"])) == 0


def test_label_later_statuses(client: MPServeClient, r: redis.Redis) -> None:
    out = client.predict(images(2, seed=3))
    first, second = (p["id"] for p in out["predictions"])
    n0 = xlen(r)

    res = client.label(first, 4)
    assert res["status"] == "ok" and res["code"] == 200
    assert xlen(r) == n0 + 1
    (_, fields), = r.xrevrange(KEYS.feedback, count=1)
    logits = np.frombuffer(r.hget(KEYS.pred(first), "logits"), dtype="<f4")
    assert float(fields[b"loss"]) == pytest.approx(float(cross_entropy(logits[None], np.array([4]))[0]), rel=1e-6)

    again = client.label(first, 4)
    assert again["status"] == "duplicate" and again["existing_label"] == 4
    assert xlen(r) == n0 + 1  # the same label twice is one example

    with pytest.raises(MPServeError) as conflict:
        client.label(first, 5)
    assert conflict.value.status == 409 and "4" in conflict.value.detail
    assert conflict.value.body["existing_label"] == 4

    with pytest.raises(MPServeError) as unknown:
        client.label("0" * 32, 1)
    assert unknown.value.status == 404 and "0" * 32 in unknown.value.detail

    with pytest.raises(MPServeError) as outside:
        client.label(second, CLASSES)
    assert outside.value.status == 422 and "classes" in outside.value.detail
    assert r.hget(KEYS.pred(second), "label") is None and xlen(r) == n0 + 1

    results = client.label_many([(second, 1), (first, 4), (first, 6), ("f" * 32, 2), (second, 12)])
    assert [(x["status"], x["code"]) for x in results] == [
        ("ok", 200), ("duplicate", 200), ("conflict", 409), ("not_found", 404), ("invalid_label", 422)]
    assert xlen(r) == n0 + 2


# ---------------------------------------------------------------------------------- malformed input
BAD = bad_requests(MAX_INPUTS, MAX_BODY)  # the one table (tests/bad_inputs.py)
MALFORMED_PREDICT = {name.removeprefix("predict: "): c for name, c in sent_by(SERVER, BAD, "/predict").items()}
MALFORMED_LABEL = {name.removeprefix("label: "): c for name, c in sent_by(SERVER, BAD, "/label").items()}


@pytest.mark.parametrize("case", list(MALFORMED_PREDICT))
def test_malformed_predict_is_a_clear_4xx_that_touches_nothing(case: str, server: ApiProcess,
                                                                client: MPServeClient, r: redis.Redis) -> None:
    body, status = MALFORMED_PREDICT[case].body, MALFORMED_PREDICT[case].status
    before, batches = redis_snapshot(r), engine_batches(client)
    resp = post_raw(server.url + "/predict", body)
    assert_clear_4xx(resp, status)
    assert redis_snapshot(r) == before
    assert engine_batches(client) == batches  # nothing reached the engine


def test_oversized_chunked_body_is_413(server: ApiProcess, client: MPServeClient, r: redis.Redis) -> None:
    """No Content-Length: the limit is enforced on the bytes as they stream in."""
    before, batches = redis_snapshot(r), engine_batches(client)

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096
        yield b"]}"

    resp = httpx.post(server.url + "/predict", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_clear_4xx(resp, 413)
    assert redis_snapshot(r) == before and engine_batches(client) == batches


def npy(array: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)  # the object array is written only to be refused
    return buf.getvalue()


MALFORMED_NPY = {  # case: (query, body, status)
    "not a .npy array": ("", b'{"inputs": [[0]]}', 400),
    "a broken header": ("", b"\x93NUMPY\x01\x00\x10\x00{'descr': nonsense", 400),
    "truncated data": ("", npy(np.zeros((2, *SHAPE), np.float32))[:-100], 400),
    "an object array": ("", npy(np.array([{"a": 1}, None], dtype=object)), 400),
    "a string array": ("", npy(np.array(["1", "2"])), 422),
    "one level short": ("", npy(np.zeros(SHAPE, np.float32)), 422),
    "the wrong image size": ("", npy(np.zeros((2, 1, 27, 28), np.float32)), 422),
    "no inputs": ("", npy(np.zeros((0, *SHAPE), np.float32)), 422),
    "NaN": ("", npy(np.where(np.arange(784).reshape(SHAPE) == 5, np.nan, 0.0)[None]), 422),
    "beyond float32": ("", npy(np.full((1, *SHAPE), 1e39)), 422),
    "too many inputs": ("", npy(np.zeros((MAX_INPUTS + 1, *SHAPE), np.uint8)), 413),
    "a label that is not a number": ("?labels=1,x", npy(np.zeros((2, *SHAPE), np.uint8)), 422),
    "a negative label": ("?labels=-1,2", npy(np.zeros((2, *SHAPE), np.uint8)), 422),
    "fewer labels than inputs": ("?labels=1", npy(np.zeros((2, *SHAPE), np.uint8)), 422),
    "a label outside the classes": (f"?labels=1,{CLASSES}", npy(np.zeros((2, *SHAPE), np.uint8)), 422),
    "an unknown model": ("?model=nosuchmodel", npy(np.zeros((1, *SHAPE), np.uint8)), 404),
    "a model name no model can have": ("?model=../x", npy(np.zeros((1, *SHAPE), np.uint8)), 422),
}


def test_a_npy_body_is_answered_as_its_json_twin_and_its_labels_are_recorded(client: MPServeClient, r: redis.Redis,
                                                                             server: ApiProcess) -> None:
    """Binary inputs on the native route: the same images as a .npy array (uint8 here, float32 by the client)
    get the same answer as JSON lists; labels and the model ride in the query string."""
    x = images(5, seed=21)
    as_json = client.predict(x)
    as_npy = client.predict(x, binary=True, model=MODEL)
    as_uint8 = post_raw(server.url + "/predict", npy(x.astype(np.uint8)), "application/x-npy").json()
    assert as_npy["version"] == as_json["version"] == as_uint8["version"]
    for a, b, c in zip(as_json["predictions"], as_npy["predictions"], as_uint8["predictions"], strict=True):
        assert a["label"] == b["label"] == c["label"]  # users get the leader's answer: the same for the same input
        np.testing.assert_allclose(b["probabilities"], a["probabilities"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(c["probabilities"], a["probabilities"], rtol=1e-5, atol=1e-7)
    before = xlen(r)
    labelled = client.predict(x[:3], labels=[4, 0, 9], binary=True)
    assert xlen(r) == before + 3
    for p, y in zip(labelled["predictions"], [4, 0, 9], strict=True):
        assert int(r.hget(KEYS.pred(p["id"]), "label")) == y
    spec = httpx.get(server.url + "/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-npy"} <= set(spec)


@pytest.mark.parametrize("case", list(MALFORMED_NPY))
def test_a_malformed_npy_body_is_a_clear_4xx_that_touches_nothing(case: str, server: ApiProcess,
                                                                  client: MPServeClient, r: redis.Redis) -> None:
    query, body, status = MALFORMED_NPY[case]
    before, batches = redis_snapshot(r), engine_batches(client)
    resp = post_raw(server.url + "/predict" + query, body, "application/x-npy")
    assert_clear_4xx(resp, status)
    assert redis_snapshot(r) == before
    assert engine_batches(client) == batches  # nothing reached the engine


@pytest.mark.parametrize("case", list(MALFORMED_LABEL))
def test_malformed_label_is_a_clear_4xx_that_touches_nothing(case: str, server: ApiProcess,
                                                              r: redis.Redis) -> None:
    body, status = MALFORMED_LABEL[case].body, MALFORMED_LABEL[case].status
    before = redis_snapshot(r)
    assert_clear_4xx(post_raw(server.url + "/label", body), status)
    assert redis_snapshot(r) == before


# ---------------------------------------------------------------------------------- admin
def test_admin_needs_the_token_and_is_closed_without_one(server: ApiProcess, replica: ApiProcess,
                                                         r: redis.Redis) -> None:
    before, version = redis_snapshot(r), serving(r)
    for path, body in (("/admin/reconcile", {}), ("/admin/rollback", {"version": 0})):
        missing = httpx.post(server.url + path, json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 401 and "invalid" in wrong.json()["detail"]
        basic = httpx.post(server.url + path, json=body, auth=("admin", TOKEN))
        assert basic.status_code == 401
        closed = httpx.post(replica.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert closed.status_code == 403 and "disabled" in closed.json()["detail"]
    assert redis_snapshot(r) == before and serving(r) == version


def test_hot_swap_reaches_both_replicas(client: MPServeClient, client_b: MPServeClient, store: ModelStore,
                                        r: redis.Redis) -> None:
    new = publish_new_version(store, r)
    wait_until(lambda: predicted_version(client) == new, timeout=20, interval=0.05, what="A swaps")
    wait_until(lambda: predicted_version(client_b) == new, timeout=20, interval=0.05, what="B swaps")
    out = client_b.predict(images(1))
    assert int(r.hget(KEYS.pred(out["predictions"][0]["id"]), "version")) == new
    for c in (client, client_b):
        info = c.model(MODEL)
        assert info["version"] == new and info["target_version"] == new and info["error"] is None
        assert metric(c.metrics(), "mpserve_model_version", model=MODEL) == new


def test_each_answer_during_a_hot_swap_comes_from_the_version_it_names(
        server: ApiProcess, client: MPServeClient, store: ModelStore, r: redis.Redis) -> None:
    """Clients keep predicting while four new versions are published in turn: every answer before, during and
    after each swap is the leader of the version it names (the NumPy twin of that version's stored weights), and
    every record written for learning names that version and holds its probe's logits on the recorded path."""
    old = serving(r)
    wait_until(lambda: predicted_version(client) == old, timeout=20, interval=0.05, what="A serves the current one")
    pool = images(24, seed=80)
    answers: list[tuple[np.ndarray, dict[str, Any]]] = []

    async def until(done: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout}s: {what}")
            await asyncio.sleep(0.01)

    async def drive() -> list[int]:
        stop, published = asyncio.Event(), []
        async with AsyncMPServeClient(server.url, timeout=60) as c:
            async def one(i: int) -> None:  # 1-3 inputs a request, so batches mix requests
                k = 0
                while not stop.is_set():
                    x = pool[[(5 * i + k + j) % len(pool) for j in range(1 + (i + k) % 3)]]
                    answers.append((x, await c.predict(x)))
                    k += 1

            clients = asyncio.gather(*(one(i) for i in range(16)))
            await until(lambda: len(answers) >= 12, "answers of the old version")
            for _ in range(4):  # each swap is another chance for a batch to straddle it
                new = await asyncio.to_thread(publish_new_version, store, r)
                published.append(new)
                await until(lambda new=new: sum(a["version"] == new for _, a in answers) >= 12, f"answers of {new}")
            stop.set()
            await clients
        return published

    published = asyncio.run(drive())
    assert {a["version"] for _, a in answers} == {old, *published}
    versions = {v: load_version(store, MODEL, v) for v in (old, *published)}

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    for x, a in answers:
        named = versions[a["version"]]
        probs = np.array([p["probabilities"] for p in a["predictions"]])
        np.testing.assert_allclose(probs, softmax(numpy_mlp(named.spec, named.params, x)), rtol=1e-3, atol=1e-6)
        for other in versions.values():  # and the versions are told apart
            if other is not named:
                assert np.abs(probs - softmax(numpy_mlp(other.spec, other.params, x))).max() > 1e-3
        for xi, p in zip(x, a["predictions"], strict=True):
            stored = r.hgetall(KEYS.pred(p["id"]))
            assert int(stored[b"version"]) == a["version"]
            path = np.array([int(v) for v in stored[b"path"].decode().split(",")])
            probe = numpy_mlp(named.spec, path_params(named.spec, named.params, named.seeds, path, named.eps),
                              xi[None])[0]
            np.testing.assert_allclose(np.frombuffer(stored[b"logits"], dtype="<f4"), probe, rtol=1e-4, atol=1e-4)


def requests_served(c: MPServeClient) -> float:
    """How many /predict requests this replica answered 200."""
    return metric(c.metrics(), "mpserve_http_requests_total", method="POST", route="/predict", status="200")


def test_clients_behind_nginx_see_versions_only_move_forward_while_the_replicas_swap(
        server: ApiProcess, replica: ApiProcess, client: MPServeClient, client_b: MPServeClient, store: ModelStore,
        r: redis.Redis, tmp_path: Path) -> None:
    """Both replicas behind nginx with the shipped deploy/nginx/mpserve.conf; 32 clients (four on each of eight
    threads) predict through it while three versions are published. No request fails, both replicas serve, and
    each client (kept on one replica by its X-Client-Id) sees the versions only move forward, up to the last."""
    stop, failures = threading.Event(), []
    seen: dict[str, list[int]] = {f"client-{i}": [] for i in range(32)}
    body = json.dumps({"inputs": images(1, seed=31).tolist()})
    before = (requests_served(client), requests_served(client_b))

    def drive(names: list[str], url: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=30, headers={"Content-Type": "application/json"}) as http:
                while not stop.is_set():
                    for name in names:
                        resp = http.post("/predict", content=body, headers={"X-Client-Id": name})
                        if resp.status_code != 200:
                            failures.append((name, resp.status_code, resp.text[:200]))
                            return
                        seen[name].append(resp.json()["version"])
        except Exception as exc:  # noqa: BLE001 — a timeout or a dropped connection is a failed request too
            failures.append((names, type(exc).__name__, str(exc)[:200]))

    names = list(seen)
    with Nginx(tmp_path / "nginx", [server.url.removeprefix("http://"), replica.url.removeprefix("http://")],
               free_port()) as lb:
        threads = [threading.Thread(target=drive, args=(names[i::8], lb.url)) for i in range(8)]
        for t in threads:
            t.start()

        def everyone_on(version: int) -> None:
            wait_until(lambda: all(seen[n] and seen[n][-1] == version for n in seen) or bool(failures), timeout=30,
                       interval=0.02, what=f"every client served version {version}")

        try:
            last = serving(r)
            for _ in range(3):
                everyone_on(last)
                last = publish_new_version(store, r)
            everyone_on(last)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    assert not failures, failures
    for name, versions in seen.items():
        assert versions == sorted(versions), (name, versions)
        assert versions[-1] == last
    after = (requests_served(client), requests_served(client_b))
    assert after[0] > before[0] and after[1] > before[1]  # the hash spread the 32 clients over both replicas


def test_rollback_points_every_replica_at_an_older_version(client: MPServeClient, client_b: MPServeClient,
                                                           store: ModelStore, r: redis.Redis) -> None:
    old = serving(r)
    new = publish_new_version(store, r)
    wait_until(lambda: predicted_version(client) == new, timeout=20, interval=0.05)
    res = client.rollback(old)
    assert res == {"model": MODEL, "version": old, "previous": new}
    assert serving(r) == old
    wait_until(lambda: predicted_version(client) == old, timeout=20, interval=0.05, what="A rolls back")
    wait_until(lambda: predicted_version(client_b) == old, timeout=20, interval=0.05, what="B rolls back")
    history = client.model(MODEL)["history"]
    assert history[-1]["type"] == "rollback" and history[-1]["version"] == old and history[-1]["from"] == new
    with pytest.raises(MPServeError) as missing:
        client.rollback(9999)
    assert missing.value.status == 404 and serving(r) == old
    with pytest.raises(MPServeError) as unknown_model:
        client.rollback(0, model="digits")
    assert unknown_model.value.status == 404


def test_corrupt_version_is_refused_and_the_last_good_one_keeps_serving(
        client: MPServeClient, client_b: MPServeClient, store: ModelStore, r: redis.Redis) -> None:
    good = serving(r)
    wait_until(lambda: predicted_version(client) == good, timeout=20, interval=0.05)
    bad = publish_new_version(store, r, corrupt=True)

    def refused(c: MPServeClient) -> bool:
        m = c.ready()["models"][MODEL]
        return m["target_version"] == bad and bool(m["error"])

    wait_until(lambda: refused(client) and refused(client_b), timeout=20, interval=0.05, what="refusal")
    ready = client.ready()
    assert ready["status"] == "ready" and ready["models"][MODEL]["version"] == good
    assert f"version {bad}" in ready["models"][MODEL]["error"] and "sha256" in ready["models"][MODEL]["error"]
    assert predicted_version(client) == good and predicted_version(client_b) == good
    with pytest.raises(MPServeError) as refused_rollback:
        client.rollback(bad)
    assert refused_rollback.value.status == 409
    client.rollback(good)  # leave the module serving a good version
    wait_until(lambda: client.ready()["models"][MODEL]["error"] is None, timeout=20, interval=0.05)


def test_full_cycle_predict_label_reconcile_serves_the_new_version(client: MPServeClient, store: ModelStore,
                                                                   r: redis.Redis, leader: ChildProcess) -> None:
    base = serving(r)
    wait_until(lambda: predicted_version(client) == base, timeout=20, interval=0.05)
    out = client.predict(images(24, seed=5))
    assert out["version"] == base
    results = client.label_many([(p["id"], i % CLASSES) for i, p in enumerate(out["predictions"])])
    assert all(x["status"] == "ok" for x in results)
    res = client.reconcile()
    assert res["model"] == MODEL and res["parent"] == base and res["version"] > base
    assert res["stats"]["records"] >= 24
    assert serving(r) == res["version"] and store.has_version(MODEL, res["version"])
    wait_until(lambda: predicted_version(client) == res["version"], timeout=20, interval=0.05)
    with pytest.raises(MPServeError) as nothing:
        client.reconcile()
    assert nothing.value.status == 409 and "too few" in nothing.value.detail
    assert serving(r) == res["version"]


# ---------------------------------------------------------------------------------- batching, metrics
def test_concurrent_requests_share_engine_batches(server: ApiProcess, client: MPServeClient) -> None:
    n = 24
    batches = engine_batches(client)

    async def burst() -> list[Any]:
        async with AsyncMPServeClient(server.url, timeout=60) as c:
            return await asyncio.gather(*(c.predict(images(1, seed=i)) for i in range(n)))

    answers = asyncio.run(burst())
    assert len(answers) == n and all(len(a["predictions"]) == 1 for a in answers)
    used = engine_batches(client) - batches
    assert 1 <= used < n, f"{n} concurrent requests took {used} engine batches"
    text = client.metrics()
    assert metric(text, "mpserve_batch_requests_sum", model=MODEL) > metric(
        text, "mpserve_batch_requests_count", model=MODEL)  # some batch held more than one request


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def test_metrics_is_prometheus_text(server: ApiProcess, client: MPServeClient, r: redis.Redis) -> None:
    # what the samples below count, made here: the test passes alone or in any order
    out = client.predict(images(1))
    assert post_raw(server.url + "/predict", predict_body(zeros(1), labels=[CLASSES])).status_code == 422
    assert client.label(out["predictions"][0]["id"], 3)["status"] == "ok"
    resp = httpx.get(server.url + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    types: dict[str, str] = {}
    samples: list[tuple[str, str, float]] = []
    for line in resp.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample: {line!r}"
            samples.append((m.group(1), m.group(2) or "", float(m.group(3))))
    for name, _, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE"
    assert types["mpserve_http_requests_total"] == "counter"
    assert types["mpserve_http_request_duration_seconds"] == "histogram"
    text = resp.text
    assert metric(text, "mpserve_http_requests_total", route="/predict", status="200") >= 1
    assert metric(text, "mpserve_http_requests_total", route="/predict", status="422") >= 1
    assert metric(text, "mpserve_http_request_duration_seconds_count", route="/predict", status="200") >= 1
    assert metric(text, "mpserve_model_version", model=MODEL) == serving(r)
    assert metric(text, "mpserve_records_written_total", model=MODEL) >= 1
    assert metric(text, "mpserve_labels_total", model=MODEL, status="ok") >= 1
    assert metric(text, "mpserve_redis_up") == 1
    assert "mpserve_feedback_backlog" in types
    buckets = [v for n, labels, v in samples if n == "mpserve_batch_size_bucket"]
    assert buckets == sorted(buckets) and buckets[-1] == metric(text, "mpserve_batch_size_count", model=MODEL)


# ---------------------------------------------------------------------------------- health, models, docs
def test_health_readiness_models_and_docs(server: ApiProcess, client: MPServeClient, r: redis.Redis) -> None:
    assert client.health() == {"status": "ok"}
    ready = client.ready()
    assert ready["status"] == "ready" and ready["redis"] == "ok" and ready["models"][MODEL]["loaded"]
    (info,) = client.models()
    assert info == client.model(MODEL)
    assert info["name"] == MODEL and info["input_shape"] == list(SHAPE) and info["num_classes"] == CLASSES
    assert info["vendors"] == 4 and info["probe_scale"] == pytest.approx(0.05) and info["learning"] is True
    assert info["version"] == serving(r) and 0 in info["stored_versions"]
    with pytest.raises(MPServeError) as unknown:
        client.model("digits")
    assert unknown.value.status == 404
    assert httpx.get(server.url + "/models/Not_Valid").status_code == 422
    assert httpx.get(server.url + "/docs").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/label", "/admin/reconcile", "/admin/rollback", "/models", "/models/{name}", "/healthz",
            "/readyz", "/metrics"} <= set(schema["paths"])
    predict = schema["components"]["schemas"]["PredictRequest"]
    assert predict["additionalProperties"] is False and "inputs" in predict["required"]


# ---------------------------------------------------------------------------------- Redis outage
def test_redis_outage_is_a_fast_503_and_service_resumes(server: ApiProcess, client: MPServeClient,
                                                        redis_proc: RedisProcess, r: redis.Redis) -> None:
    assert redis_proc.proc is not None
    version = serving(r)
    x = images(1).tolist()
    os.kill(redis_proc.proc.pid, signal.SIGSTOP)  # a Redis that accepts connections but never answers
    try:
        for path, body in (("/predict", {"inputs": x}), ("/label", {"id": "a" * 32, "label": 1}),
                           ("/models", None), ("/admin/reconcile", {})):
            started = time.monotonic()
            resp = httpx.request("GET" if body is None else "POST", server.url + path, json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
            elapsed = time.monotonic() - started
            assert resp.status_code == 503 and "Redis" in resp.json()["detail"], resp.text
            assert elapsed < REDIS_TIMEOUT_S + 1.5, f"{path} took {elapsed:.2f}s"
        ready = httpx.get(server.url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["reasons"]
        assert client.health() == {"status": "ok"}
    finally:
        os.kill(redis_proc.proc.pid, signal.SIGCONT)
    wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, timeout=20, interval=0.05)

    redis_proc.stop()  # refused connections: a 503 at once
    try:
        resp = httpx.post(server.url + "/predict", json={"inputs": x}, timeout=30)
        assert resp.status_code == 503 and "Redis" in resp.json()["detail"]
    finally:
        redis_proc.start()
    wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, timeout=20, interval=0.05)
    assert client.predict(images(1))["version"] == version


# ---------------------------------------------------------------------------------- antithetic versions
def test_a_version_with_antithetic_seeds_is_served_as_its_twin(client: MPServeClient, store: ModelStore,
                                                               r: redis.Redis) -> None:
    version = publish_new_version(store, r, antithetic=True)
    wait_until(lambda: predicted_version(client) == version, timeout=20, interval=0.05, what="A swaps")
    loaded = load_version(store, MODEL, version)
    assert loaded.antithetic and np.array_equal(loaded.seeds[:, 2], loaded.seeds[:, 1])  # vendors 1, 2 mirrored
    x = images(16, seed=30)
    out = client.predict(x)
    assert out["version"] == version
    paths = []
    for i, p in enumerate(out["predictions"]):
        stored = r.hgetall(KEYS.pred(p["id"]))
        path = np.array([int(v) for v in stored[b"path"].decode().split(",")])
        paths.append(path)
        twin = numpy_mlp(loaded.spec, path_params(loaded.spec, loaded.params, loaded.seeds, path, loaded.eps,
                                                  antithetic=True), x[i:i + 1])[0]
        np.testing.assert_allclose(np.frombuffer(stored[b"logits"], dtype="<f4"), twin, rtol=1e-4, atol=1e-4)
    assert np.isin(np.array(paths), [2]).any()  # some input ran on a mirror, θ − δ


# ---------------------------------------------------------------------------------- holdout set
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def leader_predictions(store: ModelStore, version: int, x: np.ndarray) -> np.ndarray:
    loaded = load_version(store, MODEL, version)
    return numpy_mlp(loaded.spec, loaded.params, x)


def label_some(client: MPServeClient, n: int, seed: int) -> set[str]:
    """Predict and label n inputs; returns their record ids."""
    out = client.predict(images(n, seed=seed))
    assert all(x["status"] == "ok" for x in client.label_many([(p["id"], i % CLASSES)
                                                               for i, p in enumerate(out["predictions"])]))
    return {p["id"] for p in out["predictions"]}


def pending_records(r: redis.Redis) -> set[str]:
    """Record ids of the feedback entries delivered to a reconciler and not acknowledged."""
    rows = r.xpending_range(KEYS.feedback, "reconciler", "-", "+", 100_000)
    out = set()
    for row in rows:
        entry = r.xrange(KEYS.feedback, row["message_id"], row["message_id"])
        out.update(fields[b"id"].decode() for _, fields in entry)
    return out


def test_holdout_admin_needs_the_token(server: ApiProcess, replica: ApiProcess, store: ModelStore) -> None:
    body = {"inputs": images(1).tolist(), "labels": [1]}
    for method in ("PUT", "GET", "DELETE"):
        kw: dict[str, Any] = {"json": body} if method == "PUT" else {}
        missing = httpx.request(method, server.url + "/admin/holdout", **kw)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, server.url + "/admin/holdout", headers={"Authorization": "Bearer nope"}, **kw)
        assert wrong.status_code == 401
        closed = httpx.request(method, replica.url + "/admin/holdout", headers=admin_headers(), **kw)
        assert closed.status_code == 403
    assert not store.holdout_path(MODEL).exists()


def test_malformed_holdout_is_a_clear_4xx_and_writes_nothing(server: ApiProcess, client: MPServeClient,
                                                             store: ModelStore, r: redis.Redis) -> None:
    good = images(3, seed=40).tolist()
    row = [[0.0] * 28] * 28
    cases = {
        "wrong shape": {"inputs": [[row[:27]]] * 3, "labels": [0, 1, 2]},
        "flat input": {"inputs": [[0.0] * 784] * 3, "labels": [0, 1, 2]},
        "string pixel": {"inputs": [[[["1"] * 28] * 28]], "labels": [0]},
        "beyond float32": {"inputs": [[[[1e39] * 28] * 28]], "labels": [0]},
        "label out of range": {"inputs": good, "labels": [0, 1, CLASSES]},
        "negative label": {"inputs": good, "labels": [0, 1, -1]},
        "boolean label": {"inputs": good, "labels": [0, 1, True]},
        "too few labels": {"inputs": good, "labels": [0, 1]},
        "no labels": {"inputs": good},
        "empty": {"inputs": [], "labels": []},
        "unknown field": {"inputs": good, "labels": [0, 1, 2], "path": "/tmp/x"},
        "bad model name": {"model": "../etc", "inputs": good, "labels": [0, 1, 2]},
    }
    try:
        before = client.upload_holdout(images(5, seed=41), [0, 1, 2, 3, 4])
        stored = store.holdout_path(MODEL).read_bytes()
        snapshot = redis_snapshot(r)
        for case, body in cases.items():
            resp = httpx.put(server.url + "/admin/holdout", json=body, headers=admin_headers())
            assert resp.status_code == 422, (case, resp.text[:300])
            assert_clear_4xx(resp, 422)
            assert store.holdout_path(MODEL).read_bytes() == stored, case  # the earlier upload stands
        unknown = httpx.put(server.url + "/admin/holdout", json={"model": "digits", "inputs": good,
                                                                 "labels": [0, 1, 2]}, headers=admin_headers())
        assert unknown.status_code == 404 and not (store.root / "digits").exists()
        with pytest.raises(MPServeError) as too_big:  # over the body limit (256 KiB in this module)
            client.upload_holdout(images(120, seed=42) / 255.0, list(range(10)) * 12)
        assert too_big.value.status == 413
        assert httpx.get(server.url + "/admin/holdout?model=Bad/Name", headers=admin_headers()).status_code == 422
        assert client.holdout() == before and store.holdout_path(MODEL).read_bytes() == stored
        assert redis_snapshot(r) == snapshot  # a holdout never touches Redis
    finally:
        store.delete_holdout(MODEL)


def test_holdout_upload_describe_delete_and_the_guard_uses_each_upload(
        client: MPServeClient, store: ModelStore, r: redis.Redis, tmp_path: Path, leader: ChildProcess) -> None:
    try:
        x1 = images(40, seed=50)
        wrong = (leader_predictions(store, serving(r), x1).argmax(1) + 1) % CLASSES  # v scores 0: any candidate passes
        info = client.upload_holdout(x1, wrong)
        assert (info["model"], info["size"]) == (MODEL, 40)
        assert info["classes"] == np.bincount(wrong, minlength=CLASSES).tolist()
        assert info["sha256"] == hashlib.sha256(store.holdout_path(MODEL).read_bytes()).hexdigest()
        assert client.holdout() == info == client.holdout(model=MODEL)
        held = store.read_holdout(MODEL)
        np.testing.assert_array_equal(held.inputs, x1)
        np.testing.assert_array_equal(held.labels, wrong)

        label_some(client, 12, seed=51)
        first = client.reconcile()
        m = store.read_manifest(MODEL, first["version"])
        assert m["validation"]["holdout_sha256"] == info["sha256"] and m["validation"]["accepted"] is True
        assert m["validation"]["size"] == 40 and m["metrics"]["holdout_size"] == 40

        # a new upload (the CLI path: an .npz read locally): the next version is checked on it
        x2 = images(30, seed=52)
        npz = tmp_path / "holdout.npz"
        np.savez(npz, inputs=x2, labels=(leader_predictions(store, serving(r), x2).argmax(1) + 1) % CLASSES)
        cli = subprocess.run([sys.executable, "-m", "mpserve.cli", "holdout", "upload", str(npz), "--url",
                              client.base_url, "--token", TOKEN], capture_output=True, text=True, timeout=60,
                             env=clean_env(), cwd=ROOT)
        assert cli.returncode == 0, cli.stderr
        second_info = json.loads(cli.stdout)
        assert second_info["size"] == 30 and second_info["sha256"] != info["sha256"]
        label_some(client, 12, seed=53)
        second = client.reconcile()
        assert store.read_manifest(MODEL, second["version"])["validation"]["holdout_sha256"] == second_info["sha256"]

        # a holdout the serving version gets right on its closest calls: with tolerance 0 a step is refused.
        # Its labels come from the guard's own evaluation (tinygrad, float32), so the reference is exactly 1.0
        # and a single flipped call refuses the candidate.
        pool = images(3000, seed=54)
        loaded = load_version(store, MODEL, serving(r))
        logits = leader_logits(Engine(loaded.spec, 1, buckets=[256]), loaded.params, pool)
        top2 = np.sort(logits, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        close = np.argsort(np.where(margin > 1e-3, margin, np.inf))[:40]
        client.upload_holdout(pool[close], logits[close].argmax(1))
        # A step need not flip any of these calls (it may push them all the same way); one that flips one
        # is refused. Each accepted candidate scored 1.0, the anchor, so keep trying, a bounded number of times.
        refused: MPServeError | None = None
        seen = []
        for attempt in range(8):
            mine = label_some(client, 12, seed=55 + attempt)
            version, stored = serving(r), store.versions(MODEL)
            try:
                out = client.reconcile()
            except MPServeError as exc:
                refused = exc
                break
            seen.append(store.read_manifest(MODEL, out["version"])["validation"])
            assert seen[-1]["accuracy"] == 1.0 and seen[-1]["accepted"]  # passed only because nothing flipped
        assert refused is not None, f"eight steps flipped none of the closest calls: {seen}"
        assert refused.status == 409 and "validation guard" in refused.detail
        assert "holdout accuracy" in refused.detail
        # the refused candidate is not written; its parent's weights serve again under fresh seeds (a re-seed)
        reseed = serving(r)
        assert store.versions(MODEL) == [*stored, reseed] and reseed > version
        assert store.read_manifest(MODEL, reseed)["training"]["kind"] == "reseed after a refused candidate"
        last = client.model(MODEL)["history"][-2]
        assert (last["type"], last["version"], last["validation"]["accepted"]) == ("refused", version, False)
        assert mine.isdisjoint(pending_records(r))  # its entries were used up: acknowledged
        assert last["records"] >= 12
        assert last["metrics"]["validation_accuracy"] < last["validation"]["reference_accuracy"]
    finally:
        store.delete_holdout(MODEL)
    with pytest.raises(MPServeError) as gone:
        client.holdout()
    assert gone.value.status == 404
    with pytest.raises(MPServeError) as again:
        client.delete_holdout()
    assert again.value.status == 404


def test_delete_holdout_removes_the_upload(client: MPServeClient, store: ModelStore) -> None:
    try:
        client.upload_holdout(images(2, seed=60), [1, 2])
        assert store.holdout_path(MODEL).exists()
        assert client.delete_holdout() == {"model": MODEL, "deleted": True}
        assert not store.holdout_path(MODEL).exists()
    finally:
        store.delete_holdout(MODEL)


# ---------------------------------------------------------------------------------- settings (no server)
def test_flags_override_env_and_defaults_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPSERVE_PORT", "9001")
    monkeypatch.setenv("MPSERVE_REDIS_URL", "redis://env:6379/0")
    s = settings_from_args(["--redis-url", "redis://flag:6379/1", "--max-wait-ms", "3.5", "--admin-token", "tok-xyz"])
    assert s.port == 9001 and s.redis_url == "redis://flag:6379/1" and s.max_wait_ms == 3.5
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "tok-xyz" and "tok-xyz" not in repr(s)
    assert s.models == ["fashion"] and s.device is None
    assert settings_from_args(["--default-model", "digits"]).models == ["digits"]
    assert settings_from_args(["--models", "a,b", "c", "--default-model", "b"]).models == ["a", "b", "c"]
    monkeypatch.setenv("MPSERVE_ADMIN_TOKEN", "")
    assert ServerSettings().admin_token is None  # an empty token never opens admin
    for bad in (["--default-model", "Bad/Name"], ["--models", "x", "--default-model", "y"], ["--port", "-1"],
                ["--log-level", "loud"]):
        with pytest.raises((ValueError, SystemExit)):
            settings_from_args(bad)
