"""Fashion-MNIST loading and base-model training, on the real data set from Debian's package."""

import gzip
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from marketplace.data import load_fashion_mnist
from marketplace.models import mlp
from marketplace.training import TrainConfig, evaluate, train
from model_store import ModelStore
from mpserve.cli import app
from tests.helpers import numpy_mlp


@pytest.fixture(scope="module")
def data():
    return load_fashion_mnist()


def test_loads_the_real_data_set(data):
    assert data["train"].x.shape == (60000, 1, 28, 28) and data["test"].x.shape == (10000, 1, 28, 28)
    assert data["train"].x.dtype == np.uint8 and data["train"].x.max() == 255
    assert np.bincount(data["test"].y).tolist() == [1000] * 10


def test_a_class_can_be_left_out(data):
    base = data["train"].without(9)
    assert 9 not in base.y and len(base.y) == 54000
    assert set(data["test"].only(3).y) == {3}


def test_truncated_idx_files_are_refused(tmp_path):
    header = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big")
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(header + bytes(5))  # declares 10 bytes, holds 5
    with pytest.raises(ValueError, match="header says"):
        load_fashion_mnist(tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backprop", [False, True], ids=["marketplace", "backprop"])
def test_training_beats_chance_quickly(data, backprop):
    spec = mlp(hidden=(32,))
    params = spec.init_params(0)
    before, _ = evaluate(spec, params, data["test"])
    steps = 60 if not backprop else 40
    config = TrainConfig(steps=steps, batch_size=128, backprop=backprop, eval_every=steps // 2, seed=1,
                         learning_rate=1.0 if not backprop else 3e-3)
    result = train(spec, params, data["train"], data["test"], config, progress=False)
    assert len(result.curve) == 2 and result.curve[-1]["step"] == steps
    # ten classes, chance is 10%: forward-only learning is slow (~0.19 after 40 steps here), backprop fast
    floor = 0.2 if not backprop else 0.6
    assert result.test_accuracy > max(before + 0.1, floor), (before, result.test_accuracy)


@pytest.mark.slow
def test_mpserve_train_writes_version_zero_with_its_manifest(tmp_path, data):
    out = tmp_path / "fig.json"
    res = CliRunner().invoke(app, ["train", "--arch", "mlp", "--hidden", "16", "--steps", "10", "--batch-size", "64",
                                   "--eval-every", "5", "--store-dir", str(tmp_path / "store"), "--name", "base",
                                   "--exclude-class", "9", "--plot", str(tmp_path / "curve.png"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    manifest = ModelStore(tmp_path / "store").read_manifest("base", 0)
    assert manifest["parent"] is None and manifest["architecture"]["name"] == "mlp"
    assert manifest["training"]["config"]["exclude_class"] == 9
    # the figures are those of the stored weights on the whole test split, by an independent NumPy forward
    # (a near-tie may fall the other way in float32: a few of the 10,000 calls at most)
    params, _ = ModelStore(tmp_path / "store").read_version("base", 0)
    predicted = numpy_mlp(mlp(hidden=(16,)), params, data["test"].x).argmax(1)
    correct = predicted == data["test"].y
    assert manifest["validation"]["test_accuracy"] == pytest.approx(correct.mean(), abs=3e-4)
    per_class = [correct[data["test"].y == c].mean() for c in range(10)]
    assert manifest["validation"]["per_class_accuracy"] == pytest.approx(per_class, abs=3e-3)
    assert manifest["validation"]["per_class_accuracy"][9] == 0.0  # never seen, never predicted... nearly
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert json.loads(out.read_text())["test_accuracy"] == manifest["validation"]["test_accuracy"]
    # and a holdout set for the validation guard: 100 test images of each class it was trained on
    holdout = ModelStore(tmp_path / "store").read_holdout("base", "default")
    assert holdout is not None and np.bincount(holdout.labels).tolist() == [100] * 9
    test_images = {img.tobytes() for img in data["test"].x}
    assert all(img.astype(np.uint8).tobytes() in test_images for img in holdout.inputs)


@pytest.mark.slow
def test_training_can_continue_from_a_stored_model(tmp_path):
    common = ["train", "--arch", "mlp", "--hidden", "16", "--batch-size", "64", "--name", "base", "--backprop",
              "--learning-rate", "0.003"]
    first = CliRunner().invoke(app, [*common, "--steps", "30", "--eval-every", "30",
                                     "--store-dir", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, [*common, "--steps", "2", "--eval-every", "2", "--learning-rate", "0.0000001",
                                      "--store-dir", str(tmp_path / "b"), "--init-from", str(tmp_path / "a")])
    assert second.exit_code == 0, second.output
    a = ModelStore(tmp_path / "a").read_manifest("base", 0)
    b = ModelStore(tmp_path / "b").read_manifest("base", 0)
    assert [s["steps"] for s in b["training"]["earlier_stages"]] == [30]
    # a near-zero learning rate keeps what the first stage learned (a fresh init would be near 10%)
    assert abs(b["validation"]["test_accuracy"] - a["validation"]["test_accuracy"]) < 0.02
