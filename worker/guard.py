"""The validation guard: a candidate version must hold its accuracy on a holdout set before it serves.

Forward-only learning from traffic can drift: poisoned labels, a burst of one class, a step too large.
With a holdout set (one uploaded through `PUT /admin/holdout`, else an operator's file, `holdout_path`, else
the one the model came with: the shipped model's, or the one `mpserve train` wrote), every candidate is
evaluated with its unperturbed weights before publishing and refused when its accuracy falls more than
`guard_tolerance` below the reference, or when any one class's holdout accuracy falls more than
`guard_class_tolerance` below that class's reference (a class-wide label flip trades one class's errors
for another's gains and barely moves the aggregate: the poison bench saw class 0 fall 79% -> 49% behind an
aggregate-only guard). The reference is, by default, the *anchor*: the figures of the first version that
was checked on this holdout, carried from manifest to manifest, so many small drops cannot add up to a large one;
`guard_reference=parent` compares with the serving version instead (drift may accumulate).
The shipped model comes with a holdout set (docs/DESIGN.md §3), so the guard is on by default.
With the recent-traffic check, a class whose traffic has drifted away from its holdout examples (`drifted_classes`)
leaves the holdout checks: the holdout keeps judging only the classes it still speaks for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from common.loading import LoadedVersion, load_version
from marketplace.engine import Engine
from marketplace.leader import LeaderAnswers
from marketplace.models import ModelSpec
from marketplace.reconcile import cross_entropy
from model_store import Holdout, ModelStore, ModelStoreError, VersionNotFound, read_holdout_file
from redis_io.protocol import ReplayEntry
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    validation: dict[str, Any]  # the manifest's "validation" block (or the refusal's figures)

    @property
    def no_gain(self) -> bool:
        """Refused by the recent-traffic check for gaining nothing there, though within its accuracy tolerance."""
        t = self.validation.get("traffic") or {}
        return t.get("accepted") is False and "gain_needed" in t \
            and t["accuracy"] >= t["anchor_accuracy"] - t["tolerance"] - _SLACK

    @property
    def reason(self) -> str:
        v = self.validation
        own, ref = v.get("judged_accuracy", v["accuracy"]), v.get("judged_reference_accuracy", v["reference_accuracy"])
        tol = v.get("judged_tolerance", v["tolerance"])
        if own is not None and ref is not None and own < ref - tol - _SLACK:
            drifted = f", classes {v['drifted_classes']} left out as drifted" if v.get("drifted_classes") else ""
            return (f"holdout accuracy {own:.4f} is more than {tol:.4f} below the reference "
                    f"{ref:.4f} ({v['reference']}{drifted})")
        traffic = v.get("traffic")
        if traffic and traffic.get("accepted") is False:
            if not self.no_gain:
                return (f"accuracy {traffic['accuracy']:.4f} on {traffic['size']} recent labelled inputs is more "
                        f"than {traffic['tolerance']:.4f} below the anchor's {traffic['anchor_accuracy']:.4f} on the "
                        f"same inputs (version {traffic['anchor_version']}, the model kept frozen)")
            z = "not finite" if traffic.get("gain_z") is None else f"{traffic['gain_z']:.2f}"
            return (f"no gain on {traffic['size']} recent labelled inputs: its loss there does not "
                    f"fall below the serving version's by {traffic['gain_needed']:g} standard errors (z = {z}); "
                    f"a step must pay for itself")
        c = v["worst_class"]
        return (f"class {c}'s holdout accuracy {v['class_accuracy'][c]:.4f} is more than "
                f"{v['class_tolerance']:.4f} below its reference {v['reference_class_accuracy'][c]:.4f} "
                f"({v['reference']})")


@dataclass(frozen=True)
class TrafficCheck:
    """Recent labelled traffic and whether the anchor (the model as it was, kept frozen) got each input right.

    The holdout set is fixed; what users are served is not. Under drift or a new class a candidate can hold its
    holdout figures and still serve today's traffic worse than the frozen model would, which is the very
    comparison the product's rule is stated in. So a candidate also answers the last labelled inputs the API
    kept (redis_io: the replay stream) and must be right on at least as many of them, less ``tolerance``, as
    the anchor version, evaluated on the same inputs.
    """

    inputs: np.ndarray
    labels: np.ndarray
    anchor_correct: np.ndarray
    anchor_version: int
    tolerance: float
    drift_z: float = 0.0  # > 0: a class whose traffic the anchor answers this many standard errors worse than its
    # holdout examples has drifted away from them, and the holdout no longer judges it (`drifted_classes`)
    parent_loss: np.ndarray | None = None  # the serving version's loss on each input: what a step must beat
    gain_z: float = 0.0  # > 0: the candidate's loss must fall below parent_loss by this many standard errors
    ids: tuple[str, ...] | None = None  # each input's name (`input_name`), for `LeaderAnswers`' cache

    def __post_init__(self) -> None:
        if self.gain_z > 0 and self.parent_loss is None:
            raise ValueError("a gain asked for (gain_z > 0) needs the serving version's loss on each input")


#: a class needs this many recent labelled inputs before its drift is judged
DRIFT_MIN_INPUTS = 20


def drifted_classes(check: TrafficCheck, anchor_class_accuracy: list[float | None], holdout_counts: list[int]
                    ) -> list[int]:
    """The classes whose recent traffic has moved away from their holdout examples.

    The anchor (the model as it was, kept frozen) answers both: where it is right on a class's holdout examples
    markedly more often than on that class's recent traffic (a two-proportion z-test, z ≥ ``drift_z``), the
    holdout shows a world users no longer send (a rotation growing over every class, a new look of one class),
    and judging candidates on it would only hold the model back there; the recent-traffic check, on what users
    do send, still judges them. A class the traffic does not show, or shows as the holdout does, keeps its check.

    A drift of every class shows long before any one class's test can see it (the holdout has about a hundred
    examples a class): so the classes left are also tested together (`_drifted_together`), and when the anchor
    answers their traffic markedly worse than their holdout examples predict, they all leave. Label lies aimed
    at one class make that class's traffic look drifted, not the others': the victim class, whose true images
    arrive under another label, shows no traffic of its own and keeps its holdout check either way.
    When most of the classes the traffic shows have drifted, the world has moved, and the few left (a class
    the anchor still gets right because it now answers that class for most inputs) leave with them.
    """
    if check.drift_z <= 0:
        return []
    out, rest = [], []
    for c, (held, n_h) in enumerate(zip(anchor_class_accuracy, holdout_counts, strict=False)):
        mask = check.labels == c
        n_t = int(mask.sum())
        if held is None or n_h == 0 or n_t < DRIFT_MIN_INPUTS:
            continue
        right = int(check.anchor_correct[mask].sum())
        now = right / n_t
        pooled = (held * n_h + now * n_t) / (n_h + n_t)
        se = np.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_h + 1 / n_t))
        if (held - now) / se >= check.drift_z:
            out.append(c)
        else:
            rest.append((c, held, n_h, n_t, right))
    if len(rest) > 1 and _drifted_together(rest) >= check.drift_z:
        out.extend(c for c, *_ in rest)
    if 2 * len(out) > len(out) + len(rest):  # most classes moved: the world has, the rest's holdout is stale too
        out.extend(c for c, *_ in rest)
    return sorted(set(out))


def _drifted_together(classes: list[tuple[int, float, int, int, int]]) -> float:
    """z of the anchor's right answers on these classes' traffic below what their holdout accuracies predict.

    Each entry is (class, holdout accuracy, holdout examples, traffic inputs, right on traffic). The expectation
    weighs each class's holdout accuracy by its share of the traffic, so a traffic mix unlike the holdout's
    (more of a hard class) is not mistaken for drift; its variance counts both the traffic's draws and the
    holdout's own sampling error, each class's at its rate pooled over both samples (as the per-class test's):
    a holdout a class gets all right would otherwise claim no variance, and one wrong answer an infinite z.
    """
    expected = sum(n_t * held for _, held, _, n_t, _ in classes)
    right = sum(r for *_, r in classes)
    var = 0.0
    for _, held, n_h, n_t, r in classes:
        pooled = (held * n_h + r) / (n_h + n_t)
        var += n_t * pooled * (1 - pooled) * (1 + n_t / n_h)
    return (expected - right) / np.sqrt(max(var, 1e-12))


def answers(leader: LeaderAnswers, params: dict[str, np.ndarray], inputs: np.ndarray, labels: np.ndarray,
            ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whether the unperturbed weights answer each input right, and each input's cross-entropy (a non-finite
    logit row counts as wrong, at an infinite loss); ``ids`` name the inputs, for `LeaderAnswers`' cache."""
    logits = leader.logits(params, inputs, ids)
    finite = np.isfinite(logits).all(axis=1)
    loss = np.full(len(labels), np.inf)
    if finite.any():
        loss[finite] = cross_entropy(logits[finite], labels[finite])
    return (logits.argmax(1) == labels) & finite, loss


def correct_answers(leader: LeaderAnswers, params: dict[str, np.ndarray], inputs: np.ndarray, labels: np.ndarray,
                    ids: Sequence[str] | None = None) -> np.ndarray:
    """Whether the unperturbed weights answer each input right (a non-finite logit row counts as wrong)."""
    return answers(leader, params, inputs, labels, ids)[0]


#: the gain test needs at least this many judged inputs (fewer: no step can show a gain)
GAIN_MIN_INPUTS = 30


def gain_z(loss: np.ndarray, parent_loss: np.ndarray) -> float:
    """How many standard errors the candidate's mean loss lies below the parent's on the same inputs (paired).

    Each input's own difficulty cancels in the difference, so a few hundred inputs can tell a step that helps
    from one that only moves: on traffic the model already serves well most steps are noise, and accepting every
    one that stays within a tolerance lets them add up to a random walk down to its edge. -inf: a non-finite loss.
    """
    judged = np.isfinite(parent_loss)  # an input the serving version already overflows on tells nothing
    if not np.isfinite(loss[judged]).all():  # the candidate overflows where the serving version did not
        return -np.inf
    d = parent_loss[judged] - loss[judged]
    if len(d) < GAIN_MIN_INPUTS:
        return -np.inf
    mean, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0
    if sd == 0.0:
        return np.inf if mean > 0 else 0.0 if mean == 0 else -np.inf
    return mean / (sd / np.sqrt(len(d)))


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None  # manifests are strict JSON


def traffic_figures(correct: np.ndarray, check: TrafficCheck, loss: np.ndarray | None = None) -> dict[str, Any]:
    """The manifest's ``validation.traffic`` block: the candidate against the anchor on the same recent inputs,
    and, with ``check.gain_z``, its loss against the serving version's there (it must pay for itself)."""
    accuracy, anchor = float(np.mean(correct)), float(np.mean(check.anchor_correct))
    figures: dict[str, Any] = {"size": len(correct), "accuracy": accuracy, "anchor_accuracy": anchor,
                               "anchor_version": check.anchor_version, "tolerance": check.tolerance}
    accepted = accuracy >= anchor - check.tolerance - _SLACK
    if check.gain_z > 0 and check.parent_loss is not None and loss is not None:
        z = gain_z(loss, check.parent_loss)
        figures.update(loss=_finite_or_none(np.mean(loss)), parent_loss=_finite_or_none(np.mean(check.parent_loss)),
                       gain_z=_finite_or_none(z), gain_needed=check.gain_z)
        accepted = bool(accepted and z >= check.gain_z)  # a numpy bool is not JSON
    return {**figures, "accepted": accepted}


def class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy per class (None for a class the holdout has no example of)."""
    return [float(np.mean(correct[labels == c])) if (labels == c).any() else None for c in range(num_classes)]


def holdout_figures(leader: LeaderAnswers, params: dict[str, np.ndarray], holdout: Holdout) -> dict[str, Any]:
    """Accuracy (overall and per class) and mean cross-entropy of the unperturbed weights on the holdout.

    An example with a non-finite logit counts as wrong (argmax of NaN would pick class 0), and the loss
    is then None: the figures go into manifests and the history, which are strict JSON.
    """
    logits = leader.logits(params, holdout.inputs, holdout.example_ids())
    finite = np.isfinite(logits).all(axis=1)
    correct = (logits.argmax(1) == holdout.labels) & finite  # as correct_answers, with the logits kept for the loss
    loss = float(np.mean(cross_entropy(logits, holdout.labels))) if finite.all() else None
    return {"accuracy": float(np.mean(correct)), "loss": loss if loss is not None and np.isfinite(loss) else None,
            "class_accuracy": class_accuracy(correct, holdout.labels, logits.shape[1])}


#: accuracies compare with this slack, so a drop of exactly the tolerance (in whole examples) is not refused
#: by a float's last bit
_SLACK = 1e-9


def _worst_class(own: list[float | None], ref: list[float | None], counts: list[int], least: int) -> int | None:
    """The class that lost most against its reference, among those with ``least`` examples or more (None: none).

    A class with few examples is skipped: one image of twenty is already five points, so a per-class
    tolerance there would refuse nearly every candidate.
    """
    drops = [(r - o, c) for c, (o, r, n) in enumerate(zip(own, ref, counts, strict=False))
             if o is not None and r is not None and n >= least]
    return max(drops)[1] if drops else None


def verdict(own: dict[str, Any], before: dict[str, Any], parent_validation: dict[str, Any] | None,
            holdout: Holdout, tolerance: float, reference: Literal["anchor", "parent"],
            class_tolerance: float = 1.0, drifted: Callable[[list[float | None], list[int]], list[int]] | None = None
            ) -> Verdict:
    """Accept or refuse a candidate from its holdout figures and its parent's (pure: no I/O, no state).

    ``parent_validation`` is the parent's recorded "validation" block (its manifest's); the anchor it carries
    counts only when it was measured on this very holdout (same sha256), else the parent becomes the anchor.
    Per-class figures (``class_accuracy``) are judged only where both sides have them and the holdout has at
    least 2/``class_tolerance`` examples of the class (40 at 0.05); an anchor recorded
    before per-class figures existed takes the parent's per-class figures as its own.
    ``drifted``: given the anchor's per-class figures and the holdout's class counts, the classes whose traffic
    has drifted away from the holdout (`drifted_classes`): they leave both the per-class and the aggregate check.
    """
    carried = parent_validation if parent_validation and parent_validation.get("holdout_sha256") == holdout.sha256 \
        else {}  # an anchor measured on another holdout does not count
    anchor = float(carried.get("anchor_accuracy", before["accuracy"]))
    before_classes = before.get("class_accuracy") or []
    anchor_classes = carried.get("anchor_class_accuracy") or before_classes
    ref = anchor if reference == "anchor" else before["accuracy"]
    ref_classes = anchor_classes if reference == "anchor" else before_classes
    own_classes = own.get("class_accuracy") or []
    counts = np.bincount(holdout.labels, minlength=len(own_classes)).tolist()
    stale = sorted(drifted(anchor_classes, counts)) if drifted is not None and own_classes else []
    judged = [0 if c in stale else n for c, n in enumerate(counts)]  # a drifted class's examples do not count
    least = int(np.ceil(2 / class_tolerance)) if class_tolerance > 0 else 1  # two examples within the tolerance
    worst = _worst_class(own_classes, ref_classes, judged, least)
    class_ok = worst is None or own_classes[worst] >= ref_classes[worst] - class_tolerance - _SLACK
    own_acc, ref_acc, judged_tolerance = own["accuracy"], ref, tolerance
    if stale:  # the aggregate over the classes the holdout still speaks for, with at least two examples of slack
        own_acc, ref_acc = _weighted(own_classes, judged), _weighted(ref_classes, judged)
        judged_tolerance = max(tolerance, 2 / max(sum(judged), 1))
        parent_acc = _weighted(before_classes, judged)
        if None not in (parent_acc, ref_acc) and parent_acc < ref_acc - judged_tolerance - _SLACK:
            # the parent itself fails this check (it was judged while a class now drifted still counted, and
            # traded that class's examples for these): no step near it could pass, so the model would freeze
            # where it is. It may move if it loses nothing more than the parent on these classes.
            ref_acc, judged_tolerance = parent_acc, 0.0
    accepted = (own_acc is None or ref_acc is None or own_acc >= ref_acc - judged_tolerance - _SLACK) and class_ok
    return Verdict(accepted, {
        "holdout_sha256": holdout.sha256, "size": len(holdout), "accuracy": own["accuracy"],
        "loss": own["loss"], "parent_accuracy": before["accuracy"], "anchor_accuracy": anchor,
        "reference": reference, "reference_accuracy": ref, "tolerance": tolerance,
        "class_accuracy": own_classes, "parent_class_accuracy": before_classes,
        "anchor_class_accuracy": anchor_classes, "reference_class_accuracy": ref_classes,
        "class_tolerance": class_tolerance, "worst_class": worst, "drifted_classes": stale,
        "judged_accuracy": own_acc, "judged_reference_accuracy": ref_acc, "judged_tolerance": judged_tolerance,
        "accepted": accepted})


def _weighted(per_class: list[float | None], counts: list[int]) -> float | None:
    """Accuracy over the examples of the counted classes (None: no class left to judge)."""
    pairs = [(a, n) for a, n in zip(per_class, counts, strict=False) if a is not None and n]
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total if total else None


def judge_candidate(leader: LeaderAnswers, candidate: dict[str, np.ndarray], holdout: Holdout, before: dict[str, Any],
                    parent_validation: dict[str, Any] | None, tolerance: float,
                    reference: Literal["anchor", "parent"], class_tolerance: float = 1.0,
                    traffic: TrafficCheck | None = None) -> Verdict:
    """Evaluate a candidate's unperturbed weights on the holdout (and recent traffic) and judge it.

    The one guard decision: the worker calls it before publishing, and bench/continual.py in its loop, so
    the experiments measure what the server does. ``before`` is the parent's holdout figures.
    """
    drifted = None if traffic is None else lambda anchor, counts: drifted_classes(traffic, anchor, counts)
    held = verdict(holdout_figures(leader, candidate, holdout), before, parent_validation, holdout, tolerance,
                   reference, class_tolerance, drifted)
    if traffic is None:
        return held
    correct, loss = answers(leader, candidate, traffic.inputs, traffic.labels, traffic.ids)
    figures = traffic_figures(correct, traffic, loss)
    accepted = held.accepted and figures["accepted"]
    return Verdict(accepted, {**held.validation, "traffic": figures, "accepted": accepted})


def traffic_anchor(parent_version: int, parent_validation: dict[str, Any] | None) -> int:
    """The version recent traffic is judged against: the one carried from manifest to manifest, else the parent.

    Like the holdout's anchor, it is the first version judged, so many small losses cannot add up.
    """
    carried = (parent_validation or {}).get("traffic") or {}
    return int(carried.get("anchor_version", parent_version))


def input_name(entry: ReplayEntry) -> str:
    """A kept input's name for caches of figures measured on it: its stream entry id and its record id (an entry id
    alone could come back for another input if Redis lost the stream and it was written again)."""
    return f"{entry.entry_id}/{entry.record_id}"


def replay_arrays(recent: list[ReplayEntry], spec: ModelSpec) -> tuple[list[ReplayEntry], np.ndarray, np.ndarray]:
    """The replay entries that fit the model (input size, label range, finite), with their inputs and labels."""
    size = int(np.prod(spec.input_shape))
    fit = [e for e in recent if len(e.inputs) == 4 * size and e.label < spec.num_classes]
    if not fit:
        return [], np.zeros((0, *spec.input_shape), np.float32), np.zeros(0, np.int64)
    inputs = np.stack([np.frombuffer(e.inputs, "<f4").reshape(spec.input_shape) for e in fit])
    finite = np.isfinite(inputs).reshape(len(fit), -1).all(axis=1)
    fit, inputs = [e for e, ok in zip(fit, finite, strict=True) if ok], inputs[finite]
    return fit, inputs, np.array([e.label for e in fit], np.int64)


def judged_only(key: str, share: float) -> bool:
    """Whether the kept input named ``key`` (its record id) is one the head never learns from, kept for the
    recent-traffic check: a stable hash, so an input stays on its side across updates.

    A step must be judged on inputs it did not learn from. Judged on the very inputs the head's replay gradient
    fits, every candidate looks at least as good as the frozen model there, and the check refuses nothing.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"mpserve-judge").digest()
    return int.from_bytes(digest, "big") < share * 2.0 ** 64


def split_replay(recent: list[ReplayEntry], share: float) -> tuple[list[ReplayEntry], list[ReplayEntry]]:
    """(the entries the head learns from, the entries the recent-traffic check judges on), disjoint."""
    judged = [judged_only(e.record_id, share) for e in recent]
    return ([e for e, j in zip(recent, judged, strict=True) if not j],
            [e for e, j in zip(recent, judged, strict=True) if j])


class ValidationGuard:
    """Judges candidates of one model on its current holdout set; caches what is immutable."""

    def __init__(self, settings: WorkerSettings, store: ModelStore, model: str) -> None:
        self.settings, self.store, self.model = settings, store, model
        self._leaders: dict[str, LeaderAnswers] = {}
        self._holdout_key: tuple[Any, ...] | None = None
        self._holdout: Holdout | None = None
        self._parents: dict[tuple[int, str], dict[str, Any]] = {}
        self._anchor: tuple[int, dict[str, np.ndarray]] | None = None  # the traffic anchor's weights
        self._anchor_correct: dict[tuple[int, str], bool] = {}  # (anchor version, replay entry id) -> right?

    def holdout(self) -> Holdout | None:
        """The uploaded holdout, else the configured file, else the one the model came with, else None.

        Reread only when the file changes.
        """
        uploaded = self.store.holdout_path(self.model)
        default = self.store.holdout_path(self.model, "default")
        path = uploaded if uploaded.exists() else self.settings.holdout_path or (default if default.exists() else None)
        if path is None:
            self._holdout_key, self._holdout = None, None
            return None
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)  # an upload is a new inode
        if key != self._holdout_key:
            kind = "uploaded" if path == uploaded else "default" if path == default else None
            holdout = self.store.read_holdout(self.model, kind) if kind else read_holdout_file(path)
            self._holdout_key, self._holdout = key, holdout
            log.info("%s: holdout set %s: %d examples (sha256 %s)", self.model, path,
                     len(holdout) if holdout else 0, holdout.sha256[:12] if holdout else "-")
        return self._holdout

    def judge(self, parent: LoadedVersion, candidate: dict[str, np.ndarray],
              recent: list[ReplayEntry] | None = None) -> Verdict | None:
        """None without a holdout set; else whether ``candidate`` may replace ``parent``, with its figures.

        ``recent``: the replay stream's labelled inputs to judge on (newest first; with the replay head, the side
        of `split_replay` it did not learn from); with ``guard_traffic`` and enough of them, the candidate must
        also serve them at least as well as the anchor version (`TrafficCheck`).
        """
        try:
            holdout = self.holdout()
        except (OSError, ModelStoreError, ValueError) as exc:
            log.error("%s: the holdout set cannot be read (%s); candidates are not validated", self.model, exc)
            return None
        if holdout is None:
            return None
        spec = parent.spec
        if holdout.inputs.shape[1:] != tuple(spec.input_shape) or holdout.labels.max() >= spec.num_classes \
                or holdout.labels.min() < 0 or not np.isfinite(holdout.inputs).all():
            log.error("%s: the holdout set does not fit the model (inputs %s, labels %d..%d, finite: %s); "
                      "not validating", self.model, holdout.inputs.shape[1:], int(holdout.labels.min()),
                      int(holdout.labels.max()), bool(np.isfinite(holdout.inputs).all()))
            return None
        leader = self.leader(spec)
        traffic = self._traffic_check(parent, recent or [], leader) if self.settings.guard_traffic else None
        judged = judge_candidate(leader, candidate, holdout, self._parent_figures(parent, holdout, leader),
                                 parent.manifest.get("validation"), self.settings.guard_tolerance,
                                 self.settings.guard_reference, self.settings.guard_class_tolerance, traffic)
        if self.settings.guard_traffic and traffic is None:  # too little traffic yet: the anchor still carries on
            anchor = traffic_anchor(parent.version, parent.manifest.get("validation"))
            judged.validation["traffic"] = {"anchor_version": anchor}
        return judged

    def _traffic_check(self, parent: LoadedVersion, recent: list[ReplayEntry], leader: LeaderAnswers
                       ) -> TrafficCheck | None:
        """Recent labelled inputs that fit the model, with the anchor's answers (cached per entry); None: too few."""
        fit, inputs, labels = replay_arrays(recent, parent.spec)
        if len(fit) < self.settings.guard_traffic_min:
            return None
        version, anchor = self._anchor_params(parent)
        names = [input_name(e) for e in fit]
        missing = [i for i, k in enumerate(names) if (version, k) not in self._anchor_correct]
        if missing:
            right = correct_answers(leader, anchor, inputs[missing], labels[missing], [names[i] for i in missing])
            self._anchor_correct.update({(version, names[i]): bool(r) for i, r in zip(missing, right,
                                                                                           strict=True)})
        keep = {(version, k) for k in names}  # what the stream still holds: the cache stays that size
        self._anchor_correct = {k: v for k, v in self._anchor_correct.items() if k in keep}
        anchor_correct = np.array([self._anchor_correct[(version, k)] for k in names])
        ids, gain = tuple(names), self.settings.guard_traffic_gain_z
        parent_loss = answers(leader, parent.params, inputs, labels, ids)[1] if gain > 0 else None
        return TrafficCheck(inputs, labels, anchor_correct, version, self.settings.guard_traffic_tolerance,
                            self.settings.guard_drift_z, parent_loss, gain, ids)

    def _anchor_params(self, parent: LoadedVersion) -> tuple[int, dict[str, np.ndarray]]:
        """The traffic anchor's version and weights; the parent becomes the anchor when the carried one is gone."""
        version = traffic_anchor(parent.version, parent.manifest.get("validation"))
        if version == parent.version:
            return version, parent.params
        if self._anchor is None or self._anchor[0] != version:
            try:
                anchor = load_version(self.store, self.model, version)
            except VersionNotFound:
                log.warning("%s: the traffic anchor, version %d, is gone; version %d becomes the anchor",
                            self.model, version, parent.version)
                return parent.version, parent.params
            if anchor.spec.architecture != parent.spec.architecture:
                log.warning("%s: the traffic anchor, version %d, has another architecture; version %d becomes the "
                            "anchor", self.model, version, parent.version)
                return parent.version, parent.params
            self._anchor = (version, anchor.params)
        return self._anchor

    def _parent_figures(self, parent: LoadedVersion, holdout: Holdout, leader: LeaderAnswers) -> dict[str, Any]:
        recorded = parent.manifest.get("validation") or {}
        if recorded.get("holdout_sha256") == holdout.sha256 and "accuracy" in recorded \
                and recorded.get("class_accuracy"):
            return {"accuracy": float(recorded["accuracy"]), "loss": recorded.get("loss"),
                    "class_accuracy": recorded["class_accuracy"]}
        key = (parent.version, holdout.sha256)
        if key not in self._parents:
            self._parents = {key: holdout_figures(leader, parent.params, holdout)}  # one parent at a time
        return self._parents[key]

    def leader(self, spec: ModelSpec) -> LeaderAnswers:
        """The unperturbed answers of this architecture, with the features of inputs seen before cached (the
        reconciler's replay head shares them)."""
        arch = json.dumps(spec.architecture, sort_keys=True)
        if arch not in self._leaders:
            self._leaders = {arch: LeaderAnswers(Engine(spec, 1, buckets=[256]))}
        return self._leaders[arch]
