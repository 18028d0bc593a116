"""The wire protocol between ``POST /admin/reconcile`` and the worker that holds the lease.

The API asks only the leading worker (:func:`ask_leader`): with no worker holding the lease it runs
nothing itself and says so (:class:`NoLeader`). It pushes ``{"id", "deadline_ms"}`` onto
``mp:{m}:requests`` and BLPOPs ``mp:{m}:reply:{id}``; the leader pops requests between stream reads,
runs one forced reconciliation for all requests it popped together, and pushes the outcome as JSON
onto each reply list, which expires soon after so an abandoned reply never lingers. A request whose
caller already gave up (deadline passed) is skipped: the caller was told it timed out, so it should
not find a version published behind its back.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from common.names import RECORD_ID_RE
from redis_io.keys import ModelKeys
from redis_io.protocol import clock_ms, p_lease_holder

log = logging.getLogger(__name__)

REPLY_TTL_S = 60
MAX_REQUESTS_PER_POP = 64


@dataclass(frozen=True)
class QueuedRequest:
    """A reconcile request as the worker pops it (the HTTP body is ``server.schemas.ReconcileRequest``)."""

    id: str
    deadline_ms: int


def push_request(client: redis.Redis, keys: ModelKeys, request_id: str, timeout_s: float) -> None:
    """Queue a request that its caller will wait ``timeout_s`` for."""
    body = {"id": request_id, "deadline_ms": clock_ms() + int(timeout_s * 1000)}
    client.rpush(keys.requests, json.dumps(body))


def _parse(raw: bytes | str) -> QueuedRequest | None:
    try:
        body = json.loads(raw)
        rid, deadline = body["id"], int(body["deadline_ms"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(rid, str) or not RECORD_ID_RE.fullmatch(rid):
        return None
    return QueuedRequest(rid, deadline)


def pop_requests(client: redis.Redis, keys: ModelKeys) -> list[QueuedRequest]:
    """Take the queued requests whose callers still wait; malformed or expired ones are discarded."""
    raw = client.lpop(keys.requests, MAX_REQUESTS_PER_POP)
    if not raw:
        return []
    now, out = clock_ms(), []
    for item in raw:
        req = _parse(item)
        if req is None:
            log.warning("%s: discarding a malformed reconcile request %r", keys.model, item[:100])
        elif req.deadline_ms < now:
            log.info("%s: skipping reconcile request %s: its caller stopped waiting", keys.model, req.id)
        else:
            out.append(req)
    return out


def send_reply(client: redis.Redis, keys: ModelKeys, request_ids: Iterable[str], outcome: Mapping[str, Any]) -> None:
    """Answer each request with the same outcome; the reply lists expire after REPLY_TTL_S."""
    body = json.dumps(outcome, allow_nan=False)
    pipe = client.pipeline(transaction=False)
    for rid in request_ids:
        pipe.rpush(keys.reply(rid), body)
        pipe.expire(keys.reply(rid), REPLY_TTL_S)
    pipe.execute()


def wait_reply(client: redis.Redis, keys: ModelKeys, request_id: str, timeout_s: float) -> dict[str, Any] | None:
    """The worker's answer, or None if none came within ``timeout_s``."""
    got = client.blpop([keys.reply(request_id)], timeout=max(timeout_s, 0.01))
    if got is None:
        return None
    client.delete(keys.reply(request_id))
    return json.loads(got[1])


class NoLeader(LookupError):
    """No worker holds the model's lease, so nothing would answer a request (and none was queued)."""


class ReconcileTimeout(TimeoutError):
    """No answer within the timeout; the worker may still run (or have run) the reconciliation."""


def ask_leader(client: redis.Redis, model: str, timeout_s: float) -> dict[str, Any]:
    """Ask the worker holding ``model``'s lease for a forced reconciliation and return its outcome.

    Outcome: ``{"published", "version", "parent", "stats", "reason"}``. Raises :class:`NoLeader` when no
    worker holds the lease (nothing is written), :class:`ReconcileTimeout` when the holder does not answer
    within ``timeout_s`` (it skips the request once that deadline has passed).
    """
    keys = ModelKeys(model)
    holder = p_lease_holder(client.get(keys.lock))
    if holder is None:
        raise NoLeader(f"no reconciler worker leads model {model!r}: start one (python -m worker, or mpserve up "
                       "runs one)")
    rid = uuid.uuid4().hex
    push_request(client, keys, rid, timeout_s)
    log.info("%s: asked the worker %s to reconcile (request %s)", model, holder, rid)
    reply = wait_reply(client, keys, rid, timeout_s)
    if reply is None:
        raise ReconcileTimeout(
            f"{model}: the worker holding the lease ({holder}) did not answer within {timeout_s}s; it may be busy "
            "or dead (a new leader takes over when its lease expires), and it skips the request once its caller "
            "stopped waiting")
    return reply
