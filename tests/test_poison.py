"""The label corruption of bench/poison.py (pure logic): what the poisoned benchmark's clients send."""

from __future__ import annotations

import numpy as np
import pytest

from bench.poison import Condition, random_wrong_labels, targeted_labels


def labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, n)


def test_random_wrong_labels_replace_exactly_the_rate_and_never_keep_the_true_label() -> None:
    y = labels()
    before = y.copy()
    out = random_wrong_labels(y, 0.2, 10, np.random.default_rng(1))
    assert np.array_equal(y, before)  # the true labels are left alone
    changed = out != y
    assert changed.sum() == 200  # exactly round(rate·n), every one of them wrong
    assert out.min() >= 0 and out.max() < 10 and out.dtype == np.int64
    assert np.array_equal(random_wrong_labels(y, 0.0, 10, np.random.default_rng(1)), y)
    assert (random_wrong_labels(y, 1.0, 10, np.random.default_rng(1)) != y).all()


def test_random_wrong_labels_are_uniform_over_the_wrong_classes() -> None:
    y = np.zeros(90_000, np.int64)
    out = random_wrong_labels(y, 1.0, 10, np.random.default_rng(2))
    counts = np.bincount(out, minlength=10)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] / 10_000 - 1) < 0.05)  # 9 wrong classes, 10,000 each on average


def test_targeted_labels_change_only_the_source_class_of_the_clients_share() -> None:
    y = labels(4000)
    out = targeted_labels(y, 1 / 8, 0, 6, np.random.default_rng(3))
    changed = out != y
    assert np.all(y[changed] == 0) and np.all(out[changed] == 6)
    share = changed.sum() / (y == 0).sum()
    assert 0.06 < share < 0.2  # about 1/8 of the class's inputs belong to the client
    assert np.array_equal(targeted_labels(y, 1.0, 0, 6, np.random.default_rng(3)) == 6, (y == 0) | (y == 6))
    assert np.array_equal(targeted_labels(y, 0.0, 0, 6, np.random.default_rng(3)), y)


def test_bad_arguments_are_refused_and_clean_sends_true_labels() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        random_wrong_labels(labels(), 1.5, 10, rng)
    with pytest.raises(ValueError):
        targeted_labels(labels(), 0.5, 3, 3, rng)
    assert Condition("clean", "clean").relabel() is None
    relabel = Condition("adv", "targeted", 1.0, 0, 6).relabel()
    assert np.array_equal(relabel(np.array([0, 1, 6]), rng), [6, 1, 6])
