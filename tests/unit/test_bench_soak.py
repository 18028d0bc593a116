"""The soak's flatness verdict (pure logic): growth of the last third's mean over the middle third's."""

from __future__ import annotations

import pytest

from bench.soak import flatness


def test_a_level_after_warm_up_is_flat() -> None:
    v = flatness([1, 2, 3, 10, 10, 10, 10, 10, 10.2], tolerance=0.05)
    assert v["flat"] is True and v["growth"] == pytest.approx(0.2 / 3 / 10)


def test_steady_growth_is_not_flat() -> None:
    v = flatness([float(i) for i in range(1, 10)], tolerance=0.05)
    assert v["flat"] is False and v["growth"] == pytest.approx(0.6)


def test_too_few_samples_give_no_verdict() -> None:
    assert flatness([1.0, 2.0], tolerance=0.05)["flat"] is None
