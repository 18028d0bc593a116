"""One model's records, feedback stream, versions and lease in Redis, as the worker and the API use them.

Each process has its side: the blocking :class:`RecordLog` is the leader's (the worker: the feedback stream
and its consumer group, publish and refusals, the lease, retention), the asyncio :class:`AsyncRecordLog`
the replicas' (the API: predictions, labels, the serving version, rollback). Both are thin shells over
the command builders and reply parsers of :mod:`redis_io.protocol`, which are unit-tested without Redis;
the few reads both sides need (the serving version, the history, stream figures) are written once there
and only differ in ``await``. Together with the Lua scripts (:mod:`redis_io.lua_scripts`) they are
the only code that reads or writes these keys (docs/DESIGN.md §2).

The client must be created with ``decode_responses=False``: logits are stored as raw bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import ResponseError

from redis_io.keys import ModelKeys
from redis_io.lua_scripts import Scripts, eval_many_async
from redis_io.protocol import (
    DEFAULT_GROUP,
    HISTORY_MAX,
    REPLAY_READ_MAX,
    AttachResult,
    FeedbackEntry,
    LabelItem,
    PredictionRecord,
    ReplayEntry,
    StoredPrediction,
    StreamStats,
    as_str,
    attach_calls,
    check_owner,
    clock_ms,
    is_cursor_done,
    is_nogroup,
    nonneg_int,
    p_attach,
    p_entries,
    p_fetch,
    p_history,
    p_lease_holder,
    p_predict_labels,
    p_publish,
    p_replay,
    p_retention_total,
    p_stats,
    p_status_ok,
    p_version,
    positive_int,
    prediction_batch,
    publish_call,
    q_fetch,
    q_retention,
    q_stats,
    rollback_call,
    stream_pairs,
    xreadgroup_kwargs,
)

log = logging.getLogger(__name__)


class _Base:
    """State shared by the sync and async classes."""

    def __init__(self, client: Any, model: str, label_window_s: int = 86400, group: str = DEFAULT_GROUP,
                 history_max: int = HISTORY_MAX, replay_size: int = 0, replay_window_s: int = 3600) -> None:
        kwargs = client.get_connection_kwargs()  # one server's or a cluster's client alike
        if kwargs.get("decode_responses"):
            raise ValueError("RecordLog needs a Redis client with decode_responses=False")
        if not group:
            raise ValueError("group must be non-empty")
        self.client = client
        self.keys = ModelKeys(model)
        self.model = model
        self.group = group
        self.label_window_ms = positive_int(label_window_s, "label_window_s") * 1000
        self.history_max = positive_int(history_max, "history_max")
        self.replay_size = nonneg_int(replay_size, "replay_size")  # API: labelled inputs the replay stream keeps
        self.replay_window_ms = positive_int(replay_window_s, "replay_window_s") * 1000  # API: how long a kept
        # input waits for its label
        self.scripts = Scripts.register(client)


class RecordLog(_Base):
    """The leader's side, blocking (the worker): the feedback stream and its group, publish, lease, retention."""

    client: redis.Redis

    def ensure_group(self) -> bool:
        """Create the consumer group from the stream's start (id 0), so no entry is missed."""
        try:
            self.client.xgroup_create(self.keys.feedback, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    def _xreadgroup(self, consumer: str, start: str, count: int, block_ms: int | None) -> list[Any]:
        kwargs = xreadgroup_kwargs(self.keys, self.group, consumer, start, count, block_ms)
        try:
            return stream_pairs(self.client.xreadgroup(**kwargs))
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning("consumer group %s missing on %s; recreating it", self.group, self.keys.feedback)
            self.ensure_group()
            return stream_pairs(self.client.xreadgroup(**kwargs))

    def _accept(self, pairs: list[Any]) -> list[FeedbackEntry]:
        good, bad = p_entries(pairs)
        if bad:
            self.client.xack(self.keys.feedback, self.group, *bad)
        return good

    def read_feedback(self, consumer: str, count: int, block_ms: int | None = None) -> list[FeedbackEntry]:
        """New entries for ``consumer`` (XREADGROUP >); they stay pending until a publish acks them."""
        return self._accept(self._xreadgroup(consumer, ">", count, block_ms))

    def pending_entries(self, consumer: str, count: int = 1000) -> list[FeedbackEntry]:
        """All entries delivered to ``consumer`` and not acked: what a restarted worker still owes."""
        out: list[FeedbackEntry] = []
        start = "0"
        while True:
            pairs = self._xreadgroup(consumer, start, count, None)
            if not pairs:
                return out
            out += self._accept(pairs)
            start = as_str(pairs[-1][0])
            if len(pairs) < count:
                return out

    def reclaim(self, consumer: str, min_idle_ms: int, count: int = 1000) -> list[FeedbackEntry]:
        """Take over up to ``count`` entries idle for ``min_idle_ms`` (a dead consumer's).

        Entries already owned by ``consumer`` are claimed too; callers dedupe by ``entry_id``.
        """
        out: list[FeedbackEntry] = []
        cursor: Any = "0-0"
        while len(out) < count:
            reply = self.client.xautoclaim(
                self.keys.feedback,
                self.group,
                consumer,
                nonneg_int(min_idle_ms, "min_idle_ms"),
                start_id=cursor,
                count=count - len(out),
            )
            cursor = reply[0]
            out += self._accept(list(reply[1]))
            if is_cursor_done(cursor):
                break
        return out

    def recent_inputs(self, max_age_ms: int, count: int = REPLAY_READ_MAX, now_ms: int | None = None
                      ) -> list[ReplayEntry]:
        """The newest labelled inputs the API kept (the replay stream), newest first, none older than
        ``max_age_ms`` (a stream id is its time): after traffic stops, old inputs stop judging."""
        oldest = (clock_ms() if now_ms is None else now_ms) - positive_int(max_age_ms, "max_age_ms")
        return p_replay(self.client.xrevrange(self.keys.replay, max="+", min=f"{max(oldest, 0)}-0",
                                              count=positive_int(count, "count")))

    def stream_stats(self) -> StreamStats:
        """Stream length, pending and undelivered counts, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        q_stats(pipe, self.keys)
        return p_stats(pipe.execute(raise_on_error=False), self.group)

    # versions

    def publish(
        self,
        token: int,
        new_version: int,
        history_record: Mapping[str, Any],
        entry_ids: Sequence[str],
        *,
        expected_version: int | None,
    ) -> int:
        """Publish ``new_version`` and ack the entries it used, all or nothing; returns the ack count.

        ``expected_version`` is what ``mp:{m}:version`` read when the update was planned (None: unset).
        Raises StaleLeaderError when ``token`` is not the current fence, VersionMovedError when the
        version key is set to anything else (a rollback in between), and EntryNotPendingError when an
        entry is no longer pending (so none is ever used twice); nothing is changed then.
        """
        keys, args = publish_call(self.keys, self.group, token, new_version, history_record, entry_ids,
                                  expected_version, self.history_max)
        return p_publish(self.scripts.publish_version(keys, args), token, expected_version)

    def refuse(self, token: int, base_version: int, history_record: Mapping[str, Any], entry_ids: Sequence[str],
               expected_version: int | None) -> int:
        """Record a candidate built on ``base_version`` that the validation guard refused, and ack its entries.

        The same fenced, all-or-nothing script as a publish, minus the version change: the entries count as
        used (their information went into a candidate that was judged and rejected), and serving stays.
        ``expected_version`` is what ``mp:{m}:version`` read when the candidate was planned (None: unset,
        as before the first publish, when the base is the store's newest version).
        """
        keys, args = publish_call(self.keys, self.group, token, None, history_record, entry_ids, expected_version,
                                  self.history_max, refused_base=base_version)
        return p_publish(self.scripts.publish_version(keys, args), token, expected_version)

    def current_version(self) -> int | None:
        return p_version(self.client.get(self.keys.version))

    def history(self) -> list[dict[str, Any]]:
        """Publish and rollback records, oldest first."""
        return p_history(self.client.lrange(self.keys.history, 0, -1))

    def record_retention(self, deleted: Sequence[int]) -> int:
        """Count versions deleted by retention (``GET /metrics`` reads the total); returns the new total."""
        pipe = self.client.pipeline(transaction=True)
        q_retention(pipe, self.keys, deleted, clock_ms())
        return int(pipe.execute()[0])

    def acquire_lease(self, owner: str, ttl_ms: int) -> int | None:
        """Take the lease if free; returns the new fencing token, or None when someone holds it."""
        keys = (self.keys.lock, self.keys.fence)
        token = self.scripts.acquire_lease(keys, (check_owner(owner), positive_int(ttl_ms, "ttl_ms")))
        return None if token is None else int(token)

    def renew_lease(self, owner: str, ttl_ms: int) -> bool:
        """Extend the lease; False when ``owner`` no longer holds it (stop acting as leader)."""
        args = (check_owner(owner), positive_int(ttl_ms, "ttl_ms"))
        return bool(self.scripts.renew_lease((self.keys.lock,), args))

    def release_lease(self, owner: str) -> bool:
        """Drop the lease if ``owner`` holds it; returns whether it did."""
        return bool(self.scripts.release_lease((self.keys.lock,), (check_owner(owner),)))

    def lease_holder(self) -> str | None:
        """Who holds the lease now, as Redis says (None: nobody)."""
        return p_lease_holder(self.client.get(self.keys.lock))


class AsyncRecordLog(_Base):
    """The replicas' side, on asyncio (the API): predictions, labels, the serving version, rollback, stats."""

    client: redis.asyncio.Redis

    async def write_predictions(self, items: Sequence[PredictionRecord], now_ms: int | None = None) -> None:
        """Store a served batch (and the feedback of labels given with it) in one round trip.

        Idempotent: a replay (redis-py re-sends after a connection error) adds no feedback entry.
        """
        if not items:
            return
        now = clock_ms() if now_ms is None else now_ms
        prelude, calls = prediction_batch(self.keys, items, self.label_window_ms, now, self.replay_size,
                                          self.replay_window_ms)
        replies = await eval_many_async(self.client, self.scripts.attach_label, calls, prelude, transaction=True)
        p_predict_labels(calls, replies)

    async def fetch_logits(self, ids: Sequence[str]) -> dict[str, StoredPrediction | None]:
        """Stored (version, path, logits) per id, None when unknown or expired; one round trip."""
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        q_fetch(pipe, self.keys, ids)
        return p_fetch(ids, await pipe.execute())

    async def attach_labels_detailed(
        self, items: Sequence[LabelItem], now_ms: int | None = None, client: str | None = None
    ) -> list[AttachResult]:
        """Attach (id, label, loss[, correct]) items atomically each, in one round trip; ``client`` gave them."""
        if not items:
            return []
        calls = attach_calls(self.keys, items, self.keys.feedback, clock_ms() if now_ms is None else now_ms,
                             [client] * len(items), self.replay_size)
        return [p_attach(r) for r in await eval_many_async(self.client, self.scripts.attach_label, calls)]

    async def stream_stats(self) -> StreamStats:
        pipe = self.client.pipeline(transaction=False)
        q_stats(pipe, self.keys)
        return p_stats(await pipe.execute(raise_on_error=False), self.group)

    async def rollback(self, version: int, history_record: Mapping[str, Any] | None = None) -> None:
        keys, args = rollback_call(self.keys, version, history_record or {}, self.history_max)
        p_status_ok(await self.scripts.rollback_version(keys, args), "rollback")

    async def current_version(self) -> int | None:
        return p_version(await self.client.get(self.keys.version))

    async def history(self) -> list[dict[str, Any]]:
        return p_history(await self.client.lrange(self.keys.history, 0, -1))

    async def retention_deleted_total(self) -> int:
        """Versions of this model deleted by retention so far (the worker counts them)."""
        return p_retention_total(await self.client.hget(self.keys.retention, "deleted_total"))
