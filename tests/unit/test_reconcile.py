"""Reconciliation against the naive formula Σ_i a_i·δ(path_i), and the filters around it."""

import numpy as np
import pytest

from marketplace.deltas import group_delta
from marketplace.models import mlp
from marketplace.reconcile import (
    ReconcileConfig,
    Records,
    VersionSeeds,
    attribute,
    class_balance,
    cross_entropy,
    fresh_seeds,
    keep_mask,
    learned_groups,
    reconcile,
)

SPEC = mlp(hidden=(16, 8))
S, V = 3, 4


def random_records(rng, versions, per_version):
    version = np.repeat(np.array(versions), per_version)
    path = rng.integers(0, V, size=(len(version), S))
    loss = rng.gamma(2.0, 0.5, size=len(version)) + version * 0.3  # cohorts differ in baseline
    label = rng.integers(0, 10, size=len(version))
    return Records(version, path, loss, label)


def naive_credit(loss, config):
    """Each record's credit from the definition, one record at a time (nothing taken from the implementation).

    zscore: minus the loss's standard score in its cohort; rank: a record's rank is the number of losses below
    its own plus half the number of other records with the same loss (ties share their average rank), and the
    credit is 0.5 - rank/(n-1). No spread, or fewer than two records: no credit.
    """
    loss = [float(v) for v in loss]
    n = len(loss)
    if n < 2:
        return [0.0] * n
    if config.attribution == "zscore":
        mean = sum(loss) / n
        std = (sum((v - mean) ** 2 for v in loss) / n) ** 0.5
        return [0.0] * n if std == 0 else [-(v - mean) / std for v in loss]
    ranks = [sum(w < v for w in loss) + (sum(w == v for w in loss) - 1) / 2 for v in loss]
    return [0.5 - r / (n - 1) for r in ranks]


def naive_class_weights(labels):
    """n / (classes present · records of the record's class): each present class weighs the same in total."""
    labels = [int(v) for v in labels]
    return [len(labels) / (len(set(labels)) * labels.count(y)) for y in labels]


def naive_zscore_keep(loss, z):
    """Which losses of one cohort lie within z population standard deviations of the cohort's mean."""
    loss = [float(v) for v in loss]
    n = len(loss)
    mean = sum(loss) / n
    std = (sum((v - mean) ** 2 for v in loss) / n) ** 0.5
    if n < 3 or std == 0:
        return [True] * n
    return [abs(v - mean) <= z * std for v in loss]


def naive_credits(records, config):
    """Per record: the outlier filter, then the credit among its cohort's kept records (0 when dropped or when its
    cohort is smaller than min_cohort)."""
    credit = np.zeros(len(records.loss))
    for n in np.unique(records.version):
        idx = np.flatnonzero(records.version == n)
        if len(idx) < config.min_cohort:
            continue
        if config.outlier == "zscore":
            idx = idx[naive_zscore_keep(records.loss[idx], config.outlier_z)]
        a = naive_credit(records.loss[idx], config)
        if config.class_weights:
            a = [ai * wi for ai, wi in zip(a, naive_class_weights(records.label[idx]), strict=True)]
        credit[idx] = a
    return credit


def naive_direction(records, sources, config):
    """Σ_i a_i·δ(σ[version_i, s, path_i[s]]) record by record, then the unit step."""
    flat = {k: np.zeros(np.prod(v)) for k, v in SPEC.param_shapes().items()}
    credit = naive_credits(records, config)
    for i, ai in enumerate(credit):
        if ai:
            n = records.version[i]
            for s in range(S):
                seed = sources[int(n)].seeds[s, records.path[i, s]]
                for key, d in group_delta(SPEC, s, int(seed), sources[int(n)].eps).items():
                    flat[key] += ai * d.ravel().astype(np.float64)
    norm = np.sqrt(sum((v**2).sum() for v in flat.values()))
    return {k: v / norm for k, v in flat.items()}


@pytest.mark.parametrize("class_weights", [False, True], ids=["plain", "class-weights"])
def test_direction_matches_naive_formula_in_float64(class_weights):
    """The direction itself, before it is added to float32 weights, equals the naive sum to 1e-5 relative."""
    rng = np.random.default_rng(1)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05), 1: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    records = random_records(rng, [0, 1], 30)
    config = ReconcileConfig(learning_rate=1.0, min_cohort=1, class_weights=class_weights)
    zero = {k: np.zeros(v, np.float64) for k, v in SPEC.param_shapes().items()}
    result = reconcile(SPEC, zero, records, sources, config)
    expected = naive_direction(records, sources, config)
    got = np.concatenate([result.params[k].astype(np.float64).ravel() for k in zero])
    want = np.concatenate([expected[k] for k in zero])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("attribution", ["zscore", "rank"])
def test_matches_the_naive_formula(attribution):
    rng = np.random.default_rng(0)
    sources = {n: VersionSeeds(fresh_seeds(S, V, rng), eps) for n, eps in [(3, 0.05), (4, 0.02)]}
    records = random_records(rng, [3, 4], 40)
    config = ReconcileConfig(learning_rate=0.7, attribution=attribution, min_cohort=1)
    params = SPEC.init_params(1)
    result = reconcile(SPEC, params, records, sources, config)
    expected = naive_direction(records, sources, config)
    step = {k: (result.params[k].astype(np.float64) - params[k]).ravel() / 0.7 for k in params}
    got = np.concatenate([step[k] for k in params])
    want = np.concatenate([expected[k] for k in params])
    # float32 weights hold the step to about 1e-7 of |θ|; compare directions at that resolution
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    assert result.stats["records"] == 80 and len(result.stats["cohorts"]) == 2


@pytest.mark.parametrize("attribution", ["zscore", "rank"])
def test_outlier_filter_and_masked_credits_inside_reconcile_match_the_naive_formula(attribution):
    """reconcile()'s vectorised z-score filter, per cohort, and the credits of what it keeps: a dropped record, a
    cohort without spread and a held-back cohort move nothing; the rest is the naive sum over the kept records."""
    rng = np.random.default_rng(21)
    sources = {n: VersionSeeds(fresh_seeds(S, V, rng), 0.05) for n in range(4)}
    version = np.repeat([0, 1, 2, 3], [30, 30, 12, 5])  # cohort 3: fewer than min_cohort, held back
    # cohorts of different levels and spreads, rounded (ties, for the ranks)
    loss = np.round(rng.gamma(2.0, 0.5, len(version)) * np.array([1.0, 0.3, 1.0, 1.0])[version]
                    + np.array([0.0, 8.0, 0.0, 0.0])[version], 1)
    planted = [3, 40]  # an outlier in cohort 0 and one in cohort 1
    loss[planted] += [25.0, 3.0]
    loss[version == 2] = 1.5  # no spread: no credit, nothing filtered
    records = Records(version, rng.integers(0, V, (len(version), S)), loss, rng.integers(0, 10, len(version)))
    config = ReconcileConfig(learning_rate=1.0, min_cohort=8, outlier="zscore", outlier_z=2.0,
                             attribution=attribution)
    zero = {k: np.zeros(v, np.float64) for k, v in SPEC.param_shapes().items()}
    result = reconcile(SPEC, zero, records, sources, config)

    kept = {n: sum(naive_zscore_keep(loss[version == n], 2.0)) for n in (0, 1, 2)}
    assert kept[0] <= 29 and kept[1] <= 29 and kept[2] == 12  # the planted outliers are dropped...
    assert all(not naive_zscore_keep(loss[version == version[i]], 2.0)[i - np.flatnonzero(version == version[i])[0]]
               for i in planted)
    assert result.stats["outliers_dropped"] == 72 - sum(kept.values())  # ...and exactly what the rule drops
    assert [(c["version"], c["records"], c["kept"]) for c in result.stats["cohorts"]] == [
        (0, 30, kept[0]), (1, 30, kept[1]), (2, 12, 12)]
    assert result.stats["held_back"] == 5
    expected = naive_direction(records, sources, config)
    got = np.concatenate([result.params[k].astype(np.float64).ravel() for k in zero])
    want = np.concatenate([expected[k] for k in zero])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    # the filter is not a no-op here: without it the same records point elsewhere
    unfiltered = naive_direction(records, sources, ReconcileConfig(min_cohort=8, attribution=attribution))
    assert np.linalg.norm(np.concatenate([unfiltered[k] for k in zero]) - want) > 0.1


def test_step_has_the_learning_rate_as_its_length():
    rng = np.random.default_rng(2)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    params = SPEC.init_params(0)
    result = reconcile(SPEC, params, random_records(rng, [0], 64), sources, ReconcileConfig(learning_rate=0.25))
    step = np.concatenate([(result.params[k].astype(np.float64) - params[k]).ravel() for k in params])
    assert abs(np.linalg.norm(step) - 0.25) < 1e-4


def test_per_group_normalization_gives_each_group_a_unit_step():
    rng = np.random.default_rng(3)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    zero = {k: np.zeros(v, np.float64) for k, v in SPEC.param_shapes().items()}
    result = reconcile(SPEC, zero, random_records(rng, [0], 64), sources,
                       ReconcileConfig(learning_rate=1.0, normalize="group"))
    for s in range(S):
        keys = SPEC.group_shapes(s)
        norm = np.sqrt(sum((result.params[k].astype(np.float64) ** 2).sum() for k in keys))
        assert abs(norm - 1.0) < 1e-5


def test_small_cohorts_are_held_back():
    rng = np.random.default_rng(4)
    sources = {n: VersionSeeds(fresh_seeds(S, V, rng), 0.05) for n in (0, 1)}
    records = Records(np.array([0] * 20 + [1] * 3), rng.integers(0, V, (23, S)), rng.random(23))
    result = reconcile(SPEC, SPEC.init_params(0), records, sources, ReconcileConfig(min_cohort=8))
    assert result.used.tolist() == [True] * 20 + [False] * 3
    assert result.stats["held_back"] == 3 and [c["version"] for c in result.stats["cohorts"]] == [0]


def test_no_signal_means_no_update():
    rng = np.random.default_rng(5)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    params = SPEC.init_params(0)
    records = Records(np.zeros(16, int), rng.integers(0, V, (16, S)), np.ones(16))
    result = reconcile(SPEC, params, records, sources, ReconcileConfig())
    assert all(np.array_equal(result.params[k], params[k]) for k in params)
    assert result.stats["direction_norm"] == 0.0


def test_outlier_filters():
    loss = np.array([1.0] * 50 + [1.1] * 49 + [40.0])
    assert keep_mask(loss, ReconcileConfig(outlier="zscore", outlier_z=3.0)).sum() == 99
    assert not keep_mask(loss, ReconcileConfig(outlier="zscore"))[-1]
    trimmed = keep_mask(np.arange(100.0), ReconcileConfig(outlier="quantile", outlier_quantile=0.05))
    assert trimmed.sum() == 90 and not trimmed[0] and not trimmed[-1]
    assert keep_mask(loss, ReconcileConfig(outlier="none")).all()


def test_attributions_reward_low_loss():
    loss = np.array([3.0, 1.0, 2.0, 2.0])
    for kind in ("zscore", "rank"):
        a = attribute(loss, ReconcileConfig(attribution=kind))
        assert a[1] == a.max() and a[0] == a.min() and a[2] == a[3]
        assert abs(a.sum()) < 1e-12
    assert attribute(np.array([2.0]), ReconcileConfig()).tolist() == [0.0]


def test_class_balance_upweights_rare_classes():
    labels = np.array([0] * 30 + [9] * 2)
    w = class_balance(labels, 10)
    assert w[-1] > w[0] and abs(w.mean() - 1.0) < 1e-12
    assert abs(w[labels == 0].sum() - w[labels == 9].sum()) < 1e-9


def test_fresh_seeds_keep_the_leader():
    seeds = fresh_seeds(3, 4, np.random.default_rng(0))
    assert seeds.dtype == np.uint64 and not seeds[:, 0].any() and seeds[:, 1:].all()


def test_cross_entropy_matches_the_definition():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    expected = [-np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1))), np.log(3)]
    np.testing.assert_allclose(cross_entropy(logits, np.array([0, 2])), expected, rtol=1e-12)


def test_paths_naming_unknown_vendors_are_refused():
    rng = np.random.default_rng(6)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    records = Records(np.zeros(10, int), np.full((10, S), V), rng.random(10))
    with pytest.raises(ValueError, match="vendor"):
        reconcile(SPEC, SPEC.init_params(0), records, sources, ReconcileConfig(min_cohort=1))


def test_held_back_cohorts_may_have_more_vendors_than_live_ones():
    rng = np.random.default_rng(7)
    sources = {0: VersionSeeds(fresh_seeds(S, 2, rng), 0.05), 1: VersionSeeds(fresh_seeds(S, 8, rng), 0.05)}
    records = Records(np.array([0] * 20 + [1] * 3), np.concatenate([rng.integers(0, 2, (20, S)),
                                                                    np.full((3, S), 7)]), rng.random(23))
    result = reconcile(SPEC, SPEC.init_params(0), records, sources, ReconcileConfig(min_cohort=8))
    assert result.stats["records"] == 20 and result.stats["held_back"] == 3
    nothing = reconcile(SPEC, SPEC.init_params(0), Records(np.zeros(3, int), np.full((3, S), 3), rng.random(3)),
                        {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}, ReconcileConfig(min_cohort=8))
    assert nothing.stats["records"] == 0 and nothing.stats["direction_norm"] == 0.0


# ------------------------------------------------------------------------------ antithetic pairs


def test_fresh_seeds_antithetic_pairs_share_a_seed():
    seeds = fresh_seeds(3, 6, np.random.default_rng(1), antithetic=True)
    assert not seeds[:, 0].any() and seeds[:, 1:].all()
    assert np.array_equal(seeds[:, 2], seeds[:, 1]) and np.array_equal(seeds[:, 4], seeds[:, 3])
    assert (seeds[:, 1] != seeds[:, 3]).all() and (seeds[:, 3] != seeds[:, 5]).all()  # pairs are distinct
    plain = fresh_seeds(3, 6, np.random.default_rng(1))
    assert len(np.unique(plain[:, 1:])) == plain[:, 1:].size  # without pairs, every vendor its own seed


def test_direction_with_mirrored_pairs_is_the_credit_difference_times_the_shared_delta():
    """D_s = Σ_j (A_{2j−1} − A_{2j})·δ(σ_{2j−1}) (+ A_v·δ(σ_v) for an unpaired vendor), A summed record by record."""
    rng = np.random.default_rng(11)
    Vp = 6  # leader, pairs (1, 2) and (3, 4), vendor 5 unpaired
    sources = {0: VersionSeeds(fresh_seeds(S, Vp, rng, antithetic=True), 0.05, antithetic=True)}
    n = 60
    records = Records(np.zeros(n, int), rng.integers(0, Vp, size=(n, S)), rng.gamma(2.0, 0.5, n),
                      rng.integers(0, 10, n))
    config = ReconcileConfig(learning_rate=1.0, min_cohort=1)
    zero = {k: np.zeros(v, np.float64) for k, v in SPEC.param_shapes().items()}
    result = reconcile(SPEC, zero, records, sources, config)

    a = naive_credit(records.loss, config)
    seeds = sources[0].seeds
    expected = {k: np.zeros(np.prod(v)) for k, v in SPEC.param_shapes().items()}
    for s in range(S):
        A = np.zeros(Vp)
        for i in range(n):
            A[records.path[i, s]] += a[i]
        for lead, coef in [(1, A[1] - A[2]), (3, A[3] - A[4]), (5, A[5])]:
            for key, d in group_delta(SPEC, s, int(seeds[s, lead]), 0.05).items():
                expected[key] += coef * d.ravel().astype(np.float64)
    norm = np.sqrt(sum((v ** 2).sum() for v in expected.values()))
    got = np.concatenate([result.params[k].astype(np.float64).ravel() for k in zero])
    want = np.concatenate([expected[k] / norm for k in zero])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    # read without the mirror signs, the same records give another direction: the signs matter
    plain = reconcile(SPEC, zero, records, {0: VersionSeeds(seeds, 0.05)}, config)
    other = np.concatenate([plain.params[k].astype(np.float64).ravel() for k in zero])
    assert np.linalg.norm(other - want) > 0.1


# ------------------------------------------------------------------------------ class-mean baseline


def test_class_baseline_credit_ignores_a_constant_added_to_one_class():
    rng = np.random.default_rng(12)
    sources = {n: VersionSeeds(fresh_seeds(S, V, rng), 0.05) for n in (0, 1)}
    records = random_records(rng, [0, 1], 40)
    shifted = Records(records.version, records.path, records.loss + 2.5 * (records.label == 3), records.label)
    params = SPEC.init_params(2)

    def step(recs, baseline):
        out = reconcile(SPEC, params, recs, sources, ReconcileConfig(min_cohort=1, baseline=baseline))
        return np.concatenate([(out.params[k].astype(np.float64) - params[k]).ravel() for k in params])

    with_class = step(records, "class")
    np.testing.assert_allclose(step(shifted, "class"), with_class, rtol=0, atol=1e-6)
    # without the baseline the harder class does move the step, and the baseline is not a no-op
    assert np.linalg.norm(step(shifted, "none") - step(records, "none")) > 1e-2
    assert np.linalg.norm(with_class - step(records, "none")) > 1e-2
    with pytest.raises(ValueError, match="baseline"):
        reconcile(SPEC, params, records, sources, ReconcileConfig(min_cohort=1, baseline="bogus"))


def test_class_means_are_per_cohort_and_per_class_over_kept_records():
    from marketplace.reconcile import Cohorts, class_means

    loss = np.array([1.0, 3.0, 10.0, 5.0, 7.0, 100.0])
    label = np.array([0, 0, 1, 0, 0, 0])
    keep = np.array([True, True, True, True, True, False])
    cid = np.array([0, 0, 0, 1, 1, 1])
    got = class_means(Cohorts(cid, 2), label, loss, keep, 3)
    assert got.tolist() == [2.0, 2.0, 10.0, 6.0, 6.0, 6.0]  # the dropped 100 counts in no mean
    one = class_means(Cohorts(np.zeros(3, np.int64), 1), label[:3], loss[:3], keep[:3], 3)
    assert one.tolist() == [2.0, 2.0, 10.0]


# ------------------------------------------------------------------------------ step schedule and momentum


def test_class_loss_gap_and_the_loss_gap_schedule():
    from marketplace.update import UpdateConfig, class_loss_gap, scheduled_lr

    loss = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 3.0])
    label = np.array([0, 0, 1, 1, 2, 2])  # class means 1, 1, 4; overall mean 2
    assert class_loss_gap(loss, label, 10) == pytest.approx(2.0)
    assert class_loss_gap(np.ones(4), np.array([0, 1, 2, 3]), 10) == 0.0
    assert class_loss_gap(np.zeros(0), np.zeros(0, np.int64), 10) == 0.0

    assert scheduled_lr(0.5, 3.0, UpdateConfig()) == 0.5  # constant ignores the gap
    uc = UpdateConfig(lr_schedule="loss_gap", lr_min_ratio=0.2, gap_scale=4.0)
    assert scheduled_lr(0.5, 0.0, uc) == pytest.approx(0.1)  # no gap: the smallest step
    assert scheduled_lr(0.5, 2.0, uc) == pytest.approx(0.5 * (0.2 + 0.8 * 0.5))
    assert scheduled_lr(0.5, 4.0, uc) == pytest.approx(0.5) and scheduled_lr(0.5, 40.0, uc) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(0.5, 1.0, UpdateConfig(lr_schedule="bogus"))  # type: ignore[arg-type]


def _momentum_setup(seed: int, params_seed: int):
    """One cohort of 48 records, weights, and a grandparent 0.01 away: what a momentum step is built from."""
    rng = np.random.default_rng(seed)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    records = random_records(rng, [0], 48)
    params = SPEC.init_params(params_seed)
    grand = {k: v - np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    return rng, sources, records, params, grand


def test_propose_update_schedules_the_step_and_adds_exactly_beta_times_the_last_step():
    from marketplace.update import UpdateConfig, previous_step, propose_update

    rng, sources, records, params, grand = _momentum_setup(13, 3)
    last = previous_step(params, grand)
    assert previous_step(params, None) is None
    rc = ReconcileConfig(learning_rate=0.3, min_cohort=1)

    plain = propose_update(SPEC, params, records, sources, rc, UpdateConfig())
    assert plain.stats["learning_rate"] == 0.3
    heavy = propose_update(SPEC, params, records, sources, rc, UpdateConfig(momentum=0.6), last)
    for k in params:
        np.testing.assert_allclose(heavy.params[k].astype(np.float64) - plain.params[k],
                                   0.6 * (params[k].astype(np.float64) - grand[k]), rtol=0, atol=2e-6)
    norm = np.sqrt(sum(float(((params[k].astype(np.float64) - grand[k]) ** 2).sum()) for k in params))
    assert heavy.stats["momentum_norm"] == pytest.approx(0.6 * norm)

    scheduled = propose_update(SPEC, params, records, sources, rc,
                               UpdateConfig(lr_schedule="loss_gap", lr_min_ratio=0.1, gap_scale=100.0))
    gap = scheduled.stats["loss_gap"]
    assert gap > 0 and scheduled.stats["learning_rate"] == pytest.approx(0.3 * (0.1 + 0.9 * gap / 100.0))
    step = np.concatenate([(scheduled.params[k].astype(np.float64) - params[k]).ravel() for k in params])
    assert np.linalg.norm(step) == pytest.approx(scheduled.stats["learning_rate"], rel=1e-3)

    nothing = propose_update(SPEC, params, Records(np.zeros(3, int), rng.integers(0, V, (3, S)), rng.random(3),
                                                   np.zeros(3, np.int64)), sources,
                             ReconcileConfig(min_cohort=8), UpdateConfig(momentum=0.6), last)
    assert all(np.array_equal(nothing.params[k], params[k]) for k in params)  # no records used: no momentum either


def test_momentum_leaves_the_groups_that_do_not_learn_where_they_are():
    """A last step that moved every group (learn_groups was all) does not move the frozen ones once it is head."""
    from marketplace.update import UpdateConfig, previous_step, propose_update

    _, sources, records, params, grand = _momentum_setup(17, 4)
    rc = ReconcileConfig(learning_rate=0.3, min_cohort=1, learn_groups="head")
    plain = propose_update(SPEC, params, records, sources, rc, UpdateConfig())
    heavy = propose_update(SPEC, params, records, sources, rc, UpdateConfig(momentum=0.6),
                           previous_step(params, grand))
    for k in params:
        if k.startswith(f"{S - 1}."):
            np.testing.assert_allclose(heavy.params[k].astype(np.float64) - plain.params[k],
                                       0.6 * (params[k].astype(np.float64) - grand[k]), rtol=0, atol=2e-6)
        else:
            np.testing.assert_array_equal(heavy.params[k], params[k])


# ------------------------------------------------------------------------ paired baseline and signal steps
def _paired_setup(seed: int = 3):
    rng = np.random.default_rng(seed)
    params = SPEC.init_params(seed)
    sources = {0: VersionSeeds(fresh_seeds(S, V, rng), 0.05)}
    n = 64
    path = rng.integers(0, V, size=(n, S))
    label = rng.integers(0, 10, size=n)
    diff = rng.normal(0.0, 0.01, size=n)  # loss on the probe path minus the leader's, per input
    base = rng.gamma(2.0, 1.0, size=n)  # each input's own difficulty
    return params, sources, path, label, diff, base


def _step(before: dict, after: dict) -> np.ndarray:
    return np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in before])


def test_leader_baseline_removes_each_inputs_own_difficulty():
    """With the leader's loss on the same input as baseline, only the difference matters, not the loss level."""
    params, sources, path, label, diff, base = _paired_setup()
    config = ReconcileConfig(learning_rate=0.01, min_cohort=1, baseline="leader", step="signal", max_step=0)
    version = np.zeros(len(diff), np.int64)
    a = reconcile(SPEC, params, Records(version, path, base + diff, label, base), sources, config)
    b = reconcile(SPEC, params, Records(version, path, 5 * base + diff, label, 5 * base), sources, config)
    np.testing.assert_allclose(_step(params, a.params), _step(params, b.params), atol=1e-7)
    assert a.stats["paired"] == len(diff)
    plain = reconcile(SPEC, params, Records(version, path, base + diff, label), sources, config)
    assert plain.stats["paired"] == 0  # no leader losses: class means, a different step
    assert np.abs(_step(params, plain.params) - _step(params, a.params)).max() > 1e-6


def test_signal_step_follows_the_strength_of_the_signal_and_the_cap_holds_per_group():
    params, sources, path, label, diff, base = _paired_setup()
    version = np.zeros(len(diff), np.int64)
    free = ReconcileConfig(learning_rate=1e-2, min_cohort=1, baseline="leader", step="signal", max_step=0,
                           shrink=False)
    small = reconcile(SPEC, params, Records(version, path, base + diff, label, base), sources, free)
    large = reconcile(SPEC, params, Records(version, path, base + 3 * diff, label, base), sources, free)
    # three times the loss differences: three times the step (a unit step would not change at all)
    np.testing.assert_allclose(_step(params, large.params), 3 * _step(params, small.params), rtol=1e-3, atol=1e-7)
    assert large.stats["step_norm"] == pytest.approx(3 * small.stats["step_norm"], rel=1e-6)
    capped = ReconcileConfig(learning_rate=10.0, min_cohort=1, baseline="leader", step="signal", max_step=0.002,
                             shrink=False)
    out = reconcile(SPEC, params, Records(version, path, base + diff, label, base), sources, capped)
    for s in range(S):
        keys = list(SPEC.group_shapes(s))
        theta = np.sqrt(sum(np.square(params[k], dtype=np.float64).sum() for k in keys))
        moved = np.sqrt(sum(np.square(out.params[k].astype(np.float64) - params[k]).sum() for k in keys))
        assert moved == pytest.approx(0.002 * theta, rel=1e-3)  # each group at its own cap


def test_signal_step_descends_a_known_gradient():
    """Records whose loss difference is g·δ on their path: the step points along −g (SPSA is unbiased)."""
    rng = np.random.default_rng(5)
    params = {k: np.zeros(v, np.float32) for k, v in SPEC.param_shapes().items()}
    g = {k: rng.normal(size=v) for k, v in SPEC.param_shapes().items()}
    seeds = fresh_seeds(S, V, rng)
    sources = {0: VersionSeeds(seeds, 0.05)}
    n = 4000
    path = rng.integers(0, V, size=(n, S))
    deltas = [[group_delta(SPEC, s, int(seeds[s, v]), 0.05) for v in range(V)] for s in range(S)]
    dot = np.array([[sum(float((g[k] * d).sum()) for k, d in deltas[s][v].items()) for v in range(V)]
                    for s in range(S)])
    diff = dot[np.arange(S)[None, :], path].sum(1)
    records = Records(np.zeros(n, np.int64), path, diff, rng.integers(0, 10, n), np.zeros(n))
    out = reconcile(SPEC, params, records, sources,
                    ReconcileConfig(learning_rate=1.0, min_cohort=1, baseline="leader", step="signal", max_step=0))
    step = _step(params, out.params)
    grad = np.concatenate([g[k].ravel() for k in params])
    # V-1 random directions per group only span a little of g, but what they span is descended
    assert float(step @ grad) < 0
    ghat_in_span = sum(dot[s, v] ** 2 for s in range(S) for v in range(1, V))
    assert -float(step @ grad) == pytest.approx(3 / 0.05**2 * ghat_in_span / V, rel=0.25)


def test_shrinkage_stills_noise_and_keeps_evidence():
    """Credits that noise explains move (almost) nothing; a consistent signal keeps (almost) all of its step."""
    params, sources, path, label, diff, base = _paired_setup()
    version = np.zeros(len(diff), np.int64)
    noise = Records(version, path, base + diff, label, base)  # loss differences unrelated to the paths
    on = ReconcileConfig(learning_rate=1e-2, min_cohort=1, baseline="leader", step="signal", max_step=0)
    off = ReconcileConfig(learning_rate=1e-2, min_cohort=1, baseline="leader", step="signal", max_step=0,
                          shrink=False)
    quiet, loud = reconcile(SPEC, params, noise, sources, on), reconcile(SPEC, params, noise, sources, off)
    assert quiet.stats["step_norm"] < 0.5 * loud.stats["step_norm"] and quiet.stats["shrink"] < 0.5
    # the same records plus a per-vendor effect ten times the noise: evidence, kept
    effect = np.array([0.0, 0.1, -0.1, 0.05])[path].sum(1)
    signal = Records(version, path, base + diff + effect, label, base)
    kept, full = reconcile(SPEC, params, signal, sources, on), reconcile(SPEC, params, signal, sources, off)
    assert kept.stats["step_norm"] > 0.8 * full.stats["step_norm"] and kept.stats["shrink"] > quiet.stats["shrink"]


def test_learned_groups_names_the_head_all_or_indices():
    assert learned_groups("head", 3).tolist() == [False, False, True]
    assert learned_groups("all", 3).tolist() == [True, True, True]
    assert learned_groups("0,2", 3).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="outside 0..2"):
        learned_groups("3", 3)
    with pytest.raises(ValueError, match="all, head or group indices"):
        learned_groups("first", 3)


def test_fresh_seeds_leave_groups_that_do_not_learn_unperturbed_and_draw_the_same_stream():
    plain = fresh_seeds(3, 4, np.random.default_rng(7))
    head = fresh_seeds(3, 4, np.random.default_rng(7), learned=learned_groups("head", 3))
    assert (head[:2] == 0).all()  # every vendor of groups 0 and 1 is the leader
    np.testing.assert_array_equal(head[2], plain[2])  # the head's seeds are those an unmasked draw gives
    assert (head[2, 1:] != 0).all()


def test_groups_that_do_not_learn_keep_their_weights_and_the_head_steps_as_it_would_alone():
    """The cap is per group and the credits do not depend on what learns, so the head's step is unchanged."""
    params, sources, path, label, diff, base = _paired_setup()
    effect = np.array([0.0, 0.1, -0.1, 0.05])[path].sum(1)  # a per-vendor signal in every group
    records = Records(np.zeros(len(diff), np.int64), path, base + diff + effect, label, base)
    config = ReconcileConfig(learning_rate=1e-2, min_cohort=1, baseline="leader", step="signal", max_step=0.01)
    every = reconcile(SPEC, params, records, sources, config)
    head = reconcile(SPEC, params, records, sources, ReconcileConfig(**{**config.__dict__, "learn_groups": "head"}))
    for s in range(S):
        for k in SPEC.group_shapes(s):
            if s == S - 1:
                np.testing.assert_array_equal(head.params[k], every.params[k])
                assert np.abs(head.params[k] - params[k]).max() > 0
            else:
                np.testing.assert_array_equal(head.params[k], params[k])
                assert np.abs(every.params[k] - params[k]).max() > 0


def test_a_higher_shrinkage_threshold_needs_more_evidence_to_move():
    """shrink_t = t0: the factor is max(0, 1 - t0²/t²); t0 = 1 is the default, a large t0 stills everything."""
    params, sources, path, label, diff, base = _paired_setup()
    effect = np.array([0.0, 0.1, -0.1, 0.05])[path].sum(1)
    records = Records(np.zeros(len(diff), np.int64), path, base + diff + effect, label, base)
    config = ReconcileConfig(learning_rate=1e-2, min_cohort=1, baseline="leader", step="signal", max_step=0)
    default = reconcile(SPEC, params, records, sources, config)
    one = reconcile(SPEC, params, records, sources, ReconcileConfig(**{**config.__dict__, "shrink_t": 1.0}))
    two = reconcile(SPEC, params, records, sources, ReconcileConfig(**{**config.__dict__, "shrink_t": 2.0}))
    huge = reconcile(SPEC, params, records, sources, ReconcileConfig(**{**config.__dict__, "shrink_t": 1e6}))
    assert default.stats["step_norm"] == one.stats["step_norm"] > 0
    assert 0 < two.stats["step_norm"] < one.stats["step_norm"] and two.stats["shrink"] < one.stats["shrink"]
    assert huge.stats["step_norm"] == 0 and huge.stats["shrink"] == 0
