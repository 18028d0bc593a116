"""Balanced perturbed inference: each input's logits are those of its own path's weights."""

import numpy as np
import pytest

from marketplace.deltas import group_delta, path_params, vendor_signs
from marketplace.engine import Engine, default_buckets, leader_seeds, plan_paths
from marketplace.models import beautiful_mnist, mlp
from marketplace.reconcile import fresh_seeds
from tests.helpers import numpy_mlp


def test_leader_engine_matches_an_independent_numpy_forward():
    spec = mlp(hidden=(32, 16))
    params = spec.init_params(3)
    engine = Engine(spec, 1, max_batch=16)
    weights = engine.materialize(params, leader_seeds(spec), eps=0.1)
    x = np.random.default_rng(0).uniform(0, 255, size=(7, *spec.input_shape)).astype(np.float32)
    logits, paths = engine.forward(weights, x, np.random.default_rng(1))
    assert logits.shape == (7, 10) and not paths.any()
    np.testing.assert_allclose(logits, numpy_mlp(spec, params, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("spec", "antithetic"), [
    pytest.param(mlp(hidden=(24, 12)), False, id="mlp"),
    pytest.param(beautiful_mnist(), False, id="beautiful_mnist", marks=pytest.mark.slow),
    pytest.param(mlp(hidden=(24, 12)), True, id="mlp-antithetic")])
def test_each_input_gets_the_logits_of_its_own_path(spec, antithetic):
    V, eps = 5 if antithetic else 4, 0.05  # antithetic: pairs (1, 2), (3, 4)
    params = spec.init_params(1)
    seeds = fresh_seeds(len(spec.groups), V, np.random.default_rng(7), antithetic)
    engine = Engine(spec, V, max_batch=16)
    weights = engine.materialize(params, seeds, eps, antithetic=antithetic)
    x = np.random.default_rng(2).uniform(0, 255, size=(11, *spec.input_shape)).astype(np.float32)
    logits, paths = engine.forward(weights, x, np.random.default_rng(3))
    assert paths.shape == (11, len(spec.groups))
    if antithetic:  # the mirrors do run: some input takes a mirror (vendor 2 or 4) in some group
        assert np.isin(paths, [2, 4]).any()
    leader = Engine(spec, 1, max_batch=4)
    for i in range(len(x)):
        own = leader.materialize(path_params(spec, params, seeds, paths[i], eps, antithetic), leader_seeds(spec),
                                 eps)
        expected, _ = leader.forward(own, x[i:i + 1], np.random.default_rng(0))
        np.testing.assert_allclose(logits[i], expected[0], rtol=1e-4, atol=1e-4)
    # the perturbation is real: some input's logits differ from the leader's
    lead_w = leader.materialize(params, leader_seeds(spec), eps)
    plain = np.concatenate([leader.forward(lead_w, x[i:i + 4], np.random.default_rng(0))[0]
                            for i in range(0, len(x), 4)])
    assert np.abs(plain - logits).max() > 1e-3


def test_full_bucket_is_exactly_balanced_and_groups_are_independent():
    V, S, B = 4, 3, 64
    plan = plan_paths(B, B, V, S, np.random.default_rng(0))
    for s in range(S):
        assert np.bincount(plan.paths[:, s], minlength=V).tolist() == [B // V] * V
    # independent permutations: the vendor of group 1 is not a function of the vendor of group 0
    joint = np.zeros((V, V), int)
    np.add.at(joint, (plan.paths[:, 0], plan.paths[:, 1]), 1)
    assert (joint > 0).sum() > V


def test_plan_tracks_inputs_through_the_permutations():
    V, S, B = 4, 3, 16
    plan = plan_paths(10, B, V, S, np.random.default_rng(5))
    assert sorted(plan.order0) == list(range(B)) and sorted(plan.order_last) == list(range(B))
    order = plan.order0
    for pi in plan.perms:
        order = order[pi]
    assert np.array_equal(order, plan.order_last)
    k = B // V
    for j, inp in enumerate(plan.order_last):
        if inp < 10:
            assert plan.paths[inp, S - 1] == j // k


@pytest.mark.parametrize("paired", [False, True], ids=["forward", "forward_paired"])
def test_batches_larger_than_the_largest_bucket_are_split_in_order(paired):
    """19 distinct inputs through buckets of at most 8 (chunks of 8, 8 and 3): each input gets the logits of the
    NumPy twin on its own path (and, paired, the leader's of the plain weights), and each full chunk is balanced
    on its own, so a reordered, dropped or repeated chunk cannot pass."""
    spec, V, eps = mlp(hidden=(8,)), 4, 0.05
    params = spec.init_params(0)
    seeds = fresh_seeds(len(spec.groups), V, np.random.default_rng(0))
    engine = Engine(spec, V, max_batch=8)
    weights = engine.materialize(params, seeds, eps)
    x = np.random.default_rng(4).uniform(0, 255, size=(19, *spec.input_shape)).astype(np.float32)
    if paired:
        logits, paths, leader = engine.forward_paired(weights, x, np.random.default_rng(5))
        np.testing.assert_allclose(leader, numpy_mlp(spec, params, x), rtol=1e-4, atol=1e-4)
    else:
        logits, paths = engine.forward(weights, x, np.random.default_rng(5))
    assert logits.shape == (19, 10) and paths.shape == (19, len(spec.groups))
    for lo in (0, 8):
        for s in range(len(spec.groups)):
            assert np.bincount(paths[lo:lo + 8, s], minlength=V).tolist() == [2] * V
    for i in range(len(x)):
        twin = numpy_mlp(spec, path_params(spec, params, seeds, paths[i], eps), x[i:i + 1])[0]
        np.testing.assert_allclose(logits[i], twin, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("paired", [False, True], ids=["forward", "forward_paired"])
def test_a_lone_input_takes_one_random_path_in_one_graph(paired):
    """A batch of one runs on its own graph (one slot; paired, two: the leader and the path) instead of a bucket of
    V slots: each of 24 calls gets the NumPy twin's logits of the path it reports, replayed by one captured graph
    whose vendors are bound per call, and the paths it draws reach every vendor of every group."""
    spec, V, eps = mlp(hidden=(8,)), 4, 0.05
    params = spec.init_params(0)
    seeds = fresh_seeds(len(spec.groups), V, np.random.default_rng(0))
    engine = Engine(spec, V, max_batch=8)
    weights = engine.materialize(params, seeds, eps)
    engine.warmup(weights, [engine.buckets[0]], paired)
    assert engine._lone_jits[paired].captured is not None  # warmed with the smallest bucket, off the request path
    x = np.random.default_rng(4).uniform(0, 255, size=(24, *spec.input_shape)).astype(np.float32)
    rng, seen = np.random.default_rng(5), []
    for i in range(len(x)):
        if paired:
            logits, paths, leader = engine.forward_paired(weights, x[i:i + 1], rng)
            np.testing.assert_allclose(leader, numpy_mlp(spec, params, x[i:i + 1]), rtol=1e-4, atol=1e-4)
        else:
            logits, paths = engine.forward(weights, x[i:i + 1], rng)
        assert logits.shape == (1, 10) and paths.shape == (1, len(spec.groups))
        twin = numpy_mlp(spec, path_params(spec, params, seeds, paths[0], eps), x[i:i + 1])
        np.testing.assert_allclose(logits, twin, rtol=1e-4, atol=1e-4)
        seen.append(paths[0])
    for s in range(len(spec.groups)):
        assert set(np.asarray(seen)[:, s].tolist()) == set(range(V))


def test_bad_shapes_are_refused():
    spec = mlp(hidden=(8,))
    engine = Engine(spec, 2, max_batch=8)
    weights = engine.materialize(spec.init_params(0), fresh_seeds(2, 2, np.random.default_rng(0)), 0.05)
    with pytest.raises(ValueError, match="shape"):
        engine.forward(weights, np.zeros((3, 28, 28), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="seeds"):
        engine.materialize(spec.init_params(0), np.zeros((2, 3), np.uint64), 0.05)


def test_default_buckets_are_multiples_of_v():
    assert default_buckets(4, 256) == [4, 8, 16, 32, 64, 128, 256]
    assert default_buckets(3, 10) == [3, 6, 12]


def test_one_captured_graph_serves_every_version():
    """Weights are graph inputs: after the JIT captured version A, version B's weights give B's logits."""
    spec = mlp(hidden=(16,))
    engine = Engine(spec, 2, buckets=[4])
    seeds = fresh_seeds(2, 2, np.random.default_rng(0))
    a = engine.materialize(spec.init_params(0), seeds, 0.05, version=0)
    b = engine.materialize(spec.init_params(1), seeds, 0.05, version=1)
    x = np.random.default_rng(1).uniform(0, 255, size=(4, *spec.input_shape)).astype(np.float32)
    engine.warmup(a)  # captures the bucket's graph on version A
    logits_b, paths_b = engine.forward(b, x, np.random.default_rng(2))
    fresh = Engine(spec, 2, buckets=[4])  # never saw version A
    expected, paths = fresh.forward(fresh.materialize(spec.init_params(1), seeds, 0.05), x, np.random.default_rng(2))
    assert np.array_equal(paths, paths_b)
    np.testing.assert_allclose(logits_b, expected, rtol=1e-5, atol=1e-6)
    logits_a, _ = engine.forward(a, x, np.random.default_rng(2))
    assert np.abs(logits_a - logits_b).max() > 1e-3


def test_antithetic_mirrors_subtract_their_partners_delta():
    """The naive twin itself: a mirror (vendor 2j) runs θ − δ(σ_{2j−1}), its partner θ + δ(σ_{2j−1})."""
    spec, V, eps = mlp(hidden=(8,)), 5, 0.05
    params = spec.init_params(0)
    seeds = fresh_seeds(len(spec.groups), V, np.random.default_rng(4), antithetic=True)
    assert vendor_signs(V, True).tolist() == [1, 1, -1, 1, -1] and vendor_signs(V, False).tolist() == [1] * V
    for vendor, partner, sign in [(1, 1, 1.0), (2, 1, -1.0), (3, 3, 1.0), (4, 3, -1.0)]:
        path = np.array([vendor, 0])  # group 0 on this vendor, group 1 on the leader
        got = path_params(spec, params, seeds, path, eps, antithetic=True)
        for key, d in group_delta(spec, 0, int(seeds[0, partner]), eps).items():
            np.testing.assert_array_equal(got[key], params[key] + np.float32(sign) * d)
        for key in spec.group_shapes(1):
            np.testing.assert_array_equal(got[key], params[key])


@pytest.mark.parametrize("spec", [pytest.param(mlp(hidden=(24, 12)), id="mlp"),
                                  pytest.param(beautiful_mnist(), id="beautiful_mnist", marks=pytest.mark.slow)])
def test_materialize_equals_the_numpy_twin_bit_for_bit_in_every_version(spec):
    """The JIT'd materialize (plain and captured on the 1st version, replayed after) gives every vendor's
    θ ± δ exactly as the NumPy twin, and each version keeps buffers of its own: an earlier version's weights
    are unchanged after later versions were materialized (in-flight batches of a hot swap still read them)."""
    V, S = 5, len(spec.groups)
    engine = Engine(spec, V, max_batch=V)
    rng = np.random.default_rng(11)
    keys = [key for s in range(S) for key in spec.group_shapes(s)]
    versions = []
    for v, (eps, antithetic) in enumerate([(0.05, False), (0.2, True), (0.01, False), (0.5, True), (0.07, False)]):
        params = {k: p + np.float32(v) for k, p in spec.init_params(v).items()}
        seeds = fresh_seeds(S, V, rng, antithetic)
        versions.append((engine.materialize(params, seeds, eps, version=v, antithetic=antithetic), params, antithetic))
    assert engine._materialize_jit is not None and engine._materialize_jit.captured is not None  # replays ran
    for weights, params, antithetic in versions:
        assert len(weights.tensors) == len(keys)
        for vendor in range(V):
            expected = path_params(spec, params, weights.seeds, np.full(S, vendor), weights.eps, antithetic)
            for tensor, key in zip(weights.tensors, keys, strict=True):
                got, want = tensor.numpy()[vendor], expected[key]
                assert got.shape == want.shape
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (weights.version, vendor, key)


@pytest.mark.parametrize("spec", [mlp(hidden=(16,)), beautiful_mnist()], ids=["mlp", "beautiful_mnist"])
def test_leader_weights_are_what_a_leader_only_materialize_gives_bit_for_bit(spec):
    """The guard's and the head's fast path: the same tensors in the same order, and the same logits."""
    engine = Engine(spec, 1, max_batch=4)
    params = spec.init_params(3)
    fast, slow = engine.leader_weights(params), engine.materialize(params, leader_seeds(spec), 0.0)
    assert len(fast.tensors) == len(slow.tensors)
    for a, b in zip(fast.tensors, slow.tensors, strict=True):
        assert a.shape == b.shape and np.array_equal(a.numpy(), b.numpy())
    x = np.random.default_rng(0).uniform(0, 255, size=(3, *spec.input_shape)).astype(np.float32)
    rng = np.random.default_rng(0)
    assert np.array_equal(engine.forward(fast, x, rng)[0], engine.forward(slow, x, rng)[0])
    with pytest.raises(ValueError, match="leader-only"):
        Engine(spec, 2, max_batch=4).leader_weights(params)


def test_leader_only_materialize_is_the_parameters_themselves():
    spec = mlp(hidden=(16,))
    engine = Engine(spec, 1, max_batch=4)
    for v in range(4):
        params = spec.init_params(v)
        weights = engine.materialize(params, leader_seeds(spec), eps=0.1 * v)
        for tensor, key in zip(weights.tensors, [k for s in range(2) for k in spec.group_shapes(s)], strict=True):
            assert np.array_equal(tensor.numpy()[0], params[key])
