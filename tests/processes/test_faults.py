"""Fault tests against real processes: a worker SIGKILLed at each step of a reconciliation, Redis restarted
under load, an API replica killed during a hot swap, a corrupt version in the store.

Processes stop at a step through ``MPSERVE_FAULT=<point>:pause`` (common.faults): the child writes a
marker file when it gets there and blocks; the test checks what Redis and the store hold at that moment,
then sends a real SIGKILL. Everything is checked from Redis and the store alone, as an operator would.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from common.loading import load_version, write_next_version
from model_store import ModelStore
from redis_io.keys import ModelKeys
from redis_io.recordlog import RecordLog
from tests.helpers import (
    ApiProcess,
    ChildProcess,
    ModelLog,
    RedisProcess,
    api_args,
    feed_labels,
    make_store,
    pending_ids,
    serving_version,
    start_redis,
    wait_until,
    worker_args,
)

MODEL = "fashion"
KEYS = ModelKeys(MODEL)
SHAPE = (1, 28, 28)
CLASSES = 10
REDIS_TIMEOUT_S = 0.5  # api_args' --redis-timeout-s
SLACK_S = 2.0  # a loaded 2-core CI machine: scheduling, not waiting on Redis


@pytest.fixture
def children() -> Iterator[list[ChildProcess]]:
    """Processes a test started; whatever still runs at its end is stopped (SIGKILL if SIGTERM fails)."""
    started: list[ChildProcess] = []
    yield started
    for p in started:
        p.stop()


def version_key(client: redis.Redis) -> int | None:
    raw = client.get(KEYS.version)
    return None if raw is None else int(raw)


def publishes(client: redis.Redis) -> list[dict]:
    return [h for h in RecordLog(client, MODEL).history() if h["type"] == "publish"]


def inputs(store: ModelStore, version: int) -> tuple[list[str], list[str]]:
    """(used, dropped) entry ids a version's manifest records."""
    m = store.read_manifest(MODEL, version)["inputs"]
    return m["entry_ids"], m["dropped"]["entry_ids"]


# ------------------------------------------------------------------------------------------ worker crashes


def test_sigkill_at_each_step_of_a_reconciliation_uses_every_entry_exactly_once(
        redis_client: redis.Redis, redis_server: RedisProcess, tmp_path: Path,
        children: list[ChildProcess]) -> None:
    """A worker is SIGKILLed at every step where a reconciliation can be cut, one after the other.

    The steps: (1) the version's files are written, the publish script has not run; (2) the publish
    script ran, the worker's buffer still holds the entries; (3) acknowledging dropped entries without a
    publish (a buffer full of stale entries), the fence WATCHed and checked, EXEC not sent; (4) that EXEC
    done, the buffer not yet cleared. There is no "mid-acknowledge" step to cut: the publish script sets
    the version, records the history and XACKs every used and dropped entry in one atomic Lua call, and
    the fenced acknowledgement is one MULTI/EXEC (a client that dies before EXEC leaves nothing queued).
    Steps (1) and (3) are crossed twice, the second time after a version was published.

    Afterwards, from Redis and the store alone: every labelled entry went into exactly one published
    version (or was dropped exactly once), no published version repeats a batch, the lineage skips
    the unpublished files, and nothing stays pending.
    """
    rng = np.random.default_rng(7)
    store = make_store(tmp_path / "store", model=MODEL)
    n = iter(range(100))

    def worker(fault: str | None, *extra: str) -> ChildProcess:
        name = f"w{next(n)}"
        p = ChildProcess("worker", worker_args(redis_server.url, store.root, MODEL, name, 32, *extra),
                         tmp_path / f"{name}.log", fault=f"{fault}:pause" if fault else None)
        children.append(p.start())
        return p

    def kill_at(fault: str, *extra: str) -> ChildProcess:
        p = worker(fault, *extra)
        assert p.wait_paused() == fault
        return p

    def sigkill(p: ChildProcess) -> None:
        assert p.sigkill() == -signal.SIGKILL
        assert f"pausing at {p.fault.split(':')[0]}" in p.log_tail()

    # (1) after the store write, before the publish: the file is garbage, every entry stays pending
    a = feed_labels(redis_client, MODEL, 32, rng=rng)
    stale_a = feed_labels(redis_client, MODEL, 4, version=99, rng=rng)  # no such version: dropped by the publish
    p = kill_at("after_store_write")
    assert store.versions(MODEL) == [0, 1] and version_key(redis_client) is None
    assert sorted(pending_ids(redis_client, MODEL)) == sorted(a + stale_a)
    sigkill(p)

    # (2) after the publish: the successor waits out the dead leader's lease and claims its entries; the
    # publish is the acknowledgement, so nothing is pending while the buffer still holds them
    p = kill_at("after_publish")
    assert version_key(redis_client) == 2 and pending_ids(redis_client, MODEL) == []
    assert inputs(store, 2) == (a, stale_a) and store.lineage(MODEL, 2) == [2, 0]  # built on 0, not on garbage 1
    sigkill(p)

    # (3) a buffer (16 here) full of stale entries is acknowledged without a publish, under the fence;
    # killed before EXEC: nothing acknowledged
    stale_s = feed_labels(redis_client, MODEL, 16, version=99, rng=rng)
    small = ("--max-records-per-reconcile", "16")
    p = kill_at("fenced_ack_before_exec", *small)
    assert sorted(pending_ids(redis_client, MODEL)) == sorted(stale_s)
    sigkill(p)
    p = kill_at("fenced_ack_after_exec", *small)  # (4) the next leader claims them and acknowledges them
    assert pending_ids(redis_client, MODEL) == [] and version_key(redis_client) == 2
    sigkill(p)

    # (1) again, on top of a published version, then a clean worker finishes
    b = feed_labels(redis_client, MODEL, 32, version=2, rng=rng)
    p = kill_at("after_store_write")
    assert store.versions(MODEL) == [0, 1, 2, 3] and version_key(redis_client) == 2
    assert sorted(pending_ids(redis_client, MODEL)) == sorted(b)
    sigkill(p)
    clean = worker(None)
    wait_until(lambda: version_key(redis_client) == 4, timeout=30, interval=0.05, what="the clean worker publishes")
    assert clean.stop() == 0 and redis_client.get(KEYS.lock) is None  # SIGTERM: the lease is given back

    published = [h["version"] for h in publishes(redis_client)]
    assert published == [2, 4]
    used = Counter(i for v in published for i in inputs(store, v)[0])
    dropped = Counter(i for v in published for i in inputs(store, v)[1])
    assert set(used) == set(a + b) and max(used.values()) == 1  # every usable entry, exactly once
    assert set(dropped) == set(stale_a) and max(dropped.values()) == 1
    assert not set(stale_s) & (set(used) | set(dropped))  # acknowledged on their own, used by no version
    assert inputs(store, 4)[0] == b
    hashes = [h["entry_ids_sha256"] for h in publishes(redis_client)]
    assert len(set(hashes)) == len(hashes)  # no batch published twice
    assert store.lineage(MODEL, 4) == [4, 2, 0]  # the unpublished files 1 and 3 are in no lineage
    stats = RecordLog(redis_client, MODEL).stream_stats()
    assert pending_ids(redis_client, MODEL) == [] and stats.backlog == 0  # nothing pending, nothing unread


def test_worker_survives_a_redis_crash_and_uses_every_entry_once(tmp_path: Path,
                                                                  children: list[ChildProcess]) -> None:
    """A running worker holds read, unpublished entries when Redis (AOF ``always``) is SIGKILLed and
    restarted: it reconnects by itself and publishes them exactly once, in one version with the entries
    labelled after the restart."""
    rng = np.random.default_rng(11)
    server = start_redis(tmp_path / "redis", appendonly=True, appendfsync="always")
    r = redis.Redis.from_url(server.url, decode_responses=False)
    try:
        store = make_store(tmp_path / "store", model=MODEL)
        w = ChildProcess("worker", worker_args(server.url, store.root, MODEL, "w", 32), tmp_path / "w.log")
        children.append(w.start())
        a = feed_labels(r, MODEL, 40, rng=rng)
        wait_until(lambda: version_key(r) == 1, timeout=30, interval=0.05, what="the worker publishes v1")
        held = feed_labels(r, MODEL, 20, version=1, rng=rng)  # below min_records: read and held, pending
        wait_until(lambda: len(pending_ids(r, MODEL)) == 20, timeout=10, interval=0.02, what="the worker reads")
        server.kill()
        server.start()
        assert version_key(r) == 1 and sorted(pending_ids(r, MODEL)) == sorted(held)  # the AOF kept both
        more = feed_labels(r, MODEL, 20, version=1, rng=rng)
        wait_until(lambda: version_key(r) == 2, timeout=30, interval=0.05, what="the worker publishes v2")
        assert w.stop() == 0
        assert [h["version"] for h in publishes(r)] == [1, 2]
        assert inputs(store, 1)[0] == a and inputs(store, 2)[0] == held + more
        assert pending_ids(r, MODEL) == [] and RecordLog(r, MODEL).stream_stats().backlog == 0
        assert "Redis unavailable" in w.log_tail(20_000)
    finally:
        r.close()
        server.stop()


def test_a_publish_lost_with_redis_last_writes_is_undone_cleanly(tmp_path: Path,
                                                                   children: list[ChildProcess]) -> None:
    """What ``appendfsync everysec`` may cost: Redis comes back without its last writes, here a publish
    (and the labels it used). Serving returns to the previous version, the lost version's file is
    unpublished garbage, and the entries that were pending before it are used again, exactly once along
    the surviving lineage, at once. The loss is made certain by restarting Redis from a copy of its AOF
    taken before the publish.
    """
    rng = np.random.default_rng(13)
    server = start_redis(tmp_path / "redis", appendonly=True, appendfsync="always")
    r = redis.Redis.from_url(server.url, decode_responses=False)
    aof = tmp_path / "redis" / "appendonlydir"
    try:
        store = make_store(tmp_path / "store", model=MODEL)
        # the lease (10 s) outlives the restart, and idle entries are reclaimed only after a minute: the
        # worker must notice by itself that its buffer no longer matches Redis
        w = ChildProcess("worker", worker_args(server.url, store.root, MODEL, "w", 32, "--lease-ttl-ms", "10000"),
                         tmp_path / "w.log")
        children.append(w.start())
        feed_labels(r, MODEL, 40, rng=rng)
        wait_until(lambda: version_key(r) == 1, timeout=30, interval=0.05, what="the worker publishes v1")
        held = feed_labels(r, MODEL, 20, version=1, rng=rng)
        wait_until(lambda: len(pending_ids(r, MODEL)) == 20, timeout=10, interval=0.02, what="the worker reads")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # no write in flight while the AOF is copied
        shutil.copytree(aof, tmp_path / "aof-before")
        os.kill(server.proc.pid, signal.SIGCONT)
        lost = feed_labels(r, MODEL, 20, version=1, rng=rng)
        wait_until(lambda: version_key(r) == 2, timeout=30, interval=0.05, what="the worker publishes v2")
        assert inputs(store, 2)[0] == held + lost
        server.kill()
        shutil.rmtree(aof)
        shutil.copytree(tmp_path / "aof-before", aof)
        server.start()
        assert version_key(r) == 1 and sorted(pending_ids(r, MODEL)) == sorted(held)  # v2 and its labels: gone
        more = feed_labels(r, MODEL, 12, version=1, rng=rng)
        wait_until(lambda: version_key(r) == 3, timeout=30, interval=0.05, what="the worker publishes v3")
        assert w.stop() == 0
        assert [h["version"] for h in publishes(r)] == [1, 3]
        assert store.lineage(MODEL, 3) == [3, 1, 0]  # v2 is garbage: in no lineage
        assert inputs(store, 3)[0] == held + more
        assert pending_ids(r, MODEL) == [] and RecordLog(r, MODEL).stream_stats().backlog == 0
    finally:
        r.close()
        server.stop()


def test_two_leaders_with_the_same_token_never_use_an_entry_twice(
        redis_client: redis.Redis, redis_server: RedisProcess, tmp_path: Path) -> None:
    """Redis lost its last writes (``appendfsync everysec``): the lease ``a`` took and its fence INCR. ``b``
    then takes the lease and gets the very token ``a`` holds; until ``a``'s next renewal both pass the
    fence. ``b`` claims and publishes the entries ``a`` buffered; ``a``'s publish of the same entries is
    refused because they are no longer pending, and ``a`` stops leading.
    """
    from worker.reconciler import Reconciler
    from worker.settings import WorkerSettings

    store = make_store(tmp_path / "store", model=MODEL)

    def reconciler(consumer: str) -> Reconciler:
        settings = WorkerSettings(redis_url=redis_server.url, store_dir=store.root, models=[MODEL],
                                  consumer=consumer, min_records=32, min_cohort=8, interval_s=3600, poll_ms=20)
        return Reconciler(settings, store, redis_client, MODEL)

    a, b = reconciler("a"), reconciler("b")
    rng = np.random.default_rng(17)
    early = feed_labels(redis_client, MODEL, 10, rng=rng)
    assert not a.run_once().published and a.is_leader  # a leads and buffers 10 entries
    redis_client.delete(KEYS.lock)  # the writes Redis lost: a's lease and its fence increment
    redis_client.decr(KEYS.fence)
    late = feed_labels(redis_client, MODEL, 30, rng=rng)
    out = b.run_once()  # takes the lease, gets a's token, claims a's entries, publishes all 40
    assert b.lease.token == a.lease.token and out.published and out.version == 1
    out = a.run_once(force=True)  # a's renewal is not due: it still leads, and builds on 1 with its 10
    assert not out.published and "no longer pending" in out.reason and not a.is_leader
    assert [h["version"] for h in publishes(redis_client)] == [1] and version_key(redis_client) == 1
    assert inputs(store, 1)[0] == early + late
    assert pending_ids(redis_client, MODEL) == []
    assert a.run_once().reason.startswith("not leader")  # b holds the lease
    b.close()


def test_worker_does_not_build_on_a_corrupt_serving_version(
        redis_client: redis.Redis, redis_server: RedisProcess, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Serving points at a version whose weights are corrupt: the worker says why (once) and publishes
    nothing; the entries stay pending and are used once serving points at a usable version again."""
    from worker.reconciler import Reconciler
    from worker.settings import WorkerSettings

    store = make_store(tmp_path / "store", model=MODEL)
    settings = WorkerSettings(redis_url=redis_server.url, store_dir=store.root, models=[MODEL], consumer="w",
                              min_records=32, min_cohort=8, interval_s=3600, poll_ms=20)
    rec = Reconciler(settings, store, redis_client, MODEL)
    rng = np.random.default_rng(19)
    feed_labels(redis_client, MODEL, 40, rng=rng)
    assert rec.run_once().version == 1
    weights = store.root / MODEL / "versions" / f"{1:08d}.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    ids = feed_labels(redis_client, MODEL, 40, version=1, rng=rng)
    with caplog.at_level(logging.ERROR, logger="worker.reconciler"):
        for _ in range(2):
            out = rec.run_once()
            assert not out.published and out.reason.startswith("base version 1 is not usable: IntegrityError")
    assert sum("base version 1 is not usable" in m for m in caplog.messages) == 1
    assert version_key(redis_client) == 1 and sorted(pending_ids(redis_client, MODEL)) == sorted(ids)
    ModelLog(redis_client, MODEL).rollback(0, {"by": "test"})
    on_0 = feed_labels(redis_client, MODEL, 32, version=0, rng=rng)
    out = rec.run_once()
    assert out.published and out.parent == 0 and inputs(store, out.version) == (on_0, ids)  # v1's: stale
    assert pending_ids(redis_client, MODEL) == []
    rec.close()


# ------------------------------------------------------------------------------------------ API replicas


@dataclass
class Stack:
    """One Redis (AOF), one store and two API replicas, shared by the API fault tests of this module."""

    redis: RedisProcess
    store: ModelStore
    a: ApiProcess
    b: ApiProcess
    logs: Path
    r: redis.Redis

    def serving(self) -> int:
        return serving_version(self.r, MODEL, self.store)

    def replica(self, name: str, *extra: str, fault: str | None = None) -> ApiProcess:
        return ApiProcess(api_args(self.redis.url, self.store.root, *extra), self.logs / f"api-{name}.log", fault)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Replica B stops at its next hot swap (``before_swap:pause``) until the swap test kills and restarts it:
    the other tests publish only versions that fail to load, which never reach that point."""
    logs = tmp_path_factory.mktemp("fault-logs")
    server = start_redis(tmp_path_factory.mktemp("fault-redis"), appendonly=True, appendfsync="always")
    store = make_store(tmp_path_factory.mktemp("fault-store"), model=MODEL)
    r = redis.Redis.from_url(server.url, decode_responses=False)
    st = Stack(server, store, ApiProcess([], logs / "unused.log"), ApiProcess([], logs / "unused.log"), logs, r)
    st.a, st.b = st.replica("a"), st.replica("b", fault="before_swap:pause")
    try:
        for p in (st.a, st.b):
            p.start()
        for p in (st.a, st.b):
            p.wait_ready()
        yield st
    finally:
        for p in (st.a, st.b):
            p.stop()
        r.close()
        server.stop()


def publish_next(st: Stack, corrupt: str | None = None, parent: int | None = None, base: int | None = None) -> int:
    """What the worker does: store the next version (built on ``parent``, default: the serving one), publish it.

    ``corrupt``: ``truncate`` cuts the weights file in half after the write, ``manifest`` the manifest.
    The weights are those of ``base`` (default: ``parent``) plus a small step, so ``parent`` may be a
    version that does not load.
    """
    base_version = base if base is not None else parent if parent is not None else st.serving()
    base = load_version(st.store, MODEL, base_version)
    parent = base.version if parent is None else parent
    version = (st.store.latest(MODEL) or 0) + 1
    params = {k: v + np.float32(0.01) for k, v in base.params.items()}
    write_next_version(st.store, replace(base, version=parent), version, params, {"records": 0}, 0.5,
                       np.random.default_rng(version))
    if corrupt is not None:
        suffix = {"truncate": "safetensors", "manifest": "json"}[corrupt]
        path = st.store.root / MODEL / "versions" / f"{version:08d}.{suffix}"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    token = int(st.r.get(KEYS.fence) or 0)
    RecordLog(st.r, MODEL).publish(token, version, {"parent": parent, "by": "test"}, [],
                                   expected_version=version_key(st.r))
    return version


def predicted_version(url: str, model: str = MODEL) -> int:
    resp = httpx.post(url + "/predict", json={"model": model, "inputs": images(1, np.random.default_rng(0))},
                      timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["version"]


def readiness(p: ApiProcess) -> dict[str, Any]:
    resp = p.readyz()
    assert resp is not None
    return resp.json()


def images(n: int, rng: np.random.Generator) -> list[Any]:
    return rng.integers(0, 256, size=(n, *SHAPE)).tolist()


@dataclass
class Call:
    """One HTTP exchange of a load thread: what was asked, what came back, and when (monotonic)."""

    kind: str  # predict | label
    url: str
    status: int | None  # None: no answer (a transport error, a timeout)
    started: float
    ended: float
    body: dict[str, Any] = field(default_factory=dict)
    labels: list[tuple[str, int]] = field(default_factory=list)  # (id, label) this call attached, if 200


class Load:
    """Client threads that predict and label in a loop until stopped, recording every exchange."""

    def __init__(self, urls: list[str], threads_per_url: int = 2, timeout_s: float = 15.0) -> None:
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._timeout_s = timeout_s
        self._threads = [threading.Thread(target=self._run, args=(url, i), daemon=True)
                         for i, url in enumerate(u for u in urls for _ in range(threads_per_url))]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self._timeout_s + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def _post(self, c: httpx.Client, url: str, kind: str, body: dict[str, Any]) -> Call:
        t0 = time.monotonic()
        try:
            resp = c.post(url, json=body)
            status, payload = resp.status_code, resp.json()
        except (httpx.TransportError, ValueError) as exc:
            status, payload = None, {"error": repr(exc)}
        call = Call(kind, url, status, t0, time.monotonic(), payload)
        self.calls.append(call)  # list.append is atomic under the GIL
        if status != 200:
            self._stop.wait(0.05)  # a client that backs off (Retry-After), briefly
        return call

    def _run(self, url: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=self._timeout_s) as c:
            while not self._stop.is_set():
                with_labels = bool(rng.integers(2))
                labels = [int(v) for v in rng.integers(0, CLASSES, 2)]
                body: dict[str, Any] = {"inputs": images(2, rng)}
                if with_labels:
                    body["labels"] = labels
                call = self._post(c, url + "/predict", "predict", body)
                if call.status != 200:
                    continue
                ids = [p["id"] for p in call.body["predictions"]]
                if with_labels:
                    call.labels = list(zip(ids, labels, strict=True))
                    continue
                for rid, label in zip(ids, labels, strict=True):
                    done = self._post(c, url + "/label", "label", {"id": rid, "label": label})
                    if done.status == 200:
                        done.labels = [(rid, label)]

    def count(self, status: int | None = 200, after: float = 0.0, url: str | None = None) -> int:
        return sum(1 for c in list(self.calls)
                   if c.status == status and c.started >= after and (url is None or c.url.startswith(url)))

    def labelled(self) -> list[tuple[str, int, float]]:
        """(id, label, answered at) of every label the API acknowledged with a 200."""
        return [(rid, label, c.ended) for c in list(self.calls) for rid, label in c.labels]


def stream_ids(r: redis.Redis) -> Counter[str]:
    """How many feedback entries each prediction id has."""
    return Counter(fields[b"id"].decode() for _, fields in r.xrange(KEYS.feedback))


@pytest.mark.slow  # the module's stack of replicas and a worker
@pytest.mark.parametrize(("fault", "appendfsync"), [("crash", "always"), ("crash", "everysec"),
                                                   ("freeze", "everysec")])
def test_redis_outage_under_load(stack: Stack, fault: str, appendfsync: str) -> None:
    """Redis fails while clients predict and label: ``crash`` is a SIGKILL (no shutdown flush) and a
    restart from the AOF, ``freeze`` a SIGSTOP (a Redis that accepts connections and never answers),
    then SIGCONT.

    During the outage every answer is a 503 naming Redis, within the Redis timeout; never a 500, never
    a hang. Service comes back by itself. Every label answered 200 is in its prediction hash and has
    exactly one feedback entry afterwards; after a crash with ``appendfsync everysec`` this is promised
    only for labels answered more than 2 s before it (Redis's worst case for a delayed fsync).
    """
    stack.r.config_set("appendfsync", appendfsync)
    stack.redis.appendfsync = appendfsync  # the restart keeps the policy
    assert stack.redis.proc is not None
    pid = stack.redis.proc.pid
    version = stack.serving()
    with Load([stack.a.url]) as load:
        wait_until(lambda: load.count() >= 30, timeout=30, interval=0.02, what="traffic before the outage")
        failed = time.monotonic()
        if fault == "crash":
            stack.redis.kill()
        else:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: load.count(503, after=failed) >= 5, timeout=10, interval=0.02, what="503s")
            ready = httpx.get(stack.a.url + "/readyz", timeout=10)
            assert ready.status_code == 503 and any("Redis" in why for why in ready.json()["reasons"])
            assert httpx.get(stack.a.url + "/healthz", timeout=10).status_code == 200
        finally:
            if fault == "crash":
                stack.redis.start()
            else:
                os.kill(pid, signal.SIGCONT)
        back = time.monotonic()
        wait_until(lambda: load.count(after=back) >= 30, timeout=30, interval=0.02, what="service resumes")
    answered = [c for c in load.calls if c.status is not None]
    assert len(answered) == len(load.calls), [c.body for c in load.calls if c.status is None][:3]  # no hang
    statuses = Counter(c.status for c in answered)
    lossy = fault == "crash" and appendfsync == "everysec"
    assert set(statuses) <= ({200, 503, 404} if lossy else {200, 503}), statuses  # 404: a lost prediction
    for c in answered:
        if c.status == 503:
            assert "Redis" in c.body["detail"], c.body
            assert c.ended - c.started < REDIS_TIMEOUT_S + SLACK_S, f"a 503 took {c.ended - c.started:.2f}s"
    assert httpx.get(stack.a.url + "/readyz", timeout=10).status_code == 200
    assert stack.serving() == version

    in_stream = stream_ids(stack.r)
    must_survive = [(rid, label) for rid, label, at in load.labelled() if not lossy or at < failed - 2.0 or at > back]
    lost = [(rid, label) for rid, label in must_survive
            if stack.r.hget(KEYS.pred(rid), "label") != str(label).encode() or in_stream[rid] != 1]
    assert not lost, f"{len(lost)} of {len(must_survive)} acknowledged labels lost: {lost[:5]}"
    assert len(must_survive) >= 30


@pytest.mark.slow  # the module's stack of replicas and a worker
def test_replica_killed_during_a_hot_swap(stack: Stack) -> None:
    """Replica B is SIGKILLed mid-swap (new version loaded and warmed up, not swapped in) under load.

    Replica A never fails a request and converges to the new version; once an answer of A named the
    new version, every later request is answered by it. B answers 200 until it dies, then its clients
    get connection errors (never a 5xx). B restarted serves the current version.
    """
    old = stack.serving()
    for p in (stack.a, stack.b):
        wait_until(lambda p=p: predicted_version(p.url) == old, timeout=30, interval=0.05, what="both serve")
    a, b = stack.a.url, stack.b.url
    with Load([a, b]) as load:
        wait_until(lambda: load.count(url=a) >= 10 and load.count(url=b) >= 10, timeout=30, interval=0.02,
                   what="traffic on both replicas")
        new = publish_next(stack)
        assert stack.b.wait_paused() == "before_swap"
        assert stack.b.sigkill() == -signal.SIGKILL
        killed = time.monotonic()
        wait_until(lambda: load.count(url=a, after=killed) >= 20, timeout=30, interval=0.02,
                   what="A keeps answering")
        wait_until(lambda: sum(1 for c in list(load.calls) if c.url.startswith(a) and c.kind == "predict"
                               and c.status == 200 and c.body["version"] == new) >= 5,
                   timeout=30, interval=0.02, what="A converges")
    on_a = [c for c in load.calls if c.url.startswith(a) and c.kind == "predict"]
    assert {c.status for c in load.calls if c.url.startswith(a)} == {200}
    first_new = min(c.ended for c in on_a if c.body["version"] == new)
    assert {c.body["version"] for c in on_a if c.started > first_new} <= {new}  # no going back
    assert {c.body["version"] for c in on_a} == {old, new}
    assert {c.status for c in load.calls if c.url.startswith(b)} <= {200, None}
    assert "pausing at before_swap" in stack.b.log_tail()

    stack.b = stack.replica("b")  # restarted, without the fault
    stack.b.start().wait_ready()
    assert predicted_version(stack.b.url) == new
    ready = readiness(stack.b)["models"][MODEL]
    assert (ready["version"], ready["target_version"], ready["error"]) == (new, new, None)


@pytest.mark.slow  # the module's stack of replicas and a worker
@pytest.mark.parametrize("corrupt", ["truncate", "manifest"])
def test_a_truncated_or_corrupt_version_is_refused_and_the_last_good_one_keeps_serving(
        stack: Stack, corrupt: str) -> None:
    good = stack.serving()
    for p in (stack.a, stack.b):
        wait_until(lambda p=p: predicted_version(p.url) == good, timeout=30, interval=0.05, what="both serve")
    bad = publish_next(stack, corrupt)

    def refused(p: ApiProcess) -> bool:
        m = readiness(p)["models"][MODEL]
        return m["target_version"] == bad and bool(m["error"])

    try:
        wait_until(lambda: refused(stack.a) and refused(stack.b), timeout=30, interval=0.05, what="refusal")
        why = "sha256" if corrupt == "truncate" else "manifest"
        for p in (stack.a, stack.b):
            ready = readiness(p)
            m = ready["models"][MODEL]
            assert ready["status"] == "ready" and m["version"] == good
            assert f"version {bad} cannot be served" in m["error"] and why in m["error"], m["error"]
            assert f"still serving version {good}" in m["error"]
            assert predicted_version(p.url) == good
            assert f"version {bad} cannot be served" in p.log_tail(20_000)
    finally:
        ModelLog(stack.r, MODEL).rollback(good, {"by": "test"})  # leave the module serving a good version
    for p in (stack.a, stack.b):
        wait_until(lambda p=p: readiness(p)["models"][MODEL]["error"] is None, timeout=30, interval=0.05)


@pytest.mark.slow  # the module's stack of replicas and a worker
def test_a_replica_starting_while_the_current_version_is_corrupt_serves_its_newest_good_ancestor(
        stack: Stack) -> None:
    """Current: ``bad2`` (weights truncated), built on ``bad1`` (manifest truncated: its parent is known only
    from the publish history), built on ``good``. A replica that starts now serves ``good``, ready, and
    says why in /readyz and its log. A model with no loadable version at all is not loaded, with the reason.
    """
    good = stack.serving()
    broken = make_store(stack.store.root, model="broken")
    weights = broken.root / "broken" / "versions" / f"{0:08d}.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    bad1 = publish_next(stack, "manifest")
    bad2 = publish_next(stack, "truncate", parent=bad1, base=good)
    d = stack.replica("d", "--models", MODEL, "broken", "--default-model", MODEL)
    try:
        d.start()
        wait_until(lambda: (r := d.readyz()) is not None and r.json()["models"][MODEL]["loaded"]
                   and r.json()["models"]["broken"]["error"], timeout=120, interval=0.1, what="d starts")
        ready = readiness(d)
        m, nothing = ready["models"][MODEL], ready["models"]["broken"]
        assert (m["version"], m["target_version"]) == (good, bad2)
        assert f"version {bad2} cannot be served" in m["error"] and "sha256" in m["error"], m["error"]
        assert f"serving version {good} instead, the newest loadable ancestor of version {bad2}" in m["error"]
        assert predicted_version(d.url) == good
        assert not nothing["loaded"] and "version 0 cannot be served" in nothing["error"]
        assert "no ancestor" in nothing["error"]
        assert ready["status"] == "not ready" and any("'broken' is not loaded" in why for why in ready["reasons"])
        resp = httpx.post(d.url + "/predict", json={"model": "broken", "inputs": images(1, np.random.default_rng(0))})
        assert resp.status_code == 503 and "version 0 cannot be served" in resp.json()["detail"]
        log = d.log_tail(50_000)
        assert f"ancestor {bad1} of version {bad2} cannot be served either" in log
        assert f"serving version {good} instead" in log
    finally:
        d.stop()
        ModelLog(stack.r, MODEL).rollback(good, {"by": "test"})
    for p in (stack.a, stack.b):
        wait_until(lambda p=p: readiness(p)["models"][MODEL]["error"] is None, timeout=30, interval=0.05)
