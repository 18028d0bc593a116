"""Deltas of whole layer groups, in NumPy: what one vendor adds to each of the group's tensors."""

from __future__ import annotations

import numpy as np

from marketplace.models import ModelSpec
from marketplace.threefry import uniform_delta_np


def vendor_signs(V: int, antithetic: bool) -> np.ndarray:
    """+1 per vendor, or with antithetic pairs -1 for the mirror of each pair (1, 2), (3, 4), …

    The leader (vendor 0) has no delta to mirror, so the pairs are formed among the other vendors; a
    mirror has its partner's seed and the opposite delta, so the pair's two probes differ only in sign
    and the difference of their losses is a central-difference estimate along that direction.
    """
    signs = np.ones(V)
    if antithetic:
        signs[2::2] = -1.0
    return signs


def split_group(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Cut a group's flat vector back into its tensors (sorted key order, as the counter walks them)."""
    out, offset = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        out[key] = flat[offset:offset + size].reshape(shape)
        offset += size
    return out


def group_delta(spec: ModelSpec, s: int, seed: int, eps: float) -> dict[str, np.ndarray]:
    """δ(σ) for every tensor of group s."""
    shapes = spec.group_shapes(s)
    total = sum(int(np.prod(v)) for v in shapes.values())
    return split_group(uniform_delta_np(np.uint64(seed), 0, total, eps), shapes)


def path_params(spec: ModelSpec, params: dict[str, np.ndarray], seeds: np.ndarray, path: np.ndarray,
                eps: float, antithetic: bool = False) -> dict[str, np.ndarray]:
    """The weights one path runs with: θ_s ± δ(σ[s, path[s]]) in every group (the naive, per-input way)."""
    signs = vendor_signs(seeds.shape[1], antithetic).astype(np.float32)
    out = dict(params)
    for s in range(len(spec.groups)):
        for key, d in group_delta(spec, s, int(seeds[s, path[s]]), eps).items():
            out[key] = params[key] + signs[path[s]] * d
    return out
