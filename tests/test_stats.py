"""Known-answer tests for workflow/scripts/stats.py: per-process summaries, the hierarchical
bootstrap, spread within and between processes, and the noise-floor arithmetic."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
import stats


def test_lower_median_and_centre():
    assert stats.lower_median(np.array([3.0, 1.0, 2.0])) == 2.0
    assert stats.lower_median(np.array([4.0, 1.0, 3.0, 2.0])) == 2.0  # the lower middle value
    # Centre = mean of process medians, whatever the processes' sample counts.
    assert stats.centre([[1.0, 2.0, 3.0], [10.0], [4.0, 5.0, 6.0, 100.0, 101.0]]) == pytest.approx((2 + 10 + 6) / 3)
    assert stats.centre([[float("nan")], []]) is None


def test_median_index_cdf_matches_brute_force_bootstrap():
    # The closed form: P(resample median <= i-th smallest). Compare with counting over resamples.
    n = 7
    cdf = stats._median_index_cdf(n)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, size=(200_000, n))
    med_idx = np.sort(idx, axis=1)[:, (n + 1) // 2 - 1]  # the resample's median, as a sample index
    empirical = np.array([(med_idx <= i).mean() for i in range(n)])
    assert np.allclose(cdf, empirical, atol=3e-3)
    assert cdf[-1] == 1.0 and np.all(np.diff(cdf) >= 0)


def test_spread_within_and_between_known_values():
    # Process medians 99, 100, 101 (mean 100, sd 1): between = 1%. Each process's samples m*(0.98,
    # 0.99, 1, 1.01, 1.02): IQR = 0.02 m, so within = 2%.
    groups = [[m * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)] for m in (99.0, 100.0, 101.0)]
    sp = stats.spread(groups)
    assert sp["processes"] == 3 and sp["samples"] == 15
    assert sp["between_pct"] == pytest.approx(1.0, rel=1e-9)
    assert sp["within_pct"] == pytest.approx(2.0, rel=1e-9)
    assert stats.spread([[1.0, 2.0]])["between_pct"] is None  # one process: not measured, never 0


def test_one_sample_per_process_reduces_to_scipy_bootstrap_of_the_mean_ratio():
    # With one sample per process the inner resample is the sample itself, so the hierarchical
    # bootstrap is the ordinary two-sample percentile bootstrap of mean(b) / mean(a).
    rng = np.random.default_rng(3)
    a = rng.normal(100.0, 5.0, 30)
    b = rng.normal(110.0, 5.0, 30)
    got = stats.compare([[x] for x in a], [[x] for x in b], threshold_pct=1.0, level=0.95, n_boot=20000)
    ref = sps.bootstrap((a, b), lambda x, y, axis=-1: y.mean(axis=axis) / x.mean(axis=axis), paired=False,
                        vectorized=True, n_resamples=20000, confidence_level=0.95, method="percentile",
                        random_state=np.random.default_rng(9))
    assert got["delta_pct"] == pytest.approx((b.mean() / a.mean() - 1) * 100)
    assert got["ci_low_pct"] == pytest.approx((ref.confidence_interval.low - 1) * 100, abs=0.3)
    assert got["ci_high_pct"] == pytest.approx((ref.confidence_interval.high - 1) * 100, abs=0.3)


def test_one_process_reduces_to_the_median_bootstrap():
    # k = 1: the only resampling left is within the process; compare with scipy's bootstrap of the
    # (lower) median of the one sample.
    rng = np.random.default_rng(4)
    x = rng.lognormal(np.log(5.0), 0.1, 401)  # odd: lower median == median
    reps = stats.hierarchical_bootstrap_centres([x], 40000, np.random.default_rng(1))
    ref = sps.bootstrap((x,), np.median, vectorized=True, n_resamples=40000, confidence_level=0.99,
                        method="percentile", random_state=np.random.default_rng(2))
    lo, hi = np.quantile(reps, [0.005, 0.995])
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)


def _hierarchical(rng, k, n, centre, between_sd, within_sd):
    """k processes of n samples: each process's level drawn around ``centre`` (relative sd
    ``between_sd``), its samples around that level (relative sd ``within_sd``)."""
    levels = centre * np.exp(rng.normal(0.0, between_sd, k))
    return [lv * np.exp(rng.normal(0.0, within_sd, n)) for lv in levels]


def test_pseudo_replication_per_sample_test_is_wrongly_significant_per_process_is_not():
    # Identical code: both cells come from the same distribution of processes. Processes differ by
    # ~4% (placement, dispatch speed); samples within a process by 0.5%. 5 processes x 1000 samples.
    rng = np.random.default_rng(2024)
    a = _hierarchical(rng, 5, 1000, 10.0, 0.04, 0.005)
    b = _hierarchical(rng, 5, 1000, 10.0, 0.04, 0.005)
    # Per-sample Mann-Whitney on the pooled samples: "highly significant", and wrong.
    p_samples = stats.mann_whitney_p(np.concatenate(a), np.concatenate(b))
    assert p_samples < 1e-10
    # Per-process: the CI of the delta covers 0, the Welch test on process medians is not significant,
    # and neither faster nor slower is called even at a zero threshold ("uncertain": the CI straddles
    # it); with a 10% tolerance the whole CI lies inside: no change.
    out = stats.compare(a, b, threshold_pct=0.0)
    assert out["ci_low_pct"] < 0 < out["ci_high_pct"]
    assert out["p_value"] > 0.05
    assert out["call"] == stats.UNCERTAIN
    assert stats.compare(a, b, threshold_pct=10.0)["call"] == stats.NO_CHANGE
    # The spread says why: between-process spread dwarfs within-process spread.
    sp = stats.spread(a)
    assert sp["between_pct"] > 4 * sp["within_pct"]


def test_real_change_across_processes_is_called_with_its_size():
    rng = np.random.default_rng(5)
    a = _hierarchical(rng, 6, 500, 10.0, 0.01, 0.02)
    b = _hierarchical(rng, 6, 500, 13.0, 0.01, 0.02)  # 30% slower
    out = stats.compare(a, b, threshold_pct=5.0)
    assert out["call"] == stats.SLOWER
    assert out["delta_pct"] == pytest.approx(30.0, abs=3.0)
    assert 20.0 < out["ci_low_pct"] < 30.0 < out["ci_high_pct"] < 40.0
    assert out["p_value"] < 1e-4
    assert stats.compare(b, a, threshold_pct=5.0)["call"] == stats.FASTER
    # Throughput: higher is better, so the same increase is "faster".
    assert stats.compare(a, b, threshold_pct=5.0, lower_is_better=False)["call"] == stats.FASTER
    # A threshold above the whole CI (a noisy run's floor) calls nothing; one inside it, "uncertain".
    assert stats.compare(a, b, threshold_pct=50.0)["call"] == stats.NO_CHANGE
    assert stats.compare(a, b, threshold_pct=out["ci_low_pct"] + 1.0)["call"] == stats.UNCERTAIN


def test_compare_is_seeded_and_handles_missing_data():
    rng = np.random.default_rng(6)
    a = _hierarchical(rng, 4, 50, 1.0, 0.02, 0.02)
    b = _hierarchical(rng, 4, 50, 1.0, 0.02, 0.02)
    assert stats.compare(a, b, threshold_pct=2.0) == stats.compare(a, b, threshold_pct=2.0)
    assert stats.compare([], b, threshold_pct=2.0)["call"] == stats.NO_DATA
    assert stats.compare([[float("nan")]], b, threshold_pct=2.0)["call"] == stats.NO_DATA
    # One process per cell: a CI is still given (within-process only), a p-value is not.
    one = stats.compare(a[:1], b[:1], threshold_pct=2.0)
    assert one["ci_low_pct"] is not None and one["p_value"] is None


def test_welch_on_log_process_medians_matches_scipy():
    a = [[1.0, 1.1, 1.2], [1.3, 1.3], [0.9]]
    b = [[2.0], [2.2, 2.1, 2.3], [1.9, 2.0]]
    ma = np.log([1.1, 1.3, 0.9])
    mb = np.log([2.0, 2.2, 1.9])
    assert stats.welch_p_log(a, b) == pytest.approx(sps.ttest_ind(ma, mb, equal_var=False).pvalue)


def test_median_sampling_variance_is_the_bootstrap_variance_of_the_median():
    rng = np.random.default_rng(11)
    x = rng.lognormal(0.0, 0.3, 24)
    brute = np.var([stats.lower_median(rng.choice(x, x.size)) for _ in range(40000)])
    assert stats.median_sampling_var(x) == pytest.approx(brute, rel=0.05)
    assert stats.median_sampling_var([3.0]) == 0.0 and stats.median_sampling_var([2.0, 2.0, 2.0]) == 0.0


def test_process_spread_is_what_the_samples_do_not_explain():
    rng = np.random.default_rng(12)
    # No process effect: 40 processes of 24 samples scattering 30% (a host-bound step). Their medians
    # still differ by several percent, all of it sampling noise.
    iid = [rng.lognormal(0.0, 0.3, 24) for _ in range(40)]
    sp = stats.spread(iid)
    assert sp["between_pct"] > 4.0 and sp["sampling_pct"] == pytest.approx(sp["between_pct"], rel=0.25)
    assert sp["process_pct"] < 0.4 * sp["between_pct"]
    # A real 5% process effect under 2% scatter of 200 samples: nearly all of it is the processes'.
    placed = [lv * rng.lognormal(0.0, 0.02, 200) for lv in np.exp(rng.normal(0.0, 0.05, 40))]
    sp = stats.spread(placed)
    assert sp["process_pct"] == pytest.approx(sp["between_pct"], rel=0.02) and 3.5 < sp["process_pct"] < 6.5
    assert stats.spread([[1.0, 2.0]])["process_pct"] is None  # one process: not measured


def test_reference_noise_floor_arithmetic():
    # z(99%) = 2.5758; 2% between-process CV, 8 processes: 2.5758 * 2 * sqrt(2/8) = 2.5758.
    assert stats.reference_noise_pct(2.0, 8, 0.99) == pytest.approx(2.5758293, rel=1e-6)
    assert stats.reference_noise_pct(None, 8) is None and stats.reference_noise_pct(2.0, 1) is None


def test_nan_samples_are_dropped():
    assert stats.median([1.0, float("nan"), 3.0]) == 2.0
    assert stats.clean(None).size == 0
    assert stats.delta_pct(0.0, 1.0) is None and stats.delta_pct(2.0, 3.0) == pytest.approx(50.0)
    assert math.isclose(stats.z_for(0.95), 1.959964, rel_tol=1e-6)


def test_pow2_ceil():
    assert [stats.pow2_ceil(v) for v in (0, 1, 2, 3, 4, 5, 1000, 4096, 4097)] == [0, 1, 2, 4, 4, 8, 1024, 4096, 8192]
    assert stats.pow2_ceil(None) is None


def test_window_means():
    first, last, w = stats.window_means([4.0, 3.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert (first, last, w) == (3.5, 0.0, 2)
    assert stats.window_means([], 3) == (None, None, 0)
    first, last, _ = stats.window_means([1.0, float("nan"), 0.5], 1)
    assert first == 1.0 and last == 0.5


def test_pairing_by_generation_cancels_what_every_run_shares():
    # Processes measured in generations: generation g shifts every run's process g alike (GPU clocks,
    # the host's state at the time), by up to +-15% here; processes differ by 1% beyond that.
    rng = np.random.default_rng(11)
    shifts = np.array([0.85, 1.0, 1.1, 0.95, 1.15])

    def cell(mean):
        return [rng.normal(mean * s * rng.normal(1, 0.01), mean * 0.01, 200) for s in shifts]

    a, same, slower = cell(10.0), cell(10.0), cell(13.0)
    unpaired = stats.compare(a, same, threshold_pct=5.0)
    paired = stats.compare(a, same, threshold_pct=5.0, paired=True)
    assert paired["paired"] and not unpaired["paired"]
    assert unpaired["call"] == stats.UNCERTAIN and unpaired["ci_high_pct"] - unpaired["ci_low_pct"] > 15
    assert paired["call"] == stats.NO_CHANGE and paired["ci_high_pct"] - paired["ci_low_pct"] < 5
    # The paired t-test is scipy's on the log process medians.
    la, lb = np.log(stats.process_medians(a)), np.log(stats.process_medians(same))
    assert paired["p_value"] == pytest.approx(sps.ttest_rel(lb, la).pvalue)
    # A real 30% slowdown is called, with its size, paired or not.
    out = stats.compare(a, slower, threshold_pct=5.0, paired=True)
    assert out["call"] == stats.SLOWER and 25 < out["ci_low_pct"] < 30 < out["ci_high_pct"] < 35
    # Different process counts cannot be paired: the comparison falls back to independent draws.
    assert not stats.compare(a, same[:4], threshold_pct=5.0, paired=True)["paired"]
    # Nor can cells where a process has no finite sample: dropping it would shift the indices after it.
    holed = [same[0], [float("nan")], *same[2:]]  # 5 processes, 4 with samples
    assert not stats.compare(a[:4], holed, threshold_pct=5.0, paired=True)["paired"]
    assert stats.generation_factors([a, holed]) is None  # the holed run does not count: one run left
    assert len(stats.without_generation_effect(holed, stats.generation_factors([a, same]))) == 4  # indices not j
    # The generation factors recover the shifts (relative to their mean), and removing them leaves
    # the 1% process spread.
    f = stats.generation_factors([a, same, slower])
    assert np.allclose(f, shifts / np.exp(np.log(shifts).mean()), rtol=0.02)
    assert stats.spread(a)["between_pct"] > 10 and stats.spread(stats.without_generation_effect(a, f))["between_pct"] < 3
    assert stats.generation_factors([a]) is None and stats.without_generation_effect(a, None)[0].size == 200


def test_the_process_far_from_its_cells_others_is_named():
    base = [np.full(20, v) for v in (1.0, 1.02, 0.98, 1.01)]
    assert stats.process_outlier(base + [np.full(20, 1.4)]) == (4, pytest.approx(1.4 / 1.005, rel=1e-3))
    assert stats.process_outlier([np.full(20, 0.7)] + base) == (0, pytest.approx(0.7 / 1.005, rel=1e-3))  # fast counts too
    assert stats.process_outlier(base + [np.full(20, 1.2)]) is None  # within OUTLIER_RATIO
    assert stats.process_outlier([np.full(5, 1.0), np.full(5, 2.0)]) is None  # two processes: no "others"
    # Indices are those of the groups given, a process without samples included.
    assert stats.process_outlier([[], *base, np.full(20, 1.5)])[0] == 5
