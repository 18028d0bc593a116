"""The publish protocol of one model's leader: a candidate becomes the next stored version, then the current one.

1. :meth:`Publisher.write`: the weights and the manifest go to the store under the next free number (a number a
   stale leader took is skipped) before anything points at them, so a version whose publish never happens is
   garbage that nothing serves;
2. :meth:`Publisher.publish`: one fenced script sets the version, appends the history and acknowledges exactly
   the entries used, all or nothing (``redis_io``); :meth:`Publisher.refuse` records a candidate the validation
   guard refused the same way, minus the version change. A refusal by the script (a newer fencing token, serving
   moved, an entry no longer pending) raises; the loop (``worker.reconciler``) decides what follows;
3. :meth:`Publisher.retain`: versions nothing needs any more are deleted, and counted in Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from common.loading import LoadedVersion, write_next_version
from marketplace.reconcile import learned_groups
from model_store import ModelStore, VersionExistsError
from redis_io.connect import RedisError
from redis_io.recordlog import RecordLog
from worker.settings import WorkerSettings
from worker.summary import ReconcileStats, reseed_record

log = logging.getLogger(__name__)


class Publisher:
    """Writes and publishes the versions of ``model`` for the leader ``owner`` (its fencing token per call)."""

    def __init__(self, settings: WorkerSettings, store: ModelStore, records: RecordLog, model: str, consumer: str,
                 owner: str) -> None:
        self.settings, self.store, self.records = settings, store, records
        self.model, self.consumer, self.owner = model, consumer, owner
        self._rng = np.random.default_rng(settings.version_seed)  # None: fresh entropy, as production wants

    def write(self, parent: LoadedVersion, params: dict[str, np.ndarray], stats: ReconcileStats,
              inputs: dict[str, Any], validation: dict[str, Any] | None = None,
              kind: str = "marketplace reconciliation") -> tuple[int, dict[str, Any]]:
        """Store the update under the next free number (a stale leader may have taken one: skip it)."""
        extra = stats.manifest_fields(inputs, validation, self.settings.manifest_record(), kind)
        for attempt in range(3):
            version = max([*self.store.versions(self.model), parent.version]) + 1
            try:
                manifest = write_next_version(self.store, parent, version, params, stats.update,
                                              stats.update["learning_rate"], self._rng,
                                              eps=self.settings.probe_scale, vendors=self.settings.vendors,
                                              antithetic=self.settings.antithetic,
                                              learned=learned_groups(self.settings.learn_groups,
                                                                     len(parent.spec.groups)), **extra)
                return version, manifest
            except VersionExistsError:
                if attempt == 2:
                    raise
                log.warning("%s: version %d was written by someone else; taking the next number", self.model,
                            version)
        raise AssertionError("unreachable")

    def publish(self, token: int, version: int, parent: int, stats: ReconcileStats, inputs: dict[str, Any],
                weights_sha256: str, entry_ids: Sequence[str], expected: int | None) -> int:
        """Make ``version`` current and acknowledge ``entry_ids``, if serving still reads ``expected``."""
        record = stats.publish_record(parent, inputs, weights_sha256, self.consumer, self.owner, token)
        return self.records.publish(token, version, record, entry_ids, expected_version=expected)

    def refuse(self, token: int, parent: int, stats: ReconcileStats, validation: dict[str, Any],
               entry_ids: Sequence[str], expected: int | None) -> int:
        """Record a refused candidate built on ``parent`` and acknowledge its entries; serving stays."""
        record = stats.refusal_record(parent, validation, self.consumer, self.owner, token)
        return self.records.refuse(token, parent, record, entry_ids, expected)

    def publish_reseed(self, token: int, version: int, parent: int, weights_sha256: str,
                       expected: int | None) -> int:
        """Make ``version`` (the parent's weights under fresh seeds) current; it uses no entries."""
        record = reseed_record(parent, weights_sha256, self.owner, token)
        return self.records.publish(token, version, record, [], expected_version=expected)

    def retain(self, version: int, parent: int, window: Iterable[int]) -> None:
        """Delete old versions, keeping the current one, its parent, every version a cohort may use and the pins.

        The store adds lineage roots and its own pins (``POST /admin/versions/{n}/pin``); the count goes to
        Redis, where ``GET /metrics`` of any API replica reads it.
        """
        protect = {version, parent, *window}
        try:
            deleted = self.store.apply_retention(self.model, self.settings.keep_versions, protect,
                                                 self.settings.pin_versions)
        except Exception:
            log.exception("%s: retention failed (versions are kept)", self.model)
            return
        if not deleted:
            return
        log.info("%s: retention deleted %d versions %s", self.model, len(deleted), deleted)
        try:
            self.records.record_retention(deleted)
        except RedisError:
            log.exception("%s: could not count the %d deleted versions in Redis", self.model, len(deleted))
