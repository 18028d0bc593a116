"""The reconciler worker against a real redis-server and a real model store (tests.helpers.make_store).

In-process tests drive ``Reconciler.run_once`` directly; the failover test runs two ``python -m worker``
processes and kills the leader. Crashes at each step of a reconciliation are in tests/processes/test_faults.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydantic
import pytest
import redis

from common.loading import load_version, version_sources
from marketplace.head import HeadReplay, known_damping, replay_head_gradient
from marketplace.reconcile import ReconcileConfig, Records, VersionSeeds, cross_entropy
from marketplace.update import UpdateConfig, class_loss_gap, propose_update
from model_store import ModelStore
from model_store.holdout import encode_holdout
from redis_io.admin_queue import NoLeader, ReconcileTimeout, ask_leader
from redis_io.fenced import fenced_ack
from redis_io.keys import ModelKeys
from redis_io.protocol import PredictionRecord, StaleLeaderError
from redis_io.recordlog import RecordLog
from tests.helpers import (
    ApiProcess,
    ChildProcess,
    ModelLog,
    RedisProcess,
    api_args,
    feed_labels,
    make_store,
    numpy_mlp,
    pending_ids,
    wait_until,
    worker_args,
)
from worker.guard import judged_only
from worker.main import build_settings, check_learn_groups
from worker.reconciler import Reconciler
from worker.settings import WorkerSettings

MODEL = "fashion"
K = ModelKeys(MODEL)
GROUPS, VENDORS, CLASSES = 2, 4, 10  # make_store's mlp(hidden=(32,)) with 4 vendors
_rng = np.random.default_rng(1234)  # feed()'s records; seeded afresh for each test (see _seeded_feed)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _seeded_feed() -> None:
    """Each test's fed records come from the same seed, whichever tests ran before it (or did not)."""
    global _rng
    _rng = np.random.default_rng(1234)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return make_store(tmp_path / "store", model=MODEL, vendors=VENDORS)


def make_settings(redis_server: RedisProcess, store: ModelStore, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = dict(
        redis_url=redis_server.url, store_dir=store.root, models=[MODEL], consumer="w1", min_records=32,
        min_cohort=8, interval_s=3600, poll_ms=20, lease_ttl_ms=10_000, claim_idle_ms=60_000)
    values.update(overrides)
    return WorkerSettings(**values)


def feed(client: redis.Redis, n: int, version: int = 0, now_ms: int | None = None) -> list[str]:
    """Write n labelled predictions served by ``version`` on random paths; returns their stream entry ids."""
    return feed_labels(client, MODEL, n, version, now_ms, rng=_rng, groups=GROUPS, vendors=VENDORS, classes=CLASSES)


def pending(client: redis.Redis) -> list[str]:
    return pending_ids(client, MODEL)


def version_key(client: redis.Redis) -> int | None:
    raw = client.get(K.version)
    return None if raw is None else int(raw)


def published_versions(client: redis.Redis) -> list[int]:
    return [h["version"] for h in RecordLog(client, MODEL).history() if h["type"] == "publish"]


def read_holdout_bytes(path: Path) -> bytes:
    """The bytes whose sha256 names an .npz holdout: its arrays as the store would keep them."""
    with np.load(path, allow_pickle=False) as npz:
        return encode_holdout(npz["inputs"], npz["labels"])


def used_ids(store: ModelStore, version: int) -> list[str]:
    return store.read_manifest(MODEL, version)["inputs"]["entry_ids"]


# ------------------------------------------------------------------------------------------ settings


def test_flags_override_env_and_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPSERVE_MIN_RECORDS", "7")
    monkeypatch.setenv("MPSERVE_MODELS", "alpha,beta")
    from_env = build_settings([])
    assert (from_env.min_records, from_env.models) == (7, ["alpha", "beta"])
    s = build_settings(["--min-records", "5", "--outlier", "zscore", "--class-weights", "--models", "gamma"])
    assert (s.min_records, s.outlier, s.class_weights, s.models) == (5, "zscore", True, ["gamma"])
    assert s.reconcile_config().outlier == "zscore"
    learning = build_settings(["--antithetic", "--momentum", "0.5", "--baseline", "class", "--lr-schedule", "loss_gap",
                               "--holdout-path", "h.npz", "--guard-tolerance", "0.05", "--guard-reference", "parent"])
    assert (learning.antithetic, learning.reconcile_config().baseline, str(learning.holdout_path)) == (
        True, "class", "h.npz")
    assert learning.update_config() == UpdateConfig(momentum=0.5, lr_schedule="loss_gap")
    assert (learning.guard_tolerance, learning.guard_reference) == (0.05, "parent")
    with pytest.raises(pydantic.ValidationError):
        build_settings(["--momentum", "1.0"])  # β < 1, or the steps never shrink
    with pytest.raises(pydantic.ValidationError):
        WorkerSettings(poll_ms=5000, lease_ttl_ms=10_000)  # a blocking read would outlive the renewal
    with pytest.raises(SystemExit):
        build_settings(["--outlier", "bogus"])


# ------------------------------------------------------------------------------------------ run_once


def test_run_once_publishes_records_inputs_and_acks_exactly_them(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.reconciler")
    ids = feed(redis_client, 40)
    # the fed losses are random, unrelated to the paths: shrinkage would (rightly) find no evidence and move nothing
    rec = Reconciler(make_settings(redis_server, store, shrink=False), store, redis_client, MODEL)
    out = rec.run_once()
    later = feed(redis_client, 5)  # written after the reconciliation: not part of it
    rec.close()

    assert (out.published, out.version, out.parent, out.reason) == (True, 1, 0, None)
    assert out.stats["records"] == 40 and out.stats["stale_dropped"] == 0
    assert version_key(redis_client) == 1
    m = store.read_manifest(MODEL, 1)
    assert m["parent"] == 0 and m["records"] == 40 and m["stale_dropped"] == 0
    assert m["inputs"]["entry_ids"] == ids
    assert (m["inputs"]["entries"], m["inputs"]["first_entry"], m["inputs"]["last_entry"]) == (40, ids[0], ids[-1])
    assert m["inputs"]["entry_ids_sha256"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()
    assert m["reconciler"]["min_records"] == 32 and m["reconciler"]["learning_rate"] == WorkerSettings().learning_rate
    assert m["loss"]["mean"] == pytest.approx(out.stats["loss_mean"])
    assert pending(redis_client) == []  # every used entry acknowledged...
    assert RecordLog(redis_client, MODEL).stream_stats().undelivered == 5  # ...and nothing else touched
    assert set(later).isdisjoint(ids)
    hist = RecordLog(redis_client, MODEL).history()[-1]
    assert (hist["version"], hist["parent"], hist["entries"]) == (1, 0, 40)
    p0, _ = store.read_version(MODEL, 0)
    p1, _ = store.read_version(MODEL, 1)
    assert any(not np.array_equal(p0[k], p1[k]) for k in p0)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("reconciled "))
    assert "model=fashion version=1 parent=0 records=40 cohorts=1" in line and "loss_mean=" in line
    assert redis_client.get(K.lock) is None  # close() released the lease


def test_too_few_records_publishes_and_acks_nothing_and_survives_a_restart(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    settings = make_settings(redis_server, store, consumer="same")
    ids = feed(redis_client, 10)
    rec = Reconciler(settings, store, redis_client, MODEL)
    out = rec.run_once()
    assert (out.published, out.version, out.reason) == (False, None, "too few records: have 10, need 32")
    assert version_key(redis_client) is None and store.versions(MODEL) == [0]
    assert sorted(pending(redis_client)) == sorted(ids)  # read, still pending: a crash loses nothing
    rec.close()

    small = feed(redis_client, 5, version=0)  # 15 in the cohort now; force needs min_cohort=8: enough
    again = Reconciler(settings, store, redis_client, MODEL)  # same consumer: recovers its own pending entries
    out = again.run_once(force=True)
    again.close()
    assert out.published and used_ids(store, out.version) == ids + small
    assert pending(redis_client) == []

    feed(redis_client, 3)
    out = Reconciler(settings, store, redis_client, MODEL).run_once(force=True)
    assert (out.published, out.reason) == (False, "too few records: have 0, need 8")


def test_small_cohort_is_held_back_and_expired_one_dropped(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    rec = Reconciler(make_settings(redis_server, store, label_window_s=60), store, redis_client, MODEL)
    feed(redis_client, 40)
    assert rec.run_once().version == 1
    fresh_v1 = feed(redis_client, 20, version=1)
    held = feed(redis_client, 4, version=0)
    old = feed(redis_client, 3, version=0, now_ms=time.time_ns() // 1_000_000 - 120_000)  # beyond the window
    out = rec.run_once(force=True)

    assert out.published and out.version == 2 and out.parent == 1
    assert (out.stats["records"], out.stats["held_back"], out.stats["expired_dropped"]) == (20, 4, 3)
    assert sorted(pending(redis_client)) == sorted(held)  # exactly the held-back cohort stays pending
    m = store.read_manifest(MODEL, 2)
    assert m["inputs"]["entry_ids"] == fresh_v1 and m["inputs"]["dropped"]["entry_ids"] == old
    assert [c["version"] for c in m["cohorts"]] == [1]


def test_stale_and_rolled_back_cohorts_are_dropped_and_counted(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    rec = Reconciler(make_settings(redis_server, store, max_cohort_age=1), store, redis_client, MODEL)
    feed(redis_client, 40, version=0)
    assert rec.run_once().version == 1
    feed(redis_client, 40, version=1)
    assert rec.run_once().version == 2
    too_old = feed(redis_client, 20, version=0)  # two steps back from 2: beyond max_cohort_age=1
    unknown = feed(redis_client, 10, version=9)  # not in the lineage at all
    fresh = feed(redis_client, 32, version=2)
    out = rec.run_once()
    assert (out.published, out.version, out.stats["records"], out.stats["stale_dropped"]) == (True, 3, 32, 30)
    m = store.read_manifest(MODEL, 3)
    assert m["stale_dropped"] == 30 and m["inputs"]["entry_ids"] == fresh
    assert sorted(m["inputs"]["dropped"]["entry_ids"]) == sorted(too_old + unknown)
    assert RecordLog(redis_client, MODEL).history()[-1]["stale_dropped"] == 30
    assert pending(redis_client) == []  # dropped entries were acknowledged with the publish

    ModelLog(redis_client, MODEL).rollback(1, {"reason": "test"})
    branch = feed(redis_client, 20, version=3)  # served by the rolled-back branch
    on_line = feed(redis_client, 32, version=1)
    out = rec.run_once()
    assert (out.version, out.parent, out.stats["stale_dropped"], out.stats["records"]) == (4, 1, 20, 32)
    assert used_ids(store, 4) == on_line and store.lineage(MODEL, 4) == [4, 1, 0]
    assert store.read_manifest(MODEL, 4)["inputs"]["dropped"]["entry_ids"] == branch


def test_invalid_entries_are_dropped_instead_of_blocking_reconciliation(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    good = feed(redis_client, 32)
    zeros = np.zeros(CLASSES, np.float32)
    ModelLog(redis_client, MODEL).write_predictions([
        PredictionRecord("bad-vendor", 0, (0, VENDORS), zeros, label=1, loss=0.5),
        PredictionRecord("bad-groups", 0, (0, 1, 2), zeros, label=1, loss=0.5),
        PredictionRecord("bad-label", 0, (0, 1), zeros, label=CLASSES, loss=0.5),
    ])
    bad = [eid.decode() for eid, _ in redis_client.xrange(K.feedback)][-3:]
    out = Reconciler(make_settings(redis_server, store), store, redis_client, MODEL).run_once()
    assert out.published and out.stats["invalid_dropped"] == 3 and out.stats["records"] == 32
    m = store.read_manifest(MODEL, out.version)
    assert m["inputs"]["entry_ids"] == good and m["inputs"]["dropped"]["entry_ids"] == bad
    assert pending(redis_client) == []


def test_a_buffer_full_of_stale_entries_is_acked_under_the_fence(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    settings = make_settings(redis_server, store, max_records_per_reconcile=32)
    feed(redis_client, 40, version=9)
    rec = Reconciler(settings, store, redis_client, MODEL)
    out = rec.run_once()
    assert not out.published and out.stats["acked_without_publish"] == 32 and out.stats["stale_dropped"] == 32
    assert pending(redis_client) == [] and RecordLog(redis_client, MODEL).stream_stats().undelivered == 8
    out = rec.run_once()  # 8 stale entries, buffer not full: they wait for a publish
    assert "acked_without_publish" not in out.stats and len(pending(redis_client)) == 8
    assert version_key(redis_client) is None and store.versions(MODEL) == [0]


def test_fenced_ack_refuses_a_stale_token_and_a_moved_version(redis_client: redis.Redis) -> None:
    log = RecordLog(redis_client, MODEL)
    log.ensure_group()
    ids = feed(redis_client, 3)
    log.read_feedback("w", 10)
    old = log.acquire_lease("a", 10_000)
    redis_client.delete(K.lock)
    new = log.acquire_lease("b", 10_000)
    with pytest.raises(StaleLeaderError):
        fenced_ack(redis_client, K, "reconciler", old, None, ids)
    assert fenced_ack(redis_client, K, "reconciler", new, 5, ids) is None  # serving is not at version 5
    assert len(pending(redis_client)) == 3
    assert fenced_ack(redis_client, K, "reconciler", new, None, ids[:2]) == 2
    assert pending(redis_client) == ids[2:]


def test_idle_entries_of_another_consumer_are_reclaimed(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    rec = Reconciler(make_settings(redis_server, store, claim_idle_ms=50), store, redis_client, MODEL)
    assert rec.run_once().reason == "too few records: have 0, need 32"  # leader, group created
    ids = feed(redis_client, 10)
    # A stale leader that had not noticed yet reads them under its own consumer name.
    RecordLog(redis_client, MODEL).read_feedback("ghost", 10)
    assert sorted(pending(redis_client)) == sorted(ids)
    out = wait_until(lambda: (o := rec.run_once(force=True)).published and o, timeout=5, interval=0.02,
                     what="the leader reclaims the ghost's entries")
    assert used_ids(store, out.version) == ids and pending(redis_client) == []


def test_a_rollback_during_reconciliation_is_not_undone(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.reconciler as reconciler_module

    rec = Reconciler(make_settings(redis_server, store), store, redis_client, MODEL)
    feed(redis_client, 40)
    first = rec.run_once()
    assert first.published
    base, planned_on = first.parent, first.version
    on_new = feed(redis_client, 40, version=planned_on)

    def admin_rolls_back(name: str) -> None:  # lands after the worker planned on `planned_on`
        if name == "after_store_write":
            ModelLog(redis_client, MODEL).rollback(base, {"by": "admin"})

    monkeypatch.setattr(reconciler_module, "fault_point", admin_rolls_back)
    out = rec.run_once()
    monkeypatch.undo()
    assert not out.published and out.reason.startswith("version moved") and rec.is_leader
    garbage = max(store.versions(MODEL))
    assert garbage > planned_on  # written, never published
    assert version_key(redis_client) == base  # the rollback stands
    assert RecordLog(redis_client, MODEL).history()[-1]["type"] == "rollback"
    assert published_versions(redis_client) == [planned_on]
    assert sorted(pending(redis_client)) == sorted(on_new)  # nothing acknowledged

    on_base = feed(redis_client, 32, version=base)
    out = rec.run_once()  # plans again, from the rolled-back version
    assert out.published and out.parent == base and version_key(redis_client) == out.version
    assert used_ids(store, out.version) == on_base and out.stats["stale_dropped"] == 40
    assert store.lineage(MODEL, out.version)[:2] == [out.version, base]
    assert pending(redis_client) == []


def test_retention_after_each_publish_keeps_what_cohorts_and_rollbacks_need(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    """Reconciler._retain with keep_versions=1: after publishing n on n-1 it keeps n and n-1, the versions the
    reconciliation's cohorts could come from (n-1 back max_cohort_age steps), the parent of each of those
    (momentum and rollbacks read them), the root and the worker's pins; and counts what it deleted."""
    age, pinned = 2, 1
    rec = Reconciler(make_settings(redis_server, store, keep_versions=1, max_cohort_age=age, pin_versions=[pinned]),
                     store, redis_client, MODEL)
    deleted: set[int] = set()
    for n in range(1, 9):
        feed(redis_client, 32, version=n - 1)
        assert rec.run_once().version == n
        cohort_window = {max(n - 1 - k, 0) for k in range(age + 1)}  # the lineage is straight: v's parent is v-1
        protected = {n, n - 1} | cohort_window
        kept = protected | {v - 1 for v in protected if v > 0} | {0, pinned}
        deleted |= set(range(n + 1)) - kept
        assert store.versions(MODEL) == sorted(kept), n
    assert deleted == {2, 3} and ModelLog(redis_client, MODEL).retention_deleted_total() == 2
    rec.close()


# ------------------------------------------------------------------------------------------ validation guard


_served_ids = itertools.count()


def feed_served(client: redis.Redis, n: int, version: int, seed: int) -> dict[str, PredictionRecord]:
    """n labelled predictions with real logits (about half of them right): entry id -> the record."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, CLASSES)).astype(np.float32)
    labels = np.where(rng.random(n) < 0.5, logits.argmax(1), rng.integers(0, CLASSES, n))
    loss = cross_entropy(logits, labels)
    records = [PredictionRecord(f"s{next(_served_ids)}", version,
                                tuple(int(v) for v in rng.integers(0, VENDORS, GROUPS)),
                                logits[i], label=int(labels[i]), loss=float(loss[i])) for i in range(n)]
    ModelLog(client, MODEL).write_predictions(records)
    ids = [eid.decode() for eid, _ in reversed(client.xrevrange(K.feedback, count=n))]
    return dict(zip(ids, records, strict=True))


def holdout_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28)).astype(np.float32)


def evaluate(store: ModelStore, version: int, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on (x, y), by an independent NumPy forward (not the engine)."""
    loaded = load_version(store, MODEL, version)
    logits = numpy_mlp(loaded.spec, loaded.params, x)
    return float(np.mean(logits.argmax(1) == y)), float(np.mean(cross_entropy(logits, y)))


def test_guard_records_metrics_validation_momentum_and_follows_a_new_upload(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    spec = load_version(store, MODEL, 0).spec
    x1 = holdout_images(200, 1)
    base_pred = numpy_mlp(spec, store.read_version(MODEL, 0)[0], x1).argmax(1)
    y1 = np.where(np.arange(200) % 2 == 0, base_pred, np.random.default_rng(2).integers(0, CLASSES, 200))
    h1 = store.write_holdout(MODEL, x1, y1)
    configured = tmp_path / "configured.npz"  # an operator's file: the upload takes precedence over it
    np.savez(configured, inputs=holdout_images(50, 3), labels=np.zeros(50, np.int64))
    settings = make_settings(redis_server, store, momentum=0.5, guard_tolerance=0.5, holdout_path=configured,
                             guard_class_tolerance=0.5, step="unit", learning_rate=0.5, learn_groups="all",
                             version_seed=0)  # the update follows the versions' seeds: fixed, it is the same every run
    # (unit steps: the momentum term is as large as a step; spread over every group, as this test was sized)
    rec = Reconciler(settings, store, redis_client, MODEL)

    fed = feed_served(redis_client, 40, 0, seed=10)
    out = rec.run_once()
    assert (out.published, out.version) == (True, 1), out.reason
    m1 = store.read_manifest(MODEL, 1)
    used = [fed[i] for i in m1["inputs"]["entry_ids"]]
    assert len(used) == 40
    acc0, _ = evaluate(store, 0, x1, y1)
    acc1, loss1 = evaluate(store, 1, x1, y1)
    v = m1["validation"]
    assert (v["holdout_sha256"], v["size"], v["accepted"], v["reference"]) == (h1.sha256, 200, True, "anchor")
    assert v["accuracy"] == acc1 and v["loss"] == pytest.approx(loss1, rel=1e-4)
    assert v["parent_accuracy"] == acc0 and v["anchor_accuracy"] == acc0 and v["reference_accuracy"] == acc0
    assert v["tolerance"] == 0.5
    loaded1 = load_version(store, MODEL, 1)
    right1 = numpy_mlp(loaded1.spec, loaded1.params, x1).argmax(1) == y1
    assert v["class_accuracy"] == pytest.approx([float(np.mean(right1[y1 == c])) if (y1 == c).any() else None
                                                 for c in range(CLASSES)])
    assert v["anchor_class_accuracy"] == v["parent_class_accuracy"] and v["class_tolerance"] == 0.5
    metrics = m1["metrics"]
    assert metrics["online_loss"] == pytest.approx(np.mean([r.loss for r in used]), rel=1e-6)
    hits = [int(np.argmax(r.logits)) == r.label for r in used]
    assert 0 < sum(hits) < 40 and metrics["online_accuracy"] == pytest.approx(np.mean(hits))
    assert (metrics["validation_accuracy"], metrics["validation_loss"]) == (v["accuracy"], v["loss"])
    assert (metrics["holdout_size"], metrics["records"]) == (200, 40)
    assert RecordLog(redis_client, MODEL).history()[-1]["metrics"] == metrics

    # momentum: the second step repeats half of the first, on top of its own reconciled step
    fed = feed_served(redis_client, 40, 1, seed=11)
    out = rec.run_once()
    assert (out.published, out.version) == (True, 2), out.reason
    m2 = store.read_manifest(MODEL, 2)
    used = [fed[i] for i in m2["inputs"]["entry_ids"]]
    p0, p1, p2 = (store.read_version(MODEL, n)[0] for n in (0, 1, 2))
    records = Records(np.array([r.version for r in used]), np.array([r.path for r in used]),
                      np.array([r.loss for r in used]), np.array([r.label for r in used]))
    plain = propose_update(spec, p1, records, version_sources(store, MODEL, [1]), settings.reconcile_config(),
                           UpdateConfig())
    for k in p0:
        expected = plain.params[k].astype(np.float64) + 0.5 * (p1[k].astype(np.float64) - p0[k])
        np.testing.assert_allclose(p2[k], expected, rtol=0, atol=1e-5)
    assert np.abs(p2["0.fc.weight"] - plain.params["0.fc.weight"]).max() > 1e-3  # the momentum term is real
    # the anchor is carried forward: v0's accuracy, not v1's
    v = m2["validation"]
    acc2, _ = evaluate(store, 2, x1, y1)
    assert (v["anchor_accuracy"], v["parent_accuracy"], v["accuracy"]) == (acc0, m1["validation"]["accuracy"], acc2)

    # a new upload: the next version is validated on it, and its anchor starts over at the parent
    x2 = holdout_images(120, 4)
    y2 = np.random.default_rng(5).integers(0, CLASSES, 120)
    h2 = store.write_holdout(MODEL, x2, y2)
    assert h2.sha256 != h1.sha256
    feed_served(redis_client, 40, 2, seed=12)
    out = rec.run_once()
    assert (out.published, out.version) == (True, 3), out.reason
    v = store.read_manifest(MODEL, 3)["validation"]
    acc2_new, _ = evaluate(store, 2, x2, y2)
    assert (v["holdout_sha256"], v["size"]) == (h2.sha256, 120)
    assert v["parent_accuracy"] == acc2_new and v["anchor_accuracy"] == acc2_new
    rec.close()


def test_guard_refuses_a_harmful_candidate_and_acks_its_entries(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    spec = load_version(store, MODEL, 0).spec
    x = holdout_images(200, 6)
    y = numpy_mlp(spec, store.read_version(MODEL, 0)[0], x).argmax(1)  # what v0 says: it scores (about) 1.0
    configured = tmp_path / "holdout.npz"
    np.savez(configured, inputs=x, labels=y)
    settings = make_settings(redis_server, store, holdout_path=configured, learning_rate=50.0, guard_tolerance=0.0,
                             reseed_on_refusal=False, step="unit")  # a unit step of 50: harmful by construction
    rec = Reconciler(settings, store, redis_client, MODEL)
    fed = feed_served(redis_client, 40, 0, seed=20)
    out = rec.run_once()
    assert not out.published and out.version is None and out.parent == 0
    assert out.reason.startswith("candidate refused by the validation guard: holdout accuracy")
    assert version_key(redis_client) is None and store.versions(MODEL) == [0]  # nothing written or published
    assert pending(redis_client) == []  # the entries were used: acknowledged
    refused = RecordLog(redis_client, MODEL).history()[-1]
    assert (refused["type"], refused["version"], refused["parent"], refused["records"]) == ("refused", 0, 0, 40)
    acc0, _ = evaluate(store, 0, x, y)
    v = refused["validation"]
    assert v["accepted"] is False and v["reference_accuracy"] == acc0 == v["parent_accuracy"]
    assert v["accuracy"] < acc0 and v["tolerance"] == 0.0
    assert v["holdout_sha256"] == hashlib.sha256(read_holdout_bytes(configured)).hexdigest()
    assert refused["metrics"]["validation_accuracy"] == v["accuracy"] and refused["metrics"]["records"] == 40
    assert refused["metrics"]["online_loss"] == pytest.approx(np.mean([r.loss for r in fed.values()]), rel=1e-6)
    assert out.stats["metrics"] == refused["metrics"]
    rec.close()

    # the same through the admin request to a leading worker: no publish, the guard's reason
    feed_served(redis_client, 20, 0, seed=21)  # below min_records: only the forced reconciliation uses them
    with leading(Reconciler(settings, store, redis_client, MODEL), redis_client):
        answer = ask_leader(redis_client, MODEL, timeout_s=30)
    assert answer["published"] is False and "validation guard" in answer["reason"]
    assert version_key(redis_client) is None and pending(redis_client) == []
    assert [h["type"] for h in RecordLog(redis_client, MODEL).history()] == ["refused", "refused"]


def keep_replay(client: redis.Redis, store: ModelStore, n: int, kept: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """n labelled predictions whose inputs the API kept (the newest ``kept`` stay in the replay stream), labelled
    with what version 0 answers, so version 0 is right on every one; returns the inputs and labels."""
    x = holdout_images(n, seed)
    y = numpy_mlp(load_version(store, MODEL, 0).spec, store.read_version(MODEL, 0)[0], x).argmax(1)
    logits = np.zeros((n, CLASSES), np.float32)
    ModelLog(client, MODEL, replay_size=kept).write_predictions(
        [PredictionRecord(f"r{seed}-{i}", 0, (0,) * GROUPS, logits[i], label=int(y[i]), loss=float(np.log(CLASSES)),
                          kept_input=x[i]) for i in range(n)])
    return x[-kept:], y[-kept:]


def test_guard_refuses_a_candidate_that_serves_recent_traffic_worse_than_the_frozen_anchor(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    """The holdout check is set to accept anything; the recent inputs the API kept refuse a harmful candidate,
    and with the traffic check off the same candidate is published."""
    configured = tmp_path / "holdout.npz"
    np.savez(configured, inputs=holdout_images(50, 8), labels=np.zeros(50, np.int64))
    keep_replay(redis_client, store, 200, 150, seed=9)
    harmful = dict(holdout_path=configured, guard_tolerance=1.0, guard_class_tolerance=1.0, learning_rate=50.0,
                   step="unit", reseed_on_refusal=False)
    rec = Reconciler(make_settings(redis_server, store, **harmful), store, redis_client, MODEL)
    feed_served(redis_client, 40, 0, seed=40)
    out = rec.run_once()
    assert not out.published and "recent labelled inputs" in (out.reason or ""), out.reason
    traffic = RecordLog(redis_client, MODEL).history()[-1]["validation"]["traffic"]
    assert (traffic["size"], traffic["anchor_version"], traffic["anchor_accuracy"]) == (150, 0, 1.0)
    assert traffic["accuracy"] < 0.9 and traffic["accepted"] is False
    rec.close()
    off = Reconciler(make_settings(redis_server, store, guard_traffic=False, **harmful), store, redis_client, MODEL)
    feed_served(redis_client, 40, 0, seed=41)
    out = off.run_once()
    assert (out.published, out.version) == (True, 1), out.reason
    assert "traffic" not in store.read_manifest(MODEL, 1)["validation"]
    off.close()


def test_guard_refuses_a_step_that_does_not_pay_for_itself_on_recent_traffic(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A step too small to change any answer holds every tolerance, and is refused for gaining nothing on the kept
    inputs it did not learn from; the refusal records the paired figures and is logged as routine (INFO), not as a
    fault. Without a gain asked for it publishes."""
    configured = tmp_path / "holdout.npz"
    np.savez(configured, inputs=holdout_images(50, 8), labels=np.zeros(50, np.int64))
    keep_replay(redis_client, store, 300, 300, seed=12)
    still = dict(holdout_path=configured, head_gradient="replay", head_replay_learning_rate=1e-12, guard_tolerance=1.0,
                 guard_class_tolerance=1.0, guard_traffic_tolerance=1.0, reseed_on_refusal=False)
    rec = Reconciler(make_settings(redis_server, store, **still), store, redis_client, MODEL)
    feed_served(redis_client, 40, 0, seed=42)
    with caplog.at_level(logging.INFO, logger="worker.reconciler"):
        out = rec.run_once()
    assert not out.published and "no gain on" in (out.reason or "") and "pay for itself" in (out.reason or "")
    refusals = [r for r in caplog.records if "refused by the validation guard" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.INFO]
    traffic = RecordLog(redis_client, MODEL).history()[-1]["validation"]["traffic"]
    assert (traffic["gain_z"], traffic["gain_needed"], traffic["accepted"]) == (0.0, 2.0, False)
    assert traffic["loss"] == traffic["parent_loss"] and traffic["accuracy"] == traffic["anchor_accuracy"] == 1.0
    assert 100 < traffic["size"] < 200  # the kept inputs' judged side
    rec.close()
    free = Reconciler(make_settings(redis_server, store, guard_traffic_gain_z=0.0, **still), store, redis_client,
                      MODEL)
    feed_served(redis_client, 40, 0, seed=43)
    out = free.run_once()
    assert (out.published, out.version) == (True, 1), out.reason
    assert "gain_z" not in store.read_manifest(MODEL, 1)["validation"]["traffic"]
    free.close()


def test_the_traffic_anchor_stays_the_first_version_judged(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    """Accepted versions carry version 0 as the anchor; the next candidate is judged against v0's answers,
    read back from the store, not against its parent's."""
    configured = tmp_path / "holdout.npz"
    np.savez(configured, inputs=holdout_images(50, 8), labels=np.zeros(50, np.int64))
    x, y = keep_replay(redis_client, store, 150, 150, seed=10)
    settings = make_settings(redis_server, store, holdout_path=configured, guard_tolerance=1.0,
                             guard_class_tolerance=1.0, guard_traffic_tolerance=1.0, guard_traffic_gain_z=0.0,
                             learning_rate=50.0, step="unit", keep_versions=1)
    # large steps that every check lets through, so each version answers differently; retention on
    rec = Reconciler(settings, store, redis_client, MODEL)
    for version in (0, 1):
        feed_served(redis_client, 40, version, seed=50 + version)
        assert rec.run_once().version == version + 1
    assert evaluate(store, 1, x, y)[0] < 0.9  # so a parent taken for the anchor would show in the figures
    for version in (1, 2):
        traffic = store.read_manifest(MODEL, version)["validation"]["traffic"]
        right, _ = evaluate(store, version, x, y)
        assert (traffic["anchor_version"], traffic["anchor_accuracy"], traffic["size"]) == (0, 1.0, 150)
        assert traffic["accuracy"] == pytest.approx(right)
        metrics = store.read_manifest(MODEL, version)["metrics"]  # the dashboard's and /metrics' figures
        assert (metrics["traffic_accuracy"], metrics["traffic_anchor_accuracy"]) == (traffic["accuracy"], 1.0)
    rec.close()


def test_a_refusal_reseeds_the_same_weights_so_the_next_candidate_probes_new_directions(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    spec = load_version(store, MODEL, 0).spec
    x = holdout_images(200, 6)
    y = numpy_mlp(spec, store.read_version(MODEL, 0)[0], x).argmax(1)
    configured = tmp_path / "holdout.npz"
    np.savez(configured, inputs=x, labels=y)
    settings = make_settings(redis_server, store, holdout_path=configured, learning_rate=50.0, guard_tolerance=0.0,
                             step="unit")
    assert settings.reseed_on_refusal  # the default
    rec = Reconciler(settings, store, redis_client, MODEL)
    feed_served(redis_client, 40, 0, seed=20)
    out = rec.run_once()
    assert not out.published and "validation guard" in (out.reason or "") and out.stats["reseeded_as"] == 1
    assert version_key(redis_client) == 1 and pending(redis_client) == []
    v0, v1 = load_version(store, MODEL, 0), load_version(store, MODEL, 1)
    for k in v0.params:
        np.testing.assert_array_equal(v1.params[k], v0.params[k])  # the same weights
    assert (v1.seeds[-1, 1:] != v0.seeds[-1, 1:]).all() and (v1.seeds[:, 0] == 0).all()  # fresh probes, same leader
    assert (v1.seeds[:-1] == 0).all()  # only the head learns (the default), so only the head is probed
    assert v1.manifest["training"]["kind"] == "reseed after a refused candidate" and v1.manifest["records"] == 0
    assert v1.manifest["validation"]["anchor_accuracy"] == v1.manifest["validation"]["parent_accuracy"]
    assert [h["type"] for h in RecordLog(redis_client, MODEL).history()] == ["refused", "publish"]
    # the next records are served by version 1's vendors, and the next candidate builds on it
    feed_served(redis_client, 40, 1, seed=22)
    out = rec.run_once()
    assert out.parent == 1 and pending(redis_client) == []
    rec.close()


def test_learning_options_reach_the_published_versions(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    """antithetic, probe_scale, baseline=class, the loss_gap schedule and learn_groups, as the worker applies them."""
    settings = make_settings(redis_server, store, antithetic=True, probe_scale=0.02, baseline="class",
                             lr_schedule="loss_gap", lr_min_ratio=0.2, gap_scale=5.0, step="unit", learn_groups="0")
    rec = Reconciler(settings, store, redis_client, MODEL)
    feed_served(redis_client, 40, 0, seed=30)
    assert rec.run_once().version == 1
    m1 = store.read_manifest(MODEL, 1)
    seeds = np.array(m1["seeds"], dtype=np.uint64)
    assert m1["antithetic"] is True and m1["probe_scale"] == 0.02 and m1["reconciler"]["baseline"] == "class"
    assert np.array_equal(seeds[:, 2], seeds[:, 1]) and not np.array_equal(seeds[:, 3], seeds[:, 1])
    assert m1["reconciler"]["learn_groups"] == "0" and (seeds[1:] == 0).all() and (seeds[0, 1:] != 0).all()

    fed = feed_served(redis_client, 40, 1, seed=31)  # served by the mirrored version 1
    assert rec.run_once().version == 2
    m2 = store.read_manifest(MODEL, 2)
    used = [fed[i] for i in m2["inputs"]["entry_ids"]]
    records = Records(np.array([r.version for r in used]), np.array([r.path for r in used]),
                      np.array([r.loss for r in used]), np.array([r.label for r in used]))
    p1, p2 = store.read_version(MODEL, 1)[0], store.read_version(MODEL, 2)[0]
    spec = load_version(store, MODEL, 1).spec
    sources = {1: VersionSeeds(seeds, 0.02, antithetic=True)}  # built from the manifest, not by the worker's code
    rc = ReconcileConfig(learning_rate=settings.learning_rate, min_cohort=8, baseline="class", step="unit",
                         learn_groups="0")
    expected = propose_update(spec, p1, records, sources, rc,
                              UpdateConfig(lr_schedule="loss_gap", lr_min_ratio=0.2, gap_scale=5.0))
    gap = class_loss_gap(records.loss, records.label, CLASSES)
    assert m2["learning_rate"] == pytest.approx(settings.learning_rate * (0.2 + 0.8 * min(gap / 5.0, 1.0)))
    assert m2["training"]["loss_gap"] == pytest.approx(gap)
    for k in p1:
        np.testing.assert_allclose(p2[k], expected.params[k], rtol=0, atol=1e-6)
        assert np.array_equal(p2[k], p1[k]) != k.startswith("0.")  # group 0 learns, the head keeps its weights
    rec.close()


def test_paired_entries_give_the_head_its_gradient_from_their_logits(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    """head_gradient=logits (and replay's fallback when no input is kept, as here): the worker reads both logits from
    the feedback entries and steps the head as marketplace.reconcile does on the same records, built here from what
    was written, not by the worker; at the logits rate either way."""
    rec = Reconciler(make_settings(redis_server, store, head_gradient="logits"), store, redis_client, MODEL)
    rng = np.random.default_rng(40)
    leader = rng.normal(0, 2, (48, CLASSES)).astype(np.float32)
    probe = (leader + rng.normal(0, 0.3, leader.shape)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 48)
    paths = rng.integers(0, VENDORS, (48, GROUPS))
    ModelLog(redis_client, MODEL).write_predictions(
        [PredictionRecord(f"h{i}", 0, tuple(int(v) for v in paths[i]), probe[i], label=int(labels[i]),
                          leader_logits=leader[i]) for i in range(48)])
    out = rec.run_once()
    assert (out.published, out.version) == (True, 1), out.reason
    m1 = store.read_manifest(MODEL, 1)
    assert m1["training"]["head_gradient"] == "logits"
    seeds0 = np.array(store.read_manifest(MODEL, 0)["seeds"], dtype=np.uint64)
    # make_store's version 0 probes every group: only records whose group 0 ran its leader vendor measure W
    assert m1["training"]["head_records"] == int(((seeds0[0, paths[:, 0]] == 0) & (paths[:, -1] != 0)).sum()) > 0
    records = Records(np.zeros(48, np.int64), paths, cross_entropy(probe, labels), labels,
                      cross_entropy(leader, labels), probe.astype(np.float64), leader.astype(np.float64))
    p0, p1 = store.read_version(MODEL, 0)[0], store.read_version(MODEL, 1)[0]
    loaded = load_version(store, MODEL, 0)
    sources = {0: VersionSeeds(seeds0, float(store.read_manifest(MODEL, 0)["probe_scale"]))}
    expected = propose_update(loaded.spec, p0, records, sources, rec.settings.reconcile_config(), UpdateConfig())
    for k in p0:
        np.testing.assert_allclose(p1[k], expected.params[k], rtol=0, atol=1e-6)
        assert np.array_equal(p1[k], p0[k]) == k.startswith("0.")  # only the head (group 1) learns
    rec.close()
    fallback = Reconciler(make_settings(redis_server, store, head_gradient="replay"), store, redis_client, MODEL)
    ModelLog(redis_client, MODEL).write_predictions(
        [PredictionRecord(f"g{i}", 1, tuple(int(v) for v in paths[i]), probe[i], label=int(labels[i]),
                          leader_logits=leader[i]) for i in range(48)])
    out = fallback.run_once()
    assert (out.published, out.version) == (True, 2), out.reason
    assert store.read_manifest(MODEL, 2)["training"]["head_gradient"] == "logits"  # no input kept: the fallback
    loaded1 = load_version(store, MODEL, 1)
    sources1 = {1: VersionSeeds(np.array(store.read_manifest(MODEL, 1)["seeds"], dtype=np.uint64),
                                float(store.read_manifest(MODEL, 1)["probe_scale"]))}
    records1 = Records(np.ones(48, np.int64), paths, records.loss, labels, records.base, records.logits,
                       records.leader_logits)
    expected2 = propose_update(loaded1.spec, p1, records1, sources1, fallback.settings.reconcile_config(),
                               UpdateConfig())
    p2 = store.read_version(MODEL, 2)[0]
    for k in p1:
        np.testing.assert_allclose(p2[k], expected2.params[k], rtol=0, atol=1e-6)
    fallback.close()


@pytest.mark.parametrize("traffic", [True, False], ids=["traffic-check", "no-traffic-check"])
def test_head_gradient_replay_steps_the_head_exactly_on_the_kept_inputs_damped_along_the_holdout(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path,
        traffic: bool) -> None:
    """head_gradient=replay: the worker reads the inputs the API kept, takes their features under version 0 and
    steps the head by the exact gradient, damped along the holdout's features: checked against NumPy features
    and marketplace.head's pure functions, not against the worker's own engine. With the recent-traffic check on
    (the default), the head learns only from the kept inputs that check never judges on (split_replay), and the
    check judges the others; with it off, the head learns from all of them."""
    configured = tmp_path / "holdout.npz"
    holdout = holdout_images(50, 8)
    np.savez(configured, inputs=holdout, labels=np.zeros(50, np.int64))
    x, y = keep_replay(redis_client, store, 60, 60, seed=11)
    settings = make_settings(redis_server, store, holdout_path=configured, head_gradient="replay",
                             head_replay_learning_rate=0.5, head_learning_rate=0.001, max_step=0.0,
                             guard_tolerance=1.0, guard_class_tolerance=1.0,
                             guard_traffic_tolerance=1.0, guard_traffic_min=1, guard_traffic=traffic)
    rec = Reconciler(settings, store, redis_client, MODEL)
    out = rec.run_once()
    assert (out.published, out.version) == (True, 1), out.reason
    manifest = store.read_manifest(MODEL, 1)
    learn = np.array([not traffic or not judged_only(f"r11-{i}", settings.guard_traffic_share) for i in range(60)])
    if traffic:
        assert manifest["validation"]["traffic"]["size"] == 60 - learn.sum()  # the check judged the other side
        assert 10 < learn.sum() < 50  # both sides hold some of the 60
    else:
        assert "size" not in (manifest["validation"].get("traffic") or {}) and learn.all()
    x, y = x[learn], y[learn]
    assert (manifest["training"]["head_gradient"], manifest["training"]["head_records"]) == ("replay", learn.sum())
    assert manifest["reconciler"]["head_damping"] == 3000.0
    p0, p1 = store.read_version(MODEL, 0)[0], store.read_version(MODEL, 1)[0]
    spec = load_version(store, MODEL, 0).spec

    def features(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1).astype(np.float64) * spec.input_scale
        return np.maximum(flat @ p0["0.fc.weight"].T.astype(np.float64) + p0["0.fc.bias"], 0)

    flat, _ = replay_head_gradient(spec, p0, HeadReplay(features(x), y, known_damping(features(holdout), 3000.0)))
    expected = {"1.fc.bias": p0["1.fc.bias"] - 0.5 * flat[:CLASSES],
                "1.fc.weight": p0["1.fc.weight"] - 0.5 * flat[CLASSES:].reshape(CLASSES, -1)}
    for k, v in expected.items():
        assert not np.allclose(v, p0[k])  # the step is large enough to see
        np.testing.assert_allclose(p1[k], v, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(p1["0.fc.weight"], p0["0.fc.weight"])
    rec.close()


def test_learn_groups_naming_a_group_the_model_lacks_fails_with_the_fix_and_loses_nothing(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    rec = Reconciler(make_settings(redis_server, store, learn_groups="0,2"), store, redis_client, MODEL)
    ids = feed(redis_client, 40)
    with pytest.raises(ValueError, match=r"learn_groups '0,2' names a group outside 0..1"):
        rec.run_once()
    assert store.versions(MODEL) == [0] and version_key(redis_client) is None
    assert sorted(pending(redis_client)) == sorted(ids)  # delivered, not acknowledged: a fixed worker gets them
    rec.close()


def test_the_worker_refuses_at_start_a_learn_groups_the_stored_model_lacks(
        redis_server: RedisProcess, store: ModelStore) -> None:
    with pytest.raises(ValueError, match=r"model fashion: .* indices below 2"):
        check_learn_groups(make_settings(redis_server, store, learn_groups="0,2"), store)
    for ok in ("head", "all", "0,1"):
        check_learn_groups(make_settings(redis_server, store, learn_groups=ok), store)
    check_learn_groups(make_settings(redis_server, store, models=["fresh"], learn_groups="7"), store)  # no version yet


def test_guard_counts_non_finite_logits_as_wrong_and_skips_a_holdout_that_does_not_fit(
        redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    from worker.guard import ValidationGuard

    parent = load_version(store, MODEL, 0)
    x = holdout_images(30, 8)
    y = numpy_mlp(parent.spec, parent.params, x).argmax(1)
    guard = ValidationGuard(make_settings(redis_server, store, guard_tolerance=0.5), store, MODEL)
    assert guard.judge(parent, parent.params) is None  # no holdout anywhere: nothing to check
    store.write_holdout(MODEL, x, y)
    broken = {k: np.full_like(v, np.inf) if k == "1.fc.bias" else v for k, v in parent.params.items()}
    verdict = guard.judge(parent, broken)
    assert verdict is not None and not verdict.accepted
    assert verdict.validation["accuracy"] == 0.0 and verdict.validation["loss"] is None
    json.dumps(verdict.validation, allow_nan=False)  # manifests and the history are strict JSON
    same = guard.judge(parent, parent.params)
    assert same is not None and same.accepted and same.validation["accuracy"] == evaluate(store, 0, x, y)[0]

    store.delete_holdout(MODEL)
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=x, labels=np.where(np.arange(30) == 3, -1, y))  # a negative label
    assert ValidationGuard(make_settings(redis_server, store, holdout_path=bad), store, MODEL).judge(
        parent, parent.params) is None
    np.savez(bad, inputs=x[:, :, :14], labels=y)  # another input shape
    assert ValidationGuard(make_settings(redis_server, store, holdout_path=bad), store, MODEL).judge(
        parent, parent.params) is None


def test_a_validation_longer_than_the_lease_ttl_keeps_the_lease(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store.write_holdout(MODEL, holdout_images(20, 7), np.zeros(20, np.int64))
    a = Reconciler(make_settings(redis_server, store, consumer="a", lease_ttl_ms=300, guard_tolerance=1.0), store,
                   redis_client, MODEL)
    b = Reconciler(make_settings(redis_server, store, consumer="b", lease_ttl_ms=300), store, redis_client, MODEL)
    real_judge, real_renew = a.guard.judge, a.records.renew_lease
    renewals: list[bool] = []
    seen: list[str | None] = []

    def counted_renew(owner: str, ttl_ms: int) -> bool:  # the real renewal, counted
        renewals.append(real_renew(owner, ttl_ms))
        return renewals[-1]

    def slow_judge(*args: object) -> object:  # a validation that outlasts the TTL (a big holdout, a first compile)
        # Renewals come at least TTL/3 apart, so after five of them the lease as it was when the validation began
        # has run out: without them it would be gone (the defect), and then another worker could take over.
        start = len(renewals)
        wait_until(lambda: len(renewals) - start >= 5 or redis_client.get(K.lock) is None, timeout=60,
                   what="the lease outlives its TTL, or is gone")
        seen.append(b.run_once().reason)  # another worker tries to take over meanwhile
        return real_judge(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(a.records, "renew_lease", counted_renew)
    monkeypatch.setattr(a.guard, "judge", slow_judge)
    feed(redis_client, 40)
    out = a.run_once()
    assert out.published and out.version == 1 and a.is_leader
    assert seen and seen[0].startswith("not leader") and not b.is_leader and all(renewals)
    assert redis_client.get(K.lock).decode() == a.lease.owner and a.run_once().reason.startswith("too few")
    a.close()


# ------------------------------------------------------------------------------------------ lease


def test_only_the_lease_holder_publishes_and_a_successor_takes_over(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    a = Reconciler(make_settings(redis_server, store, consumer="a", lease_ttl_ms=600), store, redis_client, MODEL)
    b = Reconciler(make_settings(redis_server, store, consumer="b", lease_ttl_ms=600), store, redis_client, MODEL)
    feed(redis_client, 40)
    assert a.run_once().version == 1
    second = feed(redis_client, 40)
    out = b.run_once()
    assert not out.published and out.reason.startswith("not leader") and "a:" in out.reason
    assert RecordLog(redis_client, MODEL).stream_stats().undelivered == 40  # b did not even read

    a.close()  # released: b takes over at once
    out = b.run_once()
    assert out.published and out.version == 2 and used_ids(store, 2) == second

    third = feed(redis_client, 40)  # b never renews now: its lease expires by itself, within its TTL
    assert redis_client.pttl(K.lock) <= 600 and redis_client.pttl(K.lock) != -1  # -2: expired already
    out = wait_until(lambda: (o := a.run_once()).published and o, timeout=60, interval=0.02, what="a takes over")
    assert out.version == 3 and used_ids(store, 3) == third
    later = b.run_once()
    assert later.reason.startswith("not leader") and not b.is_leader
    owners = [h["owner"].split(":")[0] for h in RecordLog(redis_client, MODEL).history()]
    assert owners == ["a", "b", "a"]
    a.close()


def test_a_stale_fencing_token_cannot_publish(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    a = Reconciler(make_settings(redis_server, store, consumer="a"), store, redis_client, MODEL)
    first = feed(redis_client, 10)
    assert not a.run_once().published and a.is_leader  # leads, holds 10 entries
    # The lease vanishes behind a's back (a pause longer than the TTL) and another worker takes it.
    redis_client.delete(K.lock)
    intruder = RecordLog(redis_client, MODEL).acquire_lease("intruder", 10_000)
    assert intruder is not None and intruder > a.lease.token
    rest = feed(redis_client, 30)
    out = a.run_once()  # a's renewal is not due yet: it reconciles, writes v1, and the publish is refused
    assert not out.published and out.reason.startswith("lost leadership") and not a.is_leader
    assert version_key(redis_client) is None and published_versions(redis_client) == []
    assert store.versions(MODEL) == [0, 1]  # an unpublished file: garbage, never served
    assert sorted(pending(redis_client)) == sorted(first + rest)  # nothing acknowledged

    RecordLog(redis_client, MODEL).release_lease("intruder")
    c = Reconciler(make_settings(redis_server, store, consumer="c"), store, redis_client, MODEL)
    out = c.run_once()  # claims a's pending entries at takeover
    assert out.published and out.version == 2 and out.parent == 0  # builds on v0, not on the garbage v1
    assert used_ids(store, 2) == first + rest and store.lineage(MODEL, 2) == [2, 0]
    c.close()


# ------------------------------------------------------------------------------------------ processes


@pytest.fixture
def procs() -> Iterator[list[ChildProcess]]:
    """Worker processes started by a test; whatever is still running at the end is stopped."""
    started: list[ChildProcess] = []
    yield started
    for p in started:
        p.stop()


def test_leader_failover_between_two_worker_processes(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path,
        procs: list[ChildProcess]) -> None:
    workers = {name: ChildProcess("worker", worker_args(redis_server.url, store.root, MODEL, name, 48),
                                  tmp_path / f"{name}.log").start() for name in ("wa", "wb")}
    procs.extend(workers.values())
    holder = wait_until(lambda: redis_client.get(K.lock), timeout=20, what="a leader").decode()
    leader = holder.split(":")[0]
    survivor = "wb" if leader == "wa" else "wa"

    feed(redis_client, 48)
    wait_until(lambda: version_key(redis_client) == 1, timeout=10, interval=0.02, what="the leader publishes v1")
    held = feed(redis_client, 32, version=1)  # fewer than min_records: the leader reads and holds them
    wait_until(lambda: len(pending(redis_client)) == 32, timeout=10, interval=0.02, what="the leader reads")

    workers[leader].sigkill()
    # the dead leader's lease runs out by itself (worker_args: a TTL of 900 ms), and then the survivor takes it
    assert redis_client.pttl(K.lock) <= 900 and redis_client.pttl(K.lock) != -1
    more = feed(redis_client, 16, version=1)
    wait_until(lambda: version_key(redis_client) == 2, timeout=60, interval=0.02, what="the survivor publishes")
    last = RecordLog(redis_client, MODEL).history()[-1]
    assert last["consumer"] == survivor
    assert used_ids(store, 2) == held + more  # the dead leader's pending entries were claimed, not lost
    assert workers[survivor].proc.poll() is None


# ------------------------------------------------------------------------------------------ trigger


@contextlib.contextmanager
def leading(rec: Reconciler, client: redis.Redis) -> Iterator[Reconciler]:
    """Run ``rec.serve_forever`` in a thread until it holds the lease; stop it (and close it) afterwards."""
    stop = threading.Event()
    thread = threading.Thread(target=rec.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: client.get(K.lock), timeout=10, what="the worker leads")
        yield rec
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def redis_contents(client: redis.Redis) -> dict[bytes, tuple[bytes, object]]:
    """Every key with its type and a summary (a string's value, a list's length, a stream's, ...)."""
    sizes = {b"string": client.get, b"list": client.llen, b"stream": client.xlen, b"hash": client.hlen,
             b"set": client.scard, b"zset": client.zcard}
    out = {}
    for key in client.keys("*"):
        kind = client.type(key)
        out[key] = (kind, sizes[kind](key))
    return out


def store_files(store: ModelStore) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store.root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(store.root.rglob("*")) if p.is_file()}


def test_trigger_without_a_worker_asks_no_one_and_writes_nothing(
        redis_client: redis.Redis, store: ModelStore) -> None:
    feed(redis_client, 20)
    before, files = redis_contents(redis_client), store_files(store)
    with pytest.raises(NoLeader, match=r"no reconciler worker leads model 'fashion': start one \(python -m worker"):
        ask_leader(redis_client, MODEL, timeout_s=10)
    assert redis_contents(redis_client) == before and store_files(store) == files  # no request queued, no lease


def test_admin_reconcile_without_a_worker_is_a_503_that_names_the_fix_and_writes_nothing(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore, tmp_path: Path) -> None:
    """The API runs no reconciler of its own: with no worker leading it says so and touches nothing."""
    api = ApiProcess(api_args(redis_server.url, store.root, "--admin-token", "tok"), tmp_path / "api.log")
    try:
        api.start()
        api.wait_ready()
        feed(redis_client, 20)
        before, files = redis_contents(redis_client), store_files(store)
        resp = httpx.post(api.url + "/admin/reconcile", json={"model": MODEL}, timeout=60,
                          headers={"Authorization": "Bearer tok"})
        assert resp.status_code == 503, resp.text
        assert resp.json()["detail"] == ("no reconciler worker leads model 'fashion': start one (python -m worker, "
                                         "or mpserve up runs one)")
        assert redis_contents(redis_client) == before and store_files(store) == files
        assert store.versions(MODEL) == [0] and redis_client.get(K.lock) is None
        doc = httpx.get(api.url + "/openapi.json", timeout=30).json()
        assert "503" in doc["paths"]["/admin/reconcile"]["post"]["responses"]
    finally:
        api.stop()


def test_trigger_with_a_running_worker_goes_through_it(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    settings = make_settings(redis_server, store, consumer="wk", min_records=1000)
    rec = Reconciler(settings, store, redis_client, MODEL)
    stop = threading.Event()
    thread = threading.Thread(target=rec.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: redis_client.get(K.lock), timeout=5, what="the worker leads")
        ids = feed(redis_client, 20)
        out = ask_leader(redis_client, MODEL, timeout_s=10)
        assert (out["published"], out["version"]) == (True, 1) and used_ids(store, 1) == ids
        last = RecordLog(redis_client, MODEL).history()[-1]
        assert last["trigger"] == "request" and last["owner"] == rec.lease.owner  # the worker published it
        assert redis_client.get(K.lock).decode() == rec.lease.owner  # and still leads
        assert redis_client.llen(K.requests) == 0
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and redis_client.get(K.lock) is None


def test_trigger_times_out_clearly_when_the_lease_holder_does_not_answer(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    redis_client.set(K.lock, "dead-worker:0", px=20_000)  # a worker that died holding the lease
    asked_ms = time.time_ns() // 1_000_000
    with pytest.raises(ReconcileTimeout, match="did not answer"):
        ask_leader(redis_client, MODEL, timeout_s=0.3)
    returned_ms = time.time_ns() // 1_000_000
    # it gave up at its own deadline, while the dead worker still held the lease (waiting for the lease to run
    # out, or for the default 30 s, would have taken longer than those 20 s)...
    assert redis_client.pttl(K.lock) > 0
    # ...and told the worker that deadline, so a worker that comes back later skips the abandoned request
    (queued,) = redis_client.lrange(K.requests, 0, -1)
    # (between the two clocks: a loaded machine may start the call late, so no tighter bound than its return)
    assert asked_ms + 300 <= json.loads(queued)["deadline_ms"] <= returned_ms + 300
    assert version_key(redis_client) is None


def test_timer_reconciles_what_is_usable(
        redis_client: redis.Redis, redis_server: RedisProcess, store: ModelStore) -> None:
    settings = make_settings(redis_server, store, consumer="tm", min_records=1000, interval_s=0.3)
    rec = Reconciler(settings, store, redis_client, MODEL)
    stop = threading.Event()
    thread = threading.Thread(target=rec.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        ids = feed(redis_client, 12)
        wait_until(lambda: version_key(redis_client) == 1, timeout=5, interval=0.02, what="the timer fires")
        assert used_ids(store, 1) == ids
        assert RecordLog(redis_client, MODEL).history()[-1]["trigger"] == "timer"
    finally:
        stop.set()
        thread.join(timeout=10)
