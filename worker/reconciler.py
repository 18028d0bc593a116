"""The reconciler of one model: read labelled records, turn them into the next version, publish it once.

This module is the loop (lease, reading, deciding, building a candidate, reacting to the publish script's
answer); the publish protocol's steps are :mod:`worker.publisher`, and the statistics with every record made of
them (outcome, manifest, history, log line) are :mod:`worker.summary`.

Exactly-once use of every feedback entry rests on three rules (docs/DESIGN.md §2):

1. an entry stays pending in the consumer group until the publish script acknowledges it, in the same
   atomic step that makes the version current; the worker's in-memory buffer is only a cache of
   pending entries, rebuilt from Redis whenever the worker (re)takes the lease;
2. the new version's file is written *before* the publish, and a file whose publish never happened (a
   crash, a refused token) is garbage that nothing serves, whose entries are used again by the next
   version;
3. only the holder of the newest fencing token can publish, so a leader that lost the lease without
   noticing cannot publish (nor acknowledge) anything;
4. a publish names the version it was built on, and is refused if serving moved in between (an admin
   rollback): the entries stay pending and the next iteration plans again from the new version.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.faults import fault_point
from common.loading import LoadedVersion, fallback_base, load_version, version_sources
from common.names import validate_model_name
from marketplace.head import HeadReplay
from marketplace.reconcile import VersionSeeds
from marketplace.update import previous_step, propose_update
from model_store import ModelStore, ModelStoreError, VersionNotFound
from redis_io.admin_queue import pop_requests, send_reply
from redis_io.connect import CONNECTION_ERRORS, RedisError, SyncClient
from redis_io.fenced import fenced_ack
from redis_io.protocol import EntryNotPendingError, FeedbackEntry, ReplayEntry, StaleLeaderError, VersionMovedError
from redis_io.recordlog import RecordLog
from worker.guard import ValidationGuard, Verdict, input_name, replay_arrays, split_replay, traffic_anchor
from worker.head_replay import HeadReplaySource
from worker.lease import Lease
from worker.plan import Batch, entry_order, plan_batch
from worker.publisher import Publisher
from worker.settings import WorkerSettings
from worker.summary import ReconcileStats, describe_entries, feedback_records, served_metrics

log = logging.getLogger(__name__)

#: runs a callable where tinygrad may run (``EngineThread.call``, or in place)
OnDevice = Callable[..., Any]


def _here(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)

NOT_LEADER = "not leader"
READ_CHUNK = 10_000


@dataclass
class ReconcileOutcome:
    """What one reconciliation attempt did; ``reason`` says why nothing was published."""

    published: bool
    version: int | None = None
    parent: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer of ``POST /admin/reconcile``."""
        return {"published": self.published, "version": self.version, "parent": self.parent,
                "stats": self.stats, "reason": self.reason}


class Reconciler:
    """Reconciles one model while it holds the model's leader lease; see the module docstring."""

    def __init__(self, settings: WorkerSettings, store: ModelStore, client: SyncClient, model: str,
                 owner: str | None = None, on_device: OnDevice | None = None) -> None:
        self.settings = settings
        # where tinygrad work runs (the guard's and the head's forward passes): the process's one engine thread
        # when several threads share tinygrad (worker.main), else the calling thread
        self.on_device: OnDevice = on_device or _here
        self.store = store
        self.client = client
        self.model = validate_model_name(model)
        self.records = RecordLog(client, model, settings.label_window_s)
        self.keys = self.records.keys
        self.consumer = settings.consumer
        # The owner is unique per instance even if two processes were given the same consumer name.
        self.lease = Lease(self.records, owner or f"{settings.consumer}:{secrets.token_hex(4)}",
                           settings.lease_ttl_ms)
        self.publisher = Publisher(settings, store, self.records, self.model, self.consumer, self.lease.owner)
        self.buffer: dict[str, FeedbackEntry] = {}
        self._generation = 0  # bumped whenever the buffer gains entries
        self._last_attempt: tuple[Any, ...] | None = None
        self._last_publish = time.monotonic()
        self._last_reclaim = time.monotonic()
        self._window: tuple[int, dict[int, VersionSeeds]] | None = None
        self._loaded: LoadedVersion | None = None
        self._grandparent: LoadedVersion | None = None
        self.guard = ValidationGuard(settings, store, self.model)
        self.head_replay = HeadReplaySource(settings.head_damping)
        self._base_error: str | None = None  # why the base version cannot be built on, last time it could not

    # ------------------------------------------------------------------------------------------ public

    @property
    def is_leader(self) -> bool:
        return self.lease.held

    def run_once(self, force: bool = False) -> ReconcileOutcome:
        """Take or keep the lease, read what is ready, and reconcile if enough is usable (or ``force``)."""
        t0 = time.monotonic()
        if not self._ensure_leader():
            holder = self.lease.holder()
            return ReconcileOutcome(False, reason=f"{NOT_LEADER}: the lease of {self.model} is held by {holder}",
                                    seconds=time.monotonic() - t0)
        self._read_all()
        self._reclaim_idle()
        return self._attempt(force, "force" if force else None, t0)

    def serve_forever(self, stop: threading.Event) -> None:
        """Lead (or wait to lead) until ``stop`` is set; then give the lease back."""
        log.info("%s: reconciler %s starting (min_records=%d, interval_s=%s)", self.model, self.lease.owner,
                 self.settings.min_records, self.settings.interval_s)
        try:
            while not stop.is_set():
                try:
                    self.step(stop)
                except CONNECTION_ERRORS as exc:
                    log.warning("%s: Redis unavailable (%s); retrying", self.model, exc)
                    if self.lease.held:  # Redis may come back without its last writes: rebuild from it
                        self._lost("Redis connection lost; the buffer is rebuilt from Redis once it answers")
                    self._last_attempt = None
                    stop.wait(1.0)
                except Exception:
                    log.exception("%s: reconciler step failed; retrying", self.model)
                    self._last_attempt = None  # retry even if nothing changes (a transient disk error)
                    stop.wait(1.0)
        finally:
            try:
                self.close()
            except RedisError as exc:
                log.warning("%s: could not release the lease (%s); it expires by itself", self.model, exc)

    def step(self, stop: threading.Event) -> None:
        """One loop iteration: lease, admin requests, a blocking read, and a reconciliation if due."""
        poll_s = self.settings.poll_ms / 1000
        if not self._ensure_leader():
            stop.wait(poll_s)
            return
        self._serve_requests()
        if self._room() > 0:
            self._read(self.settings.poll_ms)
        else:
            stop.wait(poll_s)
        self._reclaim_idle()
        if self._worth_attempting():
            self._attempt(False, None, time.monotonic())

    def close(self) -> None:
        """Release the lease; buffered entries stay pending in Redis for the next leader."""
        self.lease.release()
        self.buffer.clear()

    # ------------------------------------------------------------------------------------------ lease

    def _ensure_leader(self) -> bool:
        if self.lease.held:
            if self.lease.keep():
                return True
            self._lost("the lease could not be renewed")
            return False
        if not self.lease.acquire():
            return False
        self._on_acquired()
        return True

    def _on_acquired(self) -> None:
        """Rebuild the buffer from Redis: our own pending entries, then everything a previous leader left.

        Claiming other consumers' entries at once (not only after ``claim_idle_ms``) is safe: only a
        leader reads the stream, the previous leader's token is now stale, and whatever it published
        before our token was taken is already acknowledged, hence not pending.
        """
        self.buffer.clear()
        self._window, self._loaded, self._last_attempt = None, None, None
        self.records.ensure_group()
        own = self.records.pending_entries(self.consumer)
        self._add(own)
        claimed = self.records.reclaim(self.consumer, 0, count=max(self.settings.max_records_per_reconcile, 1000))
        self._add(claimed)
        self._last_publish = self._last_reclaim = time.monotonic()
        log.info("%s: leading as %s; %d pending entries recovered (%d own, %d claimed)", self.model,
                 self.lease.owner, len(self.buffer), len(own), len(claimed))

    def _lost(self, why: str) -> None:
        """Stop leading: forget the buffer, whose entries stay pending for whoever leads next."""
        log.warning("%s: no longer the leader (%s); %d buffered entries left pending", self.model, why,
                    len(self.buffer))
        self.lease.drop()
        self.buffer.clear()
        self._window, self._loaded, self._last_attempt = None, None, None

    # ------------------------------------------------------------------------------------------ reading

    def _room(self) -> int:
        return self.settings.max_records_per_reconcile - len(self.buffer)

    def _add(self, entries: Sequence[FeedbackEntry]) -> int:
        new = 0
        for e in entries:
            if e.entry_id not in self.buffer:
                self.buffer[e.entry_id] = e
                new += 1
        if new:
            self._generation += 1
        return new

    def _read(self, block_ms: int | None) -> int:
        room = self._room()
        if room <= 0:
            return 0
        return self._add(self.records.read_feedback(self.consumer, min(room, READ_CHUNK), block_ms))

    def _read_all(self) -> None:
        """Read new entries without blocking until the stream or the buffer's room runs out."""
        while self._room() > 0:
            asked = min(self._room(), READ_CHUNK)
            got = self.records.read_feedback(self.consumer, asked, None)
            self._add(got)
            if len(got) < asked:
                return

    def _reclaim_idle(self) -> None:
        """Take over entries idle for ``claim_idle_ms``: a dead consumer's, or reads of ours that got lost."""
        now = time.monotonic()
        every_s = max(self.settings.claim_idle_ms / 2000, self.settings.poll_ms / 1000)
        if now - self._last_reclaim < every_s:
            return
        self._last_reclaim = now
        count = max(len(self.buffer) + self._room(), 1000)
        n = self._add(self.records.reclaim(self.consumer, self.settings.claim_idle_ms, count=count))
        if n:
            log.info("%s: reclaimed %d idle entries", self.model, n)

    # ------------------------------------------------------------------------------------------ admin

    def _serve_requests(self) -> None:
        """Answer queued ``POST /admin/reconcile`` requests with one forced reconciliation."""
        requests = pop_requests(self.client, self.keys)
        if not requests:
            return
        t0 = time.monotonic()
        try:
            self._read_all()
            outcome = self._attempt(True, "request", t0)
        except Exception as exc:
            log.exception("%s: reconcile request failed", self.model)
            outcome = ReconcileOutcome(False, reason=f"reconciliation failed: {type(exc).__name__}: {exc}",
                                       seconds=time.monotonic() - t0)
        send_reply(self.client, self.keys, [r.id for r in requests], outcome.as_dict())

    # ------------------------------------------------------------------------------------------ deciding

    def _timer_fired(self) -> bool:
        return time.monotonic() - self._last_publish >= self.settings.interval_s

    def _worth_attempting(self) -> bool:
        """Cheap gate before planning: enough entries could be usable (or the buffer is full), and something changed.

        A full buffer always gets a look, even below ``min_records`` (a ``max_records_per_reconcile``
        smaller than it): nothing more can be read until it is used or its dropped entries acknowledged.
        """
        timer = self._timer_fired()
        if not timer and len(self.buffer) < self.settings.min_records and self._room() > 0:
            return False
        key = (self._generation, self.records.current_version(), timer)
        if key == self._last_attempt:
            return False
        self._last_attempt = key
        return True

    def _base(self) -> tuple[int | None, int | None]:
        """(base version, what ``mp:{m}:version`` says); see ``_fallback_base`` when the key is unset."""
        current = self.records.current_version()
        return (current if current is not None else self._fallback_base()), current

    def _fallback_base(self) -> int | None:
        published = {h.get("version") for h in self.records.history() if h.get("type") == "publish"}
        return fallback_base(self.store, self.model, published)

    def _sources(self, base: int) -> dict[int, VersionSeeds]:
        """Seeds of every version a cohort may come from: the base and its ancestors up to max_cohort_age."""
        if self._window is None or self._window[0] != base:
            lineage = self.store.lineage(self.model, base)[: self.settings.max_cohort_age + 1]
            self._window = (base, version_sources(self.store, self.model, lineage))
        return self._window[1]

    def _parent(self, base: int) -> LoadedVersion:
        if self._loaded is None or self._loaded.version != base:
            self._loaded = load_version(self.store, self.model, base)
        return self._loaded

    def _plan(self, base: int, sources: dict[int, VersionSeeds]) -> Batch:
        window = {n: (int(s.seeds.shape[0]), int(s.seeds.shape[1])) for n, s in sources.items()}
        return plan_batch(self.buffer.values(), base, window, self.settings.min_cohort,
                          self.settings.max_records_per_reconcile, self.settings.label_window_s * 1000,
                          time.time_ns() // 1_000_000, self._parent(base).spec.num_classes,
                          disabled_clients=frozenset(self.settings.disabled_clients))

    def _attempt(self, force: bool, trigger: str | None, t0: float) -> ReconcileOutcome:
        base, current = self._base()
        if base is None:
            return ReconcileOutcome(False, reason=f"model {self.model} has no version in the store",
                                    seconds=time.monotonic() - t0)
        try:
            sources = self._sources(base)
            batch = self._plan(base, sources)
        except ModelStoreError as exc:
            # serving points at a version the store lacks (deleted, another store) or cannot load (corrupt):
            # nothing can be built on it; the entries stay pending until an operator rolls back or repairs
            reason = f"base version {base} is not usable: {type(exc).__name__}: {exc}"
            if reason != self._base_error:  # once per cause, not once per new entry
                log.error("%s: %s; entries stay pending until serving points at a usable version", self.model,
                          reason)
            self._base_error = reason
            return ReconcileOutcome(False, None, base, {}, reason, time.monotonic() - t0)
        self._base_error = None
        timer = self._timer_fired()
        need = self.settings.min_cohort if (force or timer) else self.settings.min_records
        if len(batch.usable) < need:
            stats: dict[str, Any] = batch.counts()
            if batch.dropped and self._room() <= 0:
                self._ack_dropped(batch, current, stats)
            reason = f"too few records: have {len(batch.usable)}, need {need}"
            log.debug("%s: not reconciling (%s; %s)", self.model, reason, stats)
            seconds = time.monotonic() - t0
            stats["seconds"] = round(seconds, 6)
            return ReconcileOutcome(False, None, base, stats, reason, seconds)
        trigger = trigger or ("records" if len(batch.usable) >= self.settings.min_records else "timer")
        return self._reconcile_and_publish(batch, sources, trigger, current, t0)

    def _has_holdout(self) -> bool:
        """Whether the guard has a holdout set to judge with (no holdout: the guard, traffic check and all, is off)."""
        try:
            return self.guard.holdout() is not None
        except (OSError, ModelStoreError, ValueError):
            return False

    def _head_replay(self, parent: LoadedVersion, recent: list[ReplayEntry]) -> HeadReplay | None:
        """The kept inputs' features for the head's exact gradient; None (the logits estimate steps) if unusable."""
        try:
            holdout = self.guard.holdout()
        except (OSError, ModelStoreError, ValueError) as exc:
            log.error("%s: the holdout set cannot be read (%s); the head steps undamped", self.model, exc)
            holdout = None
        fit, inputs, labels = replay_arrays(recent, parent.spec)
        try:
            return self.head_replay.evidence(self.guard.leader(parent.spec), parent.params, inputs, labels, holdout,
                                             [input_name(e) for e in fit])
        except Exception:  # a failing forward pass must not stop learning: the logits estimate steps instead
            log.exception("%s: the kept inputs' features could not be computed; the head steps on its logits",
                          self.model)
            return None

    def _ack_dropped(self, batch: Batch, current: int | None, stats: dict[str, Any]) -> None:
        """The buffer is full of entries nothing will use: acknowledge them now rather than stall."""
        assert self.lease.token is not None
        ids = [e.entry_id for e in batch.dropped]
        try:
            acked = fenced_ack(self.client, self.keys, self.records.group, self.lease.token, current, ids)
        except StaleLeaderError as exc:
            self._lost(f"acknowledgement refused: {exc}")
            return
        if acked is None:
            self._last_attempt = None  # the version moved under us: plan again
            return
        fault_point("fenced_ack_after_exec")
        for i in ids:
            self.buffer.pop(i, None)
        stats["acked_without_publish"] = len(ids)
        log.info("%s: buffer full; acknowledged %d dropped entries without a publish (%s)", self.model,
                 len(ids), batch.counts())

    # ------------------------------------------------------------------------------------------ publishing

    def _reconcile_and_publish(self, batch: Batch, sources: dict[int, VersionSeeds], trigger: str,
                               expected: int | None, t0: float) -> ReconcileOutcome:
        """Build on ``batch.base`` and publish, provided ``mp:{m}:version`` still reads ``expected``."""
        parent = self._parent(batch.base)
        cohort_versions = {e.version for e in batch.usable}
        with self.lease.renewing():  # the update and its validation may outlast the lease's TTL
            replay = self.settings.reconcile_config().replays_head(len(parent.spec.groups))
            recent = self.records.recent_inputs(self.settings.guard_traffic_max_age_s * 1000) \
                if self.settings.guard_traffic or replay else []
            split = replay and self.settings.guard_traffic and self._has_holdout()  # else nothing is judged on
            learn, judged = split_replay(recent, self.settings.guard_traffic_share) if split else (recent, recent)
            evidence = self.on_device(self._head_replay, parent, learn) if replay else None
            result = propose_update(parent.spec, parent.params, feedback_records(batch.usable, parent.spec.num_classes),
                                    {n: sources[n] for n in cohort_versions}, self.settings.reconcile_config(),
                                    self.settings.update_config(), self._last_step(parent), evidence)
            verdict = self.on_device(self.guard.judge, parent, result.params,
                                     judged if self.settings.guard_traffic else None)
        if not self.lease.held:
            self._lost("the lease expired while the candidate was built and validated")
            return ReconcileOutcome(False, None, parent.version, {}, "lost leadership: the lease expired while "
                                    "the candidate was built and validated", time.monotonic() - t0)
        used = [e for e, u in zip(batch.usable, result.used, strict=True) if u]
        validation = None if verdict is None else verdict.validation
        stats = ReconcileStats.of_update(result.stats, batch.counts(), len(batch.usable) - len(used), trigger,
                                         served_metrics(used, validation))
        used_ids = [e.entry_id for e in used]
        dropped_ids = sorted((e.entry_id for e in batch.dropped), key=entry_order)
        inputs = {**describe_entries(used_ids), "dropped": describe_entries(dropped_ids)}
        if verdict is not None and not verdict.accepted:
            return self._refuse(parent, verdict, stats, used_ids + dropped_ids, expected, t0)

        version, manifest = self.publisher.write(parent, result.params, stats, inputs, validation)
        fault_point("after_store_write")
        token = self.lease.token
        assert token is not None
        acked, failed = self._fenced(f"publish of version {version}", parent.version, stats, t0, version,
                                     lambda: self.publisher.publish(token, version, parent.version, stats, inputs,
                                                                    manifest["weights_sha256"],
                                                                    used_ids + dropped_ids, expected))
        if failed is not None:
            return failed
        fault_point("after_publish")
        if acked != len(used_ids) + len(dropped_ids):
            log.warning("%s: version %d acknowledged %d entries, expected %d", self.model, version, acked,
                        len(used_ids) + len(dropped_ids))
        for i in used_ids + dropped_ids:
            self.buffer.pop(i, None)
        self._last_publish = time.monotonic()
        seconds = time.monotonic() - t0
        stats.seconds = round(seconds, 6)
        log.info("reconciled %s", stats.log_line(self.model, version, parent.version))
        anchor = traffic_anchor(version, validation)  # the guard reads its weights (itself, when none is carried)
        self.publisher.retain(version, parent.version, [*(self._window[1] if self._window else ()), anchor])
        return ReconcileOutcome(True, version, parent.version, stats.as_dict(), None, seconds)

    def _fenced(self, what: str, base: int, stats: ReconcileStats, t0: float, garbage: int | None,
                call: Callable[[], int]) -> tuple[int, ReconcileOutcome | None]:
        """Run a fenced publish-script call; on a refusal, the outcome that says why (and what it leaves)."""
        left = "" if garbage is None else f"; version {garbage} stays unpublished garbage in the store"

        def refused(reason: str) -> tuple[int, ReconcileOutcome]:
            return 0, ReconcileOutcome(False, None, base, stats.as_dict(), reason, time.monotonic() - t0)

        try:
            return call(), None
        except VersionMovedError as exc:
            # A rollback (or another publish) landed while we reconciled: going on would undo it.
            # The entries stay pending and buffered; the next iteration plans from the new version.
            self._last_attempt = None
            log.warning("%s: %s refused: %s; its entries stay pending, planning again%s", self.model, what, exc, left)
            return refused(f"version moved: {exc}")
        except StaleLeaderError as exc:
            self._lost(f"{what} refused: {exc}")
            log.warning("%s: lost leadership%s", self.model, left)
            return refused(f"lost leadership: {exc}")
        except EntryNotPendingError as exc:
            # Our buffer disagrees with Redis (another leader with our token, or Redis lost writes): stop
            # leading; whoever takes the lease next rebuilds its buffer from what is really pending.
            self._lost(f"{what} refused: {exc}")
            log.warning("%s: entries no longer pending%s", self.model, left)
            return refused(f"{what} refused: {exc}")
        except BaseException:
            # The script may or may not have run: only Redis knows which entries are acknowledged now.
            self._lost(f"{what} failed; its outcome is unknown")
            raise

    def _refuse(self, parent: LoadedVersion, verdict: Verdict, stats: ReconcileStats, entry_ids: list[str],
                expected: int | None, t0: float) -> ReconcileOutcome:
        """Record a candidate the guard refused and acknowledge its entries; serving stays on ``parent``."""
        token = self.lease.token
        assert token is not None
        _, failed = self._fenced("recording a refused candidate", parent.version, stats, t0, None,
                                 lambda: self.publisher.refuse(token, parent.version, stats, verdict.validation,
                                                               entry_ids, expected))
        if failed is not None:
            return failed
        for i in entry_ids:
            self.buffer.pop(i, None)
        self._last_publish = time.monotonic()
        reason = f"candidate refused by the validation guard: {verdict.reason}"
        # a step that gains nothing is the guard at work on traffic the model already serves well, not a fault
        log.log(logging.INFO if verdict.no_gain else logging.WARNING,
                "%s: %s; %d entries used, the weights of version %d keep serving", self.model, reason,
                len(entry_ids), parent.version)
        if self.settings.reseed_on_refusal:
            self._reseed(parent, verdict, stats, expected)
        seconds = time.monotonic() - t0
        stats.seconds = round(seconds, 6)
        return ReconcileOutcome(False, None, parent.version, stats.as_dict(), reason, seconds)

    def _reseed(self, parent: LoadedVersion, verdict: Verdict, stats: ReconcileStats, expected: int | None) -> None:
        """Publish the parent's weights again under fresh seeds (no entries), so serving probes new directions.

        Without it a refused candidate leaves the same seeds serving, the next records measure the same
        directions, and the guard may refuse every candidate from then on. Best effort: if this fails, the
        refusal stands and the next reconciliation simply probes the old seeds once more.
        """
        before = verdict.validation
        validation = {**before, "accuracy": before["parent_accuracy"], "loss": None, "accepted": True,
                      "class_accuracy": before.get("parent_class_accuracy"), "worst_class": None,
                      "reseed_of": parent.version}
        if before.get("traffic"):  # the anchor carries on; the refused candidate's figures do not
            validation["traffic"] = {"anchor_version": before["traffic"]["anchor_version"]}
        try:
            reseed = ReconcileStats.of_reseed(stats.trigger, before)
            version, manifest = self.publisher.write(parent, parent.params, reseed, describe_entries([]), validation,
                                                     kind="reseed after a refused candidate")
            token = self.lease.token
            assert token is not None
            _, failed = self._fenced(f"publish of reseeded version {version}", parent.version, stats,
                                     time.monotonic(), version,
                                     lambda: self.publisher.publish_reseed(token, version, parent.version,
                                                                           manifest["weights_sha256"], expected))
        except Exception:
            log.exception("%s: re-seeding after a refusal failed; the parent's seeds keep serving", self.model)
            return
        if failed is None:
            log.info("%s: version %d re-seeds version %d after a refused candidate", self.model, version,
                     parent.version)
            stats.reseeded_as = version

    def _last_step(self, parent: LoadedVersion) -> dict[str, np.ndarray] | None:
        """θ_n − θ_{n−1} for momentum: only when the parent is itself a reconciliation of a stored version."""
        grand = parent.manifest.get("parent")
        if not self.settings.momentum or grand is None or "inputs" not in parent.manifest:
            return None
        if self._grandparent is None or self._grandparent.version != grand:
            try:
                self._grandparent = load_version(self.store, self.model, int(grand))
            except (VersionNotFound, ModelStoreError, ValueError) as exc:
                log.info("%s: no momentum from version %s (%s)", self.model, grand, exc)
                return None
        return previous_step(parent.params, self._grandparent.params)
