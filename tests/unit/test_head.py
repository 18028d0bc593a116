"""The head's gradient from the logits its probes moved (marketplace.head), against the gradient itself."""

import numpy as np
import pytest

from marketplace.deltas import group_delta, vendor_signs
from marketplace.head import HeadReplay, feature_spec, head_gradient, known_damping, linear_head, replay_head_gradient
from marketplace.models import beautiful_mnist, mlp
from marketplace.reconcile import ReconcileConfig, Records, VersionSeeds, cross_entropy, fresh_seeds, reconcile

SPEC = mlp(hidden=(16,))  # the head: group 1, Linear(16, 10)
W_KEY, B_KEY = "1.fc.weight", "1.fc.bias"
EPS = 0.05


def head_records(seed: int, n: int, V: int, learned_only: bool = True, eps: float = EPS, antithetic: bool = False,
                 params: dict | None = None):
    """Features, labels, params, seeds and the logits a paired record keeps: leader W·h + b, probe (W+δW)·h + b+δb.

    ``learned_only`` False: group 0 is probed too (its seeds non-zero), as in a version 0 that probes every group;
    the probe logits still move by the head's delta only, so such records carry a usable measurement that the
    estimator must nevertheless leave out of W (in a real model their features moved)."""
    rng = np.random.default_rng(seed)
    params = SPEC.init_params(seed) if params is None else params
    h = np.maximum(rng.normal(size=(n, 16)), 0)
    label = rng.integers(0, 10, n)
    seeds = fresh_seeds(2, V, rng, antithetic=antithetic, learned=np.array([not learned_only, True]))
    signs = vendor_signs(V, antithetic)
    path = rng.integers(0, V, size=(n, 2))
    leader = h @ params[W_KEY].T.astype(np.float64) + params[B_KEY]
    probe = leader.copy()
    for v in range(1, V):
        d = group_delta(SPEC, 1, int(seeds[1, v]), eps)
        rows = path[:, 1] == v
        probe[rows] += signs[v] * (h[rows] @ d[W_KEY].T.astype(np.float64) + d[B_KEY])
    return h, label, params, VersionSeeds(seeds, eps, antithetic), path, leader, probe


def true_gradient(h, label, params):
    z = h @ params[W_KEY].T.astype(np.float64) + params[B_KEY]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(label)), label] -= 1.0
    return p.T @ h / len(label), p.mean(0)  # ∂ mean CE / ∂W, ∂b


def test_linear_head_finds_the_last_linear_layer_of_both_shipped_architectures():
    assert linear_head(SPEC) == (W_KEY, B_KEY)
    assert linear_head(beautiful_mnist()) == ("2.fc.weight", "2.fc.bias")
    assert linear_head(mlp(hidden=(16,), num_classes=3)) == ("1.fc.weight", "1.fc.bias")


def test_the_bias_gradient_is_exact_and_the_weight_gradient_unbiased():
    h, label, params, src, path, leader, probe = head_records(seed=0, n=6000, V=16)
    sources = {0: src}
    flat, measured = head_gradient(SPEC, probe, leader, label, np.zeros(len(label), np.int64), path, sources,
                                   np.ones(len(label), bool))
    gW, gb = true_gradient(h, label, params)
    est_b, est_W = flat[:10], flat[10:].reshape(10, 16)  # sorted keys: the bias first, as the delta counter walks
    np.testing.assert_allclose(est_b, gb, atol=1e-9)
    assert measured == int((path[:, 1] != 0).sum())  # the leader's vendor measures nothing
    cosine = float((est_W * gW).sum() / np.linalg.norm(est_W) / np.linalg.norm(gW))
    assert cosine > 0.9
    assert float((est_W * gW).sum() / (gW * gW).sum()) == pytest.approx(1.0, abs=0.15)  # unbiased: projection ≈ 1


def test_records_without_both_logits_or_of_another_width_do_not_count():
    h, label, params, src, path, leader, probe = head_records(seed=1, n=64, V=4)
    sources = {0: src}
    use = np.ones(64, bool)
    version, vendor = np.zeros(64, np.int64), path[:, 1]  # group 0 has seed 0 everywhere: its vendor is moot
    none = np.full_like(probe, np.nan)
    assert head_gradient(SPEC, none, leader, label, version, path, sources, use) is None
    assert head_gradient(SPEC, probe[:, :3], leader[:, :3], label, version, path, sources, use) is None
    half = probe.copy()
    half[32:] = np.nan
    _, measured = head_gradient(SPEC, half, leader, label, version, path, sources, use)
    assert measured == int((vendor[:32] != 0).sum())
    _, measured = head_gradient(SPEC, probe, leader, label, version, path, sources, np.arange(64) % 2 == 0)
    assert measured == int((vendor[::2] != 0).sum())  # only the records ``use`` lets count


def test_reconcile_steps_the_head_down_its_logits_gradient_within_the_cap():
    """A signal step with head_gradient="logits" lowers the loss of the very records it learned from, moves only
    the head, and keeps to max_step; records without logits fall back to the SPSA direction."""
    h, label, params, src, path, leader, probe = head_records(seed=2, n=2048, V=4)
    sources = {0: src}
    version = np.zeros(len(label), np.int64)
    loss, base = cross_entropy(probe, label), cross_entropy(leader, label)
    config = ReconcileConfig(min_cohort=1, baseline="leader", step="signal", max_step=0.01, learn_groups="head",
                             head_gradient="logits", head_learning_rate=0.05)
    out = reconcile(SPEC, params, Records(version, path, loss, label, base, probe, leader), sources, config)
    assert out.stats["head_gradient"] == "logits" and out.stats["head_records"] == int((path[:, 1] != 0).sum())
    new = out.params
    after = cross_entropy(h @ new[W_KEY].T.astype(np.float64) + new[B_KEY], label)
    assert after.mean() < base.mean()
    np.testing.assert_array_equal(new["0.fc.weight"], params["0.fc.weight"])
    step = np.sqrt(sum(float(np.square(new[k] - params[k].astype(np.float64)).sum()) for k in (W_KEY, B_KEY)))
    theta = np.sqrt(sum(float(np.square(params[k], dtype=np.float64).sum()) for k in (W_KEY, B_KEY)))
    assert step <= 0.01 * theta * (1 + 1e-5)
    spsa = reconcile(SPEC, params, Records(version, path, loss, label, base), sources, config)
    assert spsa.stats["head_gradient"] == "spsa" and spsa.stats["head_records"] is None
    # a rate the cap binds: the step is exactly max_step of the head's norm; η = 0 stops it altogether
    big = ReconcileConfig(**{**config.__dict__, "head_learning_rate": 10.0})
    capped = reconcile(SPEC, params, Records(version, path, loss, label, base, probe, leader), sources, big)
    step = np.sqrt(sum(float(np.square(capped.params[k] - params[k].astype(np.float64)).sum())
                       for k in (W_KEY, B_KEY)))
    assert step == pytest.approx(0.01 * theta, rel=1e-4)
    frozen = ReconcileConfig(**{**config.__dict__, "learning_rate": 0.0})
    still = reconcile(SPEC, params, Records(version, path, loss, label, base, probe, leader), sources, frozen)
    assert all(np.array_equal(still.params[k], params[k]) for k in params)


def test_versions_with_other_scales_and_mirrored_vendors_estimate_the_same_gradient():
    """Records of three versions (V 5, 4, 7; ε 0.05, 0.02, 0.1; two with antithetic pairs) in one batch, all served
    at the same weights: the bias gradient is exact and the weight gradient unbiased."""
    params = SPEC.init_params(7)
    parts = [head_records(seed=10 + i, n=12000, V=V, eps=eps, antithetic=anti, params=params)
             for i, (V, eps, anti) in enumerate([(5, 0.05, True), (4, 0.02, False), (7, 0.1, True)])]
    h = np.concatenate([p[0] for p in parts])
    label = np.concatenate([p[1] for p in parts])
    version = np.concatenate([np.full(len(p[1]), n, np.int64) for n, p in enumerate(parts)])
    flat, measured = head_gradient(SPEC, np.concatenate([p[6] for p in parts]), np.concatenate([p[5] for p in parts]),
                                   label, version, np.concatenate([p[4] for p in parts]),
                                   {n: p[3] for n, p in enumerate(parts)}, np.ones(len(label), bool))
    gW, gb = true_gradient(h, label, params)
    np.testing.assert_allclose(flat[:10], gb, atol=1e-9)
    est_W = flat[10:].reshape(10, 16)
    assert float((est_W * gW).sum() / (gW * gW).sum()) == pytest.approx(1.0, abs=0.1)
    assert float((est_W * gW).sum() / np.linalg.norm(est_W) / np.linalg.norm(gW)) > 0.8


def test_records_whose_feature_groups_were_probed_count_only_toward_the_bias():
    h, label, params, src, path, leader, probe = head_records(seed=4, n=4000, V=4, learned_only=False)
    flat, measured = head_gradient(SPEC, probe, leader, label, np.zeros(len(label), np.int64), path, {0: src},
                                   np.ones(len(label), bool))
    assert measured == int(((path[:, 0] == 0) & (path[:, 1] != 0)).sum())  # group 0's leader vendor only
    np.testing.assert_allclose(flat[:10], true_gradient(h, label, params)[1], atol=1e-9)  # every record


def test_the_bench_finds_the_logits_estimate_far_closer_to_the_gradient_than_spsa():
    """bench.head_gradient's one batch, on random inputs through a random mlp: the same records, both estimates."""
    from bench.head_gradient import one_batch

    rng = np.random.default_rng(11)
    params = mlp().init_params(11)
    cos = [one_batch(params, rng.integers(0, 256, (256, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 256),
                     4, EPS, rng) for _ in range(5)]
    spsa, logits = np.mean([c["spsa"] for c in cos]), np.mean([c["logits"] for c in cos])
    assert logits > 0.2 and logits > 4 * abs(spsa), (spsa, logits)  # measured: 0.28 against 0.02


# ------------------------------------------------------------------------------------------------ replay
def test_the_replay_gradient_without_damping_is_the_exact_gradient():
    rng = np.random.default_rng(3)
    params = SPEC.init_params(3)
    h, label = np.maximum(rng.normal(size=(40, 16)), 0), rng.integers(0, 10, 40)
    flat, n = replay_head_gradient(SPEC, params, HeadReplay(h, label))
    gW, gb = true_gradient(h, label, params)
    assert n == 40
    np.testing.assert_allclose(flat[:10], gb, atol=1e-12)  # sorted keys: the bias first
    np.testing.assert_allclose(flat[10:].reshape(10, 16), gW, atol=1e-12)
    assert replay_head_gradient(SPEC, params, HeadReplay(h[:0], label[:0])) is None


def test_damping_keeps_the_known_answers_and_moves_what_the_known_data_does_not_use():
    """Known features live in the first 8 dimensions, a new input's in the last 8: the damped step barely moves
    the known inputs' logits (it moved them fully undamped) and still moves the new input's."""
    rng = np.random.default_rng(4)
    params = SPEC.init_params(4)
    known = np.hstack([np.abs(rng.normal(size=(500, 8))), np.zeros((500, 8))])
    new = np.hstack([np.zeros((16, 8)), np.abs(rng.normal(size=(16, 8)))])
    label = np.full(16, 3)
    damping = known_damping(known, 300.0)
    assert known_damping(known, 0.0) is None

    def logit_moves(d):
        flat, _ = replay_head_gradient(SPEC, params, HeadReplay(new, label, d))
        step = np.hstack([flat[10:].reshape(10, 16), flat[:10, None]])  # (C, H+1)
        return (np.abs(np.hstack([known, np.ones((500, 1))]) @ step.T).mean(),
                np.abs(np.hstack([new, np.ones((16, 1))]) @ step.T).mean())

    (known_plain, new_plain), (known_damped, new_damped) = logit_moves(None), logit_moves(damping)
    assert known_damped < 0.05 * known_plain
    assert new_damped > 0.5 * new_plain
    with pytest.raises(ValueError, match="damping must be"):
        HeadReplay(new, label, np.eye(3))


def test_reconcile_steps_the_head_by_the_replay_gradient_and_falls_back_to_the_logits_without_one():
    h, label, params, src, path, leader, probe = head_records(seed=5, n=64, V=4)
    records = Records(np.zeros(64, np.int64), path, cross_entropy(probe, label), label,
                      cross_entropy(leader, label), probe, leader)
    config = ReconcileConfig(step="signal", learn_groups="head", head_gradient="replay", head_learning_rate=0.01,
                             baseline="leader", min_cohort=1, max_step=0.0)
    replay = HeadReplay(h[:20], label[:20])
    out = reconcile(SPEC, params, records, {0: src}, config, replay=replay)
    assert (out.stats["head_gradient"], out.stats["head_records"]) == ("replay", 20)
    flat, _ = replay_head_gradient(SPEC, params, replay)
    np.testing.assert_allclose(out.params[B_KEY], params[B_KEY] - 0.01 * flat[:10], atol=1e-6)
    np.testing.assert_allclose(out.params[W_KEY], params[W_KEY] - 0.01 * flat[10:].reshape(10, 16), atol=1e-6)
    assert reconcile(SPEC, params, records, {0: src}, config).stats["head_gradient"] == "logits"


def test_the_feature_spec_is_the_model_without_its_head():
    spec = feature_spec(beautiful_mnist())
    assert (len(spec.groups), spec.num_classes) == (2, 576)
    assert set(spec.param_shapes()) == {k for k in beautiful_mnist().param_shapes() if not k.startswith("2.")}
    with pytest.raises(ValueError, match="linear layer"):
        feature_spec(mlp(hidden=()))


def test_the_head_steps_at_the_rate_of_the_gradient_it_took():
    """A damped replay gradient at replay_learning_rate; the logits fallback and an undamped replay gradient at
    head_learning_rate (the damped gradient is far smaller: its rate would throw the others to the cap)."""
    h, label, params, src, path, leader, probe = head_records(seed=6, n=64, V=4)
    records = Records(np.zeros(64, np.int64), path, cross_entropy(probe, label), label,
                      cross_entropy(leader, label), probe, leader)
    config = ReconcileConfig(step="signal", learn_groups="head", head_gradient="replay", head_learning_rate=0.02,
                             replay_learning_rate=0.7, baseline="leader", min_cohort=1, max_step=0.0)
    damping = known_damping(h, 10.0)
    rates = {name: (out.stats["head_gradient"], out.stats["head_learning_rate"]) for name, out in {
        "damped": reconcile(SPEC, params, records, {0: src}, config, replay=HeadReplay(h, label, damping)),
        "undamped": reconcile(SPEC, params, records, {0: src}, config, replay=HeadReplay(h, label)),
        "none kept": reconcile(SPEC, params, records, {0: src}, config)}.items()}
    assert rates == {"damped": ("replay", 0.7), "undamped": ("replay", 0.02), "none kept": ("logits", 0.02)}


def test_replay_labels_outside_the_classes_are_refused():
    params = SPEC.init_params(7)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        replay_head_gradient(SPEC, params, HeadReplay(np.ones((2, 16)), np.array([3, 10])))
    with pytest.raises(ValueError, match="labels must lie"):
        replay_head_gradient(SPEC, params, HeadReplay(np.ones((2, 16)), np.array([-1, 0])))
