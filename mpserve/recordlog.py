"""The Redis data layer shared by the API replicas and the reconciler worker (docs/DESIGN.md §2).

This module is the only place that knows how records, labels, versions and leases are laid out in
Redis. Commands are built and replies parsed by private module-level functions, so that the sync
:class:`RecordLog` (worker) and the async :class:`AsyncRecordLog` (FastAPI) are thin shells that
only differ in ``await``.

The client must be created with ``decode_responses=False``: logits are stored as raw bytes.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import redis
import redis.asyncio
from redis.exceptions import ResponseError

from marketplace.reconcile import cross_entropy
from mpserve.keys import ModelKeys, validate_client_name
from mpserve.scripts import Call, Prelude, Scripts, eval_many, eval_many_async

log = logging.getLogger(__name__)

DEFAULT_GROUP = "reconciler"
HISTORY_MAX = 1000  # publish and rollback records kept in mp:{m}:history (the newest ones)
ATTACH_STATUSES = ("ok", "duplicate", "conflict", "not_found")
_PRED_FIELDS = ("version", "path", "logits", "leader")
_ENTRY_ID_RE = re.compile(r"^\d+-\d+$")


class StaleLeaderError(RuntimeError):
    """The publisher's fencing token is not the current one: another leader took over."""


class EntryNotPendingError(RuntimeError):
    """An entry given to a publish is not pending in the group: another publish used or dropped it (a second
    leader, after Redis lost its last writes), or Redis lost it. Nothing was changed; the caller's view of
    the stream is wrong and must be rebuilt from Redis.
    """


class VersionMovedError(RuntimeError):
    """``mp:{m}:version`` is no longer the version the publisher built on (a rollback, another publish).

    Nothing was changed: the caller's entries stay pending, and it should plan again from ``current``.
    """

    def __init__(self, expected: int | None, current: int | None) -> None:
        super().__init__(f"serving moved to version {current} (the update was built on {expected})")
        self.expected = expected
        self.current = current


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """What one served input leaves behind; ``label``/``loss`` only if the label came with it.

    ``client``: the API client that asked (None without API keys); kept in the hash and its feedback entry.
    ``leader_logits``: with paired probes, the unperturbed model's logits on the same input (what the user
    was answered with); a late label's entry then carries the leader's loss as the input's own baseline.
    """

    id: str
    version: int
    path: tuple[int, ...]
    logits: np.ndarray
    label: int | None = None
    loss: float | None = None
    client: str | None = None
    leader_logits: np.ndarray | None = None


class StoredPrediction(NamedTuple):
    """A prediction as read back, enough to compute the loss of a late label."""

    version: int
    path: tuple[int, ...]
    logits: np.ndarray
    leader_logits: np.ndarray | None = None


#: (id, label, loss[, correct[, base_loss, probe_correct]]): what attaching one label needs. ``correct`` says
#: whether the answer the user got was right, so a version can report its online accuracy; with paired
#: probes ``base_loss`` is the leader's loss on the same input and ``probe_correct`` whether the perturbed
#: path was right (see `label_item`).
LabelItem = (tuple[str, int, float] | tuple[str, int, float, bool]
             | tuple[str, int, float, bool, float | None, bool | None])


def label_item(record_id: str, label: int, logits: np.ndarray, leader_logits: np.ndarray | None = None
               ) -> tuple[str, int, float, bool, float | None, bool | None]:
    """The feedback of one label: the probe path's loss, and with paired probes the leader's loss as its baseline.

    The user was answered with the leader's logits when there are any (paired probes), else with the probe's.
    """
    y = np.array([label])
    loss = float(cross_entropy(np.asarray(logits)[None, :], y)[0])
    probe_hit = bool(int(np.argmax(logits)) == label)
    if leader_logits is None:
        return record_id, label, loss, probe_hit, None, None
    base = float(cross_entropy(np.asarray(leader_logits)[None, :], y)[0])
    return record_id, label, loss, bool(int(np.argmax(leader_logits)) == label), base, probe_hit


@dataclass(frozen=True, slots=True)
class FeedbackEntry:
    """One entry of the feedback stream: a served example whose loss is known."""

    entry_id: str
    id: str
    version: int
    path: tuple[int, ...]
    loss: float
    label: int
    ts_ms: int
    correct: bool | None = None  # was the answer the user got right; None for older entries
    client: str | None = None  # the API client that gave the label (None: no API keys)
    base_loss: float | None = None  # paired probes: the leader's loss on the same input
    probe_correct: bool | None = None  # paired probes: was the perturbed path right


@dataclass(frozen=True, slots=True)
class AttachResult:
    """Outcome of attaching one label; ``existing_label`` is set for conflict and duplicate."""

    status: str
    existing_label: int | None = None


class StreamStats(NamedTuple):
    """Feedback stream size: all entries, delivered-but-unacked, and not yet delivered."""

    length: int
    pending: int
    undelivered: int

    @property
    def backlog(self) -> int:
        """Entries not yet used by a published version."""
        return self.pending + self.undelivered


# --------------------------------------------------------------------------- encoding


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nonneg_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def _positive_int(value: Any, what: str) -> int:
    n = _nonneg_int(value, what)
    if n == 0:
        raise ValueError(f"{what} must be > 0")
    return n


def _encode_path(path: Sequence[int]) -> str:
    return ",".join(str(_nonneg_int(v, "path element")) for v in path)


def _decode_path(raw: bytes | str) -> tuple[int, ...]:
    text = _str(raw)
    return tuple(int(v) for v in text.split(",")) if text else ()


def _encode_logits(logits: Any) -> bytes:
    return np.ascontiguousarray(logits, dtype="<f4").ravel().tobytes()


def _decode_logits(raw: bytes) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ValueError("logits are not float32 bytes")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _encode_loss(loss: Any) -> str:
    value = float(loss)
    if not math.isfinite(value):
        raise ValueError(f"loss must be finite, got {value}")
    return repr(value)


def _owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner:
        raise ValueError("lease owner must be a non-empty string")
    return owner


def _history_json(kind: str, version: int, record: Mapping[str, Any]) -> str:
    """Strict JSON (no NaN) so every reader of the history can parse it."""
    rec = dict(record)
    rec["type"] = kind
    rec["version"] = version
    rec.setdefault("ts_ms", _now_ms())
    return json.dumps(rec, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------- predictions


def _prediction_batch(
    keys: ModelKeys, items: Sequence[PredictionRecord], window_ms: int, now_ms: int
) -> tuple[Prelude, list[Call]]:
    """Validate everything first, then queue: a bad item must not leave half a batch queued.

    Returns the prelude that stores the prediction hashes (never their label) and the attach_label
    calls of the labels given with them. Labels go through the same script as late labels, so the
    feedback entry is laid out in one place and a replayed batch answers 'duplicate' instead of
    adding a second stream entry.
    """
    rows = []
    labels: list[LabelItem] = []
    clients: list[str | None] = []
    for it in items:
        mapping: dict[str, Any] = {
            "version": _nonneg_int(it.version, "version"),
            "path": _encode_path(it.path),
            "logits": _encode_logits(it.logits),
            "created": now_ms,
        }
        if it.client is not None:
            mapping["client"] = _client(it.client)
        if it.leader_logits is not None:
            mapping["leader"] = _encode_logits(it.leader_logits)
        rows.append((keys.pred(it.id), mapping))
        if it.label is not None:
            if it.loss is None and it.leader_logits is None:
                raise ValueError(f"record {it.id}: a label needs its loss")
            if it.leader_logits is not None:
                labels.append(label_item(it.id, it.label, it.logits, it.leader_logits))
            else:
                labels.append((it.id, it.label, it.loss, bool(int(np.argmax(it.logits)) == it.label)))
            clients.append(it.client)
    calls = _attach_calls(keys, labels, keys.feedback, now_ms, clients)  # validates label and loss

    def prelude(pipe: Any) -> None:
        for key, mapping in rows:
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, window_ms)

    return prelude, calls


def _p_predict_labels(calls: Sequence[Call], replies: Sequence[Any]) -> None:
    for (_, args), reply in zip(calls, replies, strict=True):
        res = _p_attach(reply)
        if res.status not in ("ok", "duplicate"):
            log.warning("label given with prediction %s not recorded: %s (existing label %s)",
                        args[3], res.status, res.existing_label)


def _q_fetch(pipe: Any, keys: ModelKeys, ids: Sequence[str]) -> None:
    for record_id in ids:
        pipe.hmget(keys.pred(record_id), _PRED_FIELDS)


def _p_fetch(ids: Sequence[str], replies: Sequence[Any]) -> dict[str, StoredPrediction | None]:
    out: dict[str, StoredPrediction | None] = {}
    for record_id, (version, path, logits, leader) in zip(ids, replies, strict=True):
        if version is None:
            out[record_id] = None
            continue
        try:
            out[record_id] = StoredPrediction(int(version), _decode_path(path or b""), _decode_logits(logits),
                                              None if leader is None else _decode_logits(leader))
        except (ValueError, TypeError) as exc:
            log.warning("prediction %s is malformed (%s); treating it as unknown", record_id, exc)
            out[record_id] = None
    return out


def _client(name: str | None) -> str:
    """'' for no client; else the name, which must be a plain token (it lands in Redis and logs)."""
    return "" if name is None else validate_client_name(name)


def _attach_calls(
    keys: ModelKeys, items: Sequence[LabelItem], feedback: str, now_ms: int,
    clients: Sequence[str | None] | None = None,
) -> list[Call]:
    """One attach_label call per item; ``clients`` (one per item, default none) go into the feedback entries."""
    names = [_client(c) for c in (clients if clients is not None else [None] * len(items))]
    calls: list[Call] = []
    for (record_id, label, loss, *rest), client in zip(items, names, strict=True):
        correct, base, probe = (*rest, None, None, None)[:3]
        calls.append(((keys.pred(record_id), feedback),
                      (_nonneg_int(label, "label"), _encode_loss(loss), now_ms, record_id, _flag(correct), client,
                       "" if base is None else _encode_loss(base), _flag(probe))))
    return calls


def _flag(value: bool | None) -> str:
    return "" if value is None else "1" if value else "0"


_FLAGS = {b"1": True, b"0": False, "1": True, "0": False}


def _p_attach(reply: Sequence[Any]) -> AttachResult:
    status = _str(reply[0])
    if status not in ATTACH_STATUSES:
        raise RuntimeError(f"attach_label returned {status!r}")
    existing = int(reply[1]) if len(reply) > 1 and reply[1] is not None else None
    return AttachResult(status, existing)


# --------------------------------------------------------------------------- feedback stream


def _parse_entry(entry_id: str, fields: Mapping[bytes | str, Any] | None) -> FeedbackEntry:
    if not fields:
        raise ValueError("entry has no fields (deleted?)")
    f = {_str(k): v for k, v in fields.items()}
    return FeedbackEntry(
        entry_id=entry_id,
        id=_str(f["id"]),
        version=int(f["version"]),
        path=_decode_path(f["path"]),
        loss=float(f["loss"]),
        label=int(f["label"]),
        ts_ms=int(f["ts"]),
        correct=_FLAGS.get(f.get("hit")),
        client=_str(f.get("client") or b"") or None,
        base_loss=float(f["base"]) if f.get("base") else None,
        probe_correct=_FLAGS.get(f.get("probe_hit")),
    )


def _p_entries(pairs: Iterable[Any]) -> tuple[list[FeedbackEntry], list[str]]:
    """Parse (id, fields) pairs; malformed ones are returned separately, to be acked as dropped."""
    good: list[FeedbackEntry] = []
    bad: list[str] = []
    for raw_id, fields in pairs:
        if raw_id is None:
            log.warning("skipping a feedback entry without id")
            continue
        entry_id = _str(raw_id)
        try:
            good.append(_parse_entry(entry_id, fields))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("dropping malformed feedback entry %s: %r", entry_id, exc)
            bad.append(entry_id)
    return good, bad


def _stream_pairs(raw: Any) -> list[Any]:
    """The (id, fields) pairs of a one-stream XREADGROUP reply, RESP2 or RESP3 shaped."""
    if not raw:
        return []
    if isinstance(raw, dict):
        (value,) = raw.values()
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(raw[0][1])


def _xreadgroup_kwargs(
    keys: ModelKeys, group: str, consumer: str, start: str, count: int, block_ms: int | None
) -> dict[str, Any]:
    if not consumer:
        raise ValueError("consumer name must be non-empty")
    return {
        "groupname": group,
        "consumername": consumer,
        "streams": {keys.feedback: start},
        "count": _positive_int(count, "count"),
        "block": None if block_ms is None else _nonneg_int(block_ms, "block_ms"),
    }


def _is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def _is_cursor_done(cursor: Any) -> bool:
    return _str(cursor) == "0-0"


# --------------------------------------------------------------------------- versions


def _publish_call(
    keys: ModelKeys,
    group: str,
    token: int,
    new_version: int | None,
    history_record: Mapping[str, Any],
    entry_ids: Sequence[str],
    expected_version: int | None,
    history_max: int,
    refused_base: int | None = None,
) -> Call:
    """The publish script's call; ``new_version`` None records a refused candidate built on ``refused_base``."""
    expected = "" if expected_version is None else str(_nonneg_int(expected_version, "expected_version"))
    if new_version is None and refused_base is None:
        raise ValueError("a refused candidate needs the version it was built on")
    ids = [_str(e) for e in entry_ids]
    for e in ids:
        if not _ENTRY_ID_RE.fullmatch(e):
            raise ValueError(f"invalid stream entry id {e!r}")
    if new_version is None:
        version_arg, history = "", _history_json("refused", _nonneg_int(refused_base, "base_version"), history_record)
    else:
        version_arg = _nonneg_int(new_version, "new_version")
        history = _history_json("publish", version_arg, history_record)
    return (
        (keys.version, keys.fence, keys.history, keys.feedback, keys.events),
        (
            _nonneg_int(token, "token"),
            version_arg,
            history,
            group,
            expected,
            history_max,
            *ids,
        ),
    )


def _p_publish(reply: Sequence[Any], token: int, expected_version: int | None) -> int:
    status = _str(reply[0])
    if status == "ok":
        return int(reply[1])
    if status == "stale_token":
        raise StaleLeaderError(f"fencing token {token} is not the current one ({_str(reply[1])})")
    if status == "moved":
        raise VersionMovedError(expected_version, _p_version(reply[1]))
    if status == "not_pending":
        raise EntryNotPendingError(f"entry {_str(reply[1])} is no longer pending: used by another publish, or lost")
    raise RuntimeError(f"publish_version refused: {status} {_str(reply[1])}")


def _rollback_call(
    keys: ModelKeys, version: int, history_record: Mapping[str, Any], history_max: int
) -> Call:
    v = _nonneg_int(version, "version")
    args = (v, _history_json("rollback", v, history_record), history_max)
    return (keys.version, keys.history, keys.events), args


def _p_status_ok(reply: Sequence[Any], what: str) -> None:
    if _str(reply[0]) != "ok":
        raise RuntimeError(f"{what} refused: {[_str(r) for r in reply]}")


def _p_version(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def _p_history(raw: Sequence[bytes]) -> list[dict[str, Any]]:
    out = []
    for item in raw:
        try:
            rec = json.loads(item)
        except ValueError:
            log.warning("skipping malformed history record %r", item[:80])
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _q_stats(pipe: Any, keys: ModelKeys) -> None:
    pipe.xlen(keys.feedback)
    pipe.xinfo_groups(keys.feedback)


def _p_stats(replies: Sequence[Any], group: str) -> StreamStats:
    length, groups = replies
    if isinstance(length, Exception):
        raise length
    if isinstance(groups, ResponseError):  # no such key: the stream does not exist yet
        groups = []
    elif isinstance(groups, Exception):
        raise groups
    for g in groups:
        if _str(g.get("name", b"")) == group:
            pending = int(g.get("pending") or 0)
            lag = g.get("lag")
            undelivered = int(lag) if lag is not None else max(int(length) - pending, 0)
            return StreamStats(int(length), pending, undelivered)
    return StreamStats(int(length), 0, int(length))


# --------------------------------------------------------------------------- retention


def _q_retention(pipe: Any, keys: ModelKeys, deleted: Sequence[int], now_ms: int) -> None:
    versions = [_nonneg_int(v, "deleted version") for v in deleted]
    pipe.hincrby(keys.retention, "deleted_total", len(versions))
    pipe.hset(keys.retention, mapping={"last_deleted": json.dumps(versions), "last_ts_ms": now_ms})


def _p_retention_total(raw: Any) -> int:
    """``deleted_total`` of the retention hash; 0 before the first deletion (or if it is not a number)."""
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        log.warning("retention deleted_total %r is not a number; reporting 0", raw)
        return 0


# --------------------------------------------------------------------------- classes


class _Base:
    """State shared by the sync and async classes."""

    def __init__(self, client: Any, model: str, label_window_s: int, group: str, history_max: int) -> None:
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses"):
            raise ValueError("RecordLog needs a Redis client with decode_responses=False")
        if not group:
            raise ValueError("group must be non-empty")
        self.client = client
        self.keys = ModelKeys(model)
        self.model = model
        self.group = group
        self.label_window_ms = _positive_int(label_window_s, "label_window_s") * 1000
        self.history_max = _positive_int(history_max, "history_max")
        self.scripts = Scripts.register(client)


class RecordLog(_Base):
    """Blocking access to one model's records, feedback, versions and lease (used by the worker)."""

    def __init__(
        self,
        client: redis.Redis,
        model: str,
        label_window_s: int = 86400,
        group: str = DEFAULT_GROUP,
        history_max: int = HISTORY_MAX,
    ) -> None:
        super().__init__(client, model, label_window_s, group, history_max)

    # predictions and labels

    def write_predictions(self, items: Sequence[PredictionRecord], now_ms: int | None = None) -> None:
        """Store a served batch (and the feedback of labels given with it) in one round trip.

        Idempotent: a replay (redis-py re-sends after a connection error) adds no feedback entry.
        """
        if not items:
            return
        now = _now_ms() if now_ms is None else now_ms
        prelude, calls = _prediction_batch(self.keys, items, self.label_window_ms, now)
        replies = eval_many(self.client, self.scripts.attach_label, calls, prelude, transaction=True)
        _p_predict_labels(calls, replies)

    def fetch_logits(self, ids: Sequence[str]) -> dict[str, StoredPrediction | None]:
        """Stored (version, path, logits) per id, None when unknown or expired; one round trip."""
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        _q_fetch(pipe, self.keys, ids)
        return _p_fetch(ids, pipe.execute())

    def attach_labels_detailed(
        self, items: Sequence[LabelItem], now_ms: int | None = None, client: str | None = None
    ) -> list[AttachResult]:
        """Attach (id, label, loss[, correct]) items atomically each, in one round trip; ``client`` gave them."""
        if not items:
            return []
        calls = _attach_calls(self.keys, items, self.keys.feedback, _now_ms() if now_ms is None else now_ms,
                              [client] * len(items))
        return [_p_attach(r) for r in eval_many(self.client, self.scripts.attach_label, calls)]

    def attach_labels(self, items: Sequence[LabelItem], now_ms: int | None = None) -> list[str]:
        """Statuses ok / duplicate / conflict / not_found, one per item."""
        return [r.status for r in self.attach_labels_detailed(items, now_ms)]

    # feedback stream

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
        kwargs = _xreadgroup_kwargs(self.keys, self.group, consumer, start, count, block_ms)
        try:
            return _stream_pairs(self.client.xreadgroup(**kwargs))
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            log.warning("consumer group %s missing on %s; recreating it", self.group, self.keys.feedback)
            self.ensure_group()
            return _stream_pairs(self.client.xreadgroup(**kwargs))

    def _accept(self, pairs: list[Any]) -> list[FeedbackEntry]:
        good, bad = _p_entries(pairs)
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
            start = _str(pairs[-1][0])
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
                _nonneg_int(min_idle_ms, "min_idle_ms"),
                start_id=cursor,
                count=count - len(out),
            )
            cursor = reply[0]
            out += self._accept(list(reply[1]))
            if _is_cursor_done(cursor):
                break
        return out

    def stream_stats(self) -> StreamStats:
        """Stream length, pending and undelivered counts, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        _q_stats(pipe, self.keys)
        return _p_stats(pipe.execute(raise_on_error=False), self.group)

    def backlog(self) -> int:
        """Entries not yet used by a published version (pending + undelivered)."""
        return self.stream_stats().backlog

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
        keys, args = _publish_call(self.keys, self.group, token, new_version, history_record, entry_ids,
                                   expected_version, self.history_max)
        return _p_publish(self.scripts.publish_version(keys, args), token, expected_version)

    def refuse(self, token: int, base_version: int, history_record: Mapping[str, Any], entry_ids: Sequence[str],
               expected_version: int | None) -> int:
        """Record a candidate built on ``base_version`` that the validation guard refused, and ack its entries.

        The same fenced, all-or-nothing script as a publish, minus the version change: the entries count as
        used (their information went into a candidate that was judged and rejected), and serving stays.
        ``expected_version`` is what ``mp:{m}:version`` read when the candidate was planned (None: unset,
        as before the first publish, when the base is the store's newest version).
        """
        keys, args = _publish_call(self.keys, self.group, token, None, history_record, entry_ids, expected_version,
                                   self.history_max, refused_base=base_version)
        return _p_publish(self.scripts.publish_version(keys, args), token, expected_version)

    def rollback(self, version: int, history_record: Mapping[str, Any] | None = None) -> None:
        """Point serving at ``version`` (an older one) and notify the replicas."""
        keys, args = _rollback_call(self.keys, version, history_record or {}, self.history_max)
        _p_status_ok(self.scripts.rollback_version(keys, args), "rollback")

    def current_version(self) -> int | None:
        return _p_version(self.client.get(self.keys.version))

    def history(self) -> list[dict[str, Any]]:
        """Publish and rollback records, oldest first."""
        return _p_history(self.client.lrange(self.keys.history, 0, -1))

    def record_retention(self, deleted: Sequence[int]) -> int:
        """Count versions deleted by retention (``GET /metrics`` reads the total); returns the new total."""
        pipe = self.client.pipeline(transaction=True)
        _q_retention(pipe, self.keys, deleted, _now_ms())
        return int(pipe.execute()[0])

    def retention_deleted_total(self) -> int:
        return _p_retention_total(self.client.hget(self.keys.retention, "deleted_total"))

    # leader lease

    def acquire_lease(self, owner: str, ttl_ms: int) -> int | None:
        """Take the lease if free; returns the new fencing token, or None when someone holds it."""
        keys = (self.keys.lock, self.keys.fence)
        token = self.scripts.acquire_lease(keys, (_owner(owner), _positive_int(ttl_ms, "ttl_ms")))
        return None if token is None else int(token)

    def renew_lease(self, owner: str, ttl_ms: int) -> bool:
        """Extend the lease; False when ``owner`` no longer holds it (stop acting as leader)."""
        args = (_owner(owner), _positive_int(ttl_ms, "ttl_ms"))
        return bool(self.scripts.renew_lease((self.keys.lock,), args))

    def release_lease(self, owner: str) -> bool:
        """Drop the lease if ``owner`` holds it; returns whether it did."""
        return bool(self.scripts.release_lease((self.keys.lock,), (_owner(owner),)))


class AsyncRecordLog(_Base):
    """The asyncio twin of :class:`RecordLog` (used by the FastAPI replicas)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        model: str,
        label_window_s: int = 86400,
        group: str = DEFAULT_GROUP,
        history_max: int = HISTORY_MAX,
    ) -> None:
        super().__init__(client, model, label_window_s, group, history_max)

    async def write_predictions(self, items: Sequence[PredictionRecord], now_ms: int | None = None) -> None:
        if not items:
            return
        now = _now_ms() if now_ms is None else now_ms
        prelude, calls = _prediction_batch(self.keys, items, self.label_window_ms, now)
        replies = await eval_many_async(self.client, self.scripts.attach_label, calls, prelude, transaction=True)
        _p_predict_labels(calls, replies)

    async def fetch_logits(self, ids: Sequence[str]) -> dict[str, StoredPrediction | None]:
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        _q_fetch(pipe, self.keys, ids)
        return _p_fetch(ids, await pipe.execute())

    async def attach_labels_detailed(
        self, items: Sequence[LabelItem], now_ms: int | None = None, client: str | None = None
    ) -> list[AttachResult]:
        if not items:
            return []
        calls = _attach_calls(self.keys, items, self.keys.feedback, _now_ms() if now_ms is None else now_ms,
                              [client] * len(items))
        return [_p_attach(r) for r in await eval_many_async(self.client, self.scripts.attach_label, calls)]

    async def attach_labels(
        self, items: Sequence[LabelItem], now_ms: int | None = None
    ) -> list[str]:
        return [r.status for r in await self.attach_labels_detailed(items, now_ms)]

    async def ensure_group(self) -> bool:
        try:
            await self.client.xgroup_create(self.keys.feedback, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    async def _xreadgroup(self, consumer: str, start: str, count: int, block_ms: int | None) -> list[Any]:
        kwargs = _xreadgroup_kwargs(self.keys, self.group, consumer, start, count, block_ms)
        try:
            return _stream_pairs(await self.client.xreadgroup(**kwargs))
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            log.warning("consumer group %s missing on %s; recreating it", self.group, self.keys.feedback)
            await self.ensure_group()
            return _stream_pairs(await self.client.xreadgroup(**kwargs))

    async def _accept(self, pairs: list[Any]) -> list[FeedbackEntry]:
        good, bad = _p_entries(pairs)
        if bad:
            await self.client.xack(self.keys.feedback, self.group, *bad)
        return good

    async def read_feedback(
        self, consumer: str, count: int, block_ms: int | None = None
    ) -> list[FeedbackEntry]:
        return await self._accept(await self._xreadgroup(consumer, ">", count, block_ms))

    async def stream_stats(self) -> StreamStats:
        pipe = self.client.pipeline(transaction=False)
        _q_stats(pipe, self.keys)
        return _p_stats(await pipe.execute(raise_on_error=False), self.group)

    async def backlog(self) -> int:
        return (await self.stream_stats()).backlog

    async def publish(
        self,
        token: int,
        new_version: int,
        history_record: Mapping[str, Any],
        entry_ids: Sequence[str],
        *,
        expected_version: int | None,
    ) -> int:
        keys, args = _publish_call(self.keys, self.group, token, new_version, history_record, entry_ids,
                                   expected_version, self.history_max)
        return _p_publish(await self.scripts.publish_version(keys, args), token, expected_version)

    async def rollback(self, version: int, history_record: Mapping[str, Any] | None = None) -> None:
        keys, args = _rollback_call(self.keys, version, history_record or {}, self.history_max)
        _p_status_ok(await self.scripts.rollback_version(keys, args), "rollback")

    async def current_version(self) -> int | None:
        return _p_version(await self.client.get(self.keys.version))

    async def history(self) -> list[dict[str, Any]]:
        return _p_history(await self.client.lrange(self.keys.history, 0, -1))

    async def retention_deleted_total(self) -> int:
        """Versions of this model deleted by retention so far (the worker counts them)."""
        return _p_retention_total(await self.client.hget(self.keys.retention, "deleted_total"))
