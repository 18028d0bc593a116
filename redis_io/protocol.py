"""How records, labels, versions and leases are laid out in Redis (docs/DESIGN.md §2): pure code, no I/O.

The types that cross the boundary (a served :class:`PredictionRecord`, a :class:`FeedbackEntry` of the
stream, ...), their encoding, the commands that write them and the parsers of the replies. The sync
:class:`~redis_io.recordlog.RecordLog` (worker) and the async :class:`~redis_io.recordlog.AsyncRecordLog`
(API) share everything here, so that they are thin shells that only differ in ``await``. Naming:
``q_*`` queues commands on a pipeline, ``*_call`` builds a Lua script call (keys, args), ``p_*`` parses
replies.
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
from redis.exceptions import ResponseError

from common.names import validate_client_name
from marketplace.reconcile import cross_entropy
from redis_io.keys import ModelKeys
from redis_io.lua_scripts import Call, Prelude

log = logging.getLogger(__name__)

DEFAULT_GROUP = "reconciler"
HISTORY_MAX = 1000  # publish and rollback records kept in mp:{m}:history (the newest ones)
REPLAY_READ_MAX = 4096  # most replay entries the guard reads (the API caps the stream at its replay_size)
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
    kept_input: np.ndarray | None = None  # the input itself, for the share the API keeps for the guard's replay


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
    logits: np.ndarray | None = None  # paired probes: the probe path's logits (the head's gradient needs both)
    leader_logits: np.ndarray | None = None  # paired probes: the leader's logits on the same input


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


def clock_ms() -> int:
    return time.time_ns() // 1_000_000


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nonneg_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def positive_int(value: Any, what: str) -> int:
    n = nonneg_int(value, what)
    if n == 0:
        raise ValueError(f"{what} must be > 0")
    return n


def _encode_path(path: Sequence[int]) -> str:
    return ",".join(str(nonneg_int(v, "path element")) for v in path)


def _decode_path(raw: bytes | str) -> tuple[int, ...]:
    text = as_str(raw)
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


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner:
        raise ValueError("lease owner must be a non-empty string")
    return owner


def _history_json(kind: str, version: int, record: Mapping[str, Any]) -> str:
    """Strict JSON (no NaN) so every reader of the history can parse it."""
    rec = dict(record)
    rec["type"] = kind
    rec["version"] = version
    rec.setdefault("ts_ms", clock_ms())
    return json.dumps(rec, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------- predictions


def prediction_batch(
    keys: ModelKeys, items: Sequence[PredictionRecord], window_ms: int, now_ms: int, replay_max: int = 0,
    replay_window_ms: int = 3_600_000,
) -> tuple[Prelude, list[Call]]:
    """Validate everything first, then queue: a bad item must not leave half a batch queued.

    Returns the prelude that stores the prediction hashes (never their label) and the attach_label
    calls of the labels given with them. Labels go through the same script as late labels, so the
    feedback entry is laid out in one place and a replayed batch answers 'duplicate' instead of
    adding a second stream entry.
    """
    rows = []
    kept: list[tuple[str, bytes]] = []
    labels: list[LabelItem] = []
    clients: list[str | None] = []
    for it in items:
        mapping: dict[str, Any] = {
            "version": nonneg_int(it.version, "version"),
            "path": _encode_path(it.path),
            "logits": _encode_logits(it.logits),
            "created": now_ms,
        }
        if it.client is not None:
            mapping["client"] = _client(it.client)
        if it.leader_logits is not None:
            mapping["leader"] = _encode_logits(it.leader_logits)
        rows.append((keys.pred(it.id), mapping))
        if it.kept_input is not None:  # moved to the replay stream when the label comes (attach_label.lua)
            kept.append((keys.kept_input(it.id), np.ascontiguousarray(it.kept_input, dtype="<f4").tobytes()))
        if it.label is not None:
            if it.loss is None and it.leader_logits is None:
                raise ValueError(f"record {it.id}: a label needs its loss")
            if it.leader_logits is not None:
                labels.append(label_item(it.id, it.label, it.logits, it.leader_logits))
            else:
                labels.append((it.id, it.label, it.loss, bool(int(np.argmax(it.logits)) == it.label)))
            clients.append(it.client)
    calls = attach_calls(keys, labels, keys.feedback, now_ms, clients, replay_max)  # validates label and loss

    def prelude(pipe: Any) -> None:
        for key, mapping in rows:
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, window_ms)
        for key, data in kept:
            pipe.set(key, data, px=min(replay_window_ms, window_ms))

    return prelude, calls


def p_predict_labels(calls: Sequence[Call], replies: Sequence[Any]) -> None:
    for (_, args), reply in zip(calls, replies, strict=True):
        res = p_attach(reply)
        if res.status not in ("ok", "duplicate"):
            log.warning("label given with prediction %s not recorded: %s (existing label %s)",
                        args[3], res.status, res.existing_label)


def q_fetch(pipe: Any, keys: ModelKeys, ids: Sequence[str]) -> None:
    for record_id in ids:
        pipe.hmget(keys.pred(record_id), _PRED_FIELDS)


def p_fetch(ids: Sequence[str], replies: Sequence[Any]) -> dict[str, StoredPrediction | None]:
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


def attach_calls(
    keys: ModelKeys, items: Sequence[LabelItem], feedback: str, now_ms: int,
    clients: Sequence[str | None] | None = None, replay_max: int = 0,
) -> list[Call]:
    """One attach_label call per item; ``clients`` (one per item, default none) go into the feedback entries.

    ``replay_max``: how many labelled inputs the replay stream keeps (0: a kept input is not moved there).
    """
    names = [_client(c) for c in (clients if clients is not None else [None] * len(items))]
    calls: list[Call] = []
    for (record_id, label, loss, *rest), client in zip(items, names, strict=True):
        correct, base, probe = (*rest, None, None, None)[:3]
        calls.append(((keys.pred(record_id), feedback, keys.replay, keys.kept_input(record_id)),
                      (nonneg_int(label, "label"), _encode_loss(loss), now_ms, record_id, _flag(correct), client,
                       "" if base is None else _encode_loss(base), _flag(probe), nonneg_int(replay_max, "replay_max"))))
    return calls


def _flag(value: bool | None) -> str:
    return "" if value is None else "1" if value else "0"


_FLAGS = {b"1": True, b"0": False, "1": True, "0": False}


def p_attach(reply: Sequence[Any]) -> AttachResult:
    status = as_str(reply[0])
    if status not in ATTACH_STATUSES:
        raise RuntimeError(f"attach_label returned {status!r}")
    existing = int(reply[1]) if len(reply) > 1 and reply[1] is not None else None
    return AttachResult(status, existing)


# --------------------------------------------------------------------------- feedback stream


def _parse_entry(entry_id: str, fields: Mapping[bytes | str, Any] | None) -> FeedbackEntry:
    if not fields:
        raise ValueError("entry has no fields (deleted?)")
    f = {as_str(k): v for k, v in fields.items()}
    return FeedbackEntry(
        entry_id=entry_id,
        id=as_str(f["id"]),
        version=int(f["version"]),
        path=_decode_path(f["path"]),
        loss=float(f["loss"]),
        label=int(f["label"]),
        ts_ms=int(f["ts"]),
        correct=_FLAGS.get(f.get("hit")),
        client=as_str(f.get("client") or b"") or None,
        base_loss=float(f["base"]) if f.get("base") else None,
        probe_correct=_FLAGS.get(f.get("probe_hit")),
        logits=_optional_logits(f.get("logits")),
        leader_logits=_optional_logits(f.get("leader")),
    )


def _optional_logits(raw: Any) -> np.ndarray | None:
    """An entry's logits, or None when absent or malformed: the entry still counts by its loss."""
    try:
        return _decode_logits(raw) if raw else None
    except ValueError:
        return None


def p_entries(pairs: Iterable[Any]) -> tuple[list[FeedbackEntry], list[str]]:
    """Parse (id, fields) pairs; malformed ones are returned separately, to be acked as dropped."""
    good: list[FeedbackEntry] = []
    bad: list[str] = []
    for raw_id, fields in pairs:
        if raw_id is None:
            log.warning("skipping a feedback entry without id")
            continue
        entry_id = as_str(raw_id)
        try:
            good.append(_parse_entry(entry_id, fields))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("dropping malformed feedback entry %s: %r", entry_id, exc)
            bad.append(entry_id)
    return good, bad


class ReplayEntry(NamedTuple):
    """One recent labelled input of the replay stream, as the API kept it."""

    entry_id: str
    record_id: str
    inputs: bytes  # float32, little-endian, the model's input shape flattened
    label: int


def p_replay(pairs: Iterable[Any]) -> list[ReplayEntry]:
    """Parse XREVRANGE pairs of the replay stream (newest first); a malformed entry is skipped (logged)."""
    out: list[ReplayEntry] = []
    for raw_id, fields in pairs:
        try:
            f = {as_str(k): v for k, v in fields.items()}
            out.append(ReplayEntry(as_str(raw_id), as_str(f.get("id", b"")), bytes(f["x"]),
                                   nonneg_int(int(f["label"]), "label")))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("skipping malformed replay entry %r: %r", raw_id, exc)
    return out


def stream_pairs(raw: Any) -> list[Any]:
    """The (id, fields) pairs of a one-stream XREADGROUP reply, RESP2 or RESP3 shaped."""
    if not raw:
        return []
    if isinstance(raw, dict):
        (value,) = raw.values()
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(raw[0][1])


def xreadgroup_kwargs(
    keys: ModelKeys, group: str, consumer: str, start: str, count: int, block_ms: int | None
) -> dict[str, Any]:
    if not consumer:
        raise ValueError("consumer name must be non-empty")
    return {
        "groupname": group,
        "consumername": consumer,
        "streams": {keys.feedback: start},
        "count": positive_int(count, "count"),
        "block": None if block_ms is None else nonneg_int(block_ms, "block_ms"),
    }


def is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def is_cursor_done(cursor: Any) -> bool:
    return as_str(cursor) == "0-0"


# --------------------------------------------------------------------------- versions


def publish_call(
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
    expected = "" if expected_version is None else str(nonneg_int(expected_version, "expected_version"))
    if new_version is None and refused_base is None:
        raise ValueError("a refused candidate needs the version it was built on")
    ids = [as_str(e) for e in entry_ids]
    for e in ids:
        if not _ENTRY_ID_RE.fullmatch(e):
            raise ValueError(f"invalid stream entry id {e!r}")
    if new_version is None:
        version_arg, history = "", _history_json("refused", nonneg_int(refused_base, "base_version"), history_record)
    else:
        version_arg = nonneg_int(new_version, "new_version")
        history = _history_json("publish", version_arg, history_record)
    return (
        (keys.version, keys.fence, keys.history, keys.feedback, keys.events),
        (
            nonneg_int(token, "token"),
            version_arg,
            history,
            group,
            expected,
            history_max,
            *ids,
        ),
    )


def p_publish(reply: Sequence[Any], token: int, expected_version: int | None) -> int:
    status = as_str(reply[0])
    if status == "ok":
        return int(reply[1])
    if status == "stale_token":
        raise StaleLeaderError(f"fencing token {token} is not the current one ({as_str(reply[1])})")
    if status == "moved":
        raise VersionMovedError(expected_version, p_version(reply[1]))
    if status == "not_pending":
        raise EntryNotPendingError(f"entry {as_str(reply[1])} is no longer pending: used by another publish, or lost")
    raise RuntimeError(f"publish_version refused: {status} {as_str(reply[1])}")


def rollback_call(
    keys: ModelKeys, version: int, history_record: Mapping[str, Any], history_max: int
) -> Call:
    v = nonneg_int(version, "version")
    args = (v, _history_json("rollback", v, history_record), history_max)
    return (keys.version, keys.history, keys.events), args


def p_status_ok(reply: Sequence[Any], what: str) -> None:
    if as_str(reply[0]) != "ok":
        raise RuntimeError(f"{what} refused: {[as_str(r) for r in reply]}")


def p_version(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def p_lease_holder(raw: Any) -> str | None:
    """The owner written in ``mp:{m}:lock`` (None: nobody holds the lease)."""
    return None if raw is None else raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def p_history(raw: Sequence[bytes]) -> list[dict[str, Any]]:
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


def q_stats(pipe: Any, keys: ModelKeys) -> None:
    pipe.xlen(keys.feedback)
    pipe.xinfo_groups(keys.feedback)


def p_stats(replies: Sequence[Any], group: str) -> StreamStats:
    length, groups = replies
    if isinstance(length, Exception):
        raise length
    if isinstance(groups, ResponseError):  # no such key: the stream does not exist yet
        groups = []
    elif isinstance(groups, Exception):
        raise groups
    for g in groups:
        if as_str(g.get("name", b"")) == group:
            pending = int(g.get("pending") or 0)
            lag = g.get("lag")
            undelivered = int(lag) if lag is not None else max(int(length) - pending, 0)
            return StreamStats(int(length), pending, undelivered)
    return StreamStats(int(length), 0, int(length))


# --------------------------------------------------------------------------- retention


def q_retention(pipe: Any, keys: ModelKeys, deleted: Sequence[int], now_ms: int) -> None:
    versions = [nonneg_int(v, "deleted version") for v in deleted]
    pipe.hincrby(keys.retention, "deleted_total", len(versions))
    pipe.hset(keys.retention, mapping={"last_deleted": json.dumps(versions), "last_ts_ms": now_ms})


def p_retention_total(raw: Any) -> int:
    """``deleted_total`` of the retention hash; 0 before the first deletion (or if it is not a number)."""
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        log.warning("retention deleted_total %r is not a number; reporting 0", raw)
        return 0
