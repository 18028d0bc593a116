"""`mpserve train`: train a base model and store it as version 0 (or export it as the shipped default)."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from tinygrad import Device

from marketplace.data import load_fashion_mnist
from marketplace.models import get_model
from marketplace.reconcile import fresh_seeds
from marketplace.training import TrainConfig, config_dict, train
from model_store import ModelStore, make_manifest

log = logging.getLogger(__name__)


def plot_curve(curve: list[dict], title: str, path: Path) -> None:
    """Test accuracy and training loss against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [p["test_acc"] for p in curve], color="tab:blue", marker="o", label="test accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [p["train_loss"] for p in curve], color="tab:red", label="train loss")
    ax2.set_ylabel("train loss", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: test images per class in the holdout set written beside a trained model (the validation guard's)
HOLDOUT_PER_CLASS = 100


def run_train(arch: str, model_name: str, store_dir: Path | None, export_dir: Path | None, config: TrainConfig,
              data_dir: str | None = None, arch_config: dict[str, Any] | None = None, plot: Path | None = None,
              progress: bool = True, init_from: Path | None = None,
              command: str | None = None) -> dict[str, Any]:
    """Train, then write version 0 to a store (manifest: how it was trained, how well it does).

    `export_dir` is a second store root, e.g. the package's shipped-model store. `init_from` is a store
    whose latest version of `model_name` is the starting point (training continues; the earlier
    stages are kept in the manifest).
    """
    spec = get_model(arch, arch_config)
    data = load_fashion_mnist(data_dir)
    params, earlier = spec.init_params(config.seed), []
    if init_from is not None:
        src = ModelStore(init_from)
        latest = src.latest(model_name)
        if latest is None:
            raise FileNotFoundError(f"no version of {model_name!r} in {init_from}")
        params, prior = src.read_version(model_name, latest, expected_shapes=spec.param_shapes(),
                                         expected_architecture=spec.name)
        prior_training = prior.get("training") or {}
        earlier = [*prior_training.get("earlier_stages", []),
                   {k: v for k, v in prior_training.items() if k != "earlier_stages"}]
    result = train(spec, params, data["train"], data["test"], config, progress=progress)
    seeds = fresh_seeds(len(spec.groups), config.vendors, np.random.default_rng(config.seed + 2))
    training = {
        "method": "backprop (tinygrad, Adam)" if config.backprop else "marketplace v2 (forward passes only)",
        "dataset": "fashion-mnist", "config": config_dict(config), "steps": config.steps,
        "seconds": round(result.seconds, 1), "device": Device.DEFAULT, "machine": platform.machine(),
        "curve": result.curve, "command": command, "earlier_stages": earlier,
    }
    validation = {"test_accuracy": result.test_accuracy, "per_class_accuracy": result.per_class_accuracy,
                  "split": "fashion-mnist t10k"}
    manifest = make_manifest(version=0, parent=None, model=model_name, architecture=spec.architecture, seeds=seeds,
                             probe_scale=config.probe_scale, learning_rate=0.0, validation=validation,
                             training=training, created=time.time())
    # what the model knows, from images it never trained on: the guard keeps it (a left-out class has nothing to keep)
    holdout = data["test"].without(config.exclude_class).stratified(HOLDOUT_PER_CLASS, config.seed)
    for target in filter(None, [store_dir, export_dir]):
        store = ModelStore(target)
        written = store.write_version(model_name, 0, result.params, manifest)
        store.write_holdout(model_name, holdout.x, holdout.y, "default")  # the validation guard is on from the start
        log.info("wrote %s v0 and a holdout set of %d test images to %s (test accuracy %.4f)", model_name,
                 len(holdout.y), target, result.test_accuracy)
    if plot:
        plot_curve(result.curve, f"{arch} on Fashion-MNIST ({training['method']})", plot)
    summary = {"test_accuracy": result.test_accuracy, "per_class_accuracy": result.per_class_accuracy,
               "seconds": result.seconds, "curve": result.curve, "manifest": written}
    log.info("%s", json.dumps({k: v for k, v in summary.items() if k != "manifest"}))
    return summary
