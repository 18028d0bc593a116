"""Reconciliation: turn (version, path, loss) records into one update of the weights (DESIGN §1).

Records are split into cohorts by the version that served them, because attribution is only
meaningful among records measured at the same weights. Per cohort: an optional outlier filter, then
attribution (standardized negative loss, or centred ranks), then per-vendor sums A[n,s,v] in O(records).
The direction regenerates each vendor's delta once from its seed, so its cost is
O(cohorts · V · params), independent of the number of records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from marketplace.deltas import split_group
from marketplace.models import ModelSpec
from marketplace.threefry import uniform_delta_np


@dataclass(frozen=True)
class Records:
    """Labelled records: the version that served each, its path (R, S), its loss, optionally its label."""

    version: np.ndarray
    path: np.ndarray
    loss: np.ndarray
    label: np.ndarray | None = None

    def __post_init__(self) -> None:
        R = len(self.loss)
        if self.version.shape != (R,) or self.path.ndim != 2 or self.path.shape[0] != R:
            raise ValueError("version (R,), path (R, S) and loss (R,) must agree")
        if self.label is not None and self.label.shape != (R,):
            raise ValueError("label must have shape (R,)")
        if not np.all(np.isfinite(self.loss)):
            raise ValueError("losses must be finite")


@dataclass(frozen=True)
class VersionSeeds:
    """What regenerates a version's deltas: its seeds (S, V) and probe scale."""

    seeds: np.ndarray
    eps: float


@dataclass(frozen=True)
class ReconcileConfig:
    learning_rate: float = 0.5
    outlier: Literal["none", "zscore", "quantile"] = "none"
    outlier_z: float = 3.0
    outlier_quantile: float = 0.02  # trimmed from each tail
    attribution: Literal["zscore", "rank"] = "zscore"
    normalize: Literal["model", "group"] = "model"
    min_cohort: int = 8
    class_weights: bool = False


@dataclass
class ReconcileResult:
    params: dict[str, np.ndarray]
    used: np.ndarray  # records that went into this update (their cohort was large enough)
    stats: dict = field(default_factory=dict)


def keep_mask(loss: np.ndarray, config: ReconcileConfig) -> np.ndarray:
    """Which records of one cohort survive the outlier filter."""
    if config.outlier == "none" or len(loss) < 3:
        return np.ones(len(loss), dtype=bool)
    if config.outlier == "zscore":
        std = loss.std()
        return np.ones(len(loss), dtype=bool) if std == 0 else np.abs(loss - loss.mean()) <= config.outlier_z * std
    if config.outlier == "quantile":
        lo, hi = np.quantile(loss, [config.outlier_quantile, 1.0 - config.outlier_quantile])
        return (loss >= lo) & (loss <= hi)
    raise ValueError(f"unknown outlier filter {config.outlier!r}")


def attribute(loss: np.ndarray, config: ReconcileConfig) -> np.ndarray:
    """Credit per record: positive for lower-than-usual loss. Zero when the cohort has no spread."""
    n = len(loss)
    if n < 2:
        return np.zeros(n)
    if config.attribution == "zscore":
        std = loss.std()
        return np.zeros(n) if std == 0 else -(loss - loss.mean()) / std
    if config.attribution == "rank":
        order = np.argsort(loss, kind="stable")
        ranks = np.empty(n)
        ranks[order] = np.arange(n)
        # ties share their average rank, so equal losses get equal credit
        uniq, inv = np.unique(loss, return_inverse=True)
        if len(uniq) < n:
            ranks = (np.bincount(inv, weights=ranks) / np.bincount(inv))[inv]
        return -(ranks / (n - 1) - 0.5)
    raise ValueError(f"unknown attribution {config.attribution!r}")


def class_balance(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-record weights inversely proportional to its class's frequency, mean 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.zeros(num_classes)
    present = counts > 0
    w[present] = len(labels) / (present.sum() * counts[present])
    return w[labels]


def vendor_credit(path: np.ndarray, credit: np.ndarray, V: int) -> np.ndarray:
    """A[s, v] = Σ credit of the records whose path chose vendor v in group s: (S, V), O(records)."""
    return np.stack([np.bincount(path[:, s], weights=credit, minlength=V)[:V] for s in range(path.shape[1])])


def group_direction(credit: dict[int, np.ndarray], sources: dict[int, VersionSeeds], s: int, size: int
                    ) -> np.ndarray:
    """D_s = Σ_n Σ_v A[n,s,v] · δ(σ[n,s,v]), regenerating each vendor's delta once."""
    out = np.zeros(size, dtype=np.float64)
    for n, A in credit.items():
        src = sources[n]
        if np.any(A[s]):
            out += A[s] @ uniform_delta_np(src.seeds[s], 0, size, src.eps).astype(np.float64)
    return out


def reconcile(spec: ModelSpec, params: dict[str, np.ndarray], records: Records,
              sources: dict[int, VersionSeeds], config: ReconcileConfig,
              learning_rate: float | None = None) -> ReconcileResult:
    """θ + η·D from the records, and figures that say what went into it."""
    S = len(spec.groups)
    if records.path.shape[1] != S:
        raise ValueError(f"paths have {records.path.shape[1]} groups, the model has {S}")
    eta = config.learning_rate if learning_rate is None else learning_rate
    used = np.zeros(len(records.loss), dtype=bool)
    credit: dict[int, np.ndarray] = {}
    cohorts, dropped, kept_losses = [], 0, []
    for n in np.unique(records.version):
        idx = np.flatnonzero(records.version == n)
        if len(idx) < config.min_cohort:
            continue
        if int(n) not in sources:
            raise KeyError(f"no seeds for version {int(n)}")
        V = sources[int(n)].seeds.shape[1]
        if records.path[idx].max(initial=0) >= V or records.path[idx].min(initial=0) < 0:
            raise ValueError(f"a path of version {int(n)} names a vendor outside 0..{V - 1}")
        used[idx] = True
        keep = idx[keep_mask(records.loss[idx], config)]
        dropped += len(idx) - len(keep)
        a = attribute(records.loss[keep], config)
        if config.class_weights and records.label is not None:
            a = a * class_balance(records.label[keep], spec.num_classes)
        credit[int(n)] = vendor_credit(records.path[keep], a, V)
        kept_losses.append(records.loss[keep])
        cohorts.append({"version": int(n), "records": int(len(idx)), "kept": int(len(keep)),
                        "loss_mean": float(records.loss[keep].mean()), "loss_std": float(records.loss[keep].std())})

    sizes = spec.group_sizes()
    directions = [group_direction(credit, sources, s, sizes[s]) for s in range(S)]
    norms = [float(np.linalg.norm(d)) for d in directions]
    total_norm = float(np.sqrt(sum(x * x for x in norms)))
    new_params = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}
    for s, d in enumerate(directions):
        scale = (1.0 / total_norm if total_norm > 0 else 0.0) if config.normalize == "model" else (
            1.0 / norms[s] if norms[s] > 0 else 0.0)
        for key, step in split_group(d * scale * eta, spec.group_shapes(s)).items():
            new_params[key] = (params[key].astype(np.float64) + step).astype(np.float32)

    losses = np.concatenate(kept_losses) if kept_losses else np.zeros(0)
    stats = {"records": int(used.sum()), "held_back": int((~used).sum()), "cohorts": cohorts,
             "outliers_dropped": int(dropped), "direction_norm": total_norm, "learning_rate": float(eta),
             "loss_mean": float(losses.mean()) if len(losses) else None,
             "loss_std": float(losses.std()) if len(losses) else None}
    return ReconcileResult(new_params, used, stats)


def fresh_seeds(S: int, V: int, rng: np.random.Generator) -> np.ndarray:
    """Seeds for a new version: (S, V) uint64, vendor 0 the leader (seed 0), the others non-zero."""
    seeds = rng.integers(1, 2**64 - 1, size=(S, V), dtype=np.uint64, endpoint=True)
    seeds[:, 0] = 0
    return seeds


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy from logits, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    return logsumexp - z[np.arange(len(labels)), labels]
