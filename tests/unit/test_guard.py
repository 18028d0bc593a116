"""The validation guard's decision (worker.guard.verdict / judge_candidate), which the worker and the
continual-learning bench share: anchor carried from version to version, parent reference, tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from marketplace.data import load_fashion_mnist
from marketplace.engine import Engine
from marketplace.leader import LeaderAnswers
from marketplace.models import mlp
from model_store.holdout import decode_holdout, encode_holdout
from redis_io.protocol import ReplayEntry
from tests.helpers import fitted_mlp, numpy_mlp
from worker.guard import (
    TrafficCheck,
    answers,
    drifted_classes,
    gain_z,
    judge_candidate,
    judged_only,
    split_replay,
    traffic_anchor,
    verdict,
)

HOLDOUT = decode_holdout(encode_holdout(np.zeros((4, 1, 28, 28), np.float32), np.arange(4)))
OTHER = decode_holdout(encode_holdout(np.ones((4, 1, 28, 28), np.float32), np.arange(4)))
#: 50 examples of each of 4 classes: enough for each class to be judged on its own (40 at a tolerance of 0.05)
CLASSES = decode_holdout(encode_holdout(np.zeros((200, 1, 28, 28), np.float32), np.arange(200) % 4))


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


def independent_figures(spec, params, holdout) -> dict[str, float]:
    """Accuracy and mean cross-entropy by the NumPy twin of the mlp (float64), not the engine."""
    logits = numpy_mlp(spec, params, holdout.inputs)
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return {"accuracy": float(np.mean(logits.argmax(1) == holdout.labels)),
            "loss": float(-np.mean(log_p[np.arange(len(holdout)), holdout.labels]))}


def test_judge_candidate_evaluates_the_unperturbed_candidate_on_the_holdout() -> None:
    """On 500 real Fashion-MNIST test images, the guard's figures are those of an independent forward of the
    candidate's own weights (not a probe's, not the parent's), and it refuses exactly below the reference."""
    data = load_fashion_mnist()
    holdout = decode_holdout(encode_holdout(data["test"].x[:500].astype(np.float32), data["test"].y[:500]))
    spec = mlp(hidden=(32,))
    parent = fitted_mlp(spec, data["train"].x[:3000], data["train"].y[:3000])
    noise = np.random.default_rng(1)
    worse = {k: v + (noise.normal(0, 0.5 * v.std(), v.shape).astype(np.float32) if k.startswith("1.") else 0)
             for k, v in parent.items()}
    before, after = independent_figures(spec, parent, holdout), independent_figures(spec, worse, holdout)
    assert before["accuracy"] > 0.6 and 0.3 < after["accuracy"] < before["accuracy"] - 0.1  # both far from trivial
    engine = LeaderAnswers(Engine(spec, 1, buckets=[64]))  # 500 examples: eight chunks, the last one partial

    same = judge_candidate(engine, parent, holdout, before, None, 0.0, "anchor")
    assert same.accepted and same.validation["size"] == 500
    assert same.validation["accuracy"] == before["accuracy"]
    assert same.validation["loss"] == pytest.approx(before["loss"], rel=1e-5)
    gap = before["accuracy"] - after["accuracy"]
    refused = judge_candidate(engine, worse, holdout, before, None, gap - 0.01, "parent")
    assert not refused.accepted and refused.validation["accuracy"] == after["accuracy"]
    assert refused.validation["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert refused.validation["reference_accuracy"] == before["accuracy"]
    assert judge_candidate(engine, worse, holdout, before, None, gap + 0.01, "parent").accepted


def test_recent_traffic_refuses_what_the_holdout_lets_through_and_judges_against_the_anchor() -> None:
    """A candidate that serves recent labelled inputs worse than the anchor (the model kept frozen) did is refused,
    even by a holdout check that accepts anything; the figures are those of an independent forward."""
    data = load_fashion_mnist()
    spec = mlp(hidden=(32,))
    parent = fitted_mlp(spec, data["train"].x[:3000], data["train"].y[:3000])
    noise = np.random.default_rng(3)
    worse = {k: v + (noise.normal(0, 0.5 * v.std(), v.shape).astype(np.float32) if k.startswith("1.") else 0)
             for k, v in parent.items()}
    x, y = data["test"].x[:300].astype(np.float32), data["test"].y[:300]
    anchor_right = numpy_mlp(spec, parent, x).argmax(1) == y
    worse_right = numpy_mlp(spec, worse, x).argmax(1) == y
    assert worse_right.mean() < anchor_right.mean() - 0.05
    holdout = decode_holdout(encode_holdout(x[:50], y[:50]))
    engine = LeaderAnswers(Engine(spec, 1, buckets=[64]))
    before = independent_figures(spec, parent, holdout)
    check = TrafficCheck(x, y, anchor_right, 0, tolerance=0.0)

    same = judge_candidate(engine, parent, holdout, before, None, 1.0, "anchor", 1.0, check)
    assert same.accepted and same.validation["traffic"] == {
        "size": 300, "accuracy": float(anchor_right.mean()), "anchor_accuracy": float(anchor_right.mean()),
        "anchor_version": 0, "tolerance": 0.0, "accepted": True}
    refused = judge_candidate(engine, worse, holdout, before, None, 1.0, "anchor", 1.0, check)
    assert not refused.accepted and refused.validation["traffic"]["accuracy"] == float(worse_right.mean())
    assert "recent labelled inputs" in refused.reason and "version 0" in refused.reason
    assert judge_candidate(engine, worse, holdout, before, None, 1.0, "anchor", 1.0, None).accepted  # holdout alone
    gap = float(anchor_right.mean() - worse_right.mean())
    loose = TrafficCheck(x, y, anchor_right, 0, tolerance=gap + 0.01)
    assert judge_candidate(engine, worse, holdout, before, None, 1.0, "anchor", 1.0, loose).accepted


def mlp_loss(spec, params, x, y) -> np.ndarray:
    """Per-input cross-entropy by the NumPy twin (float64), not the engine."""
    logits = numpy_mlp(spec, params, x)
    z = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def test_a_step_must_lower_the_loss_on_recent_inputs_beyond_its_noise() -> None:
    """With gain_z, a candidate no better than the serving version on the recent inputs (itself, or a step back)
    is refused, though the accuracy tolerance lets anything through; a real gain is accepted."""
    data = load_fashion_mnist()
    spec = mlp(hidden=(32,))
    good = fitted_mlp(spec, data["train"].x[:3000], data["train"].y[:3000])
    rough = fitted_mlp(spec, data["train"].x[:300], data["train"].y[:300])  # the serving version: less trained
    x, y = data["test"].x[:300].astype(np.float32), data["test"].y[:300]
    holdout = decode_holdout(encode_holdout(x[:50], y[:50]))
    leader = LeaderAnswers(Engine(spec, 1, buckets=[64]))
    before = independent_figures(spec, rough, holdout)
    rough_right = numpy_mlp(spec, rough, x).argmax(1) == y

    ids = tuple(f"r{i}" for i in range(len(y)))

    def check(parent: dict) -> TrafficCheck:  # as the worker builds it: the serving version's loss by the same engine
        return TrafficCheck(x, y, rough_right, 0, tolerance=1.0, parent_loss=answers(leader, parent, x, y, ids)[1],
                            gain_z=2.0, ids=ids)

    gained = judge_candidate(leader, good, holdout, before, None, 1.0, "anchor", 1.0, check(rough))
    traffic = gained.validation["traffic"]
    assert gained.accepted and traffic["gain_z"] > 2.0 and traffic["gain_needed"] == 2.0
    assert traffic["loss"] == pytest.approx(mlp_loss(spec, good, x, y).mean(), rel=1e-4)
    assert traffic["parent_loss"] == pytest.approx(mlp_loss(spec, rough, x, y).mean(), rel=1e-4)
    still = judge_candidate(leader, rough, holdout, before, None, 1.0, "anchor", 1.0, check(rough))
    assert not still.accepted and still.validation["traffic"]["gain_z"] == 0.0
    assert "no gain on 300 recent labelled inputs" in still.reason and "pay for itself" in still.reason
    back = judge_candidate(leader, rough, holdout, before, None, 1.0, "anchor", 1.0, check(good))  # a step back
    assert not back.accepted and back.validation["traffic"]["gain_z"] < -2.0
    # without a gain asked for, staying within the tolerance is enough
    plain = TrafficCheck(x, y, rough_right, 0, tolerance=1.0)
    assert judge_candidate(leader, rough, holdout, before, None, 1.0, "anchor", 1.0, plain).accepted


def test_gain_z_is_the_paired_t_of_the_loss_drop() -> None:
    rng = np.random.default_rng(0)
    parent = rng.uniform(0.1, 3.0, 400)
    drop = rng.normal(0.05, 0.2, 400)
    assert gain_z(parent - drop, parent) == pytest.approx(drop.mean() / (drop.std(ddof=1) / 20))
    assert gain_z(parent, parent) == 0.0  # the same answers: nothing gained
    assert gain_z(parent - 0.1, parent) > 1e6 and gain_z(parent + 0.1, parent) < -1e6  # every input alike
    assert gain_z(np.full(40, 1.0), np.full(40, 2.0)) == np.inf
    assert gain_z(np.full(29, 1.0), np.full(29, 2.0)) == -np.inf  # too few inputs to show anything
    assert gain_z(np.where(np.arange(400) == 3, np.inf, parent - 1), parent) == -np.inf  # a new non-finite answer
    overflowed = np.where(np.arange(400) == 3, np.inf, parent)  # the serving version already overflows on input 3:
    assert gain_z(parent - drop, overflowed) == pytest.approx(gain_z(np.delete(parent - drop, 3),  # it tells nothing
                                                                     np.delete(parent, 3)))


def test_a_class_refusal_with_too_little_traffic_to_judge_names_the_class() -> None:
    """With fewer recent inputs than guard_traffic_min the worker records only the anchor it carries; the
    refusal's reason is then the class's (it once read the traffic block's missing verdict and raised)."""
    judged = verdict(classes(0.5, 1.0, 1.0, 1.0), classes(1.0, 1.0, 1.0, 0.5), None, CLASSES, 0.5, "anchor", 0.05)
    judged.validation["traffic"] = {"anchor_version": 3}
    assert not judged.accepted and judged.reason.startswith("class 0's holdout accuracy 0.5000")


def test_the_traffic_anchor_is_carried_from_manifest_to_manifest() -> None:
    assert traffic_anchor(7, None) == 7  # nothing recorded: the parent is the anchor
    assert traffic_anchor(7, {"accuracy": 0.5}) == 7
    assert traffic_anchor(7, {"traffic": {"anchor_version": 2, "accepted": True}}) == 2


def classes(*acc: float) -> dict[str, object]:
    return {"accuracy": sum(acc) / len(acc), "loss": 1.0, "class_accuracy": list(acc)}


def test_a_class_wide_drop_is_refused_even_when_the_aggregate_holds() -> None:
    """A label flip trades one class's errors for another's gains: the aggregate stays, one class falls."""
    anchor = verdict(classes(0.80, 0.60, 0.70, 0.90), classes(0.80, 0.60, 0.70, 0.90), None, CLASSES, 0.01,
                     "anchor", class_tolerance=0.05)
    assert anchor.accepted and anchor.validation["anchor_class_accuracy"] == [0.80, 0.60, 0.70, 0.90]
    flipped = classes(0.70, 0.70, 0.70, 0.90)  # class 0 -10 points, class 1 +10: the same aggregate
    refused = verdict(flipped, classes(0.80, 0.60, 0.70, 0.90), anchor.validation, CLASSES, 0.01, "anchor",
                      class_tolerance=0.05)
    assert not refused.accepted and refused.validation["worst_class"] == 0
    assert refused.reason.startswith("class 0's holdout accuracy 0.7000 is more than 0.0500 below its reference 0.8000")
    # within the class tolerance it passes; without per-class figures (an older manifest) only the aggregate counts
    assert verdict(flipped, classes(0.80, 0.60, 0.70, 0.90), anchor.validation, CLASSES, 0.01, "anchor",
                   class_tolerance=0.11).accepted
    assert verdict(fig(0.80), fig(0.80), None, CLASSES, 0.01, "anchor", class_tolerance=0.0).accepted


def test_per_class_drops_are_judged_against_the_anchor_not_the_parent() -> None:
    """Small per-class drops cannot add up: each class keeps the anchor's figure as its reference."""
    first = verdict(classes(0.77, 0.60), classes(0.80, 0.60), None, CLASSES, 1.0, "anchor", class_tolerance=0.05)
    assert first.accepted  # class 0: 3 points below the anchor
    second = verdict(classes(0.74, 0.60), classes(0.77, 0.60), first.validation, CLASSES, 1.0, "anchor",
                     class_tolerance=0.05)
    assert not second.accepted and second.validation["reference_class_accuracy"] == [0.80, 0.60]
    assert verdict(classes(0.74, 0.60), classes(0.77, 0.60), first.validation, CLASSES, 1.0, "parent",
                   class_tolerance=0.05).accepted  # against the parent (0.77) it is a 3-point drop


def test_judge_candidate_reports_the_class_accuracy_of_an_independent_forward() -> None:
    """Per-class figures are those of the NumPy twin on real images; a class the holdout lacks is None."""
    data = load_fashion_mnist()
    keep = data["test"].y[:600] != 4  # no coat in this holdout
    x, y = data["test"].x[:600][keep], data["test"].y[:600][keep]
    holdout = decode_holdout(encode_holdout(x, y))
    spec = mlp(hidden=(32,))
    params = fitted_mlp(spec, data["train"].x[:3000], data["train"].y[:3000])
    right = numpy_mlp(spec, params, holdout.inputs).argmax(1) == y
    expected = [None if c == 4 else float(np.mean(right[y == c])) for c in range(10)]
    leader = LeaderAnswers(Engine(spec, 1, buckets=[64]))
    got = judge_candidate(leader, params, holdout, {"accuracy": 0.0, "loss": 1.0}, None, 1.0, "parent",
                          class_tolerance=0.0).validation["class_accuracy"]
    assert got[4] is None and got == pytest.approx(expected)
    assert len({round(a, 3) for a in got if a is not None}) > 3  # the classes differ: not one figure repeated


def test_raw_pixel_holdouts_stay_bytes_and_read_as_float() -> None:
    """A holdout of uint8 pixels is stored as bytes (the shipped one: 1,000 images in 0.8 MB) and read as float32."""
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    data = encode_holdout(x, np.arange(5))
    assert len(data) < x.size * 2
    h = decode_holdout(data)
    assert h.inputs.dtype == np.float32 and np.array_equal(h.inputs, x.astype(np.float32))


def test_a_class_with_few_examples_is_not_judged_alone_and_an_exact_tolerance_passes() -> None:
    """One image of ten is ten points: a per-class tolerance of five would refuse every step; and a drop of exactly
    the tolerance, in whole examples, passes whatever the float rounding."""
    small = decode_holdout(encode_holdout(np.zeros((110, 1, 28, 28), np.float32), np.array([0] * 100 + [1] * 10)))
    ref = classes(0.70, 0.70)
    assert verdict(classes(0.70, 0.60), ref, None, small, 1.0, "parent", class_tolerance=0.05).accepted  # 10 < 40
    assert not verdict(classes(0.60, 0.70), ref, None, small, 1.0, "parent", class_tolerance=0.05).accepted
    assert verdict(classes(0.65, 0.70), ref, None, small, 1.0, "parent", class_tolerance=0.05).accepted  # exactly 5
    big = decode_holdout(encode_holdout(np.zeros((1000, 1, 28, 28), np.float32), np.arange(1000) % 10))
    assert verdict({"accuracy": 895 / 1000, "loss": 1.0}, {"accuracy": 900 / 1000, "loss": 1.0}, None, big, 0.005,
                   "parent").accepted  # 5 fewer right of 1,000 at a tolerance of 0.005


def drift_check(per_class_right: list[tuple[int, int]], z: float = 3.0) -> TrafficCheck:
    """Recent traffic whose class c has n inputs of which the anchor got ``right`` (in that order per class)."""
    labels = np.concatenate([np.full(n, c) for c, (_, n) in enumerate(per_class_right)])
    correct = np.concatenate([np.arange(n) < right for right, n in per_class_right])
    return TrafficCheck(np.zeros((len(labels), 1, 28, 28), np.float32), labels, correct, 0, 0.0, z)


def test_a_class_whose_traffic_the_anchor_now_gets_wrong_has_drifted_from_its_holdout() -> None:
    """Two-proportion z-test of the anchor's accuracy, holdout (50 a class) against recent traffic."""
    anchor, counts = [0.80, 0.80, 0.80, None], [50, 50, 50, 0]
    check = drift_check([(16, 40), (31, 40), (5, 10), (0, 40)])  # 40% | 78% | too few | no holdout examples
    assert drifted_classes(check, anchor, counts) == [0]
    assert drifted_classes(drift_check([(16, 40), (31, 40)], z=0.0), anchor, counts) == []  # 0: never
    assert drifted_classes(drift_check([(28, 40), (31, 40)], z=3.0), anchor, counts) == []  # 70%: within noise


def test_a_small_drift_of_every_class_is_seen_together_before_any_one_class_shows_it() -> None:
    """Ten classes, each answered 10 points worse on traffic than on the holdout: no class alone passes z = 3
    (50 holdout examples, 50 inputs), all of them together do, and then every class with traffic leaves."""
    anchor, counts = [0.80] * 10 + [0.80], [50] * 10 + [50]
    drifted = drift_check([(35, 50)] * 10 + [(2, 5)])  # 70% each; class 10: too few inputs to be judged
    assert drifted_classes(drift_check([(35, 50)] + [(40, 50)] * 9), anchor, counts) == []  # one class alone
    assert drifted_classes(drifted, anchor, counts) == list(range(10))
    assert drifted_classes(drift_check([(40, 50)] * 10), anchor, counts) == []  # as the holdout predicts


def test_when_most_classes_have_drifted_the_rest_leave_with_them() -> None:
    """Six of nine classes with traffic answered far worse than on the holdout, three as before (a class the
    anchor still gets right because it now answers it for most inputs): all nine leave; class 9, which the
    traffic does not show, keeps its check. Five of ten drifted is not most: the others stay."""
    anchor, counts = [0.80] * 10, [100] * 10
    per_class = [(10, 50)] * 6 + [(40, 50)] * 3 + [(0, 0)]
    assert drifted_classes(drift_check(per_class), anchor, counts) == list(range(9))
    assert drifted_classes(drift_check([(10, 50)] * 5 + [(40, 50)] * 5), anchor, counts) == [0, 1, 2, 3, 4]


def test_a_parent_that_fails_the_check_it_sets_may_still_move_but_not_down() -> None:
    """Judged while class 0 still counted, the parent traded classes 1-3 (3 points each) for class 0; once
    class 0 has drifted, the parent itself is below the anchor on 1-3. The guard would refuse every candidate
    near it and freeze the model there; instead it asks a candidate to lose nothing more than the parent."""
    ref = classes(0.80, 0.80, 0.80, 0.80)
    anchor = verdict(ref, ref, None, CLASSES, 0.01, "anchor", class_tolerance=0.05).validation
    parent = classes(0.92, 0.77, 0.77, 0.77)
    drifted = lambda a, n: [0]  # noqa: E731
    same = verdict(parent, parent, anchor, CLASSES, 0.01, "anchor", 0.05, drifted)
    assert same.accepted and same.validation["judged_reference_accuracy"] == pytest.approx(0.77)
    assert same.validation["judged_tolerance"] == 0.0
    one_less = classes(0.92, 0.77 - 1 / 50, 0.77, 0.77)  # one example of 150 fewer right
    assert not verdict(one_less, parent, anchor, CLASSES, 0.01, "anchor", 0.05, drifted).accepted
    within = classes(0.92, 0.79, 0.79, 0.79)  # a parent within the tolerance keeps the anchor's reference
    assert verdict(within, within, anchor, CLASSES, 0.01, "anchor", 0.05, drifted
                   ).validation["judged_reference_accuracy"] == pytest.approx(0.80)


def test_lies_aimed_at_one_class_do_not_make_the_others_leave_together() -> None:
    """A class-wide flip 0 -> 6: class 0's images arrive labelled 6, so class 6's traffic looks drifted (the
    anchor says 0) and class 0 shows no traffic; the other classes, as the holdout predicts, keep their checks
    and so does class 0, the one the lies would hurt."""
    anchor, counts = [0.80] * 10, [100] * 10
    per_class = [(0, 0)] + [(40, 50)] * 5 + [(40, 100)] + [(40, 50)] * 3  # class 6: 50 true 6s and 50 lies
    assert drifted_classes(drift_check(per_class), anchor, counts) == [6]


def test_a_holdout_all_right_does_not_make_one_wrong_answer_a_drift() -> None:
    """Three classes the anchor gets all right on the holdout, and one wrong answer of 150 on traffic: no drift
    (the variance is taken at the rate pooled over both samples, not at the holdout's 100%)."""
    anchor, counts = [1.0, 1.0, 1.0], [100, 100, 100]
    assert drifted_classes(drift_check([(49, 50), (50, 50), (50, 50)]), anchor, counts) == []


def test_a_traffic_mix_unlike_the_holdouts_is_not_taken_for_drift() -> None:
    """Traffic that is mostly a hard class (60% right on the holdout) answered at that class's own rate: the
    pooled accuracy is far below the holdout's, but each class is where its holdout says it should be."""
    anchor, counts = [0.95, 0.60, 0.95], [100, 100, 100]
    assert drifted_classes(drift_check([(19, 20), (240, 400), (19, 20)]), anchor, counts) == []


def test_drifted_classes_leave_the_holdout_checks_and_the_rest_still_judge() -> None:
    """Class 0 drifted: its 20-point fall on the holdout no longer refuses; class 1's does, and the aggregate
    is taken over the classes left (a fall there still refuses)."""
    ref = classes(0.80, 0.80, 0.80, 0.80)
    anchor = verdict(ref, ref, None, CLASSES, 0.01, "anchor", class_tolerance=0.05).validation
    drifted = lambda a, n: [0]  # noqa: E731 (what drifted_classes would say of class 0)
    moved = verdict(classes(0.60, 0.80, 0.80, 0.80), ref, anchor, CLASSES, 0.01, "anchor", 0.05, drifted)
    assert moved.accepted and moved.validation["drifted_classes"] == [0]
    assert moved.validation["judged_accuracy"] == pytest.approx(0.80)
    assert not verdict(classes(0.60, 0.80, 0.80, 0.80), ref, anchor, CLASSES, 0.01, "anchor", 0.05).accepted
    other = verdict(classes(0.60, 0.70, 0.80, 0.80), ref, anchor, CLASSES, 0.01, "anchor", 0.05, drifted)
    assert not other.accepted and other.validation["worst_class"] == 1
    aggregate = verdict(classes(0.60, 0.78, 0.78, 0.78), ref, anchor, CLASSES, 0.01, "anchor", 0.05, drifted)
    assert not aggregate.accepted and "left out as drifted" in aggregate.reason  # 0.78 < 0.80 - 0.0133
    # the aggregate's slack is two of the examples left: 2/150 here, above the 1% tolerance
    assert aggregate.validation["judged_tolerance"] == pytest.approx(2 / 150)
    assert verdict(classes(0.60, 0.79, 0.79, 0.79), ref, anchor, CLASSES, 0.01, "anchor", 0.05, drifted).accepted


def test_the_traffic_check_judges_kept_inputs_the_head_never_learns_from():
    """split_replay: disjoint sides whose union is every entry, in order; each entry's side is fixed by its record
    id alone (the same in every update, whatever else is kept, whatever its stream entry id or label); the judged
    share follows the setting within every class, so the check sees the traffic's class mix."""
    rng = np.random.default_rng(0)
    entries = [ReplayEntry(f"{i}-0", f"rec{i}", b"", int(rng.integers(10))) for i in range(4000)]
    learn, judged = split_replay(entries, 0.5)
    assert {e.record_id for e in learn}.isdisjoint(e.record_id for e in judged)
    assert sorted(learn + judged, key=entries.index) == entries
    assert learn == [e for e in entries if e in learn] and judged == [e for e in entries if e in judged]
    later_learn, later_judged = split_replay(entries[1000:3000], 0.5)  # older ones gone, the rest stay put
    assert set(later_judged) == set(judged) & set(entries[1000:3000])
    moved = [ReplayEntry(f"9{i}-1", e.record_id, b"x", (e.label + 1) % 10) for i, e in enumerate(entries[:400])]
    assert [judged_only(e.record_id, 0.5) for e in moved] == [e in judged for e in entries[:400]]
    for share in (0.5, 0.2):
        side = split_replay(entries, share)[1]
        for c in range(10):
            of_class = sum(e.label == c for e in entries)
            assert abs(sum(e.label == c for e in side) / of_class - share) < 0.09, (share, c)
