"""The continual-learning experiments as tests: the served model learns new data from its own traffic.

The `--quick` runs of both protocols (engine mode: the Engine serves, `propose_update` reconciles with the
worker's configs) must raise the new data's validation accuracy by a margin while the known data hold; one
short `--http` run against a real stack (redis, API, worker via `mpserve up`) must publish versions and report
sane figures. The margins come from repeated runs (see QUICK_* below and the report in bench/continual.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import continual
from bench.continual import CURVE_KEYS

# Measured over seeds 0, 1, 2 with exactly these flags (python -m bench.continual --protocol P --quick --seed N
# --eval-every 100 --baseline class --learning-rate 1.0), 300 steps each:
#   A: class 9 validation accuracy 0 -> 0.80, 0.80, 0.48; served class-9 loss fell by 18.5, 16.4, 17.7 nats;
#      known classes moved by -4.6, -3.4, -3.3 points.
#   B: rotated class 3 still at 0.00-0.01 after 300 steps (the base model's inertia), but its served loss fell by
#      5.6, 5.3, 4.0 nats; known data moved by -5.4, -5.3, -2.4 points.
# Each margin sits well inside that spread; without learning the new data's figures do not move at all.
QUICK_FLAGS = ["--quick", "--no-progress", "--eval-every", "100", "--baseline", "class", "--learning-rate", "1.0"]
MIN_NEW_ACC_RISE = {"A": 0.2, "B": 0.0}
MIN_NEW_LOSS_FALL = {"A": 10.0, "B": 2.5}  # nats, served (perturbed) predictions of the new data
MAX_KNOWN_DROP = {"A": 0.07, "B": 0.08}


@pytest.mark.parametrize("protocol", ["A", "B"])
def test_quick_run_learns_the_new_data_and_keeps_the_known(protocol: str, tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    continual.main(["--protocol", protocol, *QUICK_FLAGS, "--json", str(out), "--plot", str(tmp_path / "c.png")])
    payload = json.loads(out.read_text())
    curve = payload["curve"]
    assert payload["protocol"] == protocol and payload["model"] == "mlp" and curve[0]["step"] == 0
    assert [set(r) for r in curve] == [set(CURVE_KEYS)] * len(curve)
    first, last = curve[0], curve[-1]
    assert last["step"] == payload["steps"] == 300 and first["new_val_acc"] == 0.0
    assert last["new_val_acc"] - first["new_val_acc"] >= MIN_NEW_ACC_RISE[protocol], curve
    assert first["new_loss"] - last["new_loss"] >= MIN_NEW_LOSS_FALL[protocol], curve
    assert first["old_val_acc"] - last["old_val_acc"] <= MAX_KNOWN_DROP[protocol], curve
    assert last["old_val_acc"] > 0.7 and last["old_online_acc"] > 0.65  # the known data are still served well
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_http_run_against_a_real_stack_publishes_versions(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    steps = 4
    continual.main(["--protocol", "A", "--http", "--steps", str(steps), "--eval-every", "2", "--base-steps", "50",
                    "--label-delay-s", "0.05", "--no-progress", "--baseline", "class", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert {"protocol", "model", "steps", "curve"} <= set(payload)
    assert [r["step"] for r in payload["curve"]] == [0, 2, 4]
    for row in payload["curve"]:
        assert set(row) == set(CURVE_KEYS)
        for k in CURVE_KEYS[1:5]:
            assert 0.0 <= row[k] <= 1.0, (k, row)
        assert row["old_loss"] > 0 and row["new_loss"] > row["old_loss"]  # class 9 was never seen: far worse
    assert payload["versions"] == steps and payload["final_version"] == steps  # one publish per step
    assert payload["served_by_versions"] == list(range(steps))  # each step was served by the newest version
    assert payload["curve"][0]["old_val_acc"] > 0.5  # the base model knows the known classes
