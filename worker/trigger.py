"""``POST /admin/reconcile``: a reconciliation now, through the worker's own code path.

If a worker holds the model's lease, the request goes to it (a Redis list, answered on a reply list):
it alone may publish, and running a second reconciler beside it would only fight over the lease.
If no worker holds it, the caller runs :class:`Reconciler` in-process under a lease of its own, so
the same rules (fencing, exactly-once acknowledgement) hold for an API-only deployment.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import Any

from model_store import ModelStore
from redis_io.admin_queue import push_request, wait_reply
from redis_io.connect import SyncClient
from redis_io.keys import ModelKeys
from redis_io.recordlog import RecordLog
from worker.reconciler import NOT_LEADER, Reconciler
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

ADMIN_OWNER_PREFIX = "admin:"
_RETRY_S = 0.05


class ReconcileTimeout(TimeoutError):
    """No answer within the timeout; the worker may still run (or have run) the reconciliation."""


def _in_process(client: SyncClient, store: ModelStore, settings: WorkerSettings, model: str) -> dict[str, Any] | None:
    """Reconcile here under an admin lease; None if someone took the lease first."""
    owner = f"{ADMIN_OWNER_PREFIX}{settings.consumer}:{secrets.token_hex(4)}"
    rec = Reconciler(settings, store, client, model, owner=owner)
    try:
        outcome = rec.run_once(force=True)
    finally:
        rec.close()
    if not outcome.published and (outcome.reason or "").startswith(NOT_LEADER):
        return None
    return outcome.as_dict()


def request_reconcile(client: SyncClient, store: ModelStore, settings: WorkerSettings, model: str,
                      timeout_s: float = 30.0) -> dict[str, Any]:
    """Run a forced reconciliation of ``model`` and return its outcome dict.

    Outcome: ``{"published", "version", "parent", "stats", "reason"}``. Raises ReconcileTimeout when
    the worker holding the lease does not answer within ``timeout_s`` (or another admin run holds the
    lease that long).
    """
    records = RecordLog(client, model)
    keys = records.keys
    deadline = time.monotonic() + timeout_s
    while True:
        holder = records.lease_holder()
        if holder is None:
            outcome = _in_process(client, store, settings, model)
            if outcome is not None:
                return outcome
        elif not holder.startswith(ADMIN_OWNER_PREFIX):
            return _ask_worker(client, keys, holder, deadline, timeout_s)
        # Another admin run (or a worker that won the race for the lease): look again shortly.
        if time.monotonic() >= deadline:
            raise ReconcileTimeout(f"{model}: the lease stayed busy ({holder}) for {timeout_s}s; try again")
        time.sleep(_RETRY_S)


def _ask_worker(client: SyncClient, keys: ModelKeys, holder: str, deadline: float,
                timeout_s: float) -> dict[str, Any]:
    rid = uuid.uuid4().hex
    remaining = max(deadline - time.monotonic(), 0.01)
    push_request(client, keys, rid, remaining)
    log.info("%s: asked the worker %s to reconcile (request %s)", keys.model, holder, rid)
    reply = wait_reply(client, keys, rid, remaining)
    if reply is None:
        raise ReconcileTimeout(
            f"{keys.model}: the worker holding the lease ({holder}) did not answer within {timeout_s}s; "
            "it may be busy or dead (a new leader takes over when its lease expires), and it skips the "
            "request once its caller stopped waiting")
    return reply
