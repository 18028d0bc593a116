"""bench.curve_gaps: the gaps the learning rule is stated in, from bench.continual's curves (pure arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.curve_gaps import gaps, main


def row(step: int, known: float, served: float, frozen: float | None, new: float | None = None
        ) -> dict[str, float | int | None]:
    return {"step": step, "old_val_acc": known, "online_acc": served, "frozen_online_acc": frozen, "new_loss": 2.0,
            "new_val_acc": new}


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


def test_a_new_class_is_shown_in_points_and_its_last_figure_in_the_table(tmp_path: Path) -> None:
    curve = [row(0, 0.80, 0.70, 0.70, 0.0), row(100, 0.80, 0.72, 0.70, 0.125)]
    assert gaps(curve)["new"] == pytest.approx([0.0, 12.5])
    assert gaps([row(0, 0.8, 0.7, 0.7)])["new"][0] != gaps([row(0, 0.8, 0.7, 0.7)])["new"][0]  # none: NaN
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"curve": curve}))
    (table,) = main([f"{run}:mine", "--plot", str(tmp_path / "gaps.png")])
    assert table["new class, end"] == "12.5%"
    assert (tmp_path / "gaps.png").stat().st_size > 10_000
