"""Decode and training measurements turned into cells, comparisons and noise floors.

A *cell* is one run (commit x reserve configuration, or the reference workload) at one context and
timing mode (training: one cell per run, tokens/s). Comparisons, each its own table:

- commit vs baseline: every commit (its first-named variant; twins are the A/A check) against the
  baseline commit under the *same* reserve configuration;
- reserve vs reserve: within each commit, every configuration against the first declared;
- A/A: variants naming the same commit, against the first of them.

The noise floor of a timing mode is the larger of what the A/A twins showed (max |delta|) and what
the spread between processes implies for two cells of identical code
(``stats.reference_noise_pct``), pooled over every cell of the mode (the implementation's runs and
the reference workload's), counting only the part of that spread its processes' own samples
do not explain (``stats.spread``'s process_pct): the sampling noise of a median depends on the
workload's own step-to-step scatter and sample count, and the cells compared carry theirs in
their CIs already. A change is called only when its CI lies beyond
max(tolerance, noise floor) (see ``stats.compare``). Where the workers ran in generations (``alive``
per run), process j of every run shares its stretch of the job: comparisons pair them, and the
spread counts only what lies beyond each generation's shift common to all runs.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats as sps

import interleave
import results_io as io
import stats
from results_io import FAILED, MISSING, OK

# Which environment variables pre-size which workspace dimension (our nsa package's names; other
# implementations' workspaces fall back to "<workspace>.rows" / ".keys").
RESERVE_VARS = {
    "sel_pack": {"rows": "NSA_SEL_PACK_RESERVE_N", "keys": "NSA_SEL_PACK_RESERVE_L"},
    "varlen": {"rows": "NSA_VARLEN_RESERVE_N", "keys": "NSA_VARLEN_RESERVE_K"},
}
WORKSPACE_FIELDS = ("allocations", "growth_events", "bytes_reserved", "high_water_rows", "high_water_keys",
                    "capacity_rows", "capacity_keys", "requests")
TRAIN_MODE = "train"
WITHIN_NOISE = "within noise"


def ctx_key(ctx):
    try:
        return (0, int(ctx), "")
    except (TypeError, ValueError):
        return (1, 0, str(ctx))


def ctx_value(ctx):
    try:
        return int(ctx)
    except (TypeError, ValueError):
        return ctx


class Metric:
    """What a stage measures: its cells, the samples of one process in a cell, and its direction."""

    def __init__(self, stage: str, tolerance_key: str, lower_is_better: bool, unit: str):
        self.stage, self.tolerance_key, self.lower_is_better, self.unit = stage, tolerance_key, lower_is_better, unit

    def cells(self, run) -> list[tuple]:
        if self.stage == "train":
            return [(None, TRAIN_MODE)] if any(p["tokens_per_s"] for p in io.ok_processes(run)) else []
        found = {(ctx, mode) for p in io.ok_processes(run) for ctx, modes in p["contexts"].items() for mode in modes}
        return sorted(found, key=lambda c: (ctx_key(c[0]), c[1]))

    def groups(self, run, cell) -> list[list]:
        ctx, mode = cell
        if self.stage == "train":
            return [p["tokens_per_s"] for p in io.ok_processes(run)]
        return [p["contexts"].get(ctx, {}).get(mode) or [] for p in io.ok_processes(run)]


DECODE = Metric("decode", "decode_tolerance_pct", True, "ms")
TRAIN = Metric("train", "train_tolerance_pct", False, "tokens/s")


def judged_modes(measured: list[str], acc: dict, stage: str) -> tuple[list[str], str | None]:
    """The timing modes the verdict rests on, and a note when the configured ones were not measured."""
    if stage == "train":
        return [TRAIN_MODE], None
    wanted = acc.get("judge_modes")
    if not wanted:
        return list(measured), None
    judged = [m for m in measured if m in wanted]
    if judged or not measured:
        return judged, None
    return list(measured), (f"{', '.join(wanted)} not measured here (see the implementation's capabilities): "
                            f"{', '.join(measured)} judged instead")


def _cell_row(run, cell, metric) -> dict:
    groups = metric.groups(run, cell)
    sp = stats.spread(groups)
    q1, q3 = stats.quartiles([x for g in groups for x in g])
    return {"variant": run["variant"], "sha": run["sha"], "reserve": run["reserve"], "kind": run["kind"],
            "context": ctx_value(cell[0]), "mode": cell[1], "value": stats.centre(groups), "q1": q1, "q3": q3,
            "processes": sp["processes"], "samples": sp["samples"], "within_pct": sp["within_pct"],
            "between_pct": sp["between_pct"], "process_pct": sp["process_pct"]}


def paired_by_generation(bench: dict) -> bool:
    """Whether process j of every run was measured in the same generation as process j of the others
    (``alive`` per run below all: interleave.generations), so comparisons pair them."""
    return interleave.alive_per_run((bench.get("sizes") or {}).get("alive", "all")) is not None


def _compare(a_run, b_run, cell, metric, acc, threshold, paired=False) -> dict:
    c = stats.compare(metric.groups(a_run, cell), metric.groups(b_run, cell), threshold_pct=threshold,
                      lower_is_better=metric.lower_is_better, level=acc["ci_level"],
                      n_boot=int(acc["bootstrap_resamples"]), paired=paired)
    sp = stats.spread(metric.groups(b_run, cell))
    outliers = [(side, stats.process_outlier(metric.groups(run, cell))) for side, run in
                (("candidate", b_run), ("baseline", a_run))]
    outlier = max(((side, o) for side, o in outliers if o), key=lambda x: abs(math.log(x[1][1])), default=None)
    if c["call"] == stats.NO_CHANGE and threshold > float(acc[metric.tolerance_key]):
        c["call"] = WITHIN_NOISE  # not "no change": a change up to the noise floor would look the same
    return {"context": ctx_value(cell[0]), "mode": cell[1], "status": OK, "value": c["value"],
            "baseline_value": c["baseline_value"], "delta_pct": c["delta_pct"], "ci_low_pct": c["ci_low_pct"],
            "ci_high_pct": c["ci_high_pct"], "p_value": c["p_value"], "paired": c["paired"], "threshold_pct": threshold,
            "call": c["call"],
            "processes": c["processes"], "baseline_processes": c["baseline_processes"],
            "within_pct": sp["within_pct"], "between_pct": sp["between_pct"],
            "outlier": {"side": outlier[0], "process": outlier[1][0], "ratio": outlier[1][1]} if outlier else None}


def _pairs(a_run, b_run, metric, acc, thresholds, judged, keys, paired=False) -> list[dict]:
    """Every cell both runs measured, compared; or one row saying why there is no comparison."""
    if not a_run or not b_run or a_run["status"] != OK or b_run["status"] != OK:
        bad = next((r for r in (b_run, a_run) if not r or r["status"] != OK), None)
        return [{**keys, "context": None, "mode": None, "status": bad["status"] if bad else MISSING,
                 "reason": bad.get("reason") if bad else None, "error": bad.get("error") if bad else None,
                 "call": None, "judged": False}]
    cells = [c for c in metric.cells(b_run) if c in set(metric.cells(a_run))]
    return [{**keys, **_compare(a_run, b_run, c, metric, acc, thresholds.get(c[1], acc[metric.tolerance_key]), paired),
             "judged": c[1] in judged} for c in cells]


def _cell_factors(runs, cell, metric, paired):
    """Each generation's shift in one cell, common to the implementation's runs (None unpaired):
    it cancels in a paired comparison, so it is no noise there."""
    if not paired:
        return None
    return stats.generation_factors([metric.groups(r, cell) for r in runs
                                     if r["status"] == OK and cell in metric.cells(r)])


def _pooled(spreads: list[dict]) -> tuple[float | None, float | None, int]:
    """The cells' between- and process-level spreads pooled: the median of their squares (one cell
    with a process that stood apart must not speak for the whole run: that cell's own CI carries
    it, and its reason names the process), scaled to estimate the variance rather than its median
    (a variance from k processes scatters as chi-square with k - 1 degrees of freedom, whose median
    lies below its mean); and the fewest processes of a cell."""
    spreads = [sp for sp in spreads if sp["process_pct"] is not None]
    if not spreads:
        return None, None, 0
    k = min(sp["processes"] for sp in spreads)
    scale = (k - 1) / sps.chi2.ppf(0.5, k - 1)
    between, process = (math.sqrt(float(np.median([sp[key] ** 2 for sp in spreads])) * scale)
                        for key in ("between_pct", "process_pct"))
    return between, process, k


def noise_floors(aa: list[dict], reference, metric, acc, modes, judged, runs=(), paired=False) -> dict:
    """Per timing mode: the A/A twins' largest |delta|, and the spread between processes beyond their
    samples' scatter (with ``paired``, beyond each generation's common shift too), pooled over every
    cell of the mode that the job measured, the implementation's runs and the reference's alike,
    turned into how far two cells of identical code land apart. The reference's own figure is kept
    beside it: on a GPU its dense step is shorter and more host-bound than the implementation's
    (H100 training: 11% between its processes where the NSA runs' were 1.3-6%), so alone it spoke
    for the machine's noise at another workload's scale."""
    tol = float(acc[metric.tolerance_key])
    ok = [r for r in runs if r["status"] == OK]
    out = {}
    for mode in modes:
        aa_d = [abs(r["delta_pct"]) for r in aa if r.get("mode") == mode and r.get("delta_pct") is not None]
        cells = {c for r in ok + ([reference] if reference and reference["status"] == OK else [])
                 for c in metric.cells(r) if c[1] == mode}
        factors = {c: _cell_factors(runs, c, metric, paired) for c in cells}

        def spread(run, cell):
            return stats.spread(stats.without_generation_effect(metric.groups(run, cell), factors[cell]))

        ref = [spread(reference, c) for c in metric.cells(reference)
               if c[1] == mode] if reference and reference["status"] == OK else []
        impl = [spread(r, c) for r in ok for c in metric.cells(r) if c[1] == mode]
        between, process, k = _pooled(ref)
        all_between, all_process, all_k = _pooled(ref + impl)
        ref_pct = stats.reference_noise_pct(process, k, acc["ci_level"])
        pooled_pct = stats.reference_noise_pct(all_process, all_k, acc["ci_level"])
        parts = [x for x in (max(aa_d, default=None), pooled_pct) if x is not None]
        floor = max(parts) if parts else None
        out[mode] = {"mode": mode, "aa_pct": max(aa_d, default=None), "aa_cells": len(aa_d),
                     "reference_pct": ref_pct, "reference_between_pct": between,
                     "reference_process_pct": process, "reference_processes": k or None,
                     "reference_contexts": len([r for r in ref if r["process_pct"] is not None]),
                     "pooled_pct": pooled_pct, "pooled_between_pct": all_between, "pooled_process_pct": all_process,
                     "pooled_cells": len([r for r in ref + impl if r["process_pct"] is not None]),
                     "pooled_processes": all_k or None, "paired": paired,
                     "floor_pct": floor, "tolerance_pct": tol, "threshold_pct": max(tol, floor or 0.0),
                     "too_noisy": floor is not None and floor > tol, "judged": mode in judged,
                     "measured": floor is not None}
    return out


def analyse(bench: dict, meta: dict, acc: dict, metric: Metric) -> dict:
    """One benchmark stage: run statuses, cells, the three comparison tables and the noise floors."""
    variants, reserves = meta["variants"], meta["reserves"]
    first = io.first_variant_per_sha(variants)
    runs = {(r["variant"], r["reserve"]): r for r in bench["runs"] if r["kind"] != "reference"}
    reference = next((r for r in bench["runs"] if r["kind"] == "reference"), None)
    out = {k: bench.get(k) for k in ("status", "error", "device", "timer", "rounds", "processes", "sizes",
                                     "conditions", "schema_version")}
    out["runs"], out["cells"] = [], []
    expected = [(n, r) for n in variants for r in reserves]
    for name, reserve in expected:
        run = runs.get((name, reserve))
        if run is None:
            run = {"variant": name, "sha": variants[name]["sha"], "reserve": reserve, "kind": "impl",
                   "status": MISSING if bench["status"] == OK else bench["status"],
                   "error": f"no {metric.stage} run for {name} × {reserve}" if bench["status"] == OK
                   else bench.get("error"), "reason": None, "log_tail": None, "routes": None, "processes": []}
            runs[(name, reserve)] = run
        out["runs"].append({k: run.get(k) for k in ("variant", "sha", "reserve", "kind", "status", "error",
                                                    "reason", "log_tail")})
    if reference is not None:
        out["runs"].append({k: reference.get(k) for k in ("variant", "sha", "reserve", "kind", "status", "error",
                                                          "reason", "log_tail")})
    for run in list(runs.values()) + ([reference] if reference else []):
        out["cells"] += [_cell_row(run, c, metric) for c in metric.cells(run)]
    modes = sorted({c["mode"] for c in out["cells"]}, key=lambda m: ("eager", "graph", "compiled_graph").index(m)
                   if m in ("eager", "graph", "compiled_graph") else 9)
    judged, note = judged_modes(modes, acc, metric.stage)
    out["modes"], out["judged_modes"], out["judged_note"] = modes, judged, note
    out["paired"] = paired = paired_by_generation(bench)
    # A/A first (at the tolerance): its deltas are part of the noise floor used everywhere else.
    out["aa"] = []
    for sha, name in first.items():
        for twin in [n for n, v in variants.items() if v["sha"] == sha and n != name]:
            for reserve in reserves:
                if (twin, reserve) not in runs:
                    continue
                out["aa"] += _pairs(runs.get((name, reserve)), runs[(twin, reserve)], metric, acc, {}, judged,
                                    {"variant_a": name, "variant_b": twin, "sha": sha, "reserve": reserve}, paired)
    out["noise"] = noise_floors(out["aa"], reference, metric, acc, modes, judged, list(runs.values()), paired)
    thresholds = {m: n["threshold_pct"] for m, n in out["noise"].items()}
    base = meta["baseline"]
    base_sha = variants.get(base, {}).get("sha")
    out["rows"], out["reserve_rows"] = [], []
    for sha, name in first.items():
        for reserve in reserves:
            if sha != base_sha:
                out["rows"] += _pairs(runs.get((base, reserve)), runs.get((name, reserve)), metric, acc, thresholds,
                                      judged, {"variant": name, "sha": sha, "reserve": reserve,
                                               "baseline_variant": base}, paired)
            if reserve != reserves[0]:
                out["reserve_rows"] += _pairs(runs.get((name, reserves[0])), runs.get((name, reserve)), metric, acc,
                                              thresholds, judged, {"variant": name, "sha": sha, "reserve": reserve,
                                                                   "reference_reserve": reserves[0]}, paired)
    out["_runs"], out["_reference"] = runs, reference
    return out


def training_extras(section: dict, acc: dict) -> None:
    """Loss curves and their checks, NaN, peak memory and NSA / dense per training run."""
    ref = section.get("_reference")
    ref_tps = stats.centre([p["tokens_per_s"] for p in io.ok_processes(ref)]) if ref else None
    section["curves"], section["loss_rows"] = [], []
    for (name, reserve), run in section["_runs"].items():
        procs = io.ok_processes(run)
        if not procs:
            continue
        loss = [io.num(x) if io.num(x) is not None else float("nan") for x in procs[0]["loss"]]
        first, last, w = stats.window_means(loss, int(acc["loss_window"]) or None)
        drop = None if first is None or last is None or not first else (first - last) / abs(first) * 100.0
        nan = not loss or any(x != x or x in (float("inf"), float("-inf")) for p in procs
                              for x in [io.num(v) if io.num(v) is not None else float("nan")
                                        for v in p["loss"] + p["tokens_per_s"]])
        tps = stats.centre([p["tokens_per_s"] for p in procs])
        peaks = [p["peak_mem_bytes"] for p in procs if p["peak_mem_bytes"] is not None]
        section["loss_rows"].append({
            "variant": name, "sha": run["sha"], "reserve": reserve, "loss_first": first, "loss_last": last,
            "loss_window": w, "loss_drop_pct": drop, "nan": nan,
            "loss_fell": bool(drop is not None and drop == drop and drop >= float(acc["min_loss_drop_pct"])),
            "tokens_per_s": tps, "nsa_over_dense": tps / ref_tps if tps and ref_tps else None,
            "peak_mem_bytes": max(peaks) if peaks else None})
        section["curves"].append({"variant": name, "reserve": reserve, "loss": loss})
    if ref:
        procs = io.ok_processes(ref)
        if procs:
            section["curves"].append({"variant": "reference", "reserve": None, "reference": True,
                                      "loss": [io.num(x) if io.num(x) is not None else float("nan")
                                               for x in procs[0]["loss"]]})
    section["reference_tokens_per_s"] = ref_tps


def memory_section(decode: dict, training: dict, meta: dict) -> dict:
    """Workspace and allocator counters per (stage, commit, reserve configuration), and reserves
    recommended from the high-water marks (a power of two above, per measured workload)."""
    ws_rows, alloc_rows, high = [], [], {}
    first = set(io.first_variant_per_sha(meta["variants"]).values())
    for source, section in (("decode", decode), ("train", training)):
        for (name, reserve), run in section.get("_runs", {}).items():
            procs = io.ok_processes(run)
            if name not in first or not procs:
                continue  # a twin repeats its commit's counters
            p = procs[0]
            for ws, counters in (p["workspace_stats"] or {}).items():
                if not isinstance(counters, dict):
                    continue
                row = {"source": source, "variant": name, "reserve": reserve, "workspace": ws,
                       **{f: io.num(counters.get(f)) for f in WORKSPACE_FIELDS}}
                ws_rows.append(row)
                h = high.setdefault((source, ws), [0, 0])
                h[0] = max(h[0], max((io.num((q["workspace_stats"].get(ws) or {}).get("high_water_rows")) or 0)
                                     for q in procs))
                h[1] = max(h[1], max((io.num((q["workspace_stats"].get(ws) or {}).get("high_water_keys")) or 0)
                                     for q in procs))
            mem = {k: io.num(v) for k, v in (p["memory"] or {}).items() if not isinstance(v, (dict, list))}
            if source == "train" and p["peak_mem_bytes"] is not None:
                mem.setdefault("peak_bytes", p["peak_mem_bytes"])
            if mem:
                alloc_rows.append({"source": source, "variant": name, "reserve": reserve, **mem})
    contexts = sorted({c["context"] for c in decode.get("cells", []) if c["kind"] == "impl"}, key=ctx_key)
    tsz = training.get("sizes") or {}
    workload = {"decode": "decode, contexts " + ", ".join(map(str, contexts)),
                "train": f"training, batch {tsz.get('batch')} × seq_len {tsz.get('seq_len')}"}
    recommended, combined = [], {}
    for (source, ws), (rows_hw, keys_hw) in sorted(high.items()):
        names = RESERVE_VARS.get(ws, {"rows": f"{ws}.rows", "keys": f"{ws}.keys"})
        for dim, hw in (("rows", rows_hw), ("keys", keys_hw)):
            configured = {rc: (cfg or {}).get(names[dim]) for rc, cfg in meta["reserve_configs"].items()}
            rec = stats.pow2_ceil(hw)
            recommended.append({"workload": workload[source], "source": source, "workspace": ws, "dimension": dim,
                                "variable": names[dim], "high_water": int(hw), "recommended": rec,
                                "configured": {k: v for k, v in configured.items() if v is not None}})
            if rec:
                combined[names[dim]] = max(combined.get(names[dim], 0), rec)
    return {"workspace_rows": ws_rows, "allocator_rows": alloc_rows, "recommended": recommended,
            "recommended_env": combined}


def failed_runs(section: dict) -> list[dict]:
    return [r for r in section["runs"] if r["status"] in (FAILED, MISSING)]
