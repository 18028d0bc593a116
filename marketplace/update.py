"""One continual-learning update: reconcile, schedule the step size, add momentum (pure, no I/O).

The worker and the in-process experiments both call `propose_update`, so what is measured in
`bench/continual.py` is exactly what the served model does. Everything here is state-free: momentum is
the heavy-ball term β·(θ_n − θ_{n−1}), read from the parent and grandparent versions in the store, so
it survives worker restarts and follows a rollback (the step that led to the rolled-back-to version).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

from marketplace.head import HeadReplay
from marketplace.models import ModelSpec
from marketplace.reconcile import ReconcileConfig, ReconcileResult, Records, VersionSeeds, learned_groups, reconcile


@dataclass(frozen=True)
class UpdateConfig:
    """How a reconciled direction becomes a step; the defaults are the plain algorithm."""

    momentum: float = 0.0  # β of the heavy-ball term; 0 is off
    lr_schedule: Literal["constant", "loss_gap"] = "constant"
    lr_min_ratio: float = 0.1  # loss_gap: the smallest step, as a share of the learning rate
    gap_scale: float = 1.0  # loss_gap: the class-loss gap (nats) at which the full step is taken


def class_loss_gap(loss: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """How far the worst-served class is behind the rest: max over classes of mean loss, minus the mean.

    The article's signal for scheduling: a class the model has not learned yet (new data) has a loss far
    above the others; once it has caught up the gap is small and large steps only cost the known classes.
    """
    if len(loss) == 0:
        return 0.0
    counts = np.bincount(label, minlength=num_classes)
    sums = np.bincount(label, weights=loss, minlength=num_classes)
    present = counts > 0
    return float(max((sums[present] / counts[present]).max() - loss.mean(), 0.0))


def scheduled_lr(learning_rate: float, gap: float, config: UpdateConfig) -> float:
    """The step size for this update: constant, or growing with the class-loss gap up to the full rate."""
    if config.lr_schedule == "constant":
        return learning_rate
    if config.lr_schedule == "loss_gap":
        share = min(max(gap / config.gap_scale, 0.0), 1.0)
        return learning_rate * (config.lr_min_ratio + (1.0 - config.lr_min_ratio) * share)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")


def previous_step(parent: dict[str, np.ndarray], grandparent: dict[str, np.ndarray] | None
                  ) -> dict[str, np.ndarray] | None:
    """θ_n − θ_{n−1}: the last step taken, which momentum repeats a share of (None without a grandparent)."""
    if grandparent is None:
        return None
    return {k: parent[k].astype(np.float64) - grandparent[k].astype(np.float64) for k in parent}


def propose_update(spec: ModelSpec, params: dict[str, np.ndarray], records: Records,
                   sources: dict[int, VersionSeeds], rc: ReconcileConfig, uc: UpdateConfig,
                   last_step: dict[str, np.ndarray] | None = None, replay: HeadReplay | None = None
                   ) -> ReconcileResult:
    """The candidate next weights θ + η_t·D + β·(θ_n − θ_{n−1}), and the figures that went into it.

    ``replay``: inputs seen whole, for the head's exact gradient (``head_gradient="replay"``, marketplace.head).
    """
    used_label = records.label
    gap = class_loss_gap(np.asarray(records.loss, np.float64), np.asarray(used_label, np.int64),
                         spec.num_classes) if used_label is not None else 0.0
    eta = scheduled_lr(rc.learning_rate, gap, uc)
    if rc.learning_rate > 0 and eta != rc.learning_rate:  # a signal step's cap follows the schedule too
        rc = dataclasses.replace(rc, max_step=rc.max_step * eta / rc.learning_rate)
    result = reconcile(spec, params, records, sources, rc, learning_rate=eta, replay=replay)
    result.stats["loss_gap"] = gap
    result.stats["momentum"] = uc.momentum
    if uc.momentum and last_step is not None and result.used.any():
        learned = learned_groups(rc.learn_groups, len(spec.groups))
        last_step = {k: v if learned[int(k.split(".", 1)[0])] else np.zeros_like(v) for k, v in last_step.items()}
        for k, p in result.params.items():  # groups that do not learn keep their weights, momentum or not
            result.params[k] = (p.astype(np.float64) + uc.momentum * last_step[k]).astype(np.float32)
        result.stats["momentum_norm"] = float(uc.momentum * np.sqrt(sum(float((v ** 2).sum())
                                                                        for v in last_step.values())))
    return result


def exploration_metrics(paths: np.ndarray, correct: np.ndarray, probe_correct: np.ndarray | None
                        ) -> dict[str, float | None]:
    """What exploration cost users, from labelled records: accuracy of the leader's answers vs the probes'.

    ``probe_correct`` (paired probes; NaN-free bool per record, None without pairing): every record then has
    both, and ``correct`` is the leader's. Without pairing a record is the leader's when its path is all zero.
    """
    if probe_correct is not None:
        leader, probe = correct, probe_correct
    else:
        on_leader = (paths == 0).all(axis=1) if len(paths) else np.zeros(0, bool)
        leader, probe = correct[on_leader], correct[~on_leader]
    return {"leader_accuracy": float(np.mean(leader)) if len(leader) else None,
            "probe_accuracy": float(np.mean(probe)) if len(probe) else None}


def online_metrics(loss: np.ndarray, correct: np.ndarray | None) -> dict[str, float | None]:
    """Mean loss and accuracy of the served (perturbed) predictions behind an update."""
    acc = None
    if correct is not None and len(correct):
        acc = float(np.mean(correct))
    return {"online_loss": float(np.mean(loss)) if len(loss) else None, "online_accuracy": acc}
