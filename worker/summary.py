"""What one reconciliation leaves behind: its statistics, gathered once in :class:`ReconcileStats`, and every
record made of them: the outcome's ``stats`` (``POST /admin/reconcile`` answers it), the manifest's fields, the
publish or refusal record of the history, and the log line; plus the description of the entries a version used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from marketplace.reconcile import Records
from marketplace.update import exploration_metrics, online_metrics
from redis_io.protocol import FeedbackEntry

ENTRY_IDS_IN_MANIFEST = 4096  # above this, a manifest lists the entries by count, bounds and hash only


def describe_entries(ids: Sequence[str]) -> dict[str, Any]:
    """Count, bounds and sha256 of entry ids (stream order, joined by newlines); the ids when few."""
    out: dict[str, Any] = {
        "entries": len(ids),
        "first_entry": ids[0] if ids else None,
        "last_entry": ids[-1] if ids else None,
        "entry_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }
    if len(ids) <= ENTRY_IDS_IN_MANIFEST:
        out["entry_ids"] = list(ids)
    return out


def feedback_records(entries: Sequence[FeedbackEntry], num_classes: int | None = None) -> Records:
    """The feedback entries as the arrays the algorithm reconciles (``num_classes``: the model's, for the logits)."""
    logits, leader = logit_rows(entries, num_classes)
    return Records(
        version=np.array([e.version for e in entries], dtype=np.int64),
        path=np.array([e.path for e in entries], dtype=np.int64).reshape(len(entries), -1),
        loss=np.array([e.loss for e in entries], dtype=np.float64),
        label=np.array([e.label for e in entries], dtype=np.int64),
        base=np.array([np.nan if e.base_loss is None else e.base_loss for e in entries], dtype=np.float64),
        logits=logits, leader_logits=leader,
    )


def logit_rows(entries: Sequence[FeedbackEntry], num_classes: int | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(R, C) probe and leader logits of the entries that carry both (NaN rows for the others); None when none does.

    C is the model's number of classes (else the width most entries have); an entry of another width gets NaN
    rows, so it still counts by its loss but not in the head's logits estimate.
    """
    widths = [len(e.logits) for e in entries
              if e.logits is not None and e.leader_logits is not None and len(e.logits) == len(e.leader_logits)]
    if not widths:
        return None, None
    C = int(np.bincount(widths).argmax()) if num_classes is None else num_classes
    logits, leader = np.full((len(entries), C), np.nan), np.full((len(entries), C), np.nan)
    for i, e in enumerate(entries):
        if e.logits is not None and e.leader_logits is not None and len(e.logits) == C == len(e.leader_logits):
            logits[i], leader[i] = e.logits, e.leader_logits
    return logits, leader


def served_metrics(used: Sequence[FeedbackEntry], validation: Mapping[str, Any] | None) -> dict[str, Any]:
    """How the answers behind a candidate fared (online loss and accuracy, the leader's and the probes'), and its
    figures on the holdout set and on recent traffic (with the frozen anchor's) when the guard judged it."""
    correct = [e.correct for e in used]
    hits = None if any(c is None for c in correct) else np.array(correct, dtype=bool)
    probes = [e.probe_correct for e in used]
    metrics: dict[str, Any] = {
        **online_metrics(np.array([e.loss if e.base_loss is None else e.base_loss for e in used]), hits),
        **(exploration_metrics(feedback_records(used).path, hits, None if any(p is None for p in probes)
                               else np.array(probes, dtype=bool)) if hits is not None
           else {"leader_accuracy": None, "probe_accuracy": None}),
        "validation_accuracy": None, "validation_loss": None, "holdout_size": None, "records": len(used)}
    if validation is not None:
        metrics.update(validation_accuracy=validation["accuracy"], validation_loss=validation["loss"],
                       holdout_size=validation["size"])
    traffic = (validation or {}).get("traffic") or {}
    metrics.update(traffic_accuracy=traffic.get("accuracy"), traffic_anchor_accuracy=traffic.get("anchor_accuracy"))
    return metrics


@dataclass
class ReconcileStats:
    """The statistics of one reconciliation (or of a re-seed), gathered once; each record of it is a view."""

    #: the update's own figures as ``propose_update`` gave them: records, cohorts, outliers_dropped, loss_mean,
    #: loss_std, direction_norm, loss_gap, learning_rate, step_norm, shrink, momentum, ...
    update: dict[str, Any]
    held_back: int  # entries of cohorts still too small, and usable ones the update left out
    stale_dropped: int
    expired_dropped: int
    invalid_dropped: int
    trigger: str  # records, timer, force, request
    metrics: dict[str, Any]  # served_metrics
    seconds: float | None = None  # once the outcome is known
    reseeded_as: int | None = None  # the version that re-seeded a refused candidate's parent

    @classmethod
    def of_update(cls, update: Mapping[str, Any], counts: Mapping[str, int], left_out: int, trigger: str,
                  metrics: dict[str, Any]) -> ReconcileStats:
        """From the update's figures and the batch's counts (``Batch.counts``); ``left_out``: usable, not used."""
        return cls(dict(update), counts["held_back"] + left_out, counts["stale_dropped"], counts["expired_dropped"],
                   counts["invalid_dropped"], trigger, metrics)

    @classmethod
    def of_reseed(cls, trigger: str, judged: Mapping[str, Any]) -> ReconcileStats:
        """A re-seed of a refused candidate's parent: no records, no step; ``judged``: the refusal's validation."""
        update = {"records": 0, "cohorts": [], "outliers_dropped": 0, "loss_mean": None, "loss_std": None,
                  "direction_norm": 0.0, "loss_gap": None, "learning_rate": 0.0}
        metrics = {"online_loss": None, "online_accuracy": None, "records": 0, "leader_accuracy": None,
                   "probe_accuracy": None, "validation_accuracy": judged["parent_accuracy"], "validation_loss": None,
                   "holdout_size": judged["size"], "traffic_accuracy": None, "traffic_anchor_accuracy": None}
        return cls(update, 0, 0, 0, 0, trigger, metrics)

    def as_dict(self) -> dict[str, Any]:
        """The outcome's ``stats``: the update's figures, the batch's counts, the trigger and the metrics."""
        out = {**self.update, "held_back": self.held_back, "stale_dropped": self.stale_dropped,
               "expired_dropped": self.expired_dropped, "invalid_dropped": self.invalid_dropped,
               "trigger": self.trigger, "metrics": self.metrics}
        if self.reseeded_as is not None:
            out["reseeded_as"] = self.reseeded_as
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out

    def manifest_fields(self, inputs: dict[str, Any], validation: dict[str, Any] | None,
                        reconciler: Mapping[str, Any], kind: str) -> dict[str, Any]:
        """What the version's manifest records beyond the update itself (``write_next_version``'s extras)."""
        return {"metrics": self.metrics, "validation": validation, "stale_dropped": self.stale_dropped,
                "expired_dropped": self.expired_dropped, "invalid_dropped": self.invalid_dropped,
                "held_back": self.held_back, "inputs": inputs, "reconciler": {**reconciler, "trigger": self.trigger},
                "training": {"kind": kind, "direction_norm": self.update["direction_norm"],
                             "loss_gap": self.update["loss_gap"],
                             "head_gradient": self.update.get("head_gradient"),  # logits | replay | spsa | None
                             "head_records": self.update.get("head_records")}}

    def publish_record(self, parent: int, inputs: Mapping[str, Any], weights_sha256: str, consumer: str,
                       owner: str, token: int) -> dict[str, Any]:
        """The history record of a publish (``mp:{m}:history``)."""
        u = self.update
        return {"parent": parent, "records": u["records"], "cohorts": len(u["cohorts"]),
                "outliers_dropped": u["outliers_dropped"], "stale_dropped": self.stale_dropped,
                "expired_dropped": self.expired_dropped, "invalid_dropped": self.invalid_dropped,
                "loss_mean": u["loss_mean"], "loss_std": u["loss_std"], "entries": inputs["entries"],
                "entry_ids_sha256": inputs["entry_ids_sha256"], "weights_sha256": weights_sha256,
                "consumer": consumer, "owner": owner, "token": token, "trigger": self.trigger, "metrics": self.metrics}

    def refusal_record(self, parent: int, validation: dict[str, Any], consumer: str, owner: str,
                       token: int) -> dict[str, Any]:
        """The history record of a candidate the validation guard refused."""
        return {"parent": parent, "records": self.update["records"], "metrics": self.metrics,
                "validation": validation, "consumer": consumer, "owner": owner, "token": token,
                "trigger": self.trigger}

    def log_line(self, model: str, version: int, parent: int) -> str:
        """``key=value`` pairs of a publish, for the worker's log."""
        u = self.update
        fields = {"model": model, "version": version, "parent": parent, "records": u["records"],
                  "cohorts": len(u["cohorts"]), "outliers_dropped": u["outliers_dropped"],
                  "stale_dropped": self.stale_dropped, "expired_dropped": self.expired_dropped,
                  "invalid_dropped": self.invalid_dropped, "held_back": self.held_back,
                  "loss_mean": _fmt(u["loss_mean"]), "loss_std": _fmt(u["loss_std"]),
                  "trigger": self.trigger, "seconds": f"{self.seconds or 0.0:.3f}"}
        return " ".join(f"{k}={v}" for k, v in fields.items())


def reseed_record(parent: int, weights_sha256: str, owner: str, token: int) -> dict[str, Any]:
    """The history record of a re-seed: the parent's weights again, under fresh seeds, with no entries."""
    return {"parent": parent, "records": 0, "reseed": True, "weights_sha256": weights_sha256, "owner": owner,
            "token": token, "trigger": "reseed"}


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"
