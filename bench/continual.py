"""Continual learning through serving: does mpserve learn a new class (A) or a new domain (B) from its traffic?

    python -m bench.continual --protocol A --quick                        # engine mode, mlp, < 3 min
    python -m bench.continual --protocol A --steps 3000 --json docs/figures/continual_A_mlp.json \\
        --plot docs/figures/continual_A_mlp.png
    python -m bench.continual --protocol A --http --steps 20             # a stack of its own (redis, API, worker)
    python -m bench.continual --protocol A --http http://host:8000 --admin-token T --store-dir /srv/store

Protocol A (new class): the base model never saw class 9 (left out of its data and loss); every step serves
240 inputs of the known classes and 16 of class 9 from the train split, labels them, and reconciles once.
Protocol B (new domain): the base saw every class; the new data is class 3 rotated by 90°, labelled 3.
Each row of the curve: accuracy of the leader (unperturbed) weights on the test split, known and new apart,
and accuracy and loss of the served (perturbed) predictions since the previous row, known and new apart.

Two modes report the same figures:

- engine (default): in process. The Engine (V vendors) serves each step's inputs, `propose_update` turns
  the labelled records into the next weights with the very configs the worker builds (`WorkerSettings`),
  the validation guard is the worker's own `judge_candidate` (its holdout checks, and its check on recent traffic:
  one labelled input in eight is kept, the newest 512, as the API keeps them, judged against the base kept
  frozen), and every version gets fresh seeds.
- http: a client drives a stack exactly as client apps do: `/predict` without labels, `/label` a delay later,
  and reconciliation by the worker's own trigger or by `POST /admin/reconcile`. A client cannot read the
  weights, and probing them through `/predict` would itself perturb and train the model, so the validation
  figures are computed from the model store: with no URL the bench starts its own stack (`mpserve up`) on a
  store it owns, seeded with the base model; with a URL it evaluates a published version only when
  `--store-dir` gives that stack's store (else the validation columns are null).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import save_figure, write_json
from marketplace.data import Split, load_fashion_mnist
from marketplace.engine import Engine, leader_logits
from marketplace.leader import LeaderAnswers
from marketplace.models import ModelSpec, get_model
from marketplace.reconcile import Records, VersionSeeds, cross_entropy, fresh_seeds, learned_groups
from marketplace.training import TrainConfig, train
from marketplace.update import online_metrics, previous_step, propose_update
from model_store import Holdout
from model_store.holdout import decode_holdout, encode_holdout
from worker.guard import TrafficCheck, answers, correct_answers, holdout_figures, judge_candidate, judged_only
from worker.head_replay import HeadReplaySource
from worker.settings import WorkerSettings

log = logging.getLogger("bench.continual")

CURVE_KEYS = ("step", "old_val_acc", "new_val_acc", "old_online_acc", "new_online_acc", "old_loss", "new_loss",
              "online_acc", "frozen_online_acc", "frozen_loss", "frozen_val_acc")
#: the learning options a run may set; each is a WorkerSettings field, so the bench builds the worker's configs
LEARNING_KEYS = ("learning_rate", "probe_scale", "vendors", "attribution", "normalize", "class_weights", "baseline",
                 "step", "shrink", "shrink_t", "max_step", "head_gradient",
                 "head_learning_rate", "head_replay_learning_rate", "head_damping", "learn_groups", "outlier",
                 "outlier_z", "outlier_quantile",
                 "antithetic", "momentum",
                 "lr_schedule", "lr_min_ratio", "gap_scale", "guard_tolerance", "guard_class_tolerance",
                 "guard_reference", "guard_traffic", "guard_traffic_tolerance", "guard_traffic_gain_z",
                 "guard_traffic_min", "guard_traffic_share", "guard_drift_z", "reseed_on_refusal", "min_cohort")


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Protocol:
    """What is new, what the base model was trained on, and how a new input looks."""

    name: str
    new_class: int | None  # None: no new data (N, C)
    exclude_class: int | None  # left out of the base model's training (A) or not (B)
    rotate: bool  # the new inputs are rotated by 90° (B)
    drift_degrees: float = 0.0  # C: every input is rotated by an angle growing from 0 to this over the run
    title: str = ""

    def new_inputs(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3))) if self.rotate else x

    def drifted(self, x: np.ndarray, progress: float) -> np.ndarray:
        """Inputs as the world shows them at ``progress`` (0..1) of the run: unchanged but under drift (C)."""
        if not self.drift_degrees:
            return x
        return rotate_images(x, self.drift_degrees * progress)


PROTOCOLS = {"A": Protocol("A", 9, 9, False, title="new class 9"),
             "B": Protocol("B", 3, None, True, title="new domain: class 3 rotated 90°"),
             "N": Protocol("N", None, None, False, title="no shift: correctly labelled in-distribution traffic"),
             "C": Protocol("C", None, None, False, drift_degrees=40.0,
                           title="gradual drift: every input rotated 0° → 40° over the run")}


Drift = Callable[[np.ndarray, float], np.ndarray]


def rotate_images(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (n, 1, H, W) images about their centre by bilinear resampling (zeros outside), as float32."""
    if degrees == 0:
        return x.astype(np.float32)
    n, c, h, w = x.shape
    t = np.deg2rad(degrees)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    sy = np.cos(t) * (yy - cy) - np.sin(t) * (xx - cx) + cy  # where each output pixel comes from
    sx = np.sin(t) * (yy - cy) + np.cos(t) * (xx - cx) + cx
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    src = x.reshape(n * c, h, w).astype(np.float32)
    out = np.zeros_like(src)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        out += np.where(ok, src[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], 0.0) * wgt.astype(np.float32)
    return out.reshape(n, c, h, w)


@dataclass(frozen=True)
class Streams:
    """Pools the traffic is drawn from, the test sets, and the guard's holdout (train split, known data)."""

    old_train: Split
    new_train: Split
    old_test: Split
    new_test: Split
    holdout: Holdout
    base_train: Split  # what an on-the-fly base model trains on: the known data without the holdout slice


def make_streams(protocol: Protocol, data: dict[str, Split], holdout_size: int = 1000, seed: int = 0) -> Streams:
    """Split Fashion-MNIST into the protocol's pools; the holdout is a fixed slice of the known train data."""
    train_split, test = data["train"], data["test"]
    known_train = train_split.without(protocol.exclude_class)
    order = np.random.default_rng(seed).permutation(len(known_train.y))
    hold, rest = order[:holdout_size], np.sort(order[holdout_size:])
    old_train = Split(known_train.x[rest], known_train.y[rest])
    if protocol.new_class is None:  # N, C: nothing new, every input is known data
        new_train = new_test_src = Split(train_split.x[:0], train_split.y[:0])
    elif not protocol.rotate:  # A: the new class is exactly the excluded one, so no known pool holds it
        new_train = train_split.only(protocol.new_class)
        new_test_src = test.only(protocol.new_class)
    else:  # B: rotated copies of the class (the unrotated images stay known traffic)
        new_src = train_split.only(protocol.new_class)
        new_train = Split(protocol.new_inputs(new_src.x), new_src.y)
        new_test_src = test.only(protocol.new_class)
    holdout = decode_holdout(encode_holdout(known_train.x[hold].astype(np.float32), known_train.y[hold]))
    return Streams(old_train, new_train, test.without(protocol.exclude_class),
                   Split(protocol.new_inputs(new_test_src.x), new_test_src.y), holdout, old_train)


def step_batch(streams: Streams, rng: np.random.Generator, old_n: int, new_n: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step's traffic: inputs, labels, and which inputs are new, in a random order."""
    io = rng.integers(0, len(streams.old_train.y), old_n)
    inew = rng.integers(0, len(streams.new_train.y), new_n) if new_n else np.zeros(0, np.int64)
    x = np.concatenate([streams.old_train.x[io], streams.new_train.x[inew]]).astype(np.float32)
    y = np.concatenate([streams.old_train.y[io], streams.new_train.y[inew]])
    is_new = np.concatenate([np.zeros(old_n, bool), np.ones(new_n, bool)])
    order = rng.permutation(len(y))
    return x[order], y[order], is_new[order]


# ------------------------------------------------------------------------------------------------ base model
def train_base(spec: ModelSpec, streams: Streams, protocol: Protocol, steps: int, seed: int = 0
               ) -> dict[str, np.ndarray]:
    """A base model by backprop (`mpserve train`'s code path) on the known data, for runs without a stored base."""
    config = TrainConfig(steps=steps, backprop=True, exclude_class=protocol.exclude_class, eval_every=steps,
                         seed=seed)
    result = train(spec, spec.init_params(seed), streams.base_train, streams.old_test, config, progress=False)
    return result.params


def load_base(store_dir: Path, model: str, version: int | None = None) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """A stored base model (e.g. from `mpserve train --exclude-class 9 --store-dir DIR`)."""
    from common.loading import load_version
    from model_store import ModelStore

    store = ModelStore(store_dir)
    v = store.latest(model) if version is None else version
    if v is None:
        raise SystemExit(f"no version of {model!r} in {store_dir}")
    loaded = load_version(store, model, v)
    return loaded.spec, loaded.params


# ------------------------------------------------------------------------------------------------ figures
@dataclass
class Curve:
    """Online figures accumulated between rows, and the rows themselves."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    _loss: list[np.ndarray] = field(default_factory=list)
    _correct: list[np.ndarray] = field(default_factory=list)
    _new: list[np.ndarray] = field(default_factory=list)
    _frozen: list[np.ndarray] = field(default_factory=list)
    _frozen_loss: list[np.ndarray] = field(default_factory=list)

    def served(self, loss: np.ndarray, correct: np.ndarray, is_new: np.ndarray,
               frozen_correct: np.ndarray | None = None, frozen_loss: np.ndarray | None = None) -> None:
        """What users got; ``frozen_correct``/``frozen_loss``: what the same base, never learning, would have served
        them (right or not, and its cross-entropy)."""
        self._loss.append(loss)
        self._correct.append(correct)
        self._new.append(is_new)
        if frozen_correct is not None:
            self._frozen.append(frozen_correct)
        if frozen_loss is not None:
            self._frozen_loss.append(frozen_loss)

    def row(self, step: int, old_val: float | None, new_val: float | None,
            frozen_val: float | None = None) -> dict[str, Any]:
        """A curve point: validation now, online figures of what was served since the last row."""
        point: dict[str, Any] = {"step": step, "old_val_acc": old_val, "new_val_acc": new_val,
                                 "frozen_val_acc": frozen_val}
        point.update({k: None for k in CURVE_KEYS[3:-1]})
        if self._loss:
            loss, correct, new = (np.concatenate(a) for a in (self._loss, self._correct, self._new))
            for tag, mask in (("old", ~new), ("new", new)):
                m = online_metrics(loss[mask], correct[mask])
                point[f"{tag}_online_acc"], point[f"{tag}_loss"] = m["online_accuracy"], m["online_loss"]
            point["online_acc"] = float(correct.mean())
            if self._frozen:
                point["frozen_online_acc"] = float(np.concatenate(self._frozen).mean())
            if self._frozen_loss:  # over all traffic, as online_acc
                point["frozen_loss"] = float(np.concatenate(self._frozen_loss).mean())
        self._loss, self._correct, self._new, self._frozen, self._frozen_loss = [], [], [], [], []
        self.rows.append(point)
        return point


def validation(engine: Engine, params: dict[str, np.ndarray], streams: Streams,
               old_x: np.ndarray | None = None) -> tuple[float, float | None]:
    """Accuracy of the leader weights on the known and the new test data (``old_x``: the known data as drifted)."""
    x = streams.old_test.x.astype(np.float32) if old_x is None else old_x
    old = leader_logits(engine, params, x).argmax(1) == streams.old_test.y
    if not len(streams.new_test.y):
        return float(old.mean()), None
    new = leader_logits(engine, params, streams.new_test.x.astype(np.float32)).argmax(1) == streams.new_test.y
    return float(old.mean()), float(new.mean())


def eval_steps(steps: int, every: int) -> set[int]:
    return {0, steps, *range(every, steps, every)}


# ------------------------------------------------------------------------------------------------ engine mode
def worker_settings(options: dict[str, Any]) -> WorkerSettings:
    """The worker's settings for these learning options (the bench builds its configs exactly as the worker)."""
    return WorkerSettings(**{k: v for k, v in options.items() if k in LEARNING_KEYS})


@dataclass
class EngineRun:
    """The served model's life in process: version, weights, seeds, and what the guard remembers."""

    spec: ModelSpec
    params: dict[str, np.ndarray]
    settings: WorkerSettings
    guard: bool
    holdout: Holdout
    exploration: str = "paired"  # the server's setting: paired probes (users get the leader) or single path
    vendors: int | None = None  # None: the worker's setting, else the shipped model's 4
    seed: int = 0
    replay_share: float = 0.125  # the API's share of labelled inputs kept for the guard (ServerSettings.replay_share)
    replay_size: int = 512  # and how many of the newest it keeps (ServerSettings.replay_size)
    eps: float = 0.05
    version: int = 0
    refused: int = 0
    refused_traffic: int = 0  # of which the recent-traffic check refused (the holdout may have refused them too)
    refused_gain: int = 0  # of those, for gaining nothing on the judged recent inputs (guard_traffic_gain_z)
    grandparent: dict[str, np.ndarray] | None = None
    parent_validation: dict[str, Any] | None = None
    before: dict[str, float] | None = None
    engine: Engine = field(init=False)
    eval_engine: Engine = field(init=False)
    leader: LeaderAnswers = field(init=False)  # the guard's answers (features of inputs seen before are cached)

    def __post_init__(self) -> None:
        S = len(self.spec.groups)
        self.vendors = self.vendors or self.settings.vendors or 4
        self.engine = Engine(self.spec, self.vendors, buckets=[256])
        self.eval_engine = Engine(self.spec, 1, buckets=sorted({64, 256, self.replay_size or 1000, 1000}))
        self.leader = LeaderAnswers(self.eval_engine)
        self.seed_rng = np.random.default_rng([self.seed, 1])
        self.path_rng = np.random.default_rng([self.seed, 2])
        self.eps = self.settings.probe_scale or self.eps
        self.antithetic = self.settings.antithetic
        self.learned = learned_groups(self.settings.learn_groups, S)
        self.replay_head = self.settings.reconcile_config().replays_head(S)
        # the worker's split_replay: kept inputs the head learns from, and those only the traffic check judges on
        self.split_kept = self.guard and self.settings.guard_traffic and self.replay_head
        self.seeds = self.fresh_seeds()
        self.rc, self.uc = self.settings.reconcile_config(), self.settings.update_config()
        self.base_params = self.params
        self.frozen_weights = self.engine.materialize(self.params, self.seeds, self.eps, 0, self.antithetic)
        self.frozen_rng = np.random.default_rng([self.seed, 7])
        self.replay_rng = np.random.default_rng([self.seed, 9])
        self.replay: deque[tuple[np.ndarray, int, bool, bool, str]] = deque(maxlen=self.replay_size)
        self.kept_count = 0  # names each kept input, as a record id names it in the worker (split_replay)
        self.head_replay = HeadReplaySource(self.settings.head_damping)

    def fresh_seeds(self) -> np.ndarray:
        """A new version's seeds, as the worker draws them (unperturbed in the groups that do not learn)."""
        return fresh_seeds(len(self.spec.groups), self.vendors, self.seed_rng, self.antithetic, self.learned)

    def keep_for_replay(self, x: np.ndarray, y: np.ndarray) -> None:
        """Keep a share of the labelled inputs as the API does, with whether the anchor (the base) gets them right."""
        pick = self.replay_rng.random(len(y)) < self.replay_share
        if pick.any():
            ids = [f"kept-{self.kept_count + i}" for i in range(int(pick.sum()))]
            anchor = correct_answers(self.leader, self.base_params, x[pick], y[pick], ids)
            judged = [self.split_kept and judged_only(k, self.settings.guard_traffic_share) for k in ids]
            self.kept_count += len(ids)
            self.replay.extend(zip(x[pick], y[pick].tolist(), anchor.tolist(), judged, ids, strict=True))

    def kept_inputs(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The kept inputs the head learns from, their labels and names, newest first (as the worker reads the
        replay stream): with the recent-traffic check on, those it does not judge on."""
        learn = [(x, y, k) for x, y, _, judged, k in reversed(self.replay) if not judged]
        if not learn:
            return np.zeros((0, *self.spec.input_shape), np.float32), np.zeros(0, np.int64), []
        xs, ys, ids = zip(*learn, strict=True)
        return np.stack(xs), np.array(ys, np.int64), list(ids)

    def traffic_check(self) -> TrafficCheck | None:
        """The worker's check on recent traffic, once enough is kept (the anchor here is the base: version 0): on
        the kept inputs the head never learns from when it learns from kept inputs, else on all of them."""
        judged = [(x, y, a, k) for x, y, a, j, k in self.replay if j or not self.split_kept]
        if not self.settings.guard_traffic or len(judged) < self.settings.guard_traffic_min:
            return None
        xs, ys, anchor, ids = zip(*judged, strict=True)
        inputs, labels, gain = np.stack(xs), np.array(ys), self.settings.guard_traffic_gain_z
        parent_loss = answers(self.leader, self.params, inputs, labels, ids)[1] if gain > 0 else None
        return TrafficCheck(inputs, labels, np.array(anchor), 0, self.settings.guard_traffic_tolerance,
                            self.settings.guard_drift_z, parent_loss, gain, ids)

    def frozen_answer(self, x: np.ndarray) -> np.ndarray:
        """What the base model, never learning, serves for ``x`` (same exploration, its own vendor paths)."""
        if self.exploration == "paired":  # users get the leader's answer: the base's, unperturbed
            return self.leader.logits(self.base_params, x)
        return self.engine.forward(self.frozen_weights, x, self.frozen_rng)[0]

    def serve_and_learn(self, x: np.ndarray, y: np.ndarray, truth: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Serve one step's inputs on balanced vendor paths, reconcile their records, move to the next version.

        ``y`` are the labels the clients send (what the records hold); ``truth``, when they differ (poisoned
        feedback), the true labels the returned figures are measured against. Returns the served predictions'
        losses and correctness. A refused candidate leaves the version (and its seeds) serving, as the worker does.
        """
        weights = self.engine.materialize(self.params, self.seeds, self.eps, self.version, self.antithetic)
        base = None
        if self.exploration == "paired":  # as the API does: users get the leader's answer, the record both losses
            logits, paths, answer = self.engine.forward_paired(weights, x, self.path_rng)
            base = cross_entropy(answer, y)
        else:
            logits, paths = self.engine.forward(weights, x, self.path_rng)
            answer = logits
        loss = cross_entropy(logits, y)
        records = Records(np.full(len(y), self.version, np.int64), paths, loss, y, base,
                          logits if base is not None else None, answer if base is not None else None)
        truth = y if truth is None else truth
        served = (cross_entropy(answer, truth), answer.argmax(1) == truth)
        sources = {self.version: VersionSeeds(self.seeds, self.eps, self.antithetic)}
        last = previous_step(self.params, self.grandparent) if self.uc.momentum else None
        replay = self.replay_head
        if self.guard or replay:
            self.keep_for_replay(x, y)
        if replay:
            kept_x, kept_y, kept_ids = self.kept_inputs()
            evidence = self.head_replay.evidence(self.leader, self.params, kept_x, kept_y,
                                                 self.holdout if self.guard else None, kept_ids)
        else:
            evidence = None
        result = propose_update(self.spec, self.params, records, sources, self.rc, self.uc, last, evidence)
        if self.guard:
            if self.before is None:
                self.before = holdout_figures(self.leader, self.params, self.holdout)
            traffic = self.traffic_check()
            verdict = judge_candidate(self.leader, result.params, self.holdout, self.before,
                                      self.parent_validation, self.settings.guard_tolerance,
                                      self.settings.guard_reference, self.settings.guard_class_tolerance, traffic)
            if not verdict.accepted:
                self.refused += 1
                self.refused_traffic += verdict.validation.get("traffic", {}).get("accepted") is False
                self.refused_gain += verdict.no_gain
                if self.settings.reseed_on_refusal:  # as the worker does: the same weights under fresh seeds
                    self.version += 1
                    self.seeds = self.fresh_seeds()
                return served
            self.parent_validation = verdict.validation
            self.before = {k: verdict.validation[k] for k in ("accuracy", "loss", "class_accuracy")}
        self.grandparent = self.params
        self.params = result.params
        self.version += 1
        self.seeds = self.fresh_seeds()
        return served


def run_engine(spec: ModelSpec, base: dict[str, np.ndarray], streams: Streams, options: dict[str, Any],
               steps: int, eval_every: int, old_n: int = 240, new_n: int = 16, vendors: int | None = None,
               seed: int = 0,
               progress: bool = True, desc: str = "continual",
               on_row: Callable[[dict[str, Any]], None] | None = None,
               relabel: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
               extra_eval: Callable[[EngineRun], dict[str, Any]] | None = None,
               drift: Callable[[np.ndarray, float], np.ndarray] | None = None,
               frozen: bool = True) -> dict[str, Any]:
    """The continual-learning loop in process; returns the curve and what the run did.

    ``drift(x, progress)``: the inputs as the world shows them at that share of the run (protocol C).
    ``frozen``: also serve every step's traffic with the base model kept frozen, and validate it, side by side.

    ``relabel(y, rng)`` gives the labels the clients send for true labels ``y`` (poisoned feedback, bench/poison.py);
    it draws from a generator of its own, so the traffic and the seeds stay those of the clean run.
    ``extra_eval(run)`` adds figures of its own to every curve row.
    """
    settings = worker_settings(options)
    run = EngineRun(spec, {k: v.copy() for k, v in base.items()}, settings, bool(options.get("guard")),
                    streams.holdout, options.get("exploration", "paired"), vendors, seed)
    data_rng = np.random.default_rng([seed, 3])
    label_rng = np.random.default_rng([seed, 6])
    curve = Curve()
    evals = eval_steps(steps, eval_every)
    frozen_val: float | None = None
    start = time.perf_counter()
    bar = tqdm(range(steps + 1), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        if step > 0:  # step t serves its batch with version t-1's weights, then reconciles
            x, y, is_new = step_batch(streams, data_rng, old_n, new_n)
            if drift is not None:
                x = drift(x, step / steps)
            sent = relabel(y, label_rng) if relabel else y
            frozen_logits = run.frozen_answer(x) if frozen else None
            loss, correct = run.serve_and_learn(x, sent, truth=y if relabel else None)
            curve.served(loss, correct, is_new, None if frozen_logits is None else frozen_logits.argmax(1) == y,
                         None if frozen_logits is None else cross_entropy(frozen_logits, y))
        if step in evals:
            if step == 0:  # the base model's own served figures: one batch served without learning from it
                x, y, is_new = step_batch(streams, np.random.default_rng([seed, 4]), old_n, new_n)
                w = run.engine.materialize(run.params, run.seeds, run.eps, 0, run.antithetic)
                pair = run.engine.forward_paired(w, x, np.random.default_rng([seed, 5]))
                logits = pair[2] if run.exploration == "paired" else pair[0]
                curve.served(cross_entropy(logits, y), logits.argmax(1) == y, is_new,
                             logits.argmax(1) == y if frozen else None, cross_entropy(logits, y) if frozen else None)
            old_x = None if drift is None else drift(streams.old_test.x, step / steps)
            old_val, new_val = validation(run.eval_engine, run.params, streams, old_x)
            if frozen and (drift is not None or frozen_val is None):  # the base does not change; its data may
                frozen_val = validation(run.eval_engine, run.base_params, streams, old_x)[0]
            point = curve.row(step, old_val, new_val, frozen_val)
            point["refused"], point["refused_traffic"], point["refused_gain"] = \
                run.refused, run.refused_traffic, run.refused_gain
            if extra_eval:
                point.update(extra_eval(run))
            bar.set_postfix(old=f"{old_val:.3f}", new="-" if new_val is None else f"{new_val:.3f}",
                            frozen="-" if frozen_val is None else f"{frozen_val:.3f}", refused=run.refused)
            if on_row:
                on_row(point)
    return {"curve": curve.rows, "seconds": time.perf_counter() - start, "refused": run.refused,
            "refused_traffic": run.refused_traffic, "refused_gain": run.refused_gain,
            "versions": run.version, "settings": {**{k: getattr(settings, k) for k in LEARNING_KEYS},
                                                  "vendors": run.vendors,
                                                  "exploration": run.exploration},
            "guard": bool(options.get("guard")), "holdout_size": len(streams.holdout)}


# ------------------------------------------------------------------------------------------------ output
def print_curve(curve: list[dict[str, Any]]) -> None:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [{"step": r["step"], "known val": pct(r["old_val_acc"]), "new val": pct(r["new_val_acc"]),
             "known online": pct(r["old_online_acc"]), "new online": pct(r["new_online_acc"]),
             "known loss": num(r["old_loss"]), "new loss": num(r["new_loss"]), "frozen loss": num(r.get("frozen_loss")),
             "frozen val": pct(r.get("frozen_val_acc")), "served": pct(r.get("online_acc")),
             "frozen served": pct(r.get("frozen_online_acc"))} for r in curve]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def plot_curve(curve: list[dict[str, Any]], title: str, path: Path) -> None:
    """Validation accuracy, online accuracy and online loss, known vs new, like the article's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curve]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, (("val_acc", "validation accuracy (leader, test split)"),
                                       ("online_acc", "online accuracy (what users were served)"),
                                       ("loss", "online loss (what users were served)")), strict=True):
        something_new = any(r.get("new_val_acc") is not None for r in curve)
        lines = [("old", "tab:blue", "known" if something_new else "learning"), ("new", "tab:orange", "new")]
        if any(r.get(f"frozen_{key}") is not None for r in curve) and not (key == "loss" and something_new):
            # the frozen base's validation is on the known classes; what it served, on all traffic (new included)
            if key == "online_acc" and something_new:
                lines += [("", "tab:green", "all traffic"), ("frozen", "tab:gray", "base kept frozen (all traffic)")]
            else:
                lines.append(("frozen", "tab:gray", "base kept frozen" + (" (known)" if something_new else "")))
        for tag, color, name in lines:
            field = f"{tag}_{key}" if tag else key
            ys = [np.nan if r.get(field) is None else r[field] for r in curve]
            if all(np.isnan(ys)):
                continue
            ax.plot(steps, ys, color=color, marker="o" if len(steps) < 40 else None, label=name,
                    linestyle="--" if tag == "frozen" else "-")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step (256 served inputs each)")
        if key == "loss":  # the new data's loss starts tens of nats above the known data's
            ax.set_yscale("log")
        elif any(r.get("new_val_acc") is not None for r in curve):
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path, dpi=100)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in LEARNING_KEYS if getattr(args, k, None) is not None}
    out["guard"] = args.guard
    out["exploration"] = args.exploration
    return out


def add_learning_flags(ap: argparse.ArgumentParser) -> None:
    """The worker's learning options, same names as its flags (`mpserve worker --help`)."""
    ap.add_argument("--exploration", choices=["paired", "single"], default="paired",
                    help="the server's exploration: paired probes (default) or single path")
    ap.add_argument("--learning-rate", type=float, help="default: the worker's")
    ap.add_argument("--probe-scale", type=float, help="default: the worker's, else the base's 0.05")
    ap.add_argument("--step", choices=["unit", "signal"])
    ap.add_argument("--max-step", type=float)
    ap.add_argument("--shrink-t", type=float)
    ap.add_argument("--learn-groups", help="layer groups that learn: head, all, or indices like 0,2")
    ap.add_argument("--head-gradient", choices=["logits", "replay", "spsa"])
    ap.add_argument("--head-damping", type=float)
    ap.add_argument("--head-replay-learning-rate", type=float)
    ap.add_argument("--head-learning-rate", type=float)
    ap.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--attribution", choices=["zscore", "rank"])
    ap.add_argument("--normalize", choices=["model", "group"])
    ap.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--baseline", choices=["none", "class", "leader"])
    ap.add_argument("--outlier", choices=["none", "zscore", "quantile"])
    ap.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--lr-schedule", choices=["constant", "loss_gap"])
    ap.add_argument("--lr-min-ratio", type=float)
    ap.add_argument("--gap-scale", type=float)
    ap.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True,
                    help="the validation guard on a held-out slice of the known train data (on by default, as the "
                         "shipped model comes with a holdout set)")
    ap.add_argument("--reseed-on-refusal", action=argparse.BooleanOptionalAction, default=None,
                    help="after a refused candidate, serve the same weights under fresh seeds (worker default: on)")
    ap.add_argument("--guard-tolerance", type=float)
    ap.add_argument("--guard-class-tolerance", type=float)
    ap.add_argument("--guard-reference", choices=["anchor", "parent"])
    ap.add_argument("--guard-traffic", action=argparse.BooleanOptionalAction, default=None,
                    help="also judge candidates on recent labelled traffic against the base (worker default: on)")
    ap.add_argument("--guard-traffic-tolerance", type=float)
    ap.add_argument("--guard-traffic-gain-z", type=float)
    ap.add_argument("--guard-traffic-min", type=int)
    ap.add_argument("--guard-traffic-share", type=float)
    ap.add_argument("--guard-drift-z", type=float)


def base_model(args: argparse.Namespace, protocol: Protocol, streams: Streams) -> tuple[ModelSpec, dict, str]:
    """The stored base (--base-store) or one trained here by backprop (--base-steps)."""
    if args.base_store:
        spec, params = load_base(args.base_store, args.base_name)
        return spec, params, f"{args.base_store}:{args.base_name}"
    spec = get_model(args.model, {"hidden": [args.hidden]} if args.model == "mlp" else None)
    desc = f"backprop {args.base_steps} steps (seed {args.seed})"
    if args.base_npz and args.base_npz.exists():  # a cache of exactly this training, so runs share one base
        with np.load(args.base_npz, allow_pickle=False) as z:
            return spec, {k: z[k] for k in z.files}, desc
    t0 = time.perf_counter()
    params = train_base(spec, streams, protocol, args.base_steps, args.seed)
    log.info("trained the base model (%d backprop steps) in %.1f s", args.base_steps, time.perf_counter() - t0)
    if args.base_npz:
        np.savez(args.base_npz, **params)
    return spec, params, desc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="A")
    ap.add_argument("--http", nargs="?", const="local", default=None, metavar="URL",
                    help="drive a stack over HTTP: its URL, or none to start one of its own")
    ap.add_argument("--admin-token", default=None, help="admin token of a foreign stack (reconcile by admin)")
    ap.add_argument("--store-dir", type=Path, default=None, help="a foreign stack's store, for validation figures")
    ap.add_argument("--http-model", default="fashion", help="the served model's name (http mode)")
    ap.add_argument("--reconcile", choices=["admin", "worker"], default="admin",
                    help="http mode: POST /admin/reconcile per step, or the worker's own min_records trigger")
    ap.add_argument("--label-delay-s", type=float, default=0.0, help="http mode: label this long after /predict")
    ap.add_argument("--request-size", type=int, default=16, help="http mode: inputs per /predict request")
    ap.add_argument("--clients", type=int, default=8, help="http mode: concurrent requests")
    ap.add_argument("--worker-timeout-s", type=float, default=120.0,
                    help="http mode, worker trigger: longest wait for a publish")
    ap.add_argument("--model", default="mlp", help="architecture of an on-the-fly base (mlp or beautiful_mnist)")
    ap.add_argument("--hidden", type=int, default=128, help="mlp hidden width")
    ap.add_argument("--base-store", type=Path, default=None, help="a store holding the base model (version 0)")
    ap.add_argument("--base-name", default="fashion", help="model name in --base-store")
    ap.add_argument("--base-steps", type=int, default=400, help="backprop steps of an on-the-fly base")
    ap.add_argument("--base-npz", type=Path, default=None, help="cache of the on-the-fly base's weights (.npz)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--old-per-step", type=int, default=240)
    ap.add_argument("--new-per-step", type=int, default=16)
    ap.add_argument("--vendors", type=int, default=None, help="vendors per group (default: the worker's, else 4)")
    ap.add_argument("--holdout-size", type=int, default=1000,
                    help="the guard's holdout (the shipped model's has 1,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="mlp, 300 steps, base of 300 backprop steps")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=True,
                    help="also serve each step's traffic with the base kept frozen, side by side (engine mode)")
    add_learning_flags(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.base_steps, args.base_store = "mlp", min(args.steps, QUICK_STEPS), 300, None
    eval_every = args.eval_every or max(args.steps // 10, 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    protocol = PROTOCOLS[args.protocol]
    if protocol.new_class is None:  # N, C: all the traffic is known data
        args.old_per_step, args.new_per_step = args.old_per_step + args.new_per_step, 0
    streams = make_streams(protocol, load_fashion_mnist(), args.holdout_size, args.seed)
    spec, base, base_desc = base_model(args, protocol, streams)
    options = options_from_args(args)
    mode = "engine" if args.http is None else "http"
    config = {"guard": options["guard"], "old_per_step": args.old_per_step,
              "new_per_step": args.new_per_step, "seed": args.seed, "eval_every": eval_every}

    def output(curve: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        payload = {"protocol": protocol.name, "model": spec.name, "steps": curve[-1]["step"] if curve else 0,
                   "curve": [{k: r[k] for k in CURVE_KEYS} for r in curve], "mode": mode, "base": base_desc,
                   "config": {**extra.pop("settings", {}), **config}, **extra}
        if args.json:
            write_json(args.json, payload)
        if args.plot:
            plot_curve(payload["curve"], f"Protocol {protocol.name} ({protocol.title}), {spec.name}, {mode} mode, "
                                         f"{options['exploration']} exploration", args.plot)
        return payload

    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:  # a long run leaves usable figures even if it is stopped
        rows.append(row)
        if row["step"] < args.steps:
            output(rows, {"partial": True, "steps_planned": args.steps})

    if args.http is None:
        out = run_engine(spec, base, streams, options, args.steps, eval_every, args.old_per_step,
                         args.new_per_step, args.vendors, args.seed, not args.no_progress,
                         desc=f"protocol {protocol.name}", on_row=on_row,
                         drift=protocol.drifted if protocol.drift_degrees else None, frozen=args.frozen)
    else:
        from bench.continual_http import run_http

        out = run_http(args, spec, base, streams, options, eval_every,
                       drift=protocol.drifted if protocol.drift_degrees else None)
    payload = output(out.pop("curve"), out)
    print_curve(payload["curve"])
    return payload


QUICK_STEPS = 300

if __name__ == "__main__":
    main()
