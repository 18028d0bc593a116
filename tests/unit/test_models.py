"""The model registry: built-in models, a user's `module:factory`, and what each declares."""

import numpy as np
import pytest

from marketplace.engine import Engine
from marketplace.models import beautiful_mnist, get_model, spec_from_architecture
from marketplace.reconcile import fresh_seeds


def test_beautiful_mnist_has_the_three_groups_of_the_upstream_code():
    spec = beautiful_mnist()
    assert len(spec.groups) == 3 and spec.input_shape == (1, 28, 28) and spec.num_classes == 10
    shapes = spec.param_shapes()
    assert shapes["0.conv1.weight"] == (32, 1, 5, 5) and shapes["1.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["2.fc.weight"] == (10, 576)
    assert list(spec.group_shapes(0)) == sorted(spec.group_shapes(0))  # the delta counter's order
    assert sum(spec.group_sizes()) == sum(int(np.prod(s)) for s in shapes.values())


def test_mlp_widths_are_configurable_and_round_trip_through_the_manifest_block():
    spec = get_model("mlp", {"hidden": [64, 32]})
    assert len(spec.groups) == 3 and spec.param_shapes()["1.fc.weight"] == (32, 64)
    again = spec_from_architecture(spec.architecture)
    assert again.param_shapes() == spec.param_shapes()


def test_a_users_factory_plugs_in_and_runs_on_the_engine():
    spec = get_model("tests.custom_model:tiny", {"width": 5})
    assert spec.name == "tests.custom_model:tiny" and spec.param_shapes()["0.fc.weight"] == (5, 16)
    assert spec_from_architecture(spec.architecture).param_shapes() == spec.param_shapes()
    engine = Engine(spec, 2, max_batch=4)
    weights = engine.materialize(spec.init_params(0), fresh_seeds(2, 2, np.random.default_rng(0)), 0.05)
    logits, paths = engine.forward(weights, np.ones((3, 4, 4), np.float32), np.random.default_rng(0))
    assert logits.shape == (3, 3) and paths.shape == (3, 2)


@pytest.mark.parametrize("ref", ["nope", "os.path:join/..", "tests.custom_model:missing"])
def test_unknown_or_malformed_references_are_refused(ref):
    with pytest.raises((KeyError, AttributeError)):
        get_model(ref)


def test_a_factory_must_return_a_model_spec():
    with pytest.raises(TypeError, match="ModelSpec"):
        get_model("tests.custom_model:not_a_model")
