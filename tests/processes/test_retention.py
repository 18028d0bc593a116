"""Retention (issue #9): the store keeps exactly what the rule says, and the worker, the API and the metrics agree.

The property test drives a real ModelStore over random stores; the HTTP test runs a real worker process and a
real API replica on a real redis-server, with a small ``keep_versions``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from model_store import ModelStore, make_manifest
from mpserve.cli import app
from mpserve.client import MPServeClient, MPServeError
from redis_io.keys import ModelKeys
from redis_io.recordlog import RecordLog
from tests.helpers import (
    ApiProcess,
    ChildProcess,
    RedisProcess,
    api_args,
    make_store,
    metric,
    wait_until,
    worker_args,
)

MODEL = "fashion"
TINY = {"w": np.zeros(2, np.float32)}
# tmpfs where there is one: the store fsyncs every file, and on a busy disk that, not retention, is the cost
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def write_tiny(store: ModelStore, version: int, parent: int | None) -> None:
    manifest = make_manifest(version=version, parent=parent, model=MODEL, architecture={"name": "tiny", "config": {}},
                             seeds=[[0, 1]], probe_scale=0.01, learning_rate=0.1)
    store.write_version(MODEL, version, TINY, manifest)


@st.composite
def stores(draw: st.DrawFn) -> dict[str, object]:
    """Versions with gaps (earlier deletions), random parents (some missing, some roots), and the arguments."""
    versions = sorted(draw(st.sets(st.integers(0, 24), max_size=12)))
    parents = {v: draw(st.none() | st.integers(0, v - 1)) if v else None for v in versions}
    return {
        "parents": parents,
        "keep_last": draw(st.integers(0, 15)),
        "protect": draw(st.sets(st.integers(0, 26), max_size=4)),
        "pins": draw(st.sets(st.sampled_from(versions), max_size=3)) if versions else set(),
        "pinned": draw(st.sets(st.integers(0, 26), max_size=3)),
    }


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(stores())
def test_retention_keeps_exactly_the_rule_and_returns_what_it_deleted(case: dict) -> None:
    parents: dict[int, int | None] = case["parents"]
    keep_last, protect, pins, pinned = case["keep_last"], case["protect"], case["pins"], case["pinned"]
    versions = sorted(parents)
    # The rule, spelt independently of the implementation.
    newest = {v for v in versions if sum(w > v for w in versions) < keep_last}
    roots = {v for v in versions if parents[v] is None}
    protected_parents = {parents[v] for v in protect if parents.get(v) is not None}
    kept = set(versions) & (newest | protect | protected_parents | roots | pins | pinned)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        store = ModelStore(tmp)
        for v in versions:
            write_tiny(store, v, parents[v])
        for v in pins:
            store.pin(MODEL, v)
        deleted = store.apply_retention(MODEL, keep_last, protect, pinned)
        assert deleted == sorted(set(versions) - kept)
        assert store.versions(MODEL) == sorted(kept)
        on_disk = sorted(p.name for p in (Path(tmp) / MODEL / "versions").glob("*")) if versions else []
        assert on_disk == sorted(f"{v:08d}.{ext}" for v in kept for ext in ("json", "safetensors"))
        assert store.pins(MODEL) == sorted(pins)
        assert store.apply_retention(MODEL, keep_last, protect, pinned) == []  # what is left is all needed


# ------------------------------------------------------------------------------------------ over HTTP
TOKEN = "retention-admin-token"
KEEP = 3


@pytest.mark.slow
def test_retention_over_http_keeps_the_base_the_pins_and_counts_deletions(
        redis_server: RedisProcess, redis_client: redis.Redis, tmp_path: Path) -> None:
    """A real worker (keep_versions 3, --pin-versions 1) and API; an admin pins 2; nine publishes follow."""
    store = make_store(tmp_path / "store", model=MODEL)
    keys = ModelKeys(MODEL)
    worker = ChildProcess("worker", worker_args(redis_server.url, store.root, MODEL, "w1", 100_000, "--keep-versions",
                                                str(KEEP), "--max-cohort-age", "0", "--pin-versions", "1"),
                          tmp_path / "worker.log")
    api = ApiProcess(api_args(redis_server.url, store.root, "--admin-token", TOKEN), tmp_path / "api.log")
    rng = np.random.default_rng(0)
    try:
        worker.start()
        api.start()
        api.wait_ready()
        wait_until(lambda: redis_client.get(keys.lock), timeout=60, what="the worker leads")
        with MPServeClient(api.url, admin_token=TOKEN, timeout=60) as client:
            for v in range(1, 10):
                x = rng.integers(0, 256, size=(8, 1, 28, 28)).astype(np.float32)
                assert client.predict(x, labels=rng.integers(0, 10, 8))["version"] == v - 1
                assert client.reconcile()["version"] == v
                wait_until(lambda v=v: client.model(MODEL)["version"] == v, timeout=20, what=f"serving {v}")
                if v == 2:
                    cli = CliRunner().invoke(app, ["pin", "2", "--url", api.url, "--token", TOKEN])
                    assert cli.exit_code == 0 and json.loads(cli.output)["pinned"] == [2], cli.output
            assert RecordLog(redis_client, MODEL).history()[-1]["owner"].startswith("w1")  # the worker published

            # newest 3 (7, 8, 9; 8 is also the parent of serving 9), the root 0, pinned 1 (worker) and 2 (admin)
            assert store.versions(MODEL) == [0, 1, 2, 7, 8, 9]
            assert "retention deleted 1 versions [6]" in worker.log_tail(20_000)
            text = client.metrics()
            assert metric(text, "mpserve_retention_deleted_versions_total", model=MODEL) == 4  # 3, 4, 5, 6
            assert metric(text, "mpserve_stored_versions", model=MODEL) == 6
            assert "# TYPE mpserve_retention_deleted_versions_total counter" in text

            listing = client.versions(MODEL)
            assert listing["pinned"] == [2]
            assert {row["version"]: row["pinned"] for row in listing["versions"]} == {
                0: False, 1: False, 2: True, 7: False, 8: False, 9: False}

            # bad pins: a clear 4xx, and the pin file is unchanged
            for call, status in ((lambda: client.pin(3), 404), (lambda: client.pin(10), 404),
                                 (lambda: client.pin(0, model="digits"), 404)):
                with pytest.raises(MPServeError) as err:
                    call()
                assert err.value.status == status
            assert httpx.post(f"{api.url}/admin/versions/-1/pin", headers={"Authorization": f"Bearer {TOKEN}"}
                              ).status_code == 422
            assert httpx.post(f"{api.url}/admin/versions/0/pin").status_code == 401
            assert store.pins(MODEL) == [2]
            assert client.pin(0) == {"model": MODEL, "version": 0, "pinned": [0, 2]}
            assert client.unpin(0) == {"model": MODEL, "version": 0, "pinned": [2]}

            # the shipped base survived every update: roll back to it
            assert client.rollback(0) == {"model": MODEL, "version": 0, "previous": 9}
            wait_until(lambda: client.model(MODEL)["version"] == 0, timeout=20, what="serving 0 again")
            x = rng.integers(0, 256, size=(1, 1, 28, 28)).astype(np.float32)
            assert client.predict(x)["version"] == 0
    finally:
        api.stop()
        worker.stop()
