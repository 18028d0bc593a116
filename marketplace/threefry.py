"""Threefry-2x32-20 in NumPy and in tinygrad, bit for bit the same.

A vendor delta is never stored: it is regenerated from its uint64 seed wherever it is needed (the
serving device materializes perturbed weights with the tinygrad twin; the reconciler, tests and edge
clients use the NumPy twin). Both map one counter to one element, so any slice of a delta can be
generated on its own.

Element i of a layer group (its tensors flattened and concatenated in sorted key order) is
Threefry2x32_20(key=(seed_lo, seed_hi), counter=(i_lo, i_hi)) word 0, whose top 24 bits become the
signed integer s in [-2^23, 2^23); the delta is float32(s) * float32(eps * 2^-23). Every step is
exact in float32 except the final multiply, which is a single IEEE rounding on every device.
"""

from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes

ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
PARITY = 0x1BD11BDA
MASK32 = 0xFFFFFFFF
UNIT = 2.0**-23


def delta_scale(eps: float) -> np.float32:
    """float32(eps) * 2^-23: exact, so both twins multiply by the very same number."""
    return np.float32(np.float32(eps) * np.float32(UNIT))


# ----------------------------------------------------------------------------------------- NumPy


def threefry2x32_np(key: tuple[int, int] | tuple[np.ndarray, np.ndarray], c0: np.ndarray, c1: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 with 20 rounds; key words and counters broadcast against each other.

    In place on two state arrays and one scratch array: the reconciler regenerates every vendor's delta each
    update, and fresh temporaries per operation made this the largest cost of a step.
    """
    k0 = np.asarray(key[0], dtype=np.uint32)
    k1 = np.asarray(key[1], dtype=np.uint32)
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(PARITY))
    with np.errstate(over="ignore"):
        x0, x1 = (np.array(a) for a in np.broadcast_arrays(np.asarray(c0, dtype=np.uint32) + ks[0],
                                                            np.asarray(c1, dtype=np.uint32) + ks[1]))
        tmp = np.empty_like(x1)
        for r in range(20):
            x0 += x1
            rot = ROTATIONS[r % 8]
            np.left_shift(x1, np.uint32(rot), out=tmp)
            x1 >>= np.uint32(32 - rot)
            x1 |= tmp
            x1 ^= x0
            if r % 4 == 3:
                i = r // 4 + 1
                x0 += ks[i % 3]
                x1 += ks[(i + 1) % 3] + np.uint32(i)
    return x0, x1


def uniform_delta_np(seeds: np.ndarray | int, counter: int, n: int, eps: float) -> np.ndarray:
    """Delta elements counter..counter+n-1 for one seed or a vector of seeds: shape (*seeds.shape, n).

    Seed 0 gives zeros: it is the leader, the unperturbed model.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    if counter < 0 or n < 0 or counter + n > 2**64:
        raise ValueError("counter range out of bounds")
    idx = np.uint64(counter) + np.arange(n, dtype=np.uint64)
    c0 = (idx & np.uint64(MASK32)).astype(np.uint32)
    c1 = (idx >> np.uint64(32)).astype(np.uint32)
    k0 = (seeds & np.uint64(MASK32)).astype(np.uint32)[..., None]
    k1 = (seeds >> np.uint64(32)).astype(np.uint32)[..., None]
    x0, _ = threefry2x32_np((k0, k1), c0, c1)
    signed = (x0 >> np.uint32(8)).astype(np.int32) - np.int32(2**23)
    out = signed.astype(np.float32) * delta_scale(eps)
    out[seeds == 0] = 0.0
    return out


# -------------------------------------------------------------------------------------- tinygrad


def _rotl_tg(x: Tensor, r: int) -> Tensor:
    return (x << r) | (x >> (32 - r))


def threefry2x32_tg(key: tuple[int, int] | tuple[Tensor, Tensor], c0: Tensor, c1: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """The tinygrad twin of `threefry2x32_np`; key words (ints or uint32 tensors) broadcast."""
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ PARITY)
    x0 = c0 + ks[0]
    x1 = c1 + ks[1]
    for r in range(20):
        x0 = x0 + x1
        x1 = _rotl_tg(x1, ROTATIONS[r % 8]) ^ x0
        if r % 4 == 3:
            i = r // 4 + 1
            x0 = x0 + ks[i % 3]
            x1 = x1 + ks[(i + 1) % 3] + i
    return x0, x1


def delta_keys(seeds: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The data a delta is generated from, one entry per seed: key words, scale and the live mask (seed != 0).

    Host arrays (uint32, uint32, float32, bool) of the seeds' shape: what `uniform_delta_keyed_tg` takes as
    tensors, so a caller can keep them in device buffers of its own (a TinyJit's fixed inputs).
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    return ((seeds & np.uint64(MASK32)).astype(np.uint32), (seeds >> np.uint64(32)).astype(np.uint32),
            np.full(seeds.shape, delta_scale(eps), dtype=np.float32), seeds != 0)


def uniform_delta_keyed_tg(k0: Tensor, k1: Tensor, scale: Tensor, live: Tensor, counter: int, n: int) -> Tensor:
    """Delta elements counter..counter+n-1 from per-seed tensors of shape (m, 1) (see `delta_keys`): lazy (m, n).

    Seeds and the scale enter as data, not as constants, so one compiled kernel serves every version.
    """
    if counter < 0 or n < 0 or counter + n > 2**32:
        raise ValueError("the tinygrad twin supports counters below 2^32 (4G parameters per group)")
    idx = Tensor.arange(n, dtype=dtypes.uint32).to(k0.device).reshape(1, n) + counter
    x0, _ = threefry2x32_tg((k0, k1), idx, idx.zeros_like())
    signed = (x0 >> 8).cast(dtypes.int32) - 2**23
    return live.where(signed.cast(dtypes.float32) * scale, 0.0)


def uniform_delta_tg(seeds: np.ndarray | int, counter: int, n: int, eps: float, device: str | None = None
                     ) -> Tensor:
    """Delta elements counter..counter+n-1 for a vector of seeds: a lazy (len(seeds), n) tensor on `device`."""
    seeds = np.atleast_1d(np.asarray(seeds, dtype=np.uint64))
    k0, k1, scale, live = (Tensor(a[:, None], device=device) for a in delta_keys(seeds, eps))
    return uniform_delta_keyed_tg(k0, k1, scale, live, counter, n)
