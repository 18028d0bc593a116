"""LeaderAnswers (marketplace/leader.py) on a real engine: logits through cached features match the NumPy twin,
inputs are cached by name under the feature groups' weights, and a change of those weights misses the cache."""

import numpy as np
import pytest

from marketplace.engine import Engine
from marketplace.leader import LeaderAnswers
from marketplace.models import mlp
from tests.helpers import numpy_mlp

SPEC = mlp(hidden=(16,))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28)).astype(np.float32)


def test_logits_through_cached_features_are_the_models_and_a_new_head_reuses_them() -> None:
    params, x = SPEC.init_params(0), images(40, 1)
    leader = LeaderAnswers(Engine(SPEC, 1, buckets=[16, 64]))
    ids = [f"in{i}" for i in range(len(x))]
    np.testing.assert_allclose(leader.logits(params, x, ids), numpy_mlp(SPEC, params, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(leader.logits(params, x), numpy_mlp(SPEC, params, x), rtol=1e-4, atol=1e-4)
    head = {**params, "1.fc.weight": params["1.fc.weight"] * -2.0, "1.fc.bias": params["1.fc.bias"] + 1.0}
    # the features are cached by name: other pixels under the same names give the first inputs' answers
    np.testing.assert_allclose(leader.logits(head, images(40, 2), ids), numpy_mlp(SPEC, head, x), rtol=1e-4,
                               atol=1e-4)
    body = {**params, "0.fc.bias": params["0.fc.bias"] + 0.5}  # the feature groups moved: the cache misses
    fresh = images(40, 3)
    np.testing.assert_allclose(leader.logits(body, fresh, ids), numpy_mlp(SPEC, body, fresh), rtol=1e-4, atol=1e-4)


def test_the_cache_keeps_the_newest_rows_and_refuses_mismatched_names() -> None:
    params = SPEC.init_params(0)
    leader = LeaderAnswers(Engine(SPEC, 1, buckets=[16]), max_rows=20)
    first, second = images(16, 4), images(16, 5)
    leader.features(params, first, [f"a{i}" for i in range(16)])
    leader.features(params, second, [f"b{i}" for i in range(16)])
    kept = leader._rows
    assert len(kept) == 20 and all(f"b{i}" in kept for i in range(16))  # the oldest went, the newest stayed
    leader.features(params, first[:4], [f"a{i}" for i in range(12, 16)])  # used again: the least recent are b0..b3
    leader.features(params, first[:4], [f"c{i}" for i in range(4)])
    assert all(f"a{i}" in kept for i in range(12, 16)) and not any(f"b{i}" in kept for i in range(4))
    with pytest.raises(ValueError, match="2 ids for 16 inputs"):
        leader.features(params, first, ["a0", "a1"])
    assert leader.features(params, first[:0], []).shape == (0, 16)


def test_a_model_without_a_linear_head_gets_plain_forward_passes() -> None:
    spec = mlp(hidden=())  # one group: no feature groups before the head
    params, x = spec.init_params(0), images(8, 6)
    leader = LeaderAnswers(Engine(spec, 1, buckets=[8]))
    assert leader.head is None
    np.testing.assert_allclose(leader.logits(params, x, [str(i) for i in range(8)]), numpy_mlp(spec, params, x),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no features"):
        leader.features(params, x)
