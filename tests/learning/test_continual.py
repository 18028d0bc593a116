"""The continual-learning experiments as tests: the served model learns new data from its own traffic.

The `--quick` runs with the shipped defaults (engine mode: the Engine serves with paired probes, `propose_update`
reconciles with the worker's configs) must learn a new class (A) and a new look of a known class (B), and keep up
with drift (C) better than the same base kept frozen, while no evaluation point finds the known data worse than the
base, with or without a shift (N);
one short `--http` run against a real stack (redis, API, worker via `mpserve up`) must publish versions and report
sane figures. The margins come from repeated runs (see the figures below).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import continual
from bench.continual import CURVE_KEYS
from worker.settings import WorkerSettings

pytestmark = pytest.mark.slow

# Measured over seeds 0, 1, 2 with the shipped defaults (python -m bench.continual --protocol P --quick --seed N
# --eval-every 100: paired probes, leader baseline, only the head learning, its exact gradient on the inputs the API
# keeps, damped along the holdout's features (head_gradient=replay), capped at 1% of its norm, the validation guard
# on a 1,000-image holdout and on the kept inputs the head does not learn from (guard_traffic_share 0.5), a step
# accepted only when it lowers the loss there by two paired standard errors (guard_traffic_gain_z 2), drifted
# classes leaving the holdout checks), 300 steps (docs/figures/learning_ablation/{P}_300_gain_seed{N}.json; the
# figures before the gain rule, _replay_split_, in brackets):
#   A: class 9's loss fell by 18.6, 18.0, 19.5 nats (71.1%, 77.0%, 57.6% right at step 300 [80.3%, 76.3%, 61.3%]);
#      what users were served was never behind the frozen base; the known classes' test accuracy dipped up to 0.74
#      points below the base [0.84];
#   B: class 3 rotated 90° went from 0% to 74.2%, 1.1%, 80.0% [71.7%, 1.1%, 80.4%] (its loss fell 8.6, 6.5, 9.1
#      nats); the known classes at worst 0.30 points below the base; served never more than 0.09 points behind the
#      frozen base. The test runs seed 0: seed 1 learns too slowly for MIN_NEW_LOOK_LEARNT in 300 steps, and only
#      its loss margin would hold;
#   N: the leader's test accuracy never fell below the base (+0.12, +0.27, +0.10 at the end [+0.55, +0.20, +0.42]);
#   C: at every point the learning model was level with or ahead of the frozen base on the rotated test split,
#      by +32.8, +51.0, +43.9 points at the end [+34.5, +48.3, +41.9] (the drift takes the frozen base from ~83% to
#      11-12% in 300 steps).
# The margins sit inside that spread; a learning change that hurts the known data or stops learning fails them.
QUICK_FLAGS = ["--quick", "--no-progress", "--eval-every", "100"]
MIN_NEW_LOSS_FALL = 5.0  # nats, served answers to the new class (A)
MAX_NEW_CLASS_KNOWN_DIP = 0.02  # A: the known classes' test accuracy against the step-0 base, at every point
MAX_BEHIND_FROZEN_SERVED = 0.005  # A: what users are served against the frozen base on the same traffic
MAX_KNOWN_DROP = 0.005  # N: the leader's test accuracy against the step-0 base, at every evaluation point
MAX_BEHIND_FROZEN = 0.005  # drift (C): learning's test accuracy against the frozen base, at every point
MIN_AHEAD_OF_FROZEN = 0.30  # drift (C): learning ahead of the frozen base at the end
MIN_NEW_LOOK_LEARNT = 0.20  # B: the rotated class's test accuracy at the end (from 0%)


@pytest.fixture(scope="module")
def known_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where N and C keep their base: both train it on every class with the same seed and holdout slice, so the
    second run loads the first one's weights (bench.continual --base-npz) instead of training them again."""
    return tmp_path_factory.mktemp("base") / "all_classes.npz"


def quick_run(protocol: str, tmp_path: Path, base_npz: Path | None = None) -> list[dict]:
    out = tmp_path / "curve.json"
    cache = ["--base-npz", str(base_npz)] if base_npz else []
    continual.main(["--protocol", protocol, *QUICK_FLAGS, *cache, "--json", str(out), "--plot",
                    str(tmp_path / "c.png")])
    payload = json.loads(out.read_text())
    curve = payload["curve"]
    assert payload["protocol"] == protocol and payload["model"] == "mlp" and payload["steps"] == 300
    assert [r["step"] for r in curve] == [0, 100, 200, 300]
    assert [set(r) for r in curve] == [set(CURVE_KEYS)] * len(curve)
    assert payload["config"]["exploration"] == "paired" and payload["config"]["step"] == "signal"
    assert (tmp_path / "c.png").stat().st_size > 10_000
    return curve


def test_quick_new_class_is_learned_without_harm_to_the_known_classes(tmp_path: Path) -> None:
    curve = quick_run("A", tmp_path)
    first, last = curve[0], curve[-1]
    assert first["new_val_acc"] == 0.0 and first["new_loss"] - last["new_loss"] >= MIN_NEW_LOSS_FALL, curve
    assert all(r["old_val_acc"] >= first["old_val_acc"] - MAX_NEW_CLASS_KNOWN_DIP for r in curve), curve
    # paired probes: what users are served is the leader's answer, never behind the same base kept frozen
    assert all(r["online_acc"] >= r["frozen_online_acc"] - MAX_BEHIND_FROZEN_SERVED for r in curve), curve


def test_quick_in_distribution_traffic_never_lowers_accuracy(tmp_path: Path, known_base: Path) -> None:
    curve = quick_run("N", tmp_path, known_base)
    base = curve[0]["old_val_acc"]
    assert all(r["new_val_acc"] is None and r["frozen_val_acc"] == base for r in curve)
    assert all(r["old_val_acc"] >= base - MAX_KNOWN_DROP for r in curve), curve


def test_quick_new_look_of_a_known_class_is_learned_without_harm(tmp_path: Path, known_base: Path) -> None:
    curve = quick_run("B", tmp_path, known_base)  # B's base is N's: every class, the same holdout slice
    first, last = curve[0], curve[-1]
    assert first["new_val_acc"] == 0.0 and last["new_val_acc"] >= MIN_NEW_LOOK_LEARNT, curve
    assert first["new_loss"] - last["new_loss"] >= MIN_NEW_LOSS_FALL, curve
    assert all(r["old_val_acc"] >= first["old_val_acc"] - MAX_KNOWN_DROP for r in curve), curve
    assert all(r["online_acc"] >= r["frozen_online_acc"] - MAX_BEHIND_FROZEN_SERVED for r in curve), curve


def test_quick_drift_learning_keeps_up_better_than_the_frozen_base(tmp_path: Path, known_base: Path) -> None:
    curve = quick_run("C", tmp_path, known_base)
    assert curve[-1]["frozen_val_acc"] < curve[0]["frozen_val_acc"] - 0.1  # the drift does hurt a frozen model
    assert all(r["old_val_acc"] >= r["frozen_val_acc"] - MAX_BEHIND_FROZEN for r in curve), curve
    assert curve[-1]["old_val_acc"] - curve[-1]["frozen_val_acc"] >= MIN_AHEAD_OF_FROZEN, curve


def test_http_run_against_a_real_stack_publishes_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the stack's API batches at most 64 inputs (its 8 clients send 16 each): two buckets fewer to warm up
    monkeypatch.setenv("MPSERVE_MAX_BATCH", "64")
    out = tmp_path / "http.json"
    steps = 4
    # no holdout for the stack, so no guard: its worker draws unseeded probe seeds, and a refusal (the guard's own
    # tests cover those) would make "one publish per step" a matter of chance
    continual.main(["--protocol", "A", "--http", "--steps", str(steps), "--eval-every", "2", "--base-steps", "50",
                    "--label-delay-s", "0.05", "--no-progress", "--no-guard", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert {"protocol", "model", "steps", "curve"} <= set(payload)
    assert [r["step"] for r in payload["curve"]] == [0, 2, 4]
    for row in payload["curve"]:
        assert set(row) == set(CURVE_KEYS)
        assert row["frozen_val_acc"] == payload["curve"][0]["old_val_acc"]  # the base the stack started from
        assert row["old_loss"] > 0 and row["new_loss"] > row["old_loss"]  # class 9 was never seen: far worse
    first = payload["curve"][0]
    # before any step the stack serves the base: with paired probes users get its leader's answers, exactly what the
    # client computes from the same weights in process (a probe's answer, or another version's, would differ)
    assert first["online_acc"] == first["frozen_online_acc"], first
    assert first["new_val_acc"] == 0.0 and first["new_online_acc"] == 0.0  # a class it never saw, never predicted
    assert first["old_online_acc"] > 0.5
    assert payload["versions"] == steps and payload["final_version"] == steps  # one publish per step
    assert payload["served_by_versions"] == list(range(steps))  # each step was served by the newest version
    assert payload["curve"][0]["old_val_acc"] > 0.5  # the base model knows the known classes
    # the stack's worker ran at its defaults, and the figures say which (every learning setting, not just the given)
    assert payload["config"]["learn_groups"] == WorkerSettings().learn_groups
    assert payload["config"]["max_step"] == WorkerSettings().max_step
