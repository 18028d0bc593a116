"""Threefry-2x32-20 and seeded deltas: published vectors; the NumPy and tinygrad twins agree bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinygrad import Tensor, dtypes

from marketplace.threefry import threefry2x32_np, threefry2x32_tg, uniform_delta_np, uniform_delta_tg

# Random123's known-answer vectors for threefry2x32 with 20 rounds: (key, counter, expected output).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("key", "ctr", "expected"), KNOWN_ANSWERS)
def test_known_answers_numpy(key, ctr, expected):
    x0, x1 = threefry2x32_np(key, np.array([ctr[0]], np.uint32), np.array([ctr[1]], np.uint32))
    assert (int(x0[0]), int(x1[0])) == expected


@pytest.mark.parametrize(("key", "ctr", "expected"), KNOWN_ANSWERS)
def test_known_answers_tinygrad(key, ctr, expected):
    c0 = Tensor([ctr[0]], dtype=dtypes.uint32)
    c1 = Tensor([ctr[1]], dtype=dtypes.uint32)
    x0, x1 = threefry2x32_tg(key, c0, c1)
    assert (int(x0.numpy()[0]), int(x1.numpy()[0])) == expected


@settings(max_examples=25, deadline=None, derandomize=True)  # the same examples every run, like the rest
@given(
    seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=4),
    counter=st.integers(0, 2**31),
    n=st.integers(0, 3000),
    eps=st.floats(1e-4, 2.0),
)
def test_twins_agree_bit_for_bit(seeds, counter, n, eps):
    seeds = np.array(seeds, dtype=np.uint64)
    a = uniform_delta_np(seeds, counter, n, eps)
    b = uniform_delta_tg(seeds, counter, n, eps).numpy()
    assert a.shape == b.shape == (len(seeds), n)
    assert a.dtype == b.dtype == np.float32
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_seed_zero_is_the_unperturbed_leader():
    assert not np.any(uniform_delta_np(np.array([0], np.uint64), 0, 1000, 0.5))
    assert not np.any(uniform_delta_tg(np.array([0], np.uint64), 0, 1000, 0.5).numpy())


def test_delta_is_uniform_in_the_probe_interval():
    d = uniform_delta_np(12345, 0, 200_000, 0.05)
    assert d.min() >= -0.05 and d.max() <= 0.05
    assert abs(d.mean()) < 0.001
    assert abs(d.std() - 0.05 / np.sqrt(3)) < 0.001  # the std of U(-eps, eps)


def test_slices_regenerate_independently():
    """A counter range gives the same elements as the same range of a longer delta."""
    whole = uniform_delta_np(99, 0, 5000, 0.1)
    assert np.array_equal(uniform_delta_np(99, 1234, 100, 0.1), whole[1234:1334])
    assert not np.array_equal(uniform_delta_np(98, 0, 5000, 0.1), whole)
