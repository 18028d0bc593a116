"""bench.curve_gaps: the gaps the learning rule is stated in, from bench.continual's curves (pure arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.curve_gaps import gaps, main


def row(step: int, known: float, served: float, frozen: float | None) -> dict[str, float | int | None]:
    return {"step": step, "old_val_acc": known, "online_acc": served, "frozen_online_acc": frozen, "new_loss": 2.0}


def test_gaps_are_points_against_the_frozen_base_and_the_step0_model(tmp_path: Path) -> None:
    curve = [row(0, 0.80, 0.70, 0.70), row(100, 0.79, 0.705, 0.71), row(200, 0.81, 0.69, None)]
    g = gaps(curve)
    assert g["step"] == [0, 100]  # a row without the frozen figure is left out
    assert g["served"] == pytest.approx([0.0, -0.5]) and g["known"] == pytest.approx([0.0, -1.0])
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"curve": curve, "refused": 3}))
    (table,) = main([f"{run}:mine", "--plot", str(tmp_path / "gaps.png")])
    assert table["run"] == "mine" and table["served - frozen, worst"] == "-0.50" and table["refused"] == 3
    assert (tmp_path / "gaps.png").stat().st_size > 10_000
