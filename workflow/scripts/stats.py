"""Statistics for comparing benchmark runs where the worker *process* is the unit of replication.

A cell (one commit x reserve configuration x context x timing mode) is measured by k worker
processes, each giving many samples. Samples of one process share its placement, allocator state
and host dispatch speed, so they are not independent draws of "the code": per-sample tests (a
Mann-Whitney U on 1000 samples of one process each) call p = 1e-80 differences that the next pair
of processes does not reproduce. Everything here therefore summarises each process first:

- a process's summary is its (lower) median;
- a cell's centre is the mean of its processes' medians;
- a comparison is the ratio of two cells' centres, with a percentile CI from a hierarchical
  bootstrap (resample processes, then samples within each drawn process) and a Welch t-test on the
  log of the process medians for a p-value (information; the call itself comes from the CI);
- spread is reported twice: within a process (relative IQR of its samples) and between processes
  (coefficient of variation of the process medians).

numpy and scipy.stats do the work; hand-written here is only what scipy lacks: the hierarchical
bootstrap (``scipy.stats.bootstrap`` resamples flat samples only) and the median's bootstrap
distribution in closed form, which makes that bootstrap cheap enough for hundreds of cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

FASTER, SLOWER, NO_CHANGE, UNCERTAIN, NO_DATA = "faster", "slower", "no change", "uncertain", "insufficient data"


def clean(samples: Sequence[float] | None) -> np.ndarray:
    """Finite samples as a float array (NaN/inf dropped: a failed timing is not a fast one)."""
    if samples is None:
        return np.empty(0)
    a = np.asarray(list(samples), dtype=float).ravel()
    return a[np.isfinite(a)]


def clean_groups(groups: Sequence[Sequence[float]] | None) -> list[np.ndarray]:
    """Per-process sample arrays, cleaned, without the processes that have no finite sample."""
    out = [clean(g) for g in (groups or [])]
    return [g for g in out if g.size]


def median(samples: Sequence[float]) -> float | None:
    a = clean(samples)
    return float(np.median(a)) if a.size else None


def quartiles(samples: Sequence[float]) -> tuple[float | None, float | None]:
    """(25th, 75th) percentiles."""
    a = clean(samples)
    if not a.size:
        return None, None
    q1, q3 = np.percentile(a, [25, 75])
    return float(q1), float(q3)


def lower_median(a: np.ndarray) -> float:
    """The m-th smallest of n values, m = ceil(n / 2): the median for odd n, the lower middle value
    for even n (half a gap between neighbours away from np.median). It is the statistic whose
    bootstrap distribution has the closed form below, so estimate and bootstrap agree."""
    s = np.sort(a)
    return float(s[(s.size + 1) // 2 - 1])


def process_medians(groups) -> np.ndarray:
    return np.array([lower_median(g) for g in clean_groups(groups)])


def centre(groups) -> float | None:
    """The cell's value: the mean over processes of each process's median."""
    meds = process_medians(groups)
    return float(meds.mean()) if meds.size else None


def spread(groups) -> dict:
    """Within- and between-process spread, in percent of the cell's centre.

    within_pct: the median over processes of (IQR / median) of each process's samples;
    between_pct: the standard deviation (ddof 1) of the process medians over their mean
    (None with fewer than two processes: not measured, never zero);
    sampling_pct: how much of between_pct the processes' own samples explain: the root mean square
    of each median's standard error (its exact bootstrap, ``median_sampling_var``);
    process_pct: the rest, sqrt(between^2 - sampling^2) (0 when sampling explains it all): the
    spread of the processes themselves (placement, host state), as a random-effects model's
    variance components separate them.
    """
    gs = clean_groups(groups)
    meds = process_medians(gs)
    out = {"processes": len(gs), "samples": int(sum(g.size for g in gs)), "within_pct": None, "between_pct": None,
           "sampling_pct": None, "process_pct": None}
    if not gs:
        return out
    rel_iqr = []
    for g, m in zip(gs, meds):
        q1, q3 = np.percentile(g, [25, 75])
        if m:
            rel_iqr.append((q3 - q1) / abs(m) * 100.0)
    out["within_pct"] = float(np.median(rel_iqr)) if rel_iqr else None
    if meds.size >= 2 and meds.mean():
        scale = 100.0 / abs(meds.mean())
        out["between_pct"] = float(meds.std(ddof=1) * scale)
        out["sampling_pct"] = float(math.sqrt(np.mean([median_sampling_var(g) for g in gs])) * scale)
        out["process_pct"] = math.sqrt(max(0.0, out["between_pct"] ** 2 - out["sampling_pct"] ** 2))
    return out


def median_sampling_var(group) -> float:
    """Variance of one process's median over resamples of its own samples (the exact bootstrap, from
    ``_median_index_cdf``): what a process's median scatters by when nothing but its samples vary."""
    x = np.sort(clean(group))
    if x.size < 2:
        return 0.0
    p = np.diff(_median_index_cdf(x.size), prepend=0.0)
    return float(p @ (x - p @ x) ** 2)


def _median_index_cdf(n: int) -> np.ndarray:
    """P(resample's m-th smallest <= the i-th smallest of the sample), i = 1..n, m = ceil(n/2).

    A resample of size n draws, for each i, Binomial(n, i/n) values at or below the sample's i-th
    smallest; its m-th smallest is at or below that value iff at least m draws are. Sampling the
    index from this CDF is exactly the bootstrap of ``lower_median`` without drawing n values.
    """
    m = (n + 1) // 2
    i = np.arange(1, n + 1)
    cdf = sps.binom.sf(m - 1, n, i / n)
    cdf[-1] = 1.0
    return np.maximum.accumulate(cdf)


def hierarchical_bootstrap_centres(groups, n_boot: int, rng: np.random.Generator,
                                   which: np.ndarray | None = None) -> np.ndarray:
    """n_boot bootstrap replicates of ``centre``: draw k processes with replacement, then, for each
    drawn process independently, a resample of its own samples (through its median's CDF).
    ``which`` (n_boot x k process indices): the draws to use, shared by two cells in a paired
    comparison."""
    gs = clean_groups(groups)
    k = len(gs)
    sorted_groups = [np.sort(g) for g in gs]
    cdfs = [_median_index_cdf(g.size) for g in gs]
    if which is None:
        which = rng.integers(0, k, size=(n_boot, k))
    u = rng.random((n_boot, k))
    values = np.empty((n_boot, k))
    for j in range(k):
        mask = which == j
        idx = np.searchsorted(cdfs[j], u[mask], side="left")
        values[mask] = sorted_groups[j][np.minimum(idx, sorted_groups[j].size - 1)]
    return values.mean(axis=1)


def bootstrap_centre_ci(groups, level: float = 0.99, n_boot: int = 4000, seed: int = 0):
    gs = clean_groups(groups)
    if not gs:
        return None, None
    reps = hierarchical_bootstrap_centres(gs, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_p_log(base_groups, cand_groups) -> float | None:
    """Two-sided paired t-test on the log process medians, process j of one cell against process j
    of the other (measured in the same generation)."""
    a, b = process_medians(base_groups), process_medians(cand_groups)
    if a.size < 2 or a.size != b.size or (a <= 0).any() or (b <= 0).any():
        return None
    d = np.log(b) - np.log(a)
    if d.std() == 0:
        return 1.0 if d[0] == 0 else 0.0
    with np.errstate(all="ignore"):
        p = sps.ttest_rel(np.log(b), np.log(a)).pvalue
    return None if not np.isfinite(p) else float(p)


def generation_factors(runs_groups: list) -> np.ndarray | None:
    """Per process index, the shift every run's process of that index shares: the geometric mean
    over runs of (process median / the run's centre). Processes with one index are measured in one
    generation (one stretch of the job), so this is the generation's effect (GPU clocks, the host's
    state at the time). None unless at least two runs with the same number (>= 2) of processes."""
    # A run with a process lacking samples would shift the indices after it: such runs do not count.
    meds = [process_medians(g) for g in runs_groups if len(clean_groups(g)) == len(g)]
    meds = [m for m in meds if m.size >= 2 and (m > 0).all()]
    if len(meds) < 2 or len({m.size for m in meds}) != 1:
        return None
    return np.exp(np.mean([np.log(m / m.mean()) for m in meds], axis=0))


def without_generation_effect(groups, factors: np.ndarray | None) -> list[np.ndarray]:
    """Each process's samples divided by its generation's factor (``generation_factors``); the
    groups unchanged where there are no factors or the counts differ."""
    gs = clean_groups(groups)
    if factors is None or len(gs) != factors.size or len(gs) != len(groups):
        return gs
    return [g / f for g, f in zip(gs, factors)]


def welch_p_log(base_groups, cand_groups) -> float | None:
    """Two-sided Welch t-test on the log process medians (processes are the replicates)."""
    a, b = process_medians(base_groups), process_medians(cand_groups)
    if a.size < 2 or b.size < 2 or (a <= 0).any() or (b <= 0).any():
        return None
    la, lb = np.log(a), np.log(b)
    if la.std() == 0 and lb.std() == 0:
        return 1.0 if la[0] == lb[0] else 0.0
    with np.errstate(all="ignore"):
        p = sps.ttest_ind(la, lb, equal_var=False).pvalue
    return None if not np.isfinite(p) else float(p)


def mann_whitney_p(x, y) -> float | None:
    """Per-sample two-sided Mann-Whitney U p-value (kept to show, in the tests, what it gets wrong)."""
    a, b = clean(x), clean(y)
    if not a.size or not b.size:
        return None
    return float(sps.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue)


def delta_pct(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or base == 0 or not math.isfinite(base) or not math.isfinite(value):
        return None
    return (value / base - 1.0) * 100.0


def z_for(level: float) -> float:
    return float(sps.norm.ppf(1 - (1 - level) / 2))


def compare(base_groups, cand_groups, *, threshold_pct: float, lower_is_better: bool = True,
            level: float = 0.99, n_boot: int = 4000, seed: int = 0, paired: bool = False) -> dict:
    """Compare two cells measured by several processes each.

    delta = centre(candidate) / centre(baseline) - 1; its CI from hierarchical bootstraps of both
    cells: independent, or with ``paired`` (process j of both cells measured in the same
    generation) drawing the same process indices in both, so what a generation shifts for every run
    cancels in the ratio (and the p-value is a paired t-test). With different process counts the
    comparison is unpaired. A change is called only when the whole CI lies beyond
    +-``threshold_pct`` (the caller passes max(tolerance, noise floor)); "faster"/"slower" follows
    ``lower_is_better`` (latency: lower; throughput: higher). "no change" needs the whole CI inside
    +-``threshold_pct``; a CI reaching across it is "uncertain" (too few processes to say).
    """
    a, b = clean_groups(base_groups), clean_groups(cand_groups)
    base_c, cand_c = centre(a), centre(b)
    # Process j pairs with process j only while no process lost all its samples (clean_groups drops it).
    paired = paired and len(a) == len(b) == len(base_groups or []) == len(cand_groups or []) >= 2
    out = {"processes": len(b), "baseline_processes": len(a), "value": cand_c, "baseline_value": base_c,
           "delta_pct": delta_pct(base_c, cand_c), "ci_low_pct": None, "ci_high_pct": None, "ci_level": level,
           "p_value": paired_p_log(a, b) if paired else welch_p_log(a, b), "paired": paired,
           "threshold_pct": threshold_pct, "call": NO_DATA}
    if not a or not b or out["delta_pct"] is None:
        return out
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(a), size=(n_boot, len(a))) if paired else None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (hierarchical_bootstrap_centres(b, n_boot, rng, which)
                  / hierarchical_bootstrap_centres(a, n_boot, rng, which))
    ratios = ratios[np.isfinite(ratios)]
    if not ratios.size:
        return out
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    out["ci_low_pct"], out["ci_high_pct"] = float((lo - 1) * 100), float((hi - 1) * 100)
    if out["ci_low_pct"] > threshold_pct:
        out["call"] = SLOWER if lower_is_better else FASTER
    elif out["ci_high_pct"] < -threshold_pct:
        out["call"] = FASTER if lower_is_better else SLOWER
    elif out["ci_low_pct"] >= -threshold_pct and out["ci_high_pct"] <= threshold_pct:
        out["call"] = NO_CHANGE
    else:
        out["call"] = UNCERTAIN
    return out


# A process whose median is at least this many times the median of its cell's other processes (or
# 1/this), and far beyond how those others scatter among themselves, is named where a verdict cannot
# be judged: one slow process widens the CI as much as slow code would, and a rerun may not repeat it.
OUTLIER_RATIO = 1.25
OUTLIER_MADS = 4.0  # ... and this many robust standard deviations (normal-scaled MAD) of the others' logs


def process_outlier(groups) -> tuple[int, float] | None:
    """``(index, ratio)`` of the process furthest from the median of the others' medians (ratio =
    its median / theirs; index into ``groups``), where that is beyond ``OUTLIER_RATIO`` either way
    and beyond ``OUTLIER_MADS`` of the others' own scatter; None with fewer than three processes or
    none that far (in a cell whose processes all scatter widely, none stands out)."""
    idx = [i for i, g in enumerate(groups or []) if clean(g).size]
    meds = process_medians(groups)
    if meds.size < 3 or (meds <= 0).any():
        return None
    logs = np.log(meds)
    dev = [logs[j] - np.median(np.delete(logs, j)) for j in range(logs.size)]
    j = int(np.argmax(np.abs(dev)))
    others = np.delete(logs, j)
    scatter = OUTLIER_MADS * float(sps.median_abs_deviation(others, scale="normal"))
    return (idx[j], math.exp(dev[j])) if abs(dev[j]) >= max(math.log(OUTLIER_RATIO), scatter) else None


def reference_noise_pct(between_pct: float | None, processes: int, level: float = 0.99) -> float | None:
    """How far apart two cells of ``processes`` processes each of *identical* code land, at
    ``level``: z * between-process CV * sqrt(2 / k) (the difference of two means of k)."""
    if between_pct is None or processes < 2:
        return None
    return z_for(level) * between_pct * math.sqrt(2.0 / processes)


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
