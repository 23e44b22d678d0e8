"""Known-answer tests for workflow/scripts/stats.py (no scipy needed; compared with it when present)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
import stats


def test_rankdata_averages_ties():
    ranks, ties = stats.rankdata(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))
    # 1 -> 1, 2 -> 2, the three 3s share ranks 3, 4, 5 -> 4.
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert sorted(ties.tolist()) == [1, 1, 3]


def test_mann_whitney_hand_computed():
    # x = [1, 2], y = [3, 4, 5]: x's ranks sum to 3, U_x = 3 - 3 = 0, U_y = 6.
    # mu = 3, var = 2*3/12 * 6 = 3, z = (6 - 3 - 0.5) / sqrt(3), p = erfc(z / sqrt 2).
    u, p = stats.mann_whitney_u([1, 2], [3, 4, 5])
    assert u == 0.0
    z = 2.5 / math.sqrt(3.0)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2.0)), rel=1e-12)


def test_mann_whitney_tie_correction_hand_computed():
    # x = [1, 1], y = [1, 2]: ranks 2, 2, 2, 4 (three-way tie at 1). U_x = 4 - 3 = 1.
    # tie term = 3^3 - 3 = 24; var = 4/12 * (5 - 24/12) = 1; z = (3 - 2 - 0.5) / 1 = 0.5.
    u, p = stats.mann_whitney_u([1, 1], [1, 2])
    assert u == 1.0
    assert p == pytest.approx(math.erfc(0.5 / math.sqrt(2.0)), rel=1e-12)


def test_mann_whitney_all_equal_is_no_evidence():
    assert stats.mann_whitney_u([2.0] * 10, [2.0] * 10) == (50.0, 1.0)


def test_mann_whitney_empty():
    assert stats.mann_whitney_u([], [1.0]) == (None, None)


@pytest.mark.parametrize("n1,n2,shift,decimals", [(5, 7, 0.3, 1), (40, 25, 0.5, 1), (200, 200, 0.2, 2),
                                                  (12, 300, 0.0, 0)])
def test_mann_whitney_matches_scipy(n1, n2, shift, decimals):
    sps = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n1 * 1000 + n2)
    # Rounding makes ties, so the tie correction is exercised too.
    x = np.round(rng.normal(10.0, 1.0, n1), decimals)
    y = np.round(rng.normal(10.0 + shift, 1.0, n2), decimals)
    u, p = stats.mann_whitney_u(x, y)
    ref = sps.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(float(ref.statistic))
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)


def test_identical_distributions_no_significant_change():
    rng = np.random.default_rng(7)
    base = rng.lognormal(np.log(5.0), 0.05, 200)
    cand = rng.lognormal(np.log(5.0), 0.05, 200)
    out = stats.compare(base, cand, tolerance_pct=2.0)
    assert out["call"] == stats.NO_CHANGE
    assert abs(out["delta_pct"]) < 2.0
    assert out["ci_low_pct"] < 0 < out["ci_high_pct"]  # the 99% CI of the delta covers 0


def test_ten_percent_shift_with_200_samples_is_significant():
    rng = np.random.default_rng(11)
    base = rng.lognormal(np.log(5.0), 0.05, 200)
    slower = rng.lognormal(np.log(5.5), 0.05, 200)
    out = stats.compare(base, slower, tolerance_pct=2.0)
    assert out["call"] == stats.SLOWER
    assert out["p_value"] < 1e-10
    assert out["delta_pct"] == pytest.approx(10.0, abs=2.0)
    assert out["ci_low_pct"] > 5.0 and out["ci_high_pct"] < 15.0
    faster = stats.compare(slower, base, tolerance_pct=2.0)
    assert faster["call"] == stats.FASTER
    # Throughput: higher is better, so the same 10% increase is "faster".
    assert stats.compare(base, slower, tolerance_pct=2.0, lower_is_better=False)["call"] == stats.FASTER


def test_significant_but_within_tolerance_is_no_change():
    # A 1% shift with tiny noise is highly significant, but below a 2% tolerance (as asv does).
    rng = np.random.default_rng(3)
    base = 5.0 + rng.normal(0, 0.005, 200)
    cand = 5.05 + rng.normal(0, 0.005, 200)
    out = stats.compare(base, cand, tolerance_pct=2.0)
    assert out["significant"] and out["p_value"] < 1e-10
    assert out["call"] == stats.NO_CHANGE


def test_too_few_samples_makes_no_call():
    out = stats.compare([1.0, 2.0], [3.0, 4.0], tolerance_pct=1.0)
    assert out["call"] == stats.NO_DATA
    assert out["ci_low_pct"] is None


def test_bootstrap_ci_is_seeded_and_covers_true_ratio():
    rng = np.random.default_rng(5)
    base = rng.normal(100.0, 5.0, 300)
    cand = rng.normal(120.0, 5.0, 300)
    ci1 = stats.bootstrap_ratio_ci(base, cand, seed=42)
    ci2 = stats.bootstrap_ratio_ci(base, cand, seed=42)
    assert ci1 == ci2
    assert ci1[0] < 1.2 < ci1[1]
    assert ci1[1] - ci1[0] < 0.05
    lo, hi = stats.bootstrap_median_ci(base)
    assert lo < 100.0 < hi


def test_nan_samples_are_dropped():
    assert stats.median([1.0, float("nan"), 3.0]) == 2.0
    assert stats.clean(None).size == 0


def test_pow2_ceil():
    assert [stats.pow2_ceil(v) for v in (0, 1, 2, 3, 4, 5, 1000, 4096, 4097)] == [0, 1, 2, 4, 4, 8, 1024, 4096, 8192]
    assert stats.pow2_ceil(None) is None


def test_window_means():
    first, last, w = stats.window_means([4.0, 3.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert (first, last, w) == (3.5, 0.0, 2)
    assert stats.window_means([], 3) == (None, None, 0)
    first, last, _ = stats.window_means([1.0, float("nan"), 0.5], 1)
    assert first == 1.0 and last == 0.5
