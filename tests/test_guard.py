"""The validation guard's decision (worker.guard.verdict / judge_candidate), which the worker and the
continual-learning bench share: anchor carried from version to version, parent reference, tolerance."""

from __future__ import annotations

import numpy as np

from marketplace.engine import Engine
from marketplace.models import mlp
from model_store.holdout import decode_holdout, encode_holdout
from worker.guard import holdout_figures, judge_candidate, verdict

HOLDOUT = decode_holdout(encode_holdout(np.zeros((4, 1, 28, 28), np.float32), np.arange(4)))
OTHER = decode_holdout(encode_holdout(np.ones((4, 1, 28, 28), np.float32), np.arange(4)))


def fig(acc: float) -> dict[str, float]:
    return {"accuracy": acc, "loss": 1.0}


def test_the_anchor_stops_small_drops_from_adding_up() -> None:
    first = verdict(fig(0.795), fig(0.80), None, HOLDOUT, 0.01, "anchor")  # no record: the parent is the anchor
    assert first.accepted and first.validation["anchor_accuracy"] == 0.80
    second = verdict(fig(0.789), fig(0.795), first.validation, HOLDOUT, 0.01, "anchor")
    assert not second.accepted and second.validation["reference_accuracy"] == 0.80  # 0.789 < 0.80 - 0.01
    # measured against the parent instead, the same candidate passes: drift may accumulate
    assert verdict(fig(0.789), fig(0.795), first.validation, HOLDOUT, 0.01, "parent").accepted


def test_an_anchor_measured_on_another_holdout_does_not_count() -> None:
    old = verdict(fig(0.9), fig(0.9), None, OTHER, 0.01, "anchor").validation
    v = verdict(fig(0.70), fig(0.70), old, HOLDOUT, 0.01, "anchor")
    assert v.accepted and v.validation["anchor_accuracy"] == 0.70


def test_judge_candidate_evaluates_the_unperturbed_weights() -> None:
    spec = mlp(hidden=(8,))
    params = spec.init_params(0)
    engine = Engine(spec, 1, buckets=[8])
    own = holdout_figures(engine, params, HOLDOUT)
    v = judge_candidate(engine, params, HOLDOUT, own, None, 0.0, "anchor")
    assert v.accepted and v.validation["accuracy"] == own["accuracy"] and v.validation["size"] == 4
    worse = judge_candidate(engine, params, HOLDOUT, fig(own["accuracy"] + 0.5), None, 0.1, "parent")
    assert not worse.accepted
