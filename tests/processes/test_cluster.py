"""mpserve on a real Redis Cluster: three primaries from Debian's redis-server in cluster mode on loopback
(``redis-cli --cluster create``), two API replicas and two workers given the cluster URL, two models whose
hash tags land on different primaries.

What must hold there as on one server: every key of a model lives on its slot's primary; predict → label →
reconcile → hot swap on both replicas, the swap carried by pub/sub alone (the replicas' polling is slowed
to a minute); the leader lease fails over when its worker is killed, and the survivor claims what the dead
leader had read, so nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from model_store import ModelStore
from mpserve.client import MPServeClient
from redis_io.connect import SyncClient, async_client, parse_redis_url, sync_client
from redis_io.fenced import fenced_ack
from redis_io.keys import ModelKeys
from redis_io.protocol import PredictionRecord, StaleLeaderError
from redis_io.recordlog import AsyncRecordLog, RecordLog
from tests.helpers import (
    ApiProcess,
    ChildProcess,
    RedisClusterProcesses,
    api_args,
    make_store,
    pending_ids,
    wait_until,
    worker_args,
)

pytestmark = pytest.mark.slow

MODELS = ("fashion", "mnist")  # slots 13380 and 9677: the third and the second primary of three
TOKEN = "cluster-admin-token"
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    nodes = RedisClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def rc(cluster: RedisClusterProcesses) -> Iterator[SyncClient]:
    """mpserve's own cluster client (redis_io.connect), as the worker makes it."""
    with closing(sync_client(cluster.url)) as client:
        yield client


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("store")
    for model in MODELS:
        make_store(root, model=model)
    return ModelStore(root)


@pytest.fixture(scope="module")
def replicas(cluster: RedisClusterProcesses, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[list[ApiProcess]]:
    """Two replicas serving both models; their polling is slowed to a minute, so only pub/sub swaps them."""
    logs = tmp_path_factory.mktemp("logs")
    servers = [ApiProcess([*api_args(cluster.url, store.root, "--models", ",".join(MODELS),
                                     "--poll-interval-s", "60", "--admin-token", TOKEN)], logs / f"api-{i}.log")
               for i in range(2)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def workers(cluster: RedisClusterProcesses, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ChildProcess]]:
    """Two workers for both models: one leads each model, the other stands by. 48 labelled records start a
    reconciliation by themselves; an admin request needs only a cohort."""
    logs = tmp_path_factory.mktemp("workers")
    procs = {name: ChildProcess("worker", worker_args(cluster.url, store.root, ",".join(MODELS), name, 48),
                                logs / f"{name}.log").start() for name in ("wa", "wb")}
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def clients(replicas: list[ApiProcess]) -> Iterator[list[MPServeClient]]:
    cs = [MPServeClient(s.url, admin_token=TOKEN, timeout=60) for s in replicas]
    try:
        yield cs
    finally:
        for c in cs:
            c.close()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE)).astype(np.float32)


def serving(rc: SyncClient, model: str) -> int:
    current = RecordLog(rc, model).current_version()
    return 0 if current is None else current


def leaders(rc: SyncClient, workers: dict[str, ChildProcess]) -> dict[str, str]:
    """Model → the name of the worker holding its lease (every model led)."""
    def held() -> dict[str, str] | None:
        for w in workers.values():
            assert w.proc is not None and w.proc.poll() is None, w.log_tail()
        owners = {m: rc.get(ModelKeys(m).lock) for m in MODELS}
        return None if None in owners.values() else {m: v.decode().split(":")[0] for m, v in owners.items()}
    return wait_until(held, timeout=60, interval=0.05, what="each model has a leader")


def predict_labelled(c: MPServeClient, model: str, n: int, seed: int) -> list[str]:
    out = c.predict(images(n, seed), labels=[i % 10 for i in range(n)], model=model)
    return [p["id"] for p in out["predictions"]]


def wait_served(clients: list[MPServeClient], model: str, version: int) -> None:
    """Wait until every replica answers ``model``'s predictions with ``version``."""
    for c in clients:
        wait_until(lambda c=c: c.predict(images(1, 99), model=model)["version"] == version,
                   timeout=20, interval=0.05, what=f"{model} v{version} served by {c.base_url}")


def node_keys(cluster: RedisClusterProcesses) -> dict[int, list[bytes]]:
    """Each primary's keys, asked of the node itself."""
    out = {}
    for node in cluster.nodes:
        client = redis.Redis(port=node.port, host="127.0.0.1")
        try:
            out[node.port] = list(client.scan_iter(count=1000))
        finally:
            client.close()
    return out


def test_a_cluster_url_names_its_seeds_and_refuses_what_a_cluster_cannot_be() -> None:
    address = parse_redis_url("redis+cluster://user:pw@10.0.0.1:7000,10.0.0.2:7001/0")
    assert address.cluster and address.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert address.url == "redis://user:pw@10.0.0.1:7000"
    assert not parse_redis_url("redis://127.0.0.1:6379/2").cluster
    for bad, says in [("redis+cluster://a,b:1", "host:port"), ("redis+cluster://a:1/3", "database 0"),
                      ("redis+cluster://a:99999", "host:port")]:
        with pytest.raises(ValueError, match=says):
            parse_redis_url(bad)


def test_predict_label_reconcile_and_a_pubsub_swap_on_both_replicas_for_each_model(
        cluster: RedisClusterProcesses, rc: SyncClient, clients: list[MPServeClient], replicas: list[ApiProcess],
        workers: dict[str, ChildProcess]) -> None:
    leaders(rc, workers)
    for i, model in enumerate(MODELS):
        base = serving(rc, model)
        ids = predict_labelled(clients[0], model, 24, seed=i)  # fewer than 48: only the admin request reconciles
        res = clients[1].reconcile(model=model)
        assert res["model"] == model and res["parent"] == base and res["version"] > base
        assert res["stats"]["records"] == 24
        assert serving(rc, model) == res["version"]
        wait_served(clients, model, res["version"])  # polling is slowed to a minute: the swap came by pub/sub
        assert not pending_ids(rc, model)  # every record used was acknowledged with the publish
        assert clients[0].label(ids[0], 0, model=model)["status"] == "duplicate"  # labelled at predict time

    # every key of a model lives on the primary serving its slot, and the two models on different primaries
    homes = {m: cluster.port_of_slot(rc.keyslot(ModelKeys(m).version)) for m in MODELS}
    assert len(set(homes.values())) == len(MODELS)
    spread = node_keys(cluster)
    for model, port in homes.items():
        tag = f"{{{model}}}".encode()
        assert any(tag in k for k in spread[port])
        assert not [k for p, keys in spread.items() if p != port for k in keys if tag in k]
    print("keys per primary:", {p: len(k) for p, k in spread.items()}, "homes:", homes)

    # what reads Redis beyond the request path answers on the cluster too
    for path in ["/readyz", "/metrics", "/models", f"/models/{model}", f"/models/{model}/versions",
                 "/v2/health/ready", f"/v2/models/{model}/ready"]:
        resp = httpx.get(replicas[0].url + path, timeout=30)
        assert resp.status_code == 200, (path, resp.text[:300])
    assert clients[0].versions(model)["versions"][-1]["version"] == res["version"]


def test_the_lease_fails_over_on_the_cluster_and_the_dead_leaders_entries_are_claimed(
        rc: SyncClient, store: ModelStore, clients: list[MPServeClient],
        workers: dict[str, ChildProcess]) -> None:
    model = MODELS[1]
    keys = ModelKeys(model)
    leader = leaders(rc, workers)[model]
    start = serving(rc, model)
    predict_labelled(clients[0], model, 48, seed=10)  # min_records: the leader reconciles by itself
    wait_until(lambda: serving(rc, model) > start, timeout=30, interval=0.05, what="the leader publishes")
    first = serving(rc, model)
    held_n = 32  # fewer than min_records: the leader reads them and waits for more
    predict_labelled(clients[1], model, held_n, seed=11)
    wait_until(lambda: len(pending_ids(rc, model)) == held_n, timeout=20, interval=0.02, what="the leader reads")
    held = pending_ids(rc, model)

    workers[leader].sigkill()
    predict_labelled(clients[0], model, 16, seed=12)
    more = [e[0].decode() for e in rc.xrange(keys.feedback, "(" + held[-1])]
    wait_until(lambda: serving(rc, model) > first, timeout=60, interval=0.05, what="the survivor publishes")
    version = serving(rc, model)
    last = RecordLog(rc, model).history()[-1]
    assert last["consumer"] != leader and last["version"] == version
    assert store.read_manifest(model, version)["inputs"]["entry_ids"] == held + more  # claimed, not lost
    assert not pending_ids(rc, model)
    wait_served(clients, model, version)


def test_a_worker_started_before_the_cluster_answers_waits_for_it(tmp_path: Path, store: ModelStore) -> None:
    """A cluster's client reads the slot map when it is made: the worker must wait for one, not exit."""
    down = RedisClusterProcesses(tmp_path / "later")
    worker = ChildProcess("worker", worker_args(down.url, store.root, MODELS[0], "late", 48),
                          tmp_path / "late.log").start()
    try:
        wait_until(lambda: worker.proc is not None and "not reachable yet" in worker.log_tail(),
                   timeout=30, interval=0.1, what="the worker says it waits")
        assert worker.proc is not None and worker.proc.poll() is None
        down.start()
        client = sync_client(down.url)
        try:
            wait_until(lambda: client.get(ModelKeys(MODELS[0]).lock), timeout=30, interval=0.05,
                       what="the late worker leads")
        finally:
            client.close()
    finally:
        worker.stop()
        down.stop()


def test_a_fenced_ack_on_the_cluster_refuses_a_stale_token(rc: SyncClient, cluster: RedisClusterProcesses) -> None:
    """The worker's one optimistic transaction (WATCH the fence and the version, MULTI, XACK) on a model that
    lands on the primary the served models leave empty."""
    model = "b"
    keys = ModelKeys(model)
    assert cluster.port_of_slot(rc.keyslot(keys.version)) not in {
        cluster.port_of_slot(rc.keyslot(ModelKeys(m).version)) for m in MODELS}
    records = [PredictionRecord(f"f{i}", 0, (0, 1), np.zeros(10, np.float32), label=i % 10, loss=1.0)
               for i in range(3)]

    async def write() -> None:
        client = async_client(cluster.url)
        try:
            await AsyncRecordLog(client, model).write_predictions(records)
        finally:
            await client.aclose()

    asyncio.run(write())
    log = RecordLog(rc, model)
    log.ensure_group()
    ids = [e.entry_id for e in log.read_feedback("w", 10)]
    assert len(ids) == 3
    old = log.acquire_lease("a", 10_000)
    rc.delete(keys.lock)
    new = log.acquire_lease("b", 10_000)
    assert old is not None and new is not None and new > old
    with pytest.raises(StaleLeaderError):
        fenced_ack(rc, keys, "reconciler", old, None, ids)
    assert fenced_ack(rc, keys, "reconciler", new, 5, ids) is None  # serving is not at version 5
    assert fenced_ack(rc, keys, "reconciler", new, None, ids[:2]) == 2
    assert pending_ids(rc, model) == ids[2:]


def test_labels_after_every_primary_forgot_its_scripts_and_a_rollback_by_pubsub(
        cluster: RedisClusterProcesses, rc: SyncClient, clients: list[MPServeClient],
        workers: dict[str, ChildProcess]) -> None:
    model = MODELS[0]
    out = clients[0].predict(images(4, 20), model=model)
    for node in cluster.nodes:
        client = redis.Redis(port=node.port, host="127.0.0.1")
        try:
            client.script_flush()
        finally:
            client.close()
    results = clients[1].label_many([(p["id"], 1) for p in out["predictions"]], model=model)
    assert [r["status"] for r in results] == ["ok"] * 4  # NOSCRIPT: loaded again, then run

    current = serving(rc, model)
    if current == 0:  # this test alone: make a version to roll back from
        predict_labelled(clients[0], model, 24, seed=21)
        current = clients[0].reconcile(model=model)["version"]
    target = RecordLog(rc, model).history()[0].get("parent", 0)
    clients[0].rollback(target, model=model)
    assert serving(rc, model) == target
    wait_served(clients, model, target)  # polling is slowed to a minute: the rollback came by pub/sub


def test_a_cluster_that_is_down_is_a_503_naming_redis_and_service_resumes_when_it_is_back(
        cluster: RedisClusterProcesses, replicas: list[ApiProcess], clients: list[MPServeClient]) -> None:
    """Last in this module: it stops every primary. A cluster client's own outage errors (no node reachable,
    CLUSTERDOWN, a slot nobody serves) are outages like a refused connection: the clear 503 of one server."""
    url = replicas[0].url
    x = images(1, 30).tolist()
    for node in cluster.nodes:
        node.stop()
    try:
        for path, body in (("/predict", {"inputs": x, "model": MODELS[0]}), ("/label", {"id": "a" * 32, "label": 1}),
                           ("/models", None), ("/admin/reconcile", {"model": MODELS[0]})):
            resp = httpx.request("GET" if body is None else "POST", url + path, json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
            assert resp.status_code == 503 and "Redis" in resp.json()["detail"], (path, resp.text[:300])
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["reasons"], ready.text[:300]
    finally:
        cluster.start()  # the same nodes and ports, their cluster config kept (their data is not)
    for s in replicas:
        wait_until(lambda s=s: httpx.get(s.url + "/readyz", timeout=30).status_code == 200, timeout=30,
                   interval=0.1, what=f"{s.url} ready again")
    assert clients[0].predict(images(1, 31), model=MODELS[0])["predictions"]
