"""Reconciliation: turn (version, path, loss) records into one update of the weights (docs/DESIGN.md §1).

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

from marketplace.deltas import split_group, vendor_signs
from marketplace.head import HeadReplay, head_gradient, replay_head_gradient
from marketplace.models import ModelSpec
from marketplace.threefry import uniform_delta_np


@dataclass(frozen=True)
class Records:
    """Labelled records: the version that served each, its path (R, S), its loss, optionally its label.

    ``base``: with paired probes, the leader's loss on the same input (NaN where a record has none).
    ``logits``/``leader_logits`` (R, C): with paired probes, the probe's and the leader's logits (NaN rows where a
    record has none); they give the head its gradient estimate (marketplace.head).
    """

    version: np.ndarray
    path: np.ndarray
    loss: np.ndarray
    label: np.ndarray | None = None
    base: np.ndarray | None = None
    logits: np.ndarray | None = None
    leader_logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        R = len(self.loss)
        if self.version.shape != (R,) or self.path.ndim != 2 or self.path.shape[0] != R:
            raise ValueError("version (R,), path (R, S) and loss (R,) must agree")
        if self.label is not None and self.label.shape != (R,):
            raise ValueError("label must have shape (R,)")
        if self.base is not None and self.base.shape != (R,):
            raise ValueError("base must have shape (R,)")
        for name in ("logits", "leader_logits"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 2 or value.shape[0] != R):
                raise ValueError(f"{name} must have shape (R, C)")
        if not np.all(np.isfinite(self.loss)):
            raise ValueError("losses must be finite")


@dataclass(frozen=True)
class VersionSeeds:
    """What regenerates a version's deltas: its seeds (S, V), probe scale, and whether vendors are mirrored."""

    seeds: np.ndarray
    eps: float
    antithetic: bool = False

    def signs(self) -> np.ndarray:
        return vendor_signs(self.seeds.shape[1], self.antithetic)


@dataclass(frozen=True)
class ReconcileConfig:
    """The algorithm's knobs. ``step``: "unit" moves η along the unit direction (upstream V2); "signal" is a
    zeroth-order gradient step (SPSA): raw loss differences, η an SGD rate, so the step shrinks with the signal
    and vanishes when the credits are noise (``shrink``: each vendor's credit weighed by its own evidence);
    ``max_step`` caps each group's step as a share of its weights' norm (a layer-wise trust region)."""

    learning_rate: float = 0.5
    baseline: Literal["none", "class", "leader"] = "none"
    step: Literal["unit", "signal"] = "unit"
    max_step: float = 0.01
    shrink: bool = True
    outlier: Literal["none", "zscore", "quantile"] = "none"
    outlier_z: float = 3.0
    outlier_quantile: float = 0.02  # trimmed from each tail
    attribution: Literal["zscore", "rank"] = "zscore"
    normalize: Literal["model", "group"] = "model"
    min_cohort: int = 8
    class_weights: bool = False
    learn_groups: str = "all"  # which layer groups move: "all", "head" (the last) or indices "0,2"
    shrink_t: float = 1.0  # shrinkage: a vendor's credit moves nothing below this t-statistic
    # signal steps: "logits" estimates a linear head's gradient from the logits its probes moved (marketplace.head),
    # where records carry both logits; "replay" takes it exactly from the inputs the API kept whole, damped along
    # the known data's features (logits where none is given); "spsa" from loss differences, as every other group
    head_gradient: Literal["spsa", "logits", "replay"] = "spsa"
    head_learning_rate: float = 0.03  # the SGD rate of the logits gradient, and of an undamped replay one (capped)
    replay_learning_rate: float = 1.0  # the SGD rate of the damped replay gradient, far smaller (capped as well)

    def replays_head(self, groups: int) -> bool:
        """Whether the head of a model of ``groups`` layer groups learns from the inputs the API kept (so they
        must be read, and those the guard judges on set apart)."""
        return self.head_gradient == "replay" and self.step == "signal" and bool(
            learned_groups(self.learn_groups, groups)[-1])


LEARN_GROUPS_PATTERN = r"^(all|head|\d+(,\d+)*)$"


def learned_groups(which: str, S: int) -> np.ndarray:
    """(S,) bool: the layer groups that learn. "head" is the last group, "all" every one, "0,2" those indices.

    Learning fewer groups is what makes a zeroth-order step worth taking: an SPSA estimate's noise grows with
    the number of parameters it covers, so the head alone (a few thousand weights) gets a usable direction from
    one batch where the whole model (10⁵) gets mostly noise. The features then stay as trained.
    """
    mask = np.zeros(S, dtype=bool)
    if which == "all":
        mask[:] = True
    elif which == "head":
        mask[-1] = True
    else:
        try:
            idx = [int(i) for i in which.split(",")]
        except ValueError:
            raise ValueError(f"learn_groups must be all, head or group indices like 0,2; got {which!r}") from None
        if min(idx) < 0 or max(idx) >= S:
            raise ValueError(f"learn_groups {which!r} names a group outside 0..{S - 1}")
        mask[idx] = True
    return mask


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


def cohort_index(version: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct versions, cohort id per record), without a sort when versions span a small range."""
    if len(version) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    vmin, vmax = int(version.min()), int(version.max())
    if vmin == vmax:  # one cohort, the common case: no per-record remapping at all
        return np.array([vmin], np.int64), np.zeros(len(version), np.int64)
    if vmax - vmin < 1 << 20:
        present = np.flatnonzero(np.bincount(version - vmin))
        remap = np.zeros(vmax - vmin + 1, np.int64)
        remap[present] = np.arange(len(present))
        return present + vmin, remap[version - vmin]
    values, cid = np.unique(version, return_inverse=True)
    return values, cid


@dataclass(frozen=True)
class Cohorts:
    """Records grouped by version through a cohort id; with one cohort every lookup is a scalar."""

    cid: np.ndarray
    n: int

    def at(self, per_cohort: np.ndarray) -> np.ndarray:
        """A per-cohort value for every record (a scalar when there is one cohort)."""
        return per_cohort[0] if self.n == 1 else per_cohort[self.cid]

    def sums(self, sub: np.ndarray | None, weights: np.ndarray | None, width: int = 1) -> np.ndarray:
        """Σ weights by (cohort, sub) as (n, width): one bincount."""
        key = self.cid if sub is None else sub if self.n == 1 else self.cid * width + sub
        return np.bincount(key, weights=weights, minlength=self.n * width).reshape(self.n, width)

    def moments(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-cohort count, mean and (population) std of x over the masked records."""
        everything = bool(mask.all())
        if self.n == 1:
            xs = x if everything else x[mask]
            return (np.array([float(len(xs))]), np.array([xs.mean() if len(xs) else 0.0]),
                    np.array([xs.std() if len(xs) else 0.0]))
        w = None if everything else mask.astype(np.float64)
        count = self.sums(None, w)[:, 0]
        safe = np.maximum(count, 1)
        mean = self.sums(None, x if w is None else x * w)[:, 0] / safe
        dev = (x - mean[self.cid]) ** 2
        var = self.sums(None, dev if w is None else dev * w)[:, 0] / safe
        return count, mean, np.sqrt(var)


def class_means(co: Cohorts, label: np.ndarray, loss: np.ndarray, keep: np.ndarray, C: int) -> np.ndarray:
    """Per record, the mean loss of its class in its cohort (over the kept records).

    Subtracting it removes the largest part of each input's own difficulty (a new class's loss is far
    above the known classes') without a second forward pass, so the credit measures the paths, not
    which vendor happened to receive more hard inputs.
    """
    w = keep.astype(np.float64)
    count = co.sums(label, w, C)
    total = co.sums(label, np.where(keep, loss, 0.0), C)
    mean = total / np.maximum(count, 1)
    return mean[0, label] if co.n == 1 else mean[co.cid, label]


def _per_cohort(cid: np.ndarray, mask: np.ndarray, n: int) -> list[np.ndarray]:
    """Record indices of each cohort (masked), for the filters that need a sort anyway."""
    idx = np.flatnonzero(mask)
    order = idx[np.argsort(cid[idx], kind="stable")]
    return np.split(order, np.cumsum(np.bincount(cid[idx], minlength=n))[:-1])


def _check_paths(path: np.ndarray, cid: np.ndarray, used: np.ndarray, vendors: list[int]) -> None:
    """Every used record's path must name vendors its version has (no copies when all cohorts are used)."""
    if not used.any():
        return
    rows = path if used.all() else path[used]
    live_v = {v for v in vendors if v}
    if len(live_v) == 1:
        bad = rows.min() < 0 or rows.max() >= live_v.pop()
    else:
        bad = rows.min() < 0 or bool((rows >= np.array(vendors)[cid[used], None]).any())
    if bad:
        raise ValueError("a path names a vendor outside its version's 0..V-1")


def group_direction(credit: dict[int, np.ndarray], sources: dict[int, VersionSeeds], s: int, size: int
                    ) -> np.ndarray:
    """D_s = Σ_n Σ_v A[n,s,v] · δ(σ[n,s,v]), regenerating each (non-leader) vendor's delta once."""
    out = np.zeros(size, dtype=np.float64)
    for n, A in credit.items():
        seeds = sources[n].seeds[s]
        coef = A[s] * sources[n].signs()
        live = (seeds != 0) & (coef != 0)
        if live.any():  # a mirrored pair shares one seed: regenerate it once, with the pair's net credit
            uniq, inv = np.unique(seeds[live], return_inverse=True)
            net = np.bincount(inv, weights=coef[live], minlength=len(uniq))
            out += net @ uniform_delta_np(uniq, 0, size, sources[n].eps).astype(np.float64)
    return out


def reconcile(spec: ModelSpec, params: dict[str, np.ndarray], records: Records,
              sources: dict[int, VersionSeeds], config: ReconcileConfig,
              learning_rate: float | None = None, replay: HeadReplay | None = None) -> ReconcileResult:
    """θ + η·D from the records, and figures that say what went into it.

    ``replay``: inputs seen whole (their features and labels); with ``head_gradient="replay"`` they give the head
    its exact, damped gradient (marketplace.head), else the head falls back to the logits estimate.

    Cohorts are handled with bincounts over a cohort id, so the per-record work is a few vectorized
    passes whatever the number of cohorts.
    """
    S = len(spec.groups)
    if records.path.shape[1] != S:
        raise ValueError(f"paths have {records.path.shape[1]} groups, the model has {S}")
    eta = config.learning_rate if learning_rate is None else learning_rate
    loss, path = np.asarray(records.loss, np.float64), records.path
    versions, cid = cohort_index(records.version)
    n = len(versions)
    co = Cohorts(cid, n)
    counts = np.bincount(cid, minlength=n)
    live = counts >= config.min_cohort
    for v in versions[live]:
        if int(v) not in sources:
            raise KeyError(f"no seeds for version {int(v)}")
    used = live[cid]
    live_vendors = [sources[int(v)].seeds.shape[1] if ok else 0 for v, ok in zip(versions, live, strict=True)]
    _check_paths(path, cid, used, live_vendors)

    # outlier filter
    keep = used.copy()
    if config.outlier == "zscore":
        _, mean, std = co.moments(loss, used)
        big = co.at((counts >= 3) & (std > 0))
        keep &= ~big | (np.abs(loss - co.at(mean)) <= config.outlier_z * co.at(std))
    elif config.outlier == "quantile":
        for idx in _per_cohort(cid, used, n):
            if len(idx) >= 3:
                keep[idx] = keep_mask(loss[idx], config)
    elif config.outlier != "none":
        raise ValueError(f"unknown outlier filter {config.outlier!r}")
    loss, paired = baselined(co, loss, keep, records, config.baseline, spec.num_classes)
    kept_n, mean, std = co.moments(loss, keep)

    # attribution
    if config.step == "signal":  # raw differences from the cohort mean: the credits keep their scale
        credit = np.where(keep, co.at(mean) - loss, 0.0)
    elif config.attribution == "zscore":
        live_std = (kept_n >= 2) & (std > 0)
        credit = (co.at(mean) - loss) / co.at(np.where(live_std, std, 1.0))
        if not (live_std.all() and keep.all()):
            credit = np.where(keep & co.at(live_std), credit, 0.0)
    elif config.attribution == "rank":
        credit = np.zeros(len(loss))
        for idx in _per_cohort(cid, keep, n):
            credit[idx] = attribute(loss[idx], config)
    else:
        raise ValueError(f"unknown attribution {config.attribution!r}")
    if config.class_weights and records.label is not None:
        C = spec.num_classes
        label = np.asarray(records.label, np.int64)
        per_class = co.sums(label, keep.astype(np.float64), C)
        classes_present = (per_class > 0).sum(1)
        w = co.at(kept_n) / np.maximum(co.at(classes_present) * per_class[cid, label], 1)
        credit = credit * np.where(keep, w, 0.0)

    # per-vendor credit of every cohort, one bincount per group
    Vmax = int(max((sources[int(v)].seeds.shape[1] for v in versions[live]), default=1))
    counted = path if used.all() else np.where(used[:, None], path, 0)  # held-back paths may name any vendor
    A = np.stack([co.sums(counted[:, s], credit, Vmax) for s in range(S)], axis=1)  # (cohorts, S, Vmax)
    kept_shrink = None
    if config.step == "signal" and config.shrink:
        A, kept_shrink = shrunk(A, co, counted, credit, keep, S, Vmax, config.shrink_t)
    credit_by_version = {int(versions[c]): A[c, :, :sources[int(versions[c])].seeds.shape[1]]
                         for c in np.flatnonzero(live)}

    sizes = spec.group_sizes()
    learned = learned_groups(config.learn_groups, S)
    head, head_kind = None, None
    if learned[-1] and config.step == "signal":
        if config.head_gradient == "replay" and replay is not None:
            head, head_kind = replay_head_gradient(spec, params, replay), "replay"
        if head is None:
            head, head_kind = logits_head(spec, records, sources, keep, config), "logits"
    directions = [group_direction(credit_by_version, sources, s, sizes[s]) if learned[s] else np.zeros(sizes[s])
                  for s in range(S - 1)]
    if head is not None:  # minus the head's gradient (replayed or estimated): a descent direction, as D_s is
        directions.append(-head[0])
    elif learned[-1]:
        directions.append(group_direction(credit_by_version, sources, S - 1, sizes[-1]))
    else:
        directions.append(np.zeros(sizes[-1]))
    # η scales the head's rate too: a schedule moves both, and η = 0 stops every step. A damped replay gradient
    # steps at its own rate; the logits estimate it may fall back to, or an undamped one, at the head's
    damped = head_kind == "replay" and replay is not None and replay.damping is not None
    rate = config.replay_learning_rate if damped else config.head_learning_rate
    head_rate = rate * eta / config.learning_rate if config.learning_rate > 0 else 0.0
    norms = [float(np.linalg.norm(d)) for d in directions]
    total_norm = float(np.sqrt(sum(x * x for x in norms)))
    if config.step == "signal":
        eps = float(np.sqrt(np.mean([sources[v].eps ** 2 for v in credit_by_version]))) if credit_by_version else 1.0
        rates = [None] * (S - 1) + [head_rate if head is not None else None]
        scales, step_norm = signal_scales(directions, eps, int(keep.sum()), params, spec, eta, config.max_step, rates)
    else:
        scales = [eta / (total_norm if config.normalize == "model" else norms[s]) if norms[s] else 0.0
                  for s in range(S)]
        step_norm = float(np.sqrt(sum((scales[s] * norms[s]) ** 2 for s in range(S))))
    new_params = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}
    for s, d in enumerate(directions):
        if scales[s] == 0:
            continue
        for key_name, step in split_group(d * scales[s], spec.group_shapes(s)).items():
            new_params[key_name] = (params[key_name].astype(np.float64) + step).astype(np.float32)

    cohorts = [{"version": int(versions[c]), "records": int(counts[c]), "kept": int(kept_n[c]),
                "loss_mean": float(mean[c]), "loss_std": float(std[c])} for c in np.flatnonzero(live)]
    kept_loss = loss[keep]
    stats = {"records": int(used.sum()), "held_back": int((~used).sum()), "cohorts": cohorts,
             "outliers_dropped": int(used.sum() - keep.sum()), "direction_norm": total_norm,
             "step_norm": step_norm, "paired": int((paired & used).sum()),
             "shrink": kept_shrink,
             "head_gradient": (head_kind if head is not None else "spsa") if learned[-1] else None,
             "head_records": head[1] if head is not None else None,
             "head_learning_rate": head_rate if head is not None else None,
             "learning_rate": float(eta),
             "loss_mean": float(kept_loss.mean()) if len(kept_loss) else None,
             "loss_std": float(kept_loss.std()) if len(kept_loss) else None}
    return ReconcileResult(new_params, used, stats)


def baselined(co: Cohorts, loss: np.ndarray, keep: np.ndarray, records: Records, baseline: str, C: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(loss minus its baseline, which records were paired). The baseline takes each input's own difficulty out.

    "leader": the leader's loss on the same input (paired probes), exact per input; records without one fall back
    to "class", the mean loss of their class in their cohort; "none": raw losses.
    """
    paired = np.zeros(len(loss), bool)
    if baseline == "none" or records.label is None:
        return loss, paired
    if baseline not in ("class", "leader"):
        raise ValueError(f"unknown baseline {baseline!r}")
    if baseline == "leader" and records.base is not None:
        paired = np.isfinite(records.base)
    out = loss.copy()
    if paired.any():
        out[paired] = loss[paired] - records.base[paired]  # type: ignore[index]
    if not paired.all():
        single = keep & ~paired
        out[~paired] = (loss - class_means(co, np.asarray(records.label, np.int64), loss, single, C))[~paired]
    return out, paired


def shrunk(A: np.ndarray, co: Cohorts, counted: np.ndarray, credit: np.ndarray, keep: np.ndarray, S: int,
           Vmax: int, t0: float = 1.0) -> tuple[np.ndarray, float | None]:
    """Each vendor's credit times max(0, 1 − t0²/t²), t its mean credit over the standard error of that mean.

    A vendor's mean credit estimates g·δ_v plus noise (other inputs, other groups' probes); where noise could
    explain it (|t| ≤ t0) it moves nothing, and the step shrinks smoothly as the evidence weakens. Without this
    a zeroth-order step is noise-dominated at serving batch sizes: it random-walks a well-trained model at
    the full cap even when the traffic has nothing new to teach. Returns the shrunk credits and the mean factor.
    """
    w = keep.astype(np.float64)
    n = np.stack([co.sums(counted[:, s], w, Vmax) for s in range(S)], axis=1)
    sq = np.stack([co.sums(counted[:, s], credit * credit, Vmax) for s in range(S)], axis=1)
    safe = np.maximum(n, 2)
    mean = A / safe
    var_of_mean = np.maximum(sq - n * mean * mean, 0.0) / (safe - 1) / safe
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where((n >= 2) & (mean != 0), np.clip(1.0 - t0 * t0 * var_of_mean / (mean * mean), 0.0, 1.0),
                          0.0)
    live = n >= 2
    return A * factor, float(factor[live].mean()) if live.any() else None


def logits_head(spec: ModelSpec, records: Records, sources: dict[int, VersionSeeds], keep: np.ndarray,
                config: ReconcileConfig) -> tuple[np.ndarray, int] | None:
    """The head's estimated gradient from the records' logits (and how many measured it), when the config asks for
    it and the records carry them; None: the head takes its SPSA direction like the other groups."""
    if config.head_gradient == "spsa" or records.logits is None or records.leader_logits is None \
            or records.label is None:
        return None
    return head_gradient(spec, records.logits, records.leader_logits, np.asarray(records.label, np.int64),
                         records.version, records.path, sources, keep)


def signal_scales(directions: list[np.ndarray], eps: float, records: int, params: dict[str, np.ndarray],
                  spec: ModelSpec, eta: float, max_step: float, rates: list[float | None] | None = None
                  ) -> tuple[list[float], float]:
    """Per group, the factor that turns D_s = Σ A·δ into an SPSA step, and the whole step's norm.

    With δ uniform in [-ε, ε] per element, E[d·δ] = (ε²/3)·g for a loss difference d ≈ g·δ, so
    ĝ = 3/(ε²·n)·D over n records and the step is η·ĝ (D already points downhill: credits are minus the
    loss differences). Each group's step is capped at ``max_step``·‖θ_s‖, a layer-wise trust region: one batch
    of outliers cannot throw the model far, and the noise of a large group's estimate (it grows with the
    group's size) does not eat the step of a small one, such as the head a new class mostly needs.
    ``rates``: per group, an SGD rate for a direction that is already a (descent) gradient estimate, such as the
    head's from its logits; None: the group's D_s is an SPSA sum.
    """
    spsa = eta * 3.0 / (eps * eps * max(records, 1))
    scales = []
    for s, d in enumerate(directions):
        factor = spsa if rates is None or rates[s] is None else float(rates[s])
        norm = factor * float(np.sqrt(d @ d))
        theta = float(np.sqrt(sum(float(np.square(params[k], dtype=np.float64).sum()) for k in spec.group_shapes(s))))
        scales.append(factor * min(1.0, max_step * theta / norm) if max_step > 0 and norm > 0 else factor)
    step = float(np.sqrt(sum(float(d @ d) * c * c for d, c in zip(directions, scales, strict=True))))
    return scales, step


def fresh_seeds(S: int, V: int, rng: np.random.Generator, antithetic: bool = False,
                learned: np.ndarray | None = None) -> np.ndarray:
    """Seeds for a new version: (S, V) uint64, vendor 0 the leader (seed 0), the others non-zero.

    With antithetic pairs each mirror (vendor 2j) repeats its partner's (2j-1) seed; see vendor_signs.
    A group that does not learn (``learned`` False) gets seed 0 for every vendor: it runs unperturbed, so its
    probes add no noise to the credits of the groups that do (and cost users nothing in single exploration).
    """
    seeds = rng.integers(1, 2**64 - 1, size=(S, V), dtype=np.uint64, endpoint=True)
    seeds[:, 0] = 0
    if learned is not None:
        seeds[~np.asarray(learned, dtype=bool)] = 0
    if antithetic:
        mirrors = np.arange(2, V, 2)
        seeds[:, mirrors] = seeds[:, mirrors - 1]
    return seeds


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy from logits, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    return logsumexp - z[np.arange(len(labels)), labels]
