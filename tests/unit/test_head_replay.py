"""The worker's head replay evidence (worker/head_replay.py) on a real engine: features against NumPy, and the
damping rebuilt only when the holdout or the feature groups change."""

import numpy as np

from marketplace.engine import Engine
from marketplace.head import known_damping
from marketplace.leader import LeaderAnswers
from marketplace.models import mlp
from model_store.holdout import decode_holdout, encode_holdout
from worker.head_replay import HeadReplaySource

SPEC = mlp(hidden=(16,))
LEADER = LeaderAnswers(Engine(SPEC, 1, buckets=[32]))


def numpy_features(params, x):
    flat = x.reshape(len(x), -1).astype(np.float64) * SPEC.input_scale
    return np.maximum(flat @ params["0.fc.weight"].T.astype(np.float64) + params["0.fc.bias"], 0)


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28)).astype(np.float32)


def test_evidence_has_the_exact_features_and_the_holdouts_damping_cached_until_either_changes():
    params = SPEC.init_params(0)
    x, y = images(20, 1), np.arange(20) % 10
    holdout = decode_holdout(encode_holdout(images(30, 2), np.zeros(30, np.int64)))
    source = HeadReplaySource(damping=100.0)
    first = source.evidence(LEADER, params, x, y, holdout)
    np.testing.assert_allclose(first.features, numpy_features(params, x), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(first.labels, y)
    np.testing.assert_allclose(first.damping, known_damping(numpy_features(params, holdout.inputs), 100.0),
                               rtol=1e-4, atol=1e-6)
    assert source.evidence(LEADER, params, x[:5], y[:5], holdout).damping is first.damping  # cached
    head_moved = {**params, "1.fc.bias": params["1.fc.bias"] + 1}
    assert source.evidence(LEADER, head_moved, x, y, holdout).damping is first.damping  # the head is not a feature
    features_moved = {**params, "0.fc.bias": params["0.fc.bias"] + 0.5}
    moved = source.evidence(LEADER, features_moved, x, y, holdout)
    assert moved.damping is not first.damping
    np.testing.assert_allclose(moved.features, numpy_features(features_moved, x), rtol=1e-5, atol=1e-4)
    other = decode_holdout(encode_holdout(images(30, 3), np.zeros(30, np.int64)))
    assert source.evidence(LEADER, features_moved, x, y, other).damping is not moved.damping
    assert source.evidence(LEADER, params, x, y, None).damping is None  # no holdout: undamped
    assert source.evidence(LEADER, params, x[:0], y[:0], holdout) is None
    assert HeadReplaySource(damping=0.0).evidence(LEADER, params, x, y, holdout).damping is None


def test_inputs_whose_features_overflow_are_left_out():
    params = SPEC.init_params(0)
    params["0.fc.weight"] = params["0.fc.weight"].copy()
    params["0.fc.weight"][0] = 3e38  # any lit pixel overflows feature 0
    x = np.concatenate([np.zeros((1, 1, 28, 28), np.float32), images(2, 4)])
    out = HeadReplaySource(damping=0.0).evidence(LEADER, params, x, np.array([1, 2, 3]), None)
    assert out is not None and out.labels.tolist() == [1] and np.isfinite(out.features).all()
    assert HeadReplaySource(damping=0.0).evidence(LEADER, params, x[1:], np.array([2, 3]), None) is None
