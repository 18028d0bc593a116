"""The Redis data layer against a real redis-server (see conftest.redis_server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio

from marketplace.reconcile import cross_entropy
from redis_io.keys import ModelKeys
from redis_io.protocol import (
    EntryNotPendingError,
    FeedbackEntry,
    PredictionRecord,
    StaleLeaderError,
    VersionMovedError,
    label_item,
)
from redis_io.recordlog import AsyncRecordLog, RecordLog
from tests.helpers import ModelLog, start_redis, wait_until

MODEL = "fashion"
K = ModelKeys(MODEL)


def rec(i: int, version: int = 1, label: int | None = None, loss: float | None = None) -> PredictionRecord:
    logits = np.arange(4, dtype=np.float32) * (i + 1) - 0.5
    return PredictionRecord(f"id{i}", version, (i % 3, 1, 0), logits, label, loss)


def labelled(log: RecordLog, n: int, version: int = 1) -> list[str]:
    """Write n predictions whose labels came with them; returns their ids."""
    log.write_predictions([rec(i, version, label=i % 4, loss=0.1 * i) for i in range(n)])
    return [f"id{i}" for i in range(n)]


def pending_ids(client: redis.Redis, group: str = "reconciler") -> list[str]:
    rows = client.xpending_range(K.feedback, group, "-", "+", 10_000)
    return [r["message_id"].decode() for r in rows]


def stream_ids(client: redis.Redis) -> list[str]:
    return [eid.decode() for eid, _ in client.xrange(K.feedback)]


def replica_round_trips(url: str, call: Callable[[AsyncRecordLog], Awaitable[Any]]) -> tuple[int, Any]:
    """(socket writes, i.e. round trips, result) of ``call`` on the API's record log, connected and with its
    script loaded beforehand (the steady state)."""

    class Counting(redis.asyncio.Connection):
        sends = 0

        async def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
            type(self).sends += 1
            return await super().send_packed_command(command, check_health)

    async def main() -> tuple[int, Any]:
        client = redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool.from_url(
            url, connection_class=Counting))
        try:
            replica = AsyncRecordLog(client, MODEL, label_window_s=600)
            await client.script_load(replica.scripts.attach_label.script)
            Counting.sends = 0
            result = await call(replica)
            return Counting.sends, result
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.fixture
def log(redis_client: redis.Redis) -> ModelLog:
    rl = ModelLog(redis_client, MODEL, label_window_s=3600)
    assert rl.ensure_group() is True
    return rl


# --------------------------------------------------------------------------- keys


def test_model_keys_use_hash_tag_and_validate() -> None:
    k = ModelKeys("fashion")
    assert k.pred("a-1_B") == "mp:{fashion}:pred:a-1_B"
    assert (k.feedback, k.version, k.events) == (
        "mp:{fashion}:feedback",
        "mp:{fashion}:version",
        "mp:{fashion}:events",
    )
    assert (k.lock, k.fence, k.history) == ("mp:{fashion}:lock", "mp:{fashion}:fence", "mp:{fashion}:history")
    for bad in ["", "Fashion", "-x", "a" * 65, "a:b", "a{b}"]:
        with pytest.raises(ValueError):
            ModelKeys(bad)
    for bad_id in ["", "a:b", "x" * 65, "a b", "ü"]:
        with pytest.raises(ValueError):
            k.pred(bad_id)


def test_rejects_decoding_client(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        ModelLog(client, MODEL)


# --------------------------------------------------------------------------- predictions


def test_write_predictions_is_one_round_trip_and_sets_ttl(redis_server, redis_client) -> None:  # type: ignore[no-untyped-def]
    items = [rec(0), rec(1), rec(2, label=3, loss=1.25)]
    sends, _ = replica_round_trips(redis_server.url, lambda replica: replica.write_predictions(items, now_ms=1234))
    assert sends == 1

    h = redis_client.hgetall(K.pred("id1"))
    assert h[b"version"] == b"1" and h[b"path"] == b"1,1,0" and h[b"created"] == b"1234"
    assert h[b"logits"] == items[1].logits.astype("<f4").tobytes()
    assert b"label" not in h
    for i in range(3):
        assert 590_000 < redis_client.pttl(K.pred(f"id{i}")) <= 600_000

    entries = redis_client.xrange(K.feedback)
    assert len(entries) == 1  # only the labelled item is feedback
    fields = entries[0][1]
    assert fields == {
        b"id": b"id2",
        b"version": b"1",
        b"path": b"2,1,0",
        b"loss": b"1.25",
        b"label": b"3",
        b"ts": b"1234",
        b"hit": b"1" if int(np.argmax(items[2].logits)) == 3 else b"0",  # was the served prediction right
    }
    assert redis_client.hget(K.pred("id2"), "label") == b"3"


def test_write_predictions_is_idempotent_under_replay(log: RecordLog, redis_client: redis.Redis) -> None:
    """redis-py re-sends a batch after a connection error: the replay must not add feedback twice."""
    items = [rec(0), rec(1, label=2, loss=0.5), rec(2, label=0, loss=1.5)]
    log.write_predictions(items, now_ms=1000)
    log.write_predictions(items, now_ms=1000)
    ids = [f[b"id"] for _, f in redis_client.xrange(K.feedback)]
    assert ids == [b"id1", b"id2"]
    assert redis_client.hget(K.pred("id1"), "label") == b"2"
    assert redis_client.hget(K.pred("id0"), "label") is None
    # A late label for a prediction labelled at predict time is a duplicate, not a second entry.
    assert log.attach_labels([("id1", 2, 0.5), ("id0", 3, 0.2)]) == ["duplicate", "ok"]
    assert redis_client.xlen(K.feedback) == 3


def test_write_predictions_with_labels_survives_script_flush(log: RecordLog, redis_client: redis.Redis) -> None:
    redis_client.script_flush()
    log.write_predictions([rec(0), rec(1, label=2, loss=0.5)])
    (entry,) = log.read_feedback("w", count=10)
    assert (entry.id, entry.label, entry.loss) == ("id1", 2, 0.5)
    assert redis_client.exists(K.pred("id0")) == 1


def test_write_predictions_validates_whole_batch_first(log: RecordLog, redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        log.write_predictions([rec(0), rec(1, label=2, loss=float("nan"))])
    with pytest.raises(ValueError):
        log.write_predictions([rec(0), rec(1, label=2, loss=None)])
    assert redis_client.exists(K.pred("id0")) == 0


def test_fetch_logits_round_trip(redis_server, redis_client) -> None:  # type: ignore[no-untyped-def]
    items = [rec(0, version=7), rec(1, version=8)]
    ModelLog(redis_client, MODEL).write_predictions(items)
    sends, got = replica_round_trips(redis_server.url, lambda replica: replica.fetch_logits(["id0", "id1", "nope"]))
    assert sends == 1
    assert got["nope"] is None
    version, path, logits, leader = got["id1"]
    assert (version, path, leader) == (8, (1, 1, 0), None)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, items[1].logits)


def test_paired_record_carries_the_leader_loss_into_the_feedback_entry(redis_client) -> None:  # type: ignore[no-untyped-def]
    """Paired probes: the hash keeps the leader's logits, and a label (late or given) records both losses."""
    rl = ModelLog(redis_client, MODEL)
    probe, leader = np.array([2.0, 0.0, -1.0], np.float32), np.array([0.0, 3.0, -1.0], np.float32)
    rl.write_predictions([PredictionRecord("late", 4, (1, 2, 0), probe, leader_logits=leader),
                          PredictionRecord("given", 4, (2, 0, 1), probe, label=1, leader_logits=leader)])
    stored = rl.fetch_logits(["late"])["late"]
    assert stored is not None and stored.leader_logits is not None
    np.testing.assert_array_equal(stored.leader_logits, leader)
    assert rl.attach_labels([label_item("late", 1, stored.logits, stored.leader_logits)]) == ["ok"]
    rl.ensure_group()
    entries = {e.id: e for e in rl.read_feedback("c", count=10)}
    expect_loss = float(cross_entropy(probe[None], np.array([1]))[0])
    expect_base = float(cross_entropy(leader[None], np.array([1]))[0])
    for rid in ("late", "given"):
        e = entries[rid]
        assert e.loss == pytest.approx(expect_loss) and e.base_loss == pytest.approx(expect_base)
        assert e.correct is True  # the user got the leader's answer, class 1
        assert e.probe_correct is False  # the probe path said class 0
        # both logit vectors travel with the entry: the worker estimates the head's gradient from them
        assert e.logits is not None and e.leader_logits is not None
        np.testing.assert_array_equal(e.logits, probe)
        np.testing.assert_array_equal(e.leader_logits, leader)


# --------------------------------------------------------------------------- labels


def test_attach_label_statuses(log: RecordLog, redis_client: redis.Redis) -> None:
    log.write_predictions([rec(0, version=5), rec(1), rec(2)])
    assert log.attach_labels([("id0", 2, 0.75), ("id1", 1, 0.5, True)], now_ms=99) == ["ok", "ok"]
    assert redis_client.xlen(K.feedback) == 2
    first = redis_client.xrange(K.feedback, count=1)[0][1]
    assert first == {
        b"id": b"id0",
        b"version": b"5",
        b"path": b"0,1,0",
        b"loss": b"0.75",
        b"label": b"2",
        b"ts": b"99",
        b"hit": b"",  # not said whether the served prediction was right
    }
    assert redis_client.xrange(K.feedback)[1][1][b"hit"] == b"1"

    results = log.attach_labels_detailed(
        [("id0", 2, 0.75), ("id1", 3, 0.1), ("ghost", 1, 0.1), ("id2", 0, 0.2)]
    )
    assert [(r.status, r.existing_label) for r in results] == [
        ("duplicate", 2),
        ("conflict", 1),
        ("not_found", None),
        ("ok", None),
    ]
    assert redis_client.xlen(K.feedback) == 3  # no second entry for id0, none for the conflict
    assert redis_client.hget(K.pred("id1"), "label") == b"1"  # conflict left the first label


def test_a_kept_input_moves_to_the_capped_replay_stream_once_when_labelled(redis_client: redis.Redis) -> None:
    api = ModelLog(redis_client, MODEL, label_window_s=3600, replay_size=3, replay_window_s=60)
    x = np.random.default_rng(0).random((6, 1, 2, 2)).astype(np.float32)

    def kept(i: int, label: int | None = None) -> PredictionRecord:
        r = rec(i, label=label, loss=None if label is None else 0.5)
        return PredictionRecord(r.id, r.version, r.path, r.logits, r.label, r.loss, kept_input=x[i])

    api.write_predictions([kept(0), rec(1), kept(2), kept(3, label=1)])  # id1's input was not kept
    assert redis_client.get(K.kept_input("id0")) == x[0].tobytes()
    assert 0 < redis_client.pttl(K.kept_input("id0")) <= 60_000  # waits for its label an hour at most, not a day
    assert redis_client.exists(K.kept_input("id1")) == 0
    assert redis_client.xlen(K.replay) == 1  # id3 came with its label
    assert api.attach_labels([("id0", 2, 0.1), ("id1", 0, 0.1), ("id0", 2, 0.1)]) == ["ok", "ok", "duplicate"]
    assert redis_client.exists(K.kept_input("id0")) == 0  # moved, not copied
    got = api.recent_inputs(60_000)
    assert [(e.record_id, e.label, e.inputs) for e in got] == [("id0", 2, x[0].tobytes()), ("id3", 1, x[3].tobytes())]
    assert api.attach_labels([("id2", 3, 0.1)]) == ["ok"]
    api.write_predictions([kept(4, label=0), kept(5, label=1)])
    assert [e.record_id for e in api.recent_inputs(60_000)] == ["id5", "id4", "id2"]  # the newest 3, newest first
    assert [e.record_id for e in api.recent_inputs(60_000, count=2)] == ["id5", "id4"]
    newest_ms = int(redis_client.xrevrange(K.replay, count=1)[0][0].decode().split("-")[0])
    assert api.recent_inputs(1000, now_ms=newest_ms + 2000) == []  # once traffic stops, old inputs stop judging
    # a replica set to keep no replay (replay_size 0) moves nothing: the input stays until it expires
    api.write_predictions([PredictionRecord("k9", 1, (0, 1, 0), rec(9).logits, kept_input=x[1])])
    assert ModelLog(redis_client, MODEL, label_window_s=3600).attach_labels([("k9", 1, 0.1)]) == ["ok"]
    assert redis_client.get(K.kept_input("k9")) == x[1].tobytes()
    assert [e.record_id for e in api.recent_inputs(60_000)] == ["id5", "id4", "id2"]


def test_attach_label_after_expiry_is_not_found(redis_client: redis.Redis) -> None:
    rl = ModelLog(redis_client, MODEL, label_window_s=1)
    rl.write_predictions([rec(0)])
    assert redis_client.exists(K.pred("id0")) == 1
    wait_until(lambda: redis_client.exists(K.pred("id0")) == 0, timeout=5, what="prediction expired")
    assert rl.attach_labels([("id0", 1, 0.3)]) == ["not_found"]
    assert rl.fetch_logits(["id0"]) == {"id0": None}
    assert redis_client.xlen(K.feedback) == 0


def test_attach_survives_script_flush(log: RecordLog, redis_client: redis.Redis) -> None:
    log.write_predictions([rec(0), rec(1)])
    redis_client.script_flush()
    assert log.attach_labels([("id0", 1, 0.1), ("id1", 2, 0.2)]) == ["ok", "ok"]
    assert redis_client.xlen(K.feedback) == 2


# --------------------------------------------------------------------------- feedback stream


def test_read_feedback_and_pending_after_restart(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 5)
    first = log.read_feedback("w1", count=3)
    assert [e.id for e in first] == ["id0", "id1", "id2"]
    e = first[1]
    assert isinstance(e, FeedbackEntry)
    assert (e.version, e.path, e.loss, e.label) == (1, (1, 1, 0), 0.1, 1)
    assert [x.id for x in log.read_feedback("w2", count=10, block_ms=10)] == ["id3", "id4"]

    # A restarted worker (new object, same consumer name) sees what it had not acked.
    again = ModelLog(redis_client, MODEL).pending_entries("w1", count=2)
    assert [x.entry_id for x in again] == [x.entry_id for x in first]
    assert ModelLog(redis_client, MODEL).pending_entries("nobody") == []


def test_read_feedback_splits_between_consumers(log: RecordLog) -> None:
    labelled(log, 4)
    a = log.read_feedback("a", count=3)
    b = log.read_feedback("b", count=3, block_ms=10)
    assert len(a) == 3 and len(b) == 1
    assert {e.id for e in a} | {e.id for e in b} == {f"id{i}" for i in range(4)}
    assert log.read_feedback("a", count=3, block_ms=10) == []


def test_read_feedback_recreates_missing_group(redis_client: redis.Redis) -> None:
    rl = ModelLog(redis_client, MODEL)
    labelled(rl, 2)  # stream exists, group does not
    assert [e.id for e in rl.read_feedback("w", count=10)] == ["id0", "id1"]
    assert rl.ensure_group() is False  # BUSYGROUP is not an error


def test_malformed_entries_are_acked_as_dropped(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 1)
    bad = redis_client.xadd(K.feedback, {"id": "x", "version": "not-a-number"}).decode()
    log.write_predictions([rec(9, label=1, loss=0.2)])
    got = log.read_feedback("w", count=10)
    assert [e.id for e in got] == ["id0", "id9"]
    assert bad not in pending_ids(redis_client)
    assert len(pending_ids(redis_client)) == 2


def test_reclaim_takes_a_dead_consumers_entries(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 3)
    dead = log.read_feedback("dead", count=10)
    assert len(dead) == 3
    assert log.reclaim("alive", min_idle_ms=60_000) == []  # not idle long enough yet
    got = wait_until(lambda: log.reclaim("alive", min_idle_ms=30, count=10), timeout=5, what="reclaim")
    assert sorted(e.entry_id for e in got) == sorted(e.entry_id for e in dead)
    owners = {c["name"]: c["pending"] for c in redis_client.xpending(K.feedback, "reconciler")["consumers"]}
    assert owners == {b"alive": 3}


def test_reclaim_respects_count(log: RecordLog) -> None:
    labelled(log, 5)
    log.read_feedback("dead", count=10)
    # wait until every entry is idle past min_idle, so one reclaim sees all five (a first non-empty reclaim
    # right at the boundary could see fewer than count)
    wait_until(lambda: all(p["time_since_delivered"] >= 5 for p in
                           log.client.xpending_range(K.feedback, "reconciler", "-", "+", 10)), timeout=5,
               what="entries idle")
    got = log.reclaim("alive", min_idle_ms=1, count=2)
    assert len(got) == 2
    rest = log.reclaim("alive2", min_idle_ms=0, count=100)
    assert len(rest) == 5  # min_idle 0 claims everything pending, including alive's


# --------------------------------------------------------------------------- publishing


def test_publish_acks_exactly_the_given_ids(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 4)
    entries = log.read_feedback("w", count=10)
    token = log.acquire_lease("w", 10_000)
    assert token is not None
    used = [entries[0].entry_id, entries[2].entry_id]
    assert log.publish(token, 2, {"parent": 1, "records": 2}, used, expected_version=None) == 2
    assert pending_ids(redis_client) == [entries[1].entry_id, entries[3].entry_id]
    assert log.current_version() == 2
    (h,) = log.history()
    assert (h["type"], h["version"], h["parent"], h["records"]) == ("publish", 2, 1, 2)
    assert isinstance(h["ts_ms"], int)
    assert log.backlog() == 2
    # The same ids again: already used, so the publish is refused and changes nothing.
    before = (log.history(), pending_ids(redis_client))
    with pytest.raises(EntryNotPendingError, match=used[0]):
        log.publish(token, 3, {}, [entries[1].entry_id, used[0]], expected_version=2)
    assert (log.current_version(), log.history(), pending_ids(redis_client)) == (2, *before)
    assert log.publish(token, 3, {}, [], expected_version=2) == 0  # no entries: a plain publish


def test_stale_token_is_refused_and_changes_nothing(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 3)
    entries = log.read_feedback("old", count=10)
    old = log.acquire_lease("old", 10_000)
    assert old is not None
    assert log.publish(old, 1, {}, [], expected_version=None) == 0
    assert log.release_lease("old") is True
    new = log.acquire_lease("new", 10_000)
    assert new == old + 1

    before = (log.current_version(), log.history(), pending_ids(redis_client), stream_ids(redis_client))
    with pytest.raises(StaleLeaderError):
        log.publish(old, 2, {"by": "old"}, [e.entry_id for e in entries], expected_version=1)
    after = (log.current_version(), log.history(), pending_ids(redis_client), stream_ids(redis_client))
    assert after == before
    assert log.publish(new, 2, {"by": "new"}, [entries[0].entry_id], expected_version=1) == 1


def test_publish_refuses_when_serving_moved_and_changes_nothing(
    log: RecordLog, redis_client: redis.Redis
) -> None:
    """An admin rollback between planning and publishing must not be undone by the publish."""
    labelled(log, 2)
    entries = [e.entry_id for e in log.read_feedback("w", count=10)]
    token = log.acquire_lease("w", 10_000)
    assert token is not None
    log.publish(token, 5, {}, [], expected_version=None)
    log.rollback(3, {"by": "admin"})  # the worker had planned on 5

    before = (log.current_version(), log.history(), pending_ids(redis_client), stream_ids(redis_client))
    with pytest.raises(VersionMovedError) as info:
        log.publish(token, 6, {"parent": 5}, entries, expected_version=5)
    assert (info.value.expected, info.value.current) == (5, 3)
    with pytest.raises(VersionMovedError):  # planned while the key was unset
        log.publish(token, 6, {}, entries, expected_version=None)
    after = (log.current_version(), log.history(), pending_ids(redis_client), stream_ids(redis_client))
    assert after == before
    assert log.publish(token, 4, {"parent": 3}, entries, expected_version=3) == 2
    assert log.current_version() == 4


def test_refuse_records_the_candidate_acks_its_entries_and_leaves_serving_alone(
    log: RecordLog, redis_client: redis.Redis
) -> None:
    labelled(log, 4)
    entries = [e.entry_id for e in log.read_feedback("w", count=10)]
    token = log.acquire_lease("w", 10_000)
    assert token is not None
    log.publish(token, 3, {"parent": 2}, [], expected_version=None)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(K.events)
    wait_until(lambda: pubsub.get_message(timeout=0.05), timeout=5, what="subscribed")
    try:
        figures = {"parent": 3, "validation": {"accuracy": 0.5, "reference_accuracy": 0.9}}
        assert log.refuse(token, 3, figures, entries[:3], expected_version=3) == 3
        log.rollback(2, {"by": "test"})  # an event after the refusal: the first one seen must be this one
        assert json.loads(_next_message(pubsub)["data"]) == {"type": "rollback", "version": 2}
    finally:
        pubsub.close()
    refused = log.history()[1]
    assert (refused["type"], refused["version"], refused["parent"]) == ("refused", 3, 3)
    assert refused["validation"] == {"accuracy": 0.5, "reference_accuracy": 0.9}
    assert pending_ids(redis_client) == entries[3:]  # exactly the given entries acknowledged

    # serving had moved (the rollback to 2): a refusal planned on 3 changes nothing
    before = (log.current_version(), log.history(), pending_ids(redis_client), stream_ids(redis_client))
    with pytest.raises(VersionMovedError):
        log.refuse(token, 3, {}, entries[3:], expected_version=3)
    assert log.release_lease("w") is True
    newer = log.acquire_lease("w2", 10_000)
    assert newer == token + 1
    with pytest.raises(StaleLeaderError):  # a stale token is refused and changes nothing
        log.refuse(token, 2, {}, entries[3:], expected_version=2)
    assert (log.current_version(), log.history(), pending_ids(redis_client), stream_ids(redis_client)) == before
    with pytest.raises(ValueError):
        log.refuse(newer, 2, {"loss": float("nan")}, entries[3:], expected_version=2)


def test_refuse_before_the_first_publish_keeps_the_version_key_unset(
    log: RecordLog, redis_client: redis.Redis
) -> None:
    labelled(log, 2)
    entries = [e.entry_id for e in log.read_feedback("w", count=10)]
    token = log.acquire_lease("w", 10_000)
    assert token is not None
    assert log.refuse(token, 0, {"parent": 0}, entries, expected_version=None) == 2
    assert log.current_version() is None and pending_ids(redis_client) == []
    assert [(h["type"], h["version"]) for h in log.history()] == [("refused", 0)]


def test_publish_refuses_a_token_above_the_fence(log: RecordLog, redis_client: redis.Redis) -> None:
    token = log.acquire_lease("w", 10_000)
    assert token == 1
    with pytest.raises(StaleLeaderError):
        log.publish(token + 1, 1, {}, [], expected_version=None)  # never handed out
    assert log.current_version() is None and log.history() == []
    assert log.publish(token, 1, {}, [], expected_version=None) == 0


def test_history_keeps_only_the_newest_entries(redis_client: redis.Redis) -> None:
    rl = ModelLog(redis_client, MODEL, history_max=3)
    rl.ensure_group()
    token = rl.acquire_lease("w", 10_000)
    assert token is not None
    current = None
    for v in range(1, 5):
        rl.publish(token, v, {}, [], expected_version=current)
        current = v
    assert [h["version"] for h in rl.history()] == [2, 3, 4]
    rl.rollback(2)
    rl.rollback(3)
    assert [(h["type"], h["version"]) for h in rl.history()] == [("publish", 4), ("rollback", 2), ("rollback", 3)]
    assert redis_client.llen(K.history) == 3
    with pytest.raises(ValueError):
        ModelLog(redis_client, MODEL, history_max=0)


def test_publish_rejects_bad_input_before_writing(log: RecordLog) -> None:
    token = log.acquire_lease("w", 10_000)
    with pytest.raises(ValueError):
        log.publish(token, 2, {}, ["not-an-id"], expected_version=None)
    with pytest.raises(ValueError):
        log.publish(token, 2, {"loss": float("nan")}, [], expected_version=None)
    assert log.current_version() is None and log.history() == []


def test_publish_without_group_changes_nothing(redis_client: redis.Redis) -> None:
    rl = ModelLog(redis_client, MODEL)  # ensure_group never called
    with pytest.raises(RuntimeError, match="no_group"):
        rl.publish(0, 1, {}, ["1-0"], expected_version=None)
    assert rl.current_version() is None and rl.history() == []


def test_trim_never_drops_pending_or_undelivered(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 6)
    all_ids = stream_ids(redis_client)
    got = log.read_feedback("w", count=4)  # entries 0..3 delivered, 4..5 never delivered
    e = [x.entry_id for x in got]
    token = log.acquire_lease("w", 10_000)

    log.publish(token, 2, {}, [e[1], e[2]], expected_version=None)  # pending: 0, 3 -> nothing below entry 0 to trim
    assert stream_ids(redis_client) == all_ids

    log.publish(token, 3, {}, [e[0]], expected_version=2)  # pending: 3 -> entries 0..2 may go
    assert stream_ids(redis_client) == all_ids[3:]

    log.publish(token, 4, {}, [e[3]], expected_version=3)  # nothing pending: trim through the last delivered entry
    assert stream_ids(redis_client) == all_ids[4:]
    rest = log.read_feedback("w", count=10)
    assert [x.entry_id for x in rest] == all_ids[4:]

    log.publish(token, 5, {}, [x.entry_id for x in rest], expected_version=4)
    assert redis_client.xlen(K.feedback) == 0
    assert log.read_feedback("w", count=10) == []


def test_trim_respects_every_group(log: RecordLog, redis_client: redis.Redis) -> None:
    labelled(log, 3)
    redis_client.xgroup_create(K.feedback, "audit", id="0")  # another reader, behind
    entries = log.read_feedback("w", count=10)
    token = log.acquire_lease("w", 10_000)
    assert log.publish(token, 2, {}, [x.entry_id for x in entries], expected_version=None) == 3
    assert redis_client.xlen(K.feedback) == 3  # audit has not read them yet


def test_stream_stats(log: RecordLog) -> None:
    assert log.backlog() == 0
    labelled(log, 5)
    log.read_feedback("w", count=2)
    stats = log.stream_stats()
    assert (stats.length, stats.pending, stats.undelivered) == (5, 2, 3)
    assert log.backlog() == 5


def test_stats_without_stream(redis_client: redis.Redis) -> None:
    rl = ModelLog(redis_client, "empty")
    assert tuple(rl.stream_stats()) == (0, 0, 0)


# --------------------------------------------------------------------------- versions and events


def _next_message(pubsub: redis.client.PubSub) -> dict:
    return wait_until(lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05), timeout=5)


def test_publish_and_rollback_send_events(log: RecordLog, redis_client: redis.Redis) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(K.events)
    wait_until(lambda: pubsub.get_message(timeout=0.05), timeout=5, what="subscribed")
    try:
        token = log.acquire_lease("w", 10_000)
        log.publish(token, 4, {}, [], expected_version=None)
        assert json.loads(_next_message(pubsub)["data"]) == {"type": "publish", "version": 4}
        log.rollback(3, {"reason": "bad metrics"})
        assert json.loads(_next_message(pubsub)["data"]) == {"type": "rollback", "version": 3}
    finally:
        pubsub.close()
    assert log.current_version() == 3
    assert [(h["type"], h["version"]) for h in log.history()] == [("publish", 4), ("rollback", 3)]
    assert log.history()[-1]["reason"] == "bad metrics"


def test_history_skips_malformed_records(log: RecordLog, redis_client: redis.Redis) -> None:
    log.rollback(1)
    redis_client.rpush(K.history, b"{not json")
    log.rollback(2)
    assert [h["version"] for h in log.history()] == [1, 2]


# --------------------------------------------------------------------------- lease


def test_lease_ownership_expiry_and_fence(log: RecordLog, redis_client: redis.Redis) -> None:
    t1 = log.acquire_lease("a", 10_000)
    assert t1 == 1
    assert log.acquire_lease("b", 10_000) is None
    assert log.acquire_lease("a", 10_000) == t1 + 1  # the holder takes it again: a new token, its old one stale
    t1 += 1
    assert log.renew_lease("b", 10_000) is False
    assert log.release_lease("b") is False
    assert redis_client.get(K.lock) == b"a"
    assert log.renew_lease("a", 50) is True
    ttl = redis_client.pttl(K.lock)
    assert 0 < ttl <= 50 or ttl == -2, ttl  # -2: gone already (the renewal set 50 ms; a loaded machine took longer)

    t2 = wait_until(lambda: log.acquire_lease("b", 10_000), timeout=5, what="lease expired")
    assert t2 == t1 + 1
    assert redis_client.get(K.fence) == b"3"
    assert log.renew_lease("a", 10_000) is False  # the old owner lost it
    assert log.release_lease("a") is False
    assert log.release_lease("b") is True
    assert log.acquire_lease("a", 10_000) == 4


# --------------------------------------------------------------------------- the two sides, one event loop


def test_the_replica_side_and_the_leader_side_share_one_record_log(redis_server, redis_client) -> None:  # type: ignore[no-untyped-def]
    """The API's async calls and the worker's blocking ones, interleaved on the same keys (no test driver)."""
    leader = RecordLog(redis_client, MODEL, label_window_s=60)
    leader.ensure_group()

    async def main() -> tuple:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            replica = AsyncRecordLog(client, MODEL, label_window_s=60)
            await replica.write_predictions([rec(0, version=3), rec(1, version=3, label=2, loss=0.5)])
            fetched = await replica.fetch_logits(["id0", "zzz"])
            attached = await replica.attach_labels_detailed([("id0", 1, 0.25), ("id1", 0, 0.1), ("zzz", 1, 0.1)])
            read = leader.read_feedback("w", count=10)
            before = (await replica.stream_stats()).backlog
            token = leader.acquire_lease("w", 10_000)
            acked = leader.publish(token, 4, {"n": 2}, [e.entry_id for e in read], expected_version=None)
            await replica.rollback(3, {})
            return (fetched, [r.status for r in attached], read, before, acked, await replica.current_version(),
                    await replica.history())
        finally:
            await client.aclose()

    fetched, statuses, read, before, acked, version, history = asyncio.run(main())
    assert fetched["zzz"] is None
    np.testing.assert_array_equal(fetched["id0"].logits, rec(0).logits)
    assert fetched["id0"].version == 3
    assert statuses == ["ok", "conflict", "not_found"]
    assert [e.id for e in read] == ["id1", "id0"]
    assert (before, acked, version) == (2, 2, 3)
    assert [(h["type"], h["version"]) for h in history] == [("publish", 4), ("rollback", 3)]
    assert leader.stream_stats().backlog == 0


# --------------------------------------------------------------------------- durability


def test_aof_always_keeps_labels_and_pending_across_a_crash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_redis(tmp_path, appendonly=True, appendfsync="always")
    try:
        client = redis.Redis.from_url(server.url)
        rl = ModelLog(client, MODEL)
        rl.ensure_group()
        labelled(rl, 3)
        read = rl.read_feedback("w", count=10)
        client.close()
        server.kill()  # SIGKILL: no shutdown flush
        server.start()
        client = redis.Redis.from_url(server.url)
        again = ModelLog(client, MODEL).pending_entries("w")
        assert [e.entry_id for e in again] == [e.entry_id for e in read]
        assert client.hget(K.pred("id2"), "label") == b"2"
        client.close()
    finally:
        server.stop()
    assert not server.running


def test_the_api_client_is_kept_in_the_hash_and_the_feedback_entries(log: RecordLog,
                                                                     redis_client: redis.Redis) -> None:
    """The client that predicted is in the hash; the client that gave a label is in its feedback entry."""
    zeros = np.zeros(4, np.float32)
    log.write_predictions([PredictionRecord("a0", 1, (0, 1), zeros, 2, 0.5, client="alpha"),
                           PredictionRecord("a1", 1, (1, 0), zeros, client="alpha"),
                           PredictionRecord("n0", 1, (1, 1), zeros, 3, 0.7)])
    assert log.attach_labels_detailed([("a1", 1, 0.9)], client="beta")[0].status == "ok"
    assert log.attach_labels([("n0", 3, 0.7)]) == ["duplicate"]
    assert [redis_client.hget(K.pred(i), "client") for i in ("a0", "a1", "n0")] == [b"alpha", b"alpha", None]
    entries = {e.id: e.client for e in log.read_feedback("w", count=10)}
    assert entries == {"a0": "alpha", "n0": None, "a1": "beta"}
    for bad in ("", "a b", "x" * 65, "../etc"):  # a client name lands in Redis: plain tokens only
        with pytest.raises(ValueError):
            log.write_predictions([PredictionRecord("z0", 1, (0, 0), zeros, client=bad)])
        with pytest.raises(ValueError):
            log.attach_labels_detailed([("a0", 2, 0.5)], client=bad)
    assert redis_client.exists(K.pred("z0")) == 0
