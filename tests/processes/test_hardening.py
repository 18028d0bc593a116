"""Bad input, API keys and fuzzing, end to end: real uvicorn replicas, a real redis-server, a real model store.

Two replicas share this module's Redis and store: ``guarded`` (admin token, three API clients, one of
them disabled) and ``limited`` (one API client with a small token bucket). Every refused request is
checked to leave no ``mp:*`` key and no feedback entry behind.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from bench.fuzz import fuzz_api, summary
from model_store import ModelStore
from mpserve.client import MPServeClient
from redis_io.keys import ModelKeys
from server.access import TokenBucket
from server.main import settings_from_args
from server.settings import ServerSettings
from tests.bad_inputs import HARDENING, RID, bad_requests, sent_by
from tests.helpers import ApiProcess, ChildProcess, RedisProcess, wait_until, worker_args
from worker.reconciler import Reconciler
from worker.settings import WorkerSettings

MODEL = "fashion"
KEYS = ModelKeys(MODEL)
SHAPE, CLASSES = (1, 28, 28), 10
TOKEN = "hardening-admin-token"
SECRETS = {"alpha": "alpha-secret-1", "beta": "beta-secret-22", "gone": "gone-secret-333"}
MAX_INPUTS, MAX_BODY = 16, 128 * 1024
RATE, BURST = 0.5, 3
FUZZ_EXAMPLES = 20  # per operation, mode and credentials: 15-50 s on 2 cores, depending on their load


def key(client: str) -> dict[str, str]:
    return {"X-API-Key": SECRETS[client]}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# ---------------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def servers(redis_proc: RedisProcess, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ApiProcess]]:
    """``guarded`` takes its keys as a flag ("a:s,b:s"), ``limited`` as a JSON environment variable."""
    logs = tmp_path_factory.mktemp("logs")
    common = ["--redis-url", redis_proc.url, "--store-dir", str(store.root), "--max-batch", "32",
              "--max-wait-ms", "5", "--max-inputs-per-request", str(MAX_INPUTS), "--max-body-bytes", str(MAX_BODY),
              "--log-level", "info"]
    procs = {
        "guarded": ApiProcess([
            *common, "--admin-token", TOKEN, "--api-keys", ",".join(f"{c}:{s}" for c, s in SECRETS.items()),
            "--disabled-clients", "gone"], logs / "server-guarded.log"),
        "limited": ApiProcess(common, logs / "server-limited.log", env={
            "MPSERVE_API_KEYS": json.dumps({"alpha": SECRETS["alpha"]}), "MPSERVE_RATE_LIMIT_PER_S": str(RATE),
            "MPSERVE_RATE_LIMIT_BURST": str(BURST)}),
    }
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def guarded(servers: dict[str, ApiProcess]) -> ApiProcess:
    return servers["guarded"]


@pytest.fixture(scope="module")
def limited(servers: dict[str, ApiProcess]) -> ApiProcess:
    return servers["limited"]


# ---------------------------------------------------------------------------------- helpers
def snapshot(r: redis.Redis) -> tuple[frozenset[bytes], int]:
    """Every mp:* key, and the feedback stream's length (entries are added to an existing key)."""
    return frozenset(r.scan_iter(match="mp:*", count=1000)), int(r.xlen(KEYS.feedback))


def images(n: int, seed: int = 0) -> list[Any]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE)).tolist()


def detail_text(resp: httpx.Response) -> str:
    body = resp.json()
    assert "detail" in body, body
    d = body["detail"]
    return d if isinstance(d, str) else " | ".join(e["msg"] for e in d)


BAD_INPUT = sent_by(HARDENING, bad_requests(MAX_INPUTS, MAX_BODY))  # the one table (tests/bad_inputs.py)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_4xx_that_writes_nothing(case: str, guarded: ApiProcess, r: redis.Redis) -> None:
    c = BAD_INPUT[case]
    method, path, body, status, message = c.method, c.path, c.body, c.status, c.message
    before = snapshot(r)
    headers = {**key("alpha"), **bearer(TOKEN), "content-type": "application/json"}  # X-API-Key wins on /predict
    resp = httpx.request(method, guarded.url + path, content=body, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text[:500]
    assert message in detail_text(resp), resp.text[:500]
    assert len(resp.content) < 20_000  # an error never echoes the (possibly huge) input
    assert snapshot(r) == before


# ---------------------------------------------------------------------------------- API keys
def test_predict_and_label_record_the_client(guarded: ApiProcess, r: redis.Redis) -> None:
    """Alpha predicts (with and without labels); beta labels later with a bearer key."""
    out = httpx.post(guarded.url + "/predict", json={"inputs": images(2, 1), "labels": [3, 4]}, headers=key("alpha"))
    assert out.status_code == 200, out.text
    labelled = [p["id"] for p in out.json()["predictions"]]
    with MPServeClient(guarded.url, api_key=SECRETS["alpha"]) as alpha:
        (late_id,) = (p["id"] for p in alpha.predict(np.asarray(images(1, 2)))["predictions"])
    res = httpx.post(guarded.url + "/label", json={"id": late_id, "label": 5}, headers=bearer(SECRETS["beta"]))
    assert res.status_code == 200 and res.json()["status"] == "ok", res.text
    for rid in [*labelled, late_id]:
        assert r.hget(KEYS.pred(rid), "client") == b"alpha"
    entries = {f[b"id"].decode(): f.get(b"client") for _, f in r.xrange(KEYS.feedback)}
    assert [entries[i] for i in labelled] == [b"alpha", b"alpha"] and entries[late_id] == b"beta"


AUTH_FAILURES: dict[str, tuple[dict[str, str], int, str]] = {
    "no key": ({}, 401, "needs an API key"),
    "unknown X-API-Key": ({"X-API-Key": "not-a-known-key"}, 401, "unknown API key"),
    "unknown bearer": (bearer("not-a-known-key"), 401, "unknown API key"),
    "admin token as bearer": (bearer(TOKEN), 401, "unknown API key"),
    "key as basic auth": ({"Authorization": "Basic " + "YWxwaGE6YWxwaGEtc2VjcmV0LTE="}, 401, "needs an API key"),
    "empty X-API-Key": ({"X-API-Key": ""}, 401, "needs an API key"),
    "a known key with a suffix": ({"X-API-Key": SECRETS["alpha"] + "x"}, 401, "unknown API key"),
    "disabled client": (key("gone"), 403, "'gone' is disabled"),
    "disabled client as bearer": (bearer(SECRETS["gone"]), 403, "'gone' is disabled"),
}


@pytest.mark.parametrize("route", ["/predict", "/label"])
@pytest.mark.parametrize("case", list(AUTH_FAILURES))
def test_requests_without_a_valid_key_are_refused_and_write_nothing(case: str, route: str, guarded: ApiProcess,
                                                                   r: redis.Redis) -> None:
    headers, status, message = AUTH_FAILURES[case]
    body = {"inputs": images(1), "labels": [1]} if route == "/predict" else {"id": RID, "label": 1}
    before = snapshot(r)
    resp = httpx.post(guarded.url + route, json=body, headers=headers)
    assert resp.status_code == status and message in detail_text(resp), resp.text
    if status == 401:
        assert resp.headers["www-authenticate"] == "Bearer"
    assert snapshot(r) == before


def test_admin_routes_take_the_admin_token_not_an_api_key(guarded: ApiProcess, r: redis.Redis) -> None:
    before = snapshot(r)
    for headers in (key("alpha"), bearer(SECRETS["alpha"]), {}):
        resp = httpx.post(guarded.url + "/admin/rollback", json={"version": 0}, headers=headers)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", resp.text
    assert snapshot(r) == before
    ok = httpx.post(guarded.url + "/admin/rollback", json={"version": 0}, headers=bearer(TOKEN))
    assert ok.status_code == 200 and ok.json()["version"] == 0 and int(r.get(KEYS.version)) == 0


def test_client_names_are_logged_and_secrets_never(guarded: ApiProcess) -> None:
    text = guarded.log_path.read_text(errors="replace")
    assert "API keys required on /predict and /label: clients ['alpha', 'beta', 'gone'], disabled ['gone']" in text
    assert not any(secret in text for secret in SECRETS.values())


def test_rate_limit_is_a_429_with_retry_after_then_the_bucket_refills(limited: ApiProcess,
                                                                      r: redis.Redis) -> None:
    """The bucket holds BURST tokens and refills at RATE per second. How many requests pass before the first 429
    depends on how long they took, which a loaded machine stretches: so the bounds use the time measured."""
    def predict() -> httpx.Response:
        return httpx.post(limited.url + "/predict", json={"inputs": images(1)}, headers=key("alpha"), timeout=30)

    started, passed = time.monotonic(), 0
    while True:
        before, sent = snapshot(r), time.monotonic()
        over = predict()
        if over.status_code != 200 or passed > BURST + 100:
            break
        passed += 1
    assert over.status_code == 429 and "rate limit" in detail_text(over), over.text
    assert BURST <= passed <= BURST + int((time.monotonic() - started) * RATE)  # the burst, plus any refill
    wait = float(re.search(r"retry in ([0-9.]+) s", detail_text(over)).group(1))
    assert 0 < wait <= 1 / RATE and 1 <= int(over.headers["retry-after"]) <= int(1 / RATE) + 1
    assert snapshot(r) == before  # refused before validation, batching or Redis
    label = httpx.post(limited.url + "/label", json={"id": RID, "label": 1}, headers=key("alpha"), timeout=30)
    # one bucket per client, shared by its routes: refused too, unless the machine was so slow it refilled meanwhile
    assert label.status_code == 429 or time.monotonic() - sent >= wait, label.text
    assert httpx.post(limited.url + "/predict", json={"inputs": images(1)}).status_code == 401  # no key: no bucket
    again = wait_until(lambda: (resp := predict()).status_code == 200 and resp, timeout=30, interval=0.25,
                       what="the bucket refills")
    assert again.json()["predictions"]


# ---------------------------------------------------------------------------------- worker
def test_the_worker_drops_feedback_of_disabled_clients(guarded: ApiProcess, store: ModelStore,
                                                      redis_proc: RedisProcess, r: redis.Redis) -> None:
    """Labels that beta gave while it was trusted are dropped as invalid once the worker disables it."""
    for client, seed in (("alpha", 10), ("beta", 11)):
        out = httpx.post(guarded.url + "/predict", json={"inputs": images(8, seed)}, headers=key(client)).json()
        res = httpx.post(guarded.url + "/label", headers=key(client), json={
            "labels": [{"id": p["id"], "label": i % CLASSES} for i, p in enumerate(out["predictions"])]})
        assert all(x["status"] == "ok" for x in res.json()["results"]), res.text
    by_client: dict[bytes | None, list[str]] = {}
    for eid, fields in r.xrange(KEYS.feedback):
        by_client.setdefault(fields.get(b"client"), []).append(eid.decode())
    assert len(by_client[b"beta"]) >= 8 and len(by_client[b"alpha"]) >= 8
    settings = WorkerSettings(redis_url=redis_proc.url, store_dir=store.root, models=[MODEL], consumer="hardening",
                              min_records=4, min_cohort=2, max_cohort_age=1000, disabled_clients=["beta"])
    rec = Reconciler(settings, store, r, MODEL)
    try:
        out = rec.run_once(force=True)
    finally:
        rec.close()
    assert out.published, out.reason
    assert out.stats["invalid_dropped"] == len(by_client[b"beta"])
    manifest = store.read_manifest(MODEL, out.version)
    assert manifest["reconciler"]["disabled_clients"] == ["beta"]  # the version says whose labels it refused
    assert sorted(manifest["inputs"]["dropped"]["entry_ids"]) == sorted(by_client[b"beta"])
    assert not set(manifest["inputs"]["entry_ids"]) & set(by_client[b"beta"])
    assert set(by_client[b"alpha"]) <= set(manifest["inputs"]["entry_ids"])


# ---------------------------------------------------------------------------------- fuzzing
@pytest.fixture
def leader(redis_proc: RedisProcess, store: ModelStore, r: redis.Redis, tmp_path: Path) -> Iterator[ChildProcess]:
    """The worker that answers the guarded replica's POST /admin/reconcile (the API runs no reconciler), with
    its disabled clients; it never reconciles by itself. Only for this test: the ones above run their own."""
    w = ChildProcess("worker", worker_args(redis_proc.url, store.root, MODEL, "fuzz", 100_000, "--disabled-clients",
                                           "gone", "--lease-ttl-ms", "10000"), tmp_path / "worker.log").start()

    def leads() -> bool:
        assert w.proc is not None and w.proc.poll() is None, w.log_tail()
        return r.get(KEYS.lock) is not None
    try:
        wait_until(leads, timeout=60, interval=0.05, what="the worker leads")
        yield w
    finally:
        w.stop()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(guarded: ApiProcess,
                                                                    leader: ChildProcess) -> None:
    """Every operation of the live /openapi.json (positive and negative data), plus /predict bodies of the
    model's shape and labels of the ids they got, without and with credentials."""
    credentials = {"none": {}, "keys": {**key("alpha"), **bearer(TOKEN)}}
    rows = fuzz_api(guarded.url, FUZZ_EXAMPLES, credentials, derandomize=True)
    table = summary(rows)
    assert {"POST /predict", "POST /label", "POST /admin/reconcile", "POST /admin/rollback",
            "GET /models/{name}"} <= {t["operation"] for t in table}
    assert sum(t["examples"] for t in table) >= 8 * FUZZ_EXAMPLES
    failures = [f"{r.operation} [{r.mode}, {r.auth}] {f}" for r in rows for f in r.failures]
    assert all(t["5xx"] == 0 and t["schema_violations"] == 0 for t in table), "\n\n".join(failures)
    statuses = {s for r in rows if r.operation == "POST /predict" and r.auth == "none" and r.mode == "positive"
                for s in r.statuses}
    assert statuses == {"401"}  # without a key, well-formed requests get no further than authentication
    shaped = {(r.operation, r.auth): r.statuses for r in rows if r.mode == "shaped"}
    assert shaped[("POST /predict", "keys")].get("200") and shaped[("POST /label", "keys")].get("200")
    assert set(shaped[("POST /predict", "none")]) == {"401"}


# ---------------------------------------------------------------------------------- settings, buckets (no server)
def test_api_keys_parse_from_flags_and_json_and_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from_args(["--api-keys", "client-a:secret-one, client-b:secret-two", "--disabled-clients",
                            "client-b,client-c", "--rate-limit-per-s", "2.5"])
    assert {k: v.get_secret_value() for k, v in s.api_keys.items()} == {"client-a": "secret-one",
                                                                       "client-b": "secret-two"}
    assert s.disabled_clients == ["client-b", "client-c"] and s.rate_limit_per_s == 2.5 and s.rate_limit_burst == 10
    assert "secret-one" not in repr(s) and "secret-one" not in str(s.model_dump())
    monkeypatch.setenv("MPSERVE_API_KEYS", '{"json-client": "json-secret"}')
    monkeypatch.setenv("MPSERVE_DISABLED_CLIENTS", "x1")
    env = ServerSettings()
    assert list(env.api_keys) == ["json-client"] and env.disabled_clients == ["x1"]
    assert WorkerSettings().disabled_clients == ["x1"]
    monkeypatch.delenv("MPSERVE_API_KEYS")
    assert ServerSettings().api_keys == {}  # unset: /predict and /label stay open
    for bad in ("a:short", "a:same-secret,b:same-secret", "no-colon-secret", "bad name:long-enough-secret",
                "a:with space secret", '{"a": 5}'):
        with pytest.raises(ValueError):
            settings_from_args(["--api-keys", bad])
    with pytest.raises(ValueError):
        settings_from_args(["--disabled-clients", "../x"])


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = [100.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)  # empty: one token every 1/rate seconds
    assert bucket.take("b") == 0.0  # buckets are per client
    now[0] += 0.25
    assert bucket.take("a") == pytest.approx(0.25)  # half a token refilled: a refusal spends nothing
    now[0] += 0.25
    assert bucket.take("a") == 0.0 and bucket.take("a") > 0
    now[0] += 1000
    takes = [bucket.take("a") for _ in range(4)]
    assert takes[:3] == [0.0, 0.0, 0.0] and takes[3] > 0  # the refill is capped at the burst
