"""Statistics for comparing benchmark samples: medians, IQR, Mann-Whitney U, bootstrap CIs.

Everything here works on plain sequences of floats with numpy only, because scipy is not
installed on every host the workflow runs on (air-gapped GPU boxes often lack it). The tests
check these functions against scipy where scipy is present.

The comparison follows the approach of airspeed velocity (asv): a change is reported only when
it is both statistically significant (two-sided Mann-Whitney U on the raw samples) and larger
than a tolerance, so that tiny but "significant" differences from drift are not called out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FASTER, SLOWER, NO_CHANGE, NO_DATA = "faster", "slower", "no significant change", "insufficient data"

# Fewer samples than this on either side and no call is made: with 2 vs 2 samples the normal
# approximation is meaningless and the bootstrap has only a handful of distinct resamples.
MIN_SAMPLES = 3


def clean(samples: Sequence[float] | None) -> np.ndarray:
    """Finite samples as a float array (NaN/inf dropped: a failed timing is not a fast one)."""
    if samples is None:
        return np.empty(0)
    a = np.asarray(list(samples), dtype=float).ravel()
    return a[np.isfinite(a)]


def median(samples: Sequence[float]) -> float | None:
    a = clean(samples)
    return float(np.median(a)) if a.size else None


def quartiles(samples: Sequence[float]) -> tuple[float | None, float | None]:
    """(25th, 75th) percentiles; the IQR band drawn in the plots."""
    a = clean(samples)
    if not a.size:
        return None, None
    q1, q3 = np.percentile(a, [25, 75])
    return float(q1), float(q3)


def rankdata(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) and the sizes of every group of tied values."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values in sorted order.
    new_group = np.concatenate(([True], sorted_vals[1:] != sorted_vals[:-1]))
    group_id = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    counts = np.diff(np.concatenate((starts, [values.size])))
    # A tied run occupying positions s..s+c-1 (0-based) gets the mean 1-based rank s + (c+1)/2.
    avg_rank = starts + (counts + 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = avg_rank[group_id]
    return ranks, counts


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity correction.

    Returns (U of x, p-value). Matches ``scipy.stats.mannwhitneyu(x, y, method="asymptotic")``.
    The normal approximation is what we want even for small samples: benchmark timings are
    almost always tied somewhere (timer resolution), where an exact test does not apply.
    """
    a, b = clean(x), clean(y)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return None, None
    ranks, ties = rankdata(np.concatenate((a, b)))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    u2 = n1 * n2 - u1
    n = n1 + n2
    mu = n1 * n2 / 2.0
    tie_term = float((ties.astype(float) ** 3 - ties).sum())
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:  # every value identical: no evidence of any difference
        return u1, 1.0
    # Two-sided: take the larger U, subtract 0.5 for continuity, double the upper tail.
    z = (max(u1, u2) - mu - 0.5) / math.sqrt(var)
    p = math.erfc(z / math.sqrt(2.0))  # = 2 * (1 - Phi(z))
    return u1, min(1.0, max(0.0, p))


def _boot_medians(a: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    return np.median(a[idx], axis=1)


def bootstrap_median_ci(samples: Sequence[float], level: float = 0.99, n_boot: int = 4000,
                        seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the median of one sample (seeded: reruns give the same CI)."""
    a = clean(samples)
    if a.size < MIN_SAMPLES:
        return None, None
    rng = np.random.default_rng(seed)
    meds = _boot_medians(a, n_boot, rng)
    lo, hi = np.quantile(meds, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_ratio_ci(baseline: Sequence[float], candidate: Sequence[float], level: float = 0.99,
                       n_boot: int = 4000, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of median(candidate) / median(baseline).

    The two samples are resampled independently (they come from different runs), each resample
    of the same size as its sample, and the ratio of medians is taken per resample.
    """
    a, b = clean(baseline), clean(candidate)
    if a.size < MIN_SAMPLES or b.size < MIN_SAMPLES:
        return None, None
    rng = np.random.default_rng(seed)
    med_a = _boot_medians(a, n_boot, rng)
    med_b = _boot_medians(b, n_boot, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = med_b / med_a
    ratios = ratios[np.isfinite(ratios)]
    if not ratios.size:
        return None, None
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def delta_pct(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or base == 0 or not math.isfinite(base) or not math.isfinite(value):
        return None
    return (value / base - 1.0) * 100.0


def compare(baseline: Sequence[float], candidate: Sequence[float], *, tolerance_pct: float,
            alpha: float = 0.01, lower_is_better: bool = True, level: float = 0.99,
            n_boot: int = 4000, seed: int = 0) -> dict:
    """Compare a candidate's raw samples with the baseline's.

    The call is "faster"/"slower" only if the Mann-Whitney p-value is below ``alpha`` AND the
    median moved by more than ``tolerance_pct`` percent; otherwise "no significant change".
    ``lower_is_better`` says which direction is "faster" (latency: lower; throughput: higher).
    """
    a, b = clean(baseline), clean(candidate)
    base_med, cand_med = median(a), median(b)
    d = delta_pct(base_med, cand_med)
    _, p = mann_whitney_u(a, b)
    lo, hi = bootstrap_ratio_ci(a, b, level=level, n_boot=n_boot, seed=seed)
    out = {
        "n": int(b.size), "baseline_n": int(a.size),
        "median": cand_med, "baseline_median": base_med,
        "delta_pct": d,
        "ci_low_pct": None if lo is None else (lo - 1.0) * 100.0,
        "ci_high_pct": None if hi is None else (hi - 1.0) * 100.0,
        "ci_level": level,
        "p_value": p,
        "tolerance_pct": tolerance_pct,
        "significant": bool(p is not None and p < alpha),
    }
    if a.size < MIN_SAMPLES or b.size < MIN_SAMPLES or d is None or p is None:
        out["call"] = NO_DATA
    elif p < alpha and abs(d) > tolerance_pct:
        got_lower = d < 0
        out["call"] = FASTER if got_lower == lower_is_better else SLOWER
    else:
        out["call"] = NO_CHANGE
    return out


def pow2_ceil(n: float | None) -> int | None:
    """Smallest power of two >= n (reserve recommendations; 0 stays 0 = grow on demand)."""
    if n is None:
        return None
    n = math.ceil(n)
    if n <= 0:
        return 0
    return 1 << (n - 1).bit_length()


def window_means(values: Sequence[float], window: int | None = None) -> tuple[float | None, float | None, int]:
    """Means of the first and last ``window`` values (default: a quarter of the curve, >= 1).

    Comparing windows rather than the first and last step keeps one noisy batch from deciding
    whether a loss curve fell. NaN anywhere propagates into the mean on purpose.
    """
    v = np.asarray(list(values or []), dtype=float)
    if not v.size:
        return None, None, 0
    w = window if window and window > 0 else max(1, v.size // 4)
    w = min(w, v.size)
    return float(np.mean(v[:w])), float(np.mean(v[-w:])), w
