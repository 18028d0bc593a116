"""Fault tests against real processes: a worker SIGKILLed at each step of a reconciliation, Redis restarted
under load, an API replica killed during a hot swap, a corrupt version in the store.

Processes stop at a step through ``MPSERVE_FAULT=<point>:pause`` (mpserve.faults): the child writes a
marker file when it gets there and blocks; the test checks what Redis and the store hold at that moment,
then sends a real SIGKILL. Everything is checked from Redis and the store alone, as an operator would.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from model_store import ModelStore
from mpserve.keys import ModelKeys
from mpserve.recordlog import RecordLog
from tests.helpers import ChildProcess, RedisProcess, feed_labels, make_store, pending_ids, wait_until, worker_args

MODEL = "fashion"
KEYS = ModelKeys(MODEL)


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
