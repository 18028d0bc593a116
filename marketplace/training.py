"""Base-model training: Marketplace V2 (forward passes only) or a backprop baseline (tinygrad, Adam).

Marketplace training here is the continual-learning loop run on a training set: every step sends one
batch through balanced vendor paths, reconciles the per-example losses as one cohort, and moves to a
new version with fresh seeds — the same engine and reconciler the server and worker use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from tinygrad import Tensor, TinyJit
from tinygrad.helpers import Context
from tinygrad.nn.optim import Adam
from tqdm import tqdm

from marketplace.data import Split
from marketplace.engine import Engine, leader_logits
from marketplace.models import ModelSpec
from marketplace.reconcile import ReconcileConfig, Records, VersionSeeds, cross_entropy, fresh_seeds, reconcile

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    learning_rate: float | None = None  # default: 1e-3 (Adam) or 0.1 (Marketplace unit step)
    lr_decay: float = 1.0  # Marketplace: step size multiplied by this at every step (floor 5% of start)
    vendors: int = 4
    probe_scale: float = 0.05
    exclude_class: int | None = None
    eval_every: int = 100
    seed: int = 0
    backprop: bool = False
    attribution: str = "zscore"
    replicas: int = 4  # Marketplace: each input runs on this many paths; its mean loss is its own baseline


@dataclass
class TrainResult:
    params: dict[str, np.ndarray]
    curve: list[dict] = field(default_factory=list)  # {"step", "test_acc", "train_loss", "seconds"}
    test_accuracy: float = 0.0
    per_class_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(spec: ModelSpec, params: dict[str, np.ndarray], data: Split, batch: int = 256,
             engine: Engine | None = None) -> tuple[float, list[float]]:
    """Accuracy of the unperturbed weights, overall and per class."""
    engine = engine or Engine(spec, 1, buckets=[batch])
    correct = leader_logits(engine, params, data.x).argmax(1) == data.y
    per_class = [float(correct[data.y == c].mean()) if np.any(data.y == c) else float("nan")
                 for c in range(spec.num_classes)]
    return float(correct.mean()), per_class


def train(spec: ModelSpec, params: dict[str, np.ndarray], train_split: Split, test_split: Split,
          config: TrainConfig, progress: bool = True,
          on_eval: Callable[[dict], None] | None = None) -> TrainResult:
    """Train from `params`; the class `exclude_class` is left out of the training data (and so of the loss)."""
    train_split = train_split.without(config.exclude_class)
    rng = np.random.default_rng(config.seed)
    step_fn = _backprop_steps(spec, params, config) if config.backprop else _marketplace_steps(spec, params, config)
    eval_engine = Engine(spec, 1, buckets=[256])
    result = TrainResult(params)
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(1, config.steps + 1), disable=not progress, desc="backprop" if config.backprop else "marketplace")
    for step in bar:
        reps = 1 if config.backprop else max(1, config.replicas)
        idx = np.repeat(rng.integers(0, len(train_split.y), size=config.batch_size // reps), reps)
        losses.append(step_fn(train_split.x[idx].astype(np.float32), train_split.y[idx], rng))
        if step % config.eval_every == 0 or step == config.steps:
            current = step_fn.params()  # type: ignore[attr-defined]
            acc, _ = evaluate(spec, current, test_split, engine=eval_engine)
            point = {"step": step, "test_acc": acc, "train_loss": float(np.mean(losses[-config.eval_every:])),
                     "seconds": time.perf_counter() - start}
            result.curve.append(point)
            bar.set_postfix(loss=f"{point['train_loss']:.3f}", test_acc=f"{acc:.4f}")
            log.info("step=%d train_loss=%.4f test_acc=%.4f", step, point["train_loss"], acc)
            if on_eval:
                on_eval(point)
    result.params = step_fn.params()  # type: ignore[attr-defined]
    result.test_accuracy, result.per_class_accuracy = evaluate(spec, result.params, test_split, engine=eval_engine)
    result.seconds = time.perf_counter() - start
    return result


class _marketplace_steps:
    """One Marketplace V2 step per call: balanced perturbed forward, reconcile, fresh seeds."""

    def __init__(self, spec: ModelSpec, params: dict[str, np.ndarray], config: TrainConfig):
        self.spec, self.config = spec, config
        self.theta = {k: v.copy() for k, v in params.items()}
        self.engine = Engine(spec, config.vendors, buckets=[-(-config.batch_size // config.vendors) * config.vendors])
        self.lr = config.learning_rate if config.learning_rate is not None else 0.1
        self.rc = ReconcileConfig(learning_rate=self.lr, min_cohort=1, attribution=config.attribution)  # type: ignore[arg-type]
        self.seed_rng = np.random.default_rng(config.seed + 1)
        self.step = 0

    def __call__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
        S = len(self.spec.groups)
        seeds = fresh_seeds(S, self.config.vendors, self.seed_rng)
        weights = self.engine.materialize(self.theta, seeds, self.config.probe_scale)
        logits, paths = self.engine.forward(weights, x, rng)
        loss = cross_entropy(logits, y)
        reps = max(1, self.config.replicas)
        # per-input baseline: an input's replicas ran on different paths, so subtracting their mean loss
        # removes the input's own difficulty from the signal and leaves the paths' effect
        grouped = loss.reshape(-1, reps)
        residual = loss if reps == 1 else (grouped - grouped.mean(1, keepdims=True)).ravel()
        lr = self.lr * max(self.config.lr_decay ** self.step, 0.05)
        out = reconcile(self.spec, self.theta, Records(np.zeros(len(y), np.int64), paths, residual, y),
                        {0: VersionSeeds(seeds, self.config.probe_scale)}, self.rc, learning_rate=lr)
        self.theta = out.params
        self.step += 1
        return float(loss.mean())

    def params(self) -> dict[str, np.ndarray]:
        return self.theta


class _backprop_steps:
    """The baseline: the same forward graph (V=1), differentiated by tinygrad, optimized by Adam."""

    def __init__(self, spec: ModelSpec, params: dict[str, np.ndarray], config: TrainConfig):
        self.engine = Engine(spec, 1, buckets=[config.batch_size])
        self.keys = [k for s in range(len(spec.groups)) for k in spec.group_shapes(s)]
        self.tensors = [Tensor(params[k][None].astype(np.float32)) for k in self.keys]
        self.opt = Adam(self.tensors, lr=config.learning_rate if config.learning_rate is not None else 1e-3)

        @TinyJit
        def step(x: Tensor, y: Tensor) -> Tensor:
            self.opt.zero_grad()
            loss = self.engine.graph(x, [], self.tensors).sparse_categorical_crossentropy(y)
            loss.backward()
            self.opt.step()
            return loss.realize()

        self._step = step

    def __call__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
        with Context(TRAINING=1):
            return float(self._step(Tensor(x), Tensor(y.astype(np.int32))).item())

    def params(self) -> dict[str, np.ndarray]:
        return {k: t.numpy()[0].copy() for k, t in zip(self.keys, self.tensors, strict=True)}


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
