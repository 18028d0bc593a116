"""The head's gradient from the logits its probes moved: forward-only, C measurements per record instead of one.

The last layer group of a classifier is one linear map z = W·h + b (C classes, H features). A probe that
perturbs it by (δW, δb) moves the logits by Δz = δW·h + δb (exactly when the head alone is perturbed; to first
order otherwise), so Δz − δb is the input's features h seen through C random projections, the rows of δW.
Uniform δ in [−ε, ε] gives E[δWᵀ·δW] = C·ε²/3·I, so

    ĥ = 3 / (C·ε²) · δWᵀ·(Δz − δb)

is an unbiased estimate of h, and with the leader's probabilities p and the label y (a one-hot row) the head's
gradient follows: ∂ℓ/∂W = (p − y)·hᵀ, estimated as (p − y)·ĥᵀ, and ∂ℓ/∂b = p − y, exact. A scalar loss
difference (plain SPSA) measures one random projection of the whole head's gradient per record, so most of its
estimate is noise; on the mlp's head (1,290 weights, V = 4) this estimate points 11× closer to the true gradient
(cosine 0.37 against 0.033 on protocol A traffic, `bench/head_gradient.py`). Paired probes already keep both
logits of every record: nothing more runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from marketplace.deltas import group_delta, vendor_signs
from marketplace.layers import Linear
from marketplace.models import ModelSpec


def linear_head(spec: ModelSpec) -> tuple[str, str] | None:
    """(weight key, bias key) when the model's last group is exactly one linear layer to its C classes."""
    layers = spec.groups[-1].layers
    if len(layers) != 1 or not isinstance(layers[0][1], Linear) or layers[0][1].fout != spec.num_classes:
        return None
    prefix = f"{len(spec.groups) - 1}.{layers[0][0]}"
    return f"{prefix}.weight", f"{prefix}.bias"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities from logits, in float64 (the API's answers and the head's p − y both use it)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def head_gradient(spec: ModelSpec, logits: np.ndarray, leader_logits: np.ndarray, label: np.ndarray,
                  version: np.ndarray, path: np.ndarray, sources: dict, use: np.ndarray
                  ) -> tuple[np.ndarray, int] | None:
    """The estimated gradient of the mean loss over the head group's flat vector (sorted key order, as the delta
    counter walks it), and how many records measured its weights; None when the head is not one linear layer or
    no used record carries both logits.

    ``logits``/``leader_logits`` (R, C): each record's probe and leader logits (NaN rows: none recorded);
    ``path`` (R, S): each record's vendor per group; ``sources``: version → VersionSeeds;
    ``use`` (R,) bool: the records that may count (cohort used, not an outlier). Only records whose other groups
    ran unperturbed (seed 0: the default, where only the head learns) measure the weights: a perturbed feature
    group adds W·Δh to Δz, zero on average but as large as the signal (the mlp's cosine falls from ~0.4 to
    0.1-0.2). Every record counts toward the bias, whose gradient needs no probe.
    """
    keys = linear_head(spec)
    if keys is None:
        return None
    w_key, b_key = keys
    C = spec.num_classes
    have = use & np.isfinite(logits).all(axis=1) & np.isfinite(leader_logits).all(axis=1) \
        if logits.shape[1:] == (C,) and leader_logits.shape[1:] == (C,) else np.zeros(len(use), bool)
    if not have.any():
        return None
    s = len(spec.groups) - 1
    shapes = spec.group_shapes(s)
    H = shapes[w_key][1]
    G = softmax(leader_logits[have])
    G[np.arange(len(G)), label[have]] -= 1.0  # p − y per record: the bias gradient, exact
    dz = (logits[have] - leader_logits[have]).astype(np.float64)
    gW = np.zeros((C, H))
    measured = 0
    ver, paths = version[have], path[have]
    ven = paths[:, s]
    for n in np.unique(ver):
        src = sources[int(n)]
        signs = vendor_signs(src.seeds.shape[1], src.antithetic)
        cohort = np.flatnonzero(ver == n)
        exact = cohort[(src.seeds[np.arange(s)[None, :], paths[cohort, :s]] == 0).all(axis=1)]
        for v in np.unique(ven[exact]):
            seed = int(src.seeds[s, v])
            if seed == 0:  # the leader's vendor: no probe, so no measurement of the features
                continue
            rows = exact[ven[exact] == v]
            delta = group_delta(spec, s, seed, src.eps)
            dW = signs[v] * delta[w_key].astype(np.float64)
            db = signs[v] * delta[b_key].astype(np.float64)
            h_hat = (dz[rows] - db) @ dW * (3.0 / (C * src.eps * src.eps))  # (rows, H)
            gW += G[rows].T @ h_hat
            measured += len(rows)
    flat = {w_key: gW / max(measured, 1), b_key: G.mean(axis=0)}
    return np.concatenate([flat[k].ravel() for k in shapes]), measured


# ------------------------------------------------------------------------------------------------ replay
# The probes see each input's features through C random projections; the inputs the API keeps for the guard
# (redis_io's replay stream) show them whole. A forward pass of the feature groups gives h exactly, so the
# head's gradient (p − y)·hᵀ is exact on those inputs. Exact is not enough: on a new look of a known class
# (protocol B) even the exact gradient costs the known classes ~2 points before the new inputs are learned,
# because the new inputs' features lie in the span of the known ones, and the step that raises the label
# on them lowers it on known inputs alike. Damping the step along the directions the known data occupies
# (its features' second moment, read from the holdout set) keeps the known answers where they are and lets
# the step move the head where the known data has little weight: the valley is gone (`bench/continual.py`).


def feature_spec(spec: ModelSpec) -> ModelSpec:
    """The model without its head: its output (B, H) is the head's input, the features the head weighs."""
    keys = linear_head(spec)
    if keys is None or len(spec.groups) < 2:
        raise ValueError("the replay head gradient needs a last group that is one linear layer after others")
    fin = spec.groups[-1].layers[0][1].fin  # type: ignore[attr-defined]
    return dataclasses.replace(spec, groups=spec.groups[:-1], num_classes=int(fin))


@dataclass(frozen=True)
class HeadReplay:
    """Labelled inputs seen whole: their features under the serving version's feature groups, and labels.

    ``damping``: the known-feature preconditioner (`known_damping`), (H+1, H+1), or None to step undamped.
    """

    features: np.ndarray  # (n, H) float
    labels: np.ndarray  # (n,) int
    damping: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.labels.shape != (len(self.features),):
            raise ValueError("features must be (n, H) and labels (n,)")
        H = self.features.shape[1]
        if self.damping is not None and self.damping.shape != (H + 1, H + 1):
            raise ValueError(f"damping must be ({H + 1}, {H + 1})")


def known_damping(known_features: np.ndarray, strength: float) -> np.ndarray | None:
    """(I + c·Σ/λ_max)⁻¹ over [h, 1]: Σ the known features' second moment, c ``strength`` (0: None, no damping).

    A step g·P moves the head's answer on a known input by g·P·[h, 1], which the damping shrinks by up to
    1/(1 + c) where the known data has its weight, and leaves whole along directions it does not use.
    """
    if strength <= 0 or not len(known_features):
        return None
    h = np.hstack([known_features.astype(np.float64), np.ones((len(known_features), 1))])
    sigma = h.T @ h / len(h)
    top = float(np.linalg.eigvalsh(sigma)[-1])
    return np.linalg.inv(np.eye(len(sigma)) + strength * sigma / max(top, 1e-12))


def replay_head_gradient(spec: ModelSpec, params: dict[str, np.ndarray], replay: HeadReplay
                         ) -> tuple[np.ndarray, int] | None:
    """The exact mean-loss gradient of the head on the replayed inputs, damped along the known features, as a flat
    vector in the head group's sorted key order, and how many inputs gave it; None without any input."""
    keys = linear_head(spec)
    if keys is None or not len(replay.labels):
        return None
    w_key, b_key = keys
    if replay.labels.min() < 0 or replay.labels.max() >= spec.num_classes:
        raise ValueError(f"replay labels must lie in 0..{spec.num_classes - 1}")
    W, b = params[w_key].astype(np.float64), params[b_key].astype(np.float64)
    h = replay.features.astype(np.float64)
    G = softmax(h @ W.T + b)
    G[np.arange(len(G)), replay.labels] -= 1.0
    g = np.hstack([G.T @ h, G.sum(axis=0)[:, None]]) / len(G)  # (C, H + 1): weights, then the bias column
    if replay.damping is not None:
        g = g @ replay.damping
    flat = {w_key: g[:, :-1], b_key: g[:, -1]}
    return np.concatenate([flat[k].ravel() for k in spec.group_shapes(len(spec.groups) - 1)]), len(G)
