"""Aggregate the pipeline's raw result files into one summary (JSON) plus CSV/markdown tables.

Usage: aggregate.py --results results --out results/summary.json [--tables results/tables]

Reads the files the harness writes (see the layout in ``load_results``); any of them may be
missing or marked ``"status": "failed"``: such a job becomes a FAILED/MISSING row and the verdict
turns INCOMPLETE, but everything else is still summarised. Judgments follow the acceptance
settings from ``results/meta/variants.json`` (defaults in ``DEFAULT_ACCEPTANCE``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats
from harness import write_atomic  # one atomic writer for every result file (temp + rename)

SCHEMA_VERSION = 1

# Judgment thresholds; the config's `acceptance` overrides any of them, and a nested mapping
# named after the device (e.g. `acceptance: {cpu: {decode_tolerance_pct: 10}}`) overrides those
# for that device only, because a laptop CPU is far noisier than an H100.
DEFAULT_ACCEPTANCE = {
    "alpha": 0.01,  # Mann-Whitney p-value below which a difference is significant
    "ci_level": 0.99,  # level of the bootstrap confidence intervals
    "bootstrap_resamples": 4000,
    "decode_tolerance_pct": 5.0,  # a decode change counts only if significant AND larger than this
    "aa_max_delta_pct": 2.0,  # the same code measured twice must agree within this
    "train_tolerance_pct": 10.0,  # as decode_tolerance_pct, for training tokens/s
    "equiv_atol": 1e-5,  # max abs diff allowed between commits (reserve configs: bit-identical)
    "loss_window": 0,  # steps averaged at each end of the loss curve (0: a quarter of the steps)
    "min_loss_drop_pct": 1.0,  # the last window's mean loss must be this much below the first's
}
# Other spellings accepted for the same settings (first match wins after the canonical name).
ACCEPTANCE_ALIASES = {
    "decode_tolerance_pct": ("decode_regression_pct", "decode_tolerance", "tolerance_pct"),
    "aa_max_delta_pct": ("aa_tolerance_pct", "aa_max_delta"),
    "train_tolerance_pct": ("train_regression_pct", "train_tolerance"),
    "equiv_atol": ("equivalence_atol", "equiv_tolerance", "max_abs_diff", "atol"),
    "alpha": ("p_threshold", "p_value"),
}

# Which environment variables pre-size which workspace dimension (see nsa/ops/workspace.py).
RESERVE_VARS = {
    "sel_pack": {"rows": "NSA_SEL_PACK_RESERVE_N", "keys": "NSA_SEL_PACK_RESERVE_L"},
    "varlen": {"rows": "NSA_VARLEN_RESERVE_N", "keys": "NSA_VARLEN_RESERVE_K"},
}
WORKSPACE_FIELDS = ("allocations", "growth_events", "bytes_reserved", "high_water_rows", "high_water_keys",
                    "capacity_rows", "capacity_keys", "requests")
LOG_TAIL_CHARS = 4000

OK, FAILED, MISSING = "ok", "FAILED", "MISSING"


# ----------------------------------------------------------------------------- reading

def tail(text, limit: int = LOG_TAIL_CHARS) -> str | None:
    """The end of a log (string or list of lines), short enough for a table cell."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        text = "\n".join(str(t) for t in text)
    text = str(text)
    return text if len(text) <= limit else "…" + text[-limit:]


def read_record(path: Path, default_status: str | None = None) -> dict:
    """A result JSON as a dict with a normalised ``status`` (ok / FAILED / MISSING).

    A missing file means the job never finished; an unreadable one (a half-written file from an
    interrupted run) is FAILED, never taken as a result.
    """
    path = Path(path)
    if not path.exists():
        return {"status": MISSING, "error": f"{path} not found (the job did not finish)", "path": str(path)}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"status": FAILED, "error": f"unreadable result {path}: {e}", "path": str(path)}
    if not isinstance(data, dict):
        return {"status": FAILED, "error": f"{path}: expected a JSON object", "path": str(path)}
    raw = str(data.get("status", default_status or "")).lower()
    data["status"] = OK if raw == "ok" else FAILED
    if raw not in ("ok", "failed"):
        data.setdefault("error", f"{path}: status {data.get('status')!r} is neither ok nor failed")
    if "log_tail" in data:
        data["log_tail"] = tail(data["log_tail"])
    data["path"] = str(path)
    return data


def effective_acceptance(acceptance: dict | None, device: str | None) -> dict:
    acc = dict(DEFAULT_ACCEPTANCE)
    given = dict(acceptance or {})
    per_device = given.pop(device, None) if device else None
    for layer in (given, per_device if isinstance(per_device, dict) else {}):
        for key, value in layer.items():
            if isinstance(value, dict):
                continue  # another device's overrides
            canonical = next((k for k, al in ACCEPTANCE_ALIASES.items() if key in al), key)
            acc[canonical] = value
    # The config schema validates these; still, a null or a string here must not crash the report.
    for key, default in DEFAULT_ACCEPTANCE.items():
        cast = int if isinstance(default, int) else float
        try:
            acc[key] = cast(acc[key])
        except (TypeError, ValueError):
            acc[key] = default
    return acc


def _num(x):
    """A float, or None for missing/non-numeric values (never raises on odd input)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f


# ----------------------------------------------------------------------------- sections

def job(stage: str, rec: dict, **keys) -> dict:
    return {"stage": stage, **keys, "status": rec.get("status"), "error": rec.get("error"),
            "log_tail": rec.get("log_tail"), "path": rec.get("path")}


def environment_rows(results: Path, variants: dict, jobs: list) -> list[dict]:
    rows = []
    seen = set()
    for name, v in variants.items():
        sha = v.get("sha")
        rec = read_record(results / "env" / str(sha) / "env.json")
        if sha not in seen and rec["status"] != OK:
            jobs.append(job("env", rec, variant=name, sha=sha))
        seen.add(sha)
        backends = rec.get("backends") or {}
        rows.append({
            "variant": name, "ref": v.get("ref"), "sha": sha, "status": rec["status"],
            "python": rec.get("python"), "torch": rec.get("torch"), "cuda": rec.get("cuda"),
            "gpu": rec.get("gpu"), "driver": rec.get("driver"), "fa2_available": rec.get("fa2_available"),
            "nsa_version": rec.get("nsa_version"), "api_version": rec.get("api_version"),
            "installer": rec.get("installer"),
            "backends": {b: (r.get("route") if isinstance(r, dict) else r) for b, r in backends.items()},
            "backend_reasons": {b: r.get("reason") for b, r in backends.items() if isinstance(r, dict)},
            "pip_freeze": list(rec.get("pip_freeze") or []),
            "error": rec.get("error"), "log_tail": rec.get("log_tail"),
        })
    return rows


def correctness_rows(results: Path, variants: dict, reserves: list, suites: dict, jobs: list) -> list[dict]:
    rows = []
    seen = set()
    for name, v in variants.items():
        sha = v.get("sha")
        for reserve in reserves:
            rec = read_record(results / "tests" / str(sha) / reserve / "summary.json")
            got = rec.get("suites") or {}
            if rec["status"] != OK and (sha, reserve) not in seen:
                jobs.append(job("tests", rec, variant=name, sha=sha, reserve=reserve))
            seen.add((sha, reserve))
            for suite in list(suites) + [s for s in got if s not in suites]:
                s = got.get(suite)
                if isinstance(s, dict):
                    counts = {k: int(_num(s.get(k)) or 0) for k in ("passed", "failed", "skipped", "errors")}
                    status = OK if str(s.get("status", "ok")).lower() == "ok" else FAILED
                    if counts["failed"] or counts["errors"]:
                        status = FAILED
                    elif status != OK and (sha, reserve, suite) not in seen:
                        # Failed with no failing test: pytest could not run it (usage/collection
                        # problem). That is a broken job, not evidence either way.
                        jobs.append(job("tests", {"status": FAILED, "log_tail": rec.get("log_tail"),
                                                  "error": f"suite {suite} failed without a failing test"},
                                        variant=name, sha=sha, reserve=reserve))
                    seen.add((sha, reserve, suite))
                    rows.append({"suite": suite, "marker": s.get("marker", suites.get(suite)), "variant": name,
                                 "sha": sha, "reserve": reserve, "status": status, **counts,
                                 "junit": s.get("junit"),
                                 "log_tail": rec.get("log_tail") if status != OK else None,
                                 "error": None})
                else:
                    rows.append({"suite": suite, "marker": suites.get(suite), "variant": name, "sha": sha,
                                 "reserve": reserve, "status": rec["status"] if rec["status"] != OK else MISSING,
                                 "passed": None, "failed": None, "skipped": None, "errors": None, "junit": None,
                                 "error": rec.get("error") or f"suite {suite} absent from the summary",
                                 "log_tail": rec.get("log_tail")})
    return rows


def _decode_index(runs: list) -> dict:
    """(variant, reserve) -> run, merging duplicates' samples (e.g. one entry per round)."""
    index = {}
    for run in runs:
        if not isinstance(run, dict):
            continue
        key = (run.get("variant"), run.get("reserve"))
        status = OK if str(run.get("status", "")).lower() == "ok" else FAILED
        if key not in index:
            index[key] = {**run, "status": status, "contexts": {}}
        merged = index[key]
        if status != OK:
            merged["status"] = FAILED
            merged.setdefault("error", run.get("error"))
            merged["log_tail"] = tail(run.get("log_tail"))
        for ctx, modes in (run.get("contexts") or {}).items():
            slot = merged["contexts"].setdefault(str(ctx), {})
            for mode_key, samples in (modes or {}).items():
                if mode_key.endswith("_ms") and isinstance(samples, list):
                    slot.setdefault(mode_key[:-3], []).extend(samples)
    return index


def _ctx_sort(ctx: str):
    try:
        return (0, int(ctx))
    except ValueError:
        return (1, ctx)


def decode_section(results: Path, variants: dict, reserves: list, baseline: tuple, acc: dict, jobs: list) -> dict:
    # decode.json holds every run and has no status of its own; each run carries one.
    rec = read_record(results / "decode" / "decode.json", default_status="ok")
    out = {"status": rec["status"], "timer": rec.get("timer"), "rounds": rec.get("rounds"),
           "device": rec.get("device"), "rows": [], "aa": []}
    if rec["status"] != OK:
        jobs.append(job("decode", rec))
    index = _decode_index(rec.get("runs") or [])
    kw = {"alpha": acc["alpha"], "level": acc["ci_level"], "n_boot": int(acc["bootstrap_resamples"])}
    base_run = index.get(baseline[:2])
    base_ok = base_run is not None and base_run["status"] == OK
    for name, v in variants.items():
        for reserve in reserves:
            run = index.get((name, reserve))
            common = {"variant": name, "sha": v.get("sha"), "reserve": reserve}
            if run is None or run["status"] != OK:
                r = run or {"status": MISSING if rec["status"] == OK else rec["status"],
                            "error": f"no decode run for {name} × {reserve}" if rec["status"] == OK else rec.get("error"),
                            "log_tail": rec.get("log_tail") if rec["status"] != OK else None}
                if rec["status"] == OK:  # a whole-file failure is already one job
                    jobs.append(job("decode", r, **common))
                out["rows"].append({**common, "status": r["status"], "context": None, "mode": None,
                                    "error": r.get("error"), "log_tail": tail(r.get("log_tail"))})
                continue
            is_base = (name, reserve) == baseline[:2]
            for ctx in sorted(run["contexts"], key=_ctx_sort):
                for mode, samples in sorted(run["contexts"][ctx].items()):
                    s = stats.clean(samples)
                    q1, q3 = stats.quartiles(s)
                    lo, hi = stats.bootstrap_median_ci(s, level=acc["ci_level"], n_boot=int(acc["bootstrap_resamples"]))
                    row = {**common, "status": OK, "context": _ctx_sort(ctx)[1], "mode": mode, "n": int(s.size),
                           "median_ms": stats.median(s), "q1_ms": q1, "q3_ms": q3,
                           "iqr_ms": None if q1 is None else q3 - q1,
                           "median_ci_low_ms": lo, "median_ci_high_ms": hi, "is_baseline": is_base}
                    base_samples = base_run["contexts"].get(ctx, {}).get(mode) if base_ok else None
                    if is_base:
                        row.update(baseline_median_ms=row["median_ms"], call="baseline")
                    elif base_samples:
                        c = stats.compare(base_samples, s, tolerance_pct=acc["decode_tolerance_pct"], **kw)
                        row.update(baseline_median_ms=c["baseline_median"], delta_pct=c["delta_pct"],
                                   ci_low_pct=c["ci_low_pct"], ci_high_pct=c["ci_high_pct"], p_value=c["p_value"],
                                   call=c["call"])
                    else:
                        row.update(call="no baseline")
                    out["rows"].append(row)
    # A/A: variants that resolve to the same commit measure the same code; any difference is noise.
    by_sha = {}
    for name, v in variants.items():
        by_sha.setdefault(v.get("sha"), []).append(name)
    for sha, names in by_sha.items():
        for other in names[1:]:
            first = names[0]
            for reserve in reserves:
                a, b = index.get((first, reserve)), index.get((other, reserve))
                if not a or not b or a["status"] != OK or b["status"] != OK:
                    out["aa"].append({"variant_a": first, "variant_b": other, "sha": sha, "reserve": reserve,
                                      "status": MISSING, "context": None, "mode": None})
                    continue
                for ctx in sorted(set(a["contexts"]) & set(b["contexts"]), key=_ctx_sort):
                    for mode in sorted(set(a["contexts"][ctx]) & set(b["contexts"][ctx])):
                        c = stats.compare(a["contexts"][ctx][mode], b["contexts"][ctx][mode],
                                          tolerance_pct=acc["decode_tolerance_pct"], **kw)
                        out["aa"].append({"variant_a": first, "variant_b": other, "sha": sha, "reserve": reserve,
                                          "status": OK, "context": _ctx_sort(ctx)[1], "mode": mode,
                                          "median_a_ms": c["baseline_median"], "median_b_ms": c["median"],
                                          "delta_pct": c["delta_pct"], "ci_low_pct": c["ci_low_pct"],
                                          "ci_high_pct": c["ci_high_pct"], "p_value": c["p_value"],
                                          "call": c["call"], "n": c["n"]})
    out["_index"] = index  # raw runs, for the memory section; dropped before writing
    return out


def _series(part: dict | None, key: str) -> list:
    vals = (part or {}).get(key) or []
    return [(_num(x) if _num(x) is not None else float("nan")) for x in vals]


def training_section(results: Path, variants: dict, reserves: list, baseline: tuple, acc: dict, jobs: list) -> dict:
    recs, seen = {}, set()
    for name, v in variants.items():
        for reserve in reserves:
            sha = v.get("sha")
            rec = read_record(results / "train" / str(sha) / f"{reserve}.json")
            recs[(name, reserve)] = rec
            if rec["status"] != OK and (sha, reserve) not in seen:
                jobs.append(job("train", rec, variant=name, sha=sha, reserve=reserve))
            seen.add((sha, reserve))
    base = recs.get(baseline[:2])
    base_tps = _series(base.get("nsa"), "tokens_per_s") if base and base["status"] == OK else None
    rows, curves = [], []
    for (name, reserve), rec in recs.items():
        common = {"variant": name, "sha": variants[name].get("sha"), "reserve": reserve, "status": rec["status"]}
        if rec["status"] != OK:
            rows.append({**common, "error": rec.get("error"), "log_tail": rec.get("log_tail")})
            continue
        nsa, dense = rec.get("nsa") or {}, rec.get("dense") or {}
        tps, dtps = _series(nsa, "tokens_per_s"), _series(dense, "tokens_per_s")
        loss, dloss = _series(nsa, "loss"), _series(dense, "loss")
        first, last, w = stats.window_means(loss, int(acc["loss_window"]) or None)
        dfirst, dlast, _ = stats.window_means(dloss, int(acc["loss_window"]) or None)
        has_nan = any(not math.isfinite(x) for x in loss + tps) or not loss
        drop = None if first is None or last is None or not first else (first - last) / abs(first) * 100.0
        fell = bool(drop is not None and math.isfinite(drop) and drop >= acc["min_loss_drop_pct"])
        med, dmed = stats.median(tps), stats.median(dtps)
        lo, hi = stats.bootstrap_median_ci(tps, level=acc["ci_level"], n_boot=int(acc["bootstrap_resamples"]))
        row = {**common, "device": rec.get("device"), "steps": rec.get("steps"), "warmup": rec.get("warmup"),
               "batch": rec.get("batch"), "seq_len": rec.get("seq_len"),
               "tokens_per_s": med, "tokens_per_s_ci_low": lo, "tokens_per_s_ci_high": hi, "n": len(stats.clean(tps)),
               "dense_tokens_per_s": dmed,
               "nsa_over_dense": (med / dmed) if med is not None and dmed else None,
               "loss_first": first, "loss_last": last, "loss_window": w, "loss_drop_pct": drop, "loss_fell": fell,
               "dense_loss_first": dfirst, "dense_loss_last": dlast, "nan": has_nan,
               "dense_nan": any(not math.isfinite(x) for x in dloss + dtps),
               "peak_mem_bytes": _num(nsa.get("peak_mem_bytes")), "dense_peak_mem_bytes": _num(dense.get("peak_mem_bytes")),
               "is_baseline": (name, reserve) == baseline[:2]}
        if row["is_baseline"]:
            row["call"] = "baseline"
        elif base_tps:
            c = stats.compare(base_tps, tps, tolerance_pct=acc["train_tolerance_pct"], lower_is_better=False,
                              alpha=acc["alpha"], level=acc["ci_level"], n_boot=int(acc["bootstrap_resamples"]))
            row.update(baseline_tokens_per_s=c["baseline_median"], delta_pct=c["delta_pct"],
                       ci_low_pct=c["ci_low_pct"], ci_high_pct=c["ci_high_pct"], p_value=c["p_value"], call=c["call"])
        else:
            row["call"] = "no baseline"
        rows.append(row)
        curves.append({"variant": name, "reserve": reserve, "loss": loss, "dense_loss": dloss,
                       "tokens_per_s": tps, "dense_tokens_per_s": dtps})
    return {"rows": rows, "curves": curves, "_records": recs}


def memory_section(decode: dict, training: dict, variants: dict, reserves: list, reserve_configs: dict) -> dict:
    ws_rows, alloc_rows = [], []
    sources = [("decode", key, run) for key, run in decode.get("_index", {}).items()]
    sources += [("train", key, rec) for key, rec in training.get("_records", {}).items()]
    high = {}  # (workload, workspace) -> [max rows, max keys]
    workloads = {}
    seen_train = set()
    for source, (name, reserve), rec in sources:
        if rec.get("status") != OK or name not in variants:
            continue
        if source == "train":  # training results are per commit: an A/A twin would repeat them
            if (variants[name].get("sha"), reserve) in seen_train:
                continue
            seen_train.add((variants[name].get("sha"), reserve))
        for ws, counters in (rec.get("workspace_stats") or {}).items():
            if not isinstance(counters, dict):
                continue
            row = {"source": source, "variant": name, "reserve": reserve, "workspace": ws,
                   **{f: _num(counters.get(f)) for f in WORKSPACE_FIELDS}}
            ws_rows.append(row)
            h = high.setdefault((source, ws), [0, 0])
            h[0] = max(h[0], row["high_water_rows"] or 0)
            h[1] = max(h[1], row["high_water_keys"] or 0)
        mem = rec.get("memory") or {}
        if isinstance(mem, dict) and mem:
            alloc_rows.append({"source": source, "variant": name, "reserve": reserve,
                               **{k: _num(val) for k, val in mem.items() if not isinstance(val, (dict, list))}})
        if source == "decode":
            workloads.setdefault("decode", set()).update(str(c) for c in (rec.get("contexts") or {}))
        else:
            workloads.setdefault("train", set()).add(f"batch {rec.get('batch')} × seq_len {rec.get('seq_len')}")
    describe = {
        "decode": lambda: "decode, contexts " + ", ".join(sorted(workloads.get("decode", ()), key=_ctx_sort)),
        "train": lambda: "training, " + "; ".join(sorted(workloads.get("train", ()))),
    }
    recommended = []
    for (source, ws), (rows_hw, keys_hw) in sorted(high.items()):
        names = RESERVE_VARS.get(ws, {"rows": f"{ws}.rows", "keys": f"{ws}.keys"})
        for dim, hw in (("rows", rows_hw), ("keys", keys_hw)):
            configured = {rc: (cfg or {}).get(names[dim]) for rc, cfg in reserve_configs.items()}
            recommended.append({"workload": describe[source]() if source in describe else source, "source": source,
                                "workspace": ws, "dimension": dim, "variable": names[dim],
                                "high_water": int(hw), "recommended": stats.pow2_ceil(hw),
                                "configured": {k: val for k, val in configured.items() if val is not None}})
    # One value per variable covering every measured workload (what a user would export); a
    # workspace the workload never touched gets no variable (0 = grow on demand is the default).
    combined = {}
    for r in recommended:
        if r["recommended"]:
            combined[r["variable"]] = max(combined.get(r["variable"], 0), r["recommended"])
    return {"workspace_rows": ws_rows, "allocator_rows": alloc_rows, "recommended": recommended,
            "recommended_env": combined}


def _load_tensors(path: Path):
    import torch  # only here: the rest of the summary must not need torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except TypeError:  # torch too old for weights_only
        obj = torch.load(str(path), map_location="cpu")
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: expected a dict of tensors")
    return obj


def _bitwise_equal(a, b) -> bool:
    import torch

    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    # Compare the bytes, not the values: NaN != NaN and -0.0 == 0.0 would both mislead here.
    return torch.equal(a.detach().contiguous().view(-1).view(torch.uint8),
                       b.detach().contiguous().view(-1).view(torch.uint8))


def _max_abs_diff(a, b) -> float:
    import torch

    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - b.detach().double()).abs()
    if torch.isnan(d).any():
        return math.nan
    return float(d.max())


def equivalence_section(results: Path, variants: dict, reserves: list, baseline: tuple, acc: dict, jobs: list) -> dict:
    tensors, status = {}, {}
    seen = set()
    for name, v in variants.items():
        sha = v.get("sha")
        for reserve in reserves:
            key = (sha, reserve)
            if key in status:
                continue
            rec = read_record(results / "equiv" / str(sha) / f"{reserve}.json")
            pt = results / "equiv" / str(sha) / f"{reserve}.pt"
            if rec["status"] == OK:
                if not pt.exists():
                    rec = {**rec, "status": MISSING, "error": f"{pt} not found"}
                else:
                    try:
                        tensors[key] = _load_tensors(pt)
                    except ImportError:
                        rec = {**rec, "status": MISSING, "error": "torch is not importable here; cannot compare outputs"}
                    except Exception as e:  # noqa: BLE001 - a corrupt file is a failed job, not a crash of the report
                        rec = {**rec, "status": FAILED, "error": f"unreadable {pt}: {e}"}
            status[key] = rec
            if rec["status"] != OK and key not in seen:
                jobs.append(job("equiv", rec, variant=name, sha=sha, reserve=reserve))
            seen.add(key)
    ref_key = (variants.get(baseline[0], {}).get("sha"), baseline[1])
    ref = tensors.get(ref_key)
    rows = []
    for name, v in variants.items():
        sha = v.get("sha")
        for reserve in reserves:
            rec = status[(sha, reserve)]
            row = {"variant": name, "sha": sha, "reserve": reserve, "status": rec["status"],
                   "error": rec.get("error"), "log_tail": rec.get("log_tail")}
            out = tensors.get((sha, reserve))
            if out is not None:
                if ref is not None:
                    names = sorted(set(ref) | set(out))
                    diffs = {k: _max_abs_diff(ref.get(k), out.get(k)) for k in names}
                    row["max_abs_diff"] = {k: d for k, d in diffs.items()}
                    worst = max(diffs.values(), key=lambda d: math.inf if math.isnan(d) else d) if diffs else 0.0
                    row["max_abs_diff_all"] = worst
                    row["within_tolerance"] = bool(math.isfinite(worst) and worst <= float(acc["equiv_atol"]))
                # Pre-sizing must not change a single bit: compare with the same commit's first config.
                own = tensors.get((sha, reserves[0]))
                row["bit_identical"] = None
                if reserve != reserves[0] and own is not None:
                    row["bit_identical"] = all(_bitwise_equal(own.get(k), out.get(k)) for k in set(own) | set(out))
            rows.append(row)
    return {"reference": {"variant": baseline[0], "sha": ref_key[0], "reserve": baseline[1]}, "rows": rows}


# ----------------------------------------------------------------------------- judgment

def criterion(name, measured, threshold, passed, *, on_fail="fail", detail=None, missing: int = 0) -> dict:
    """One acceptance line. ``passed`` None means it cannot be judged from what ran.

    ``on_fail`` says what a False means for the verdict: "fail" (the code is wrong), "incomplete"
    (the measurement cannot be trusted, e.g. the A/A check), or "info" (shown, never decisive).

    Criteria are judged on what ran; ``missing`` runs are named in the measured value (the failed
    jobs themselves make the verdict INCOMPLETE).
    """
    if missing:
        measured = f"{measured}; {missing} not measured (failed/missing jobs)"
    return {"criterion": name, "measured": measured, "threshold": threshold, "pass": passed,
            "on_fail": on_fail, "detail": detail}


def _fmt(x, spec=".3g"):
    return "n/a" if x is None else format(x, spec)


def acceptance_checklist(s: dict, acc: dict) -> list[dict]:
    out = []
    # Correctness, counted once per commit x reserve (A/A twins share results).
    seen, failures, unknown, total = set(), [], [], 0
    for r in s["correctness"]:
        key = (r["sha"], r["reserve"], r["suite"])
        if key in seen:
            continue
        seen.add(key)
        if r["failed"] is None:
            unknown.append(f"{r['suite']} on {r['variant']}/{r['reserve']}: {r['status']}")
        elif r["failed"] or r["errors"] or r["status"] != OK:
            if r["failed"] or r["errors"]:
                failures.append(f"{r['suite']} on {r['variant']}/{r['reserve']}: "
                                f"{r['failed']} failed, {r['errors']} errors")
            else:
                unknown.append(f"{r['suite']} on {r['variant']}/{r['reserve']}: suite job failed")
        else:
            total += r["passed"]
    out.append(criterion(
        "All correctness suites pass for every commit × reserve config",
        f"{len(failures)} failing suite runs, {len(unknown)} not run; {total} tests passed", "0 failures",
        False if failures else (None if total == 0 else True), detail="; ".join(failures + unknown) or None))

    # Decode regression against the baseline (same commit + same config excluded: that is A/A).
    base_sha = s["baseline"]["sha"]
    rows = [r for r in s["decode"]["rows"] if r.get("status") == OK and not r.get("is_baseline")
            and not (r["sha"] == base_sha and r["reserve"] == s["baseline"]["reserve"])]
    slower = [r for r in rows if r.get("call") == stats.SLOWER]
    judged = [r for r in rows if r.get("delta_pct") is not None]
    missing = [r for r in s["decode"]["rows"] if r.get("status") != OK]
    worst = max((r["delta_pct"] for r in judged), default=None)
    out.append(criterion(
        "Decode: no significant regression vs the baseline",
        f"worst median delta {_fmt(worst, '+.2f')}% over {len(judged)} comparisons; {len(slower)} slower",
        f"p < {acc['alpha']} and delta > +{acc['decode_tolerance_pct']}% counts as a regression",
        False if slower else (None if not judged and (missing or len(s["variants"]) > 1) else True), missing=len(missing),
        detail="; ".join(f"{r['variant']}/{r['reserve']} ctx {r['context']} {r['mode']}: "
                         f"{r['delta_pct']:+.2f}% (p={r['p_value']:.2g})" for r in slower) or None))

    # A/A: the measurement itself.
    aa = s["decode"]["aa"]
    if not aa:
        out.append(criterion("Decode A/A (same commit listed twice) agrees", "no A/A pair configured",
                             f"|delta| < {acc['aa_max_delta_pct']}% and no significant change", None, on_fail="info"))
    else:
        all_ok = [r for r in aa if r["status"] == OK and r["delta_pct"] is not None]
        # `aa_modes` limits the judgment to timing modes the device clock governs: on a GPU an
        # eager step is host-dispatch-bound, and each worker process dispatches at its own speed.
        modes = acc.get("aa_modes") or None
        ok_rows = [r for r in all_ok if modes is None or r["mode"] in modes]
        unjudged = [r for r in all_ok if r not in ok_rows]
        bad = [r for r in ok_rows if abs(r["delta_pct"]) >= acc["aa_max_delta_pct"] or r["call"] != stats.NO_CHANGE]
        worst = max((abs(r["delta_pct"]) for r in ok_rows), default=None)
        notes = ["; ".join(f"{r['variant_b']} vs {r['variant_a']} /{r['reserve']} ctx {r['context']} {r['mode']}: "
                           f"{r['delta_pct']:+.2f}% ({r['call']})" for r in bad)]
        if unjudged:
            worst_unjudged = max(abs(r["delta_pct"]) for r in unjudged)
            notes.append(f"not judged ({', '.join(sorted({r['mode'] for r in unjudged}))} mode, outside aa_modes): "
                         f"max |median delta| {worst_unjudged:.2f}% over {len(unjudged)} comparisons")
        out.append(criterion(
            "Decode A/A (same commit listed twice) agrees",
            f"max |median delta| {_fmt(worst, '.2f')}% over {len(ok_rows)} comparisons"
            + (f" ({', '.join(modes)} mode)" if modes else "") + f"; {len(bad)} outside",
            f"|delta| < {acc['aa_max_delta_pct']}% and no significant change",
            False if bad else (None if not ok_rows else True), on_fail="incomplete",
            detail="; ".join(n for n in notes if n) or None))

    # Host timers around asynchronous GPU work measure launch overhead and drift, not the kernels
    # (one of the seed report's flaws): say which timer produced the numbers.
    timer, dev = s["decode"].get("timer"), s["decode"].get("device") or s.get("device")
    if timer:
        out.append(criterion("Decode timed with the device's own clock", f"{timer} on {dev}",
                             "cuda_events on cuda", timer == "cuda_events" if dev == "cuda" else True,
                             on_fail="info"))

    # Training.
    trows = s["training"]["rows"]
    ok_t = [r for r in trows if r["status"] == OK]
    not_t = [r for r in trows if r["status"] != OK]
    no_fall = [r for r in ok_t if not r["loss_fell"]]
    measured = "no training results"
    if ok_t:  # the run closest to failing (a NaN drop counts as the worst)
        w = min(ok_t, key=lambda r: r["loss_drop_pct"] if r["loss_drop_pct"] is not None
                and math.isfinite(r["loss_drop_pct"]) else -math.inf)
        measured = (f"smallest drop {_fmt(w['loss_drop_pct'], '.2f')}% ({w['variant']}/{w['reserve']}: "
                    f"{_fmt(w['loss_first'], '.4f')} → {_fmt(w['loss_last'], '.4f')}, windows of {w['loss_window']} "
                    f"steps) over {len(ok_t)} runs")
    out.append(criterion(
        "Training loss falls (last window mean below the first)", measured,
        f"drop ≥ {acc['min_loss_drop_pct']}%",
        False if no_fall else (None if not ok_t else True), missing=len(not_t),
        detail="; ".join(f"{r['variant']}/{r['reserve']}: drop {_fmt(r['loss_drop_pct'], '.2f')}%" for r in no_fall) or None))
    nans = [r for r in ok_t if r["nan"]]
    out.append(criterion("Training: no NaN/inf in loss or throughput", f"{len(nans)} runs with NaN", "0",
                         False if nans else (None if not ok_t else True), missing=len(not_t),
                         detail=", ".join(f"{r['variant']}/{r['reserve']}" for r in nans) or None))
    tslow = [r for r in ok_t if r.get("call") == stats.SLOWER
             and not (r["sha"] == base_sha and r["reserve"] == s["baseline"]["reserve"])]
    tjudged = [r for r in ok_t if r.get("delta_pct") is not None]
    tworst = min((r["delta_pct"] for r in tjudged), default=None)
    out.append(criterion(
        "Training throughput: no significant regression vs the baseline",
        f"worst tokens/s delta {_fmt(tworst, '+.2f')}% over {len(tjudged)} comparisons",
        f"p < {acc['alpha']} and delta < -{acc['train_tolerance_pct']}% counts as a regression",
        # Nothing to compare is fine for a single run; it is "not judged" only when runs are missing.
        False if tslow else (None if not tjudged and (not_t or len(ok_t) > 1) else True), missing=len(not_t),
        detail="; ".join(f"{r['variant']}/{r['reserve']}: {r['delta_pct']:+.2f}%" for r in tslow) or None))

    # Equivalence.
    erows = s["equivalence"]["rows"]
    e_missing = [r for r in erows if r["status"] != OK or ("max_abs_diff_all" not in r)]
    reserve_rows = [r for r in erows if r["reserve"] != s["reserves"][0] and r["status"] == OK]
    not_bit = [r for r in reserve_rows if r.get("bit_identical") is False]
    out.append(criterion(
        "Reserve configs are bit-identical to their commit's first config",
        f"{len(reserve_rows) - len(not_bit) - sum(r.get('bit_identical') is None for r in reserve_rows)} of "
        f"{len(reserve_rows)} identical", "bit for bit",
        False if not_bit else (None if any(r.get("bit_identical") is None for r in reserve_rows)
                               or (not reserve_rows and len(s["reserves"]) > 1) else True),
        missing=len(e_missing),
        detail=", ".join(f"{r['variant']}/{r['reserve']}" for r in not_bit) or None))
    judged_e = [r for r in erows if "max_abs_diff_all" in r]
    outside = [r for r in judged_e if not r["within_tolerance"]]
    worst_e = max((r["max_abs_diff_all"] for r in judged_e), default=None,
                  key=lambda d: math.inf if d is None or math.isnan(d) else d)
    out.append(criterion(
        "Outputs of every commit within tolerance of the baseline",
        f"max abs diff {_fmt(worst_e, '.3g')} over {len(judged_e)} runs", f"≤ {acc['equiv_atol']}",
        False if outside else (None if not judged_e else True), missing=len(e_missing),
        detail=", ".join(f"{r['variant']}/{r['reserve']}: {_fmt(r['max_abs_diff_all'], '.3g')}" for r in outside) or None))

    # Memory (informative): does pre-sizing remove workspace growth?
    ws = s["memory"]["workspace_rows"]
    if ws and len(s["reserves"]) > 1:
        first = s["reserves"][0]
        growth = {}
        for r in ws:
            growth.setdefault(r["reserve"], 0)
            growth[r["reserve"]] += int(r["growth_events"] or 0)
        others = {k: val for k, val in growth.items() if k != first}
        out.append(criterion(
            "Memory: reserve configs reduce workspace growth events",
            ", ".join(f"{k}: {val}" for k, val in growth.items()), f"≤ {first}'s growth events",
            all(val <= growth.get(first, 0) for val in others.values()) if others else None, on_fail="info"))
    return out


def verdict(checklist: list[dict], jobs: list[dict]) -> tuple[str, list[str]]:
    fails = [f"{c['criterion']}: {c['measured']}" + (f" ({c['detail']})" if c.get("detail") else "")
             for c in checklist if c["pass"] is False and c["on_fail"] == "fail"]
    incomplete = [f"{c['criterion']}: {c['measured']}" + (f" ({c['detail']})" if c.get("detail") else "")
                  for c in checklist if c["on_fail"] != "info"
                  and (c["pass"] is None or (c["pass"] is False and c["on_fail"] == "incomplete"))]
    # A commit whose environment failed cannot have run anything else: say so once, not per job.
    env_failed = {j.get("sha") for j in jobs if j["stage"] == "env"}
    for j in jobs:
        if j["stage"] != "env" and j.get("sha") in env_failed and j["status"] == MISSING:
            continue
        where = "/".join(str(j[k]) for k in ("variant", "reserve") if j.get(k))
        text = f"{j['stage']} job {where} {j['status']}: {j.get('error') or 'see its log'}".replace("  ", " ")
        if j["stage"] == "env":
            text += " (its later jobs could not run)"
        incomplete.append(text)
    if fails:
        return "FAIL", fails + [f"(also not judged) {r}" for r in incomplete]
    if incomplete:
        return "INCOMPLETE", incomplete
    return "PASS", ["every acceptance criterion passed"]


# ----------------------------------------------------------------------------- driver

def build_summary(results: Path) -> dict:
    results = Path(results)
    meta = read_record(results / "meta" / "variants.json")
    jobs: list[dict] = []
    if meta["status"] == MISSING or not isinstance(meta.get("variants"), dict):
        jobs.append(job("meta", meta if meta["status"] != OK else {**meta, "status": FAILED,
                                                                     "error": "variants.json has no variants"}))
        meta = {"variants": {}, "reserve_configs": {}, "suites": {}, "acceptance": {}}
    variants = {str(k): (v if isinstance(v, dict) else {"ref": None, "sha": None})
                for k, v in (meta.get("variants") or {}).items()}
    reserve_configs = meta.get("reserve_configs") or {"none": {}}
    reserves = [str(r) for r in reserve_configs]
    suites = meta.get("suites") or {}
    device = meta.get("device")
    acc = effective_acceptance(meta.get("acceptance"), device)
    base_name = meta.get("baseline") if meta.get("baseline") in variants else next(iter(variants), None)
    baseline = (base_name, reserves[0])
    s = {
        "schema": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "repo": meta.get("repo"), "device": device,
        "baseline": {"variant": base_name, "reserve": reserves[0], "sha": variants.get(base_name, {}).get("sha")},
        "variants": [{"name": n, "ref": v.get("ref"), "sha": v.get("sha")} for n, v in variants.items()],
        "reserves": reserves, "reserve_configs": reserve_configs, "common_env": meta.get("common_env") or {},
        "suites": suites, "acceptance_settings": acc,
    }
    s["environment"] = environment_rows(results, variants, jobs)
    s["correctness"] = correctness_rows(results, variants, reserves, suites, jobs)
    decode = decode_section(results, variants, reserves, baseline, acc, jobs)
    training = training_section(results, variants, reserves, baseline, acc, jobs)
    s["memory"] = memory_section(decode, training, variants, reserves, reserve_configs)
    decode.pop("_index", None)
    training.pop("_records", None)
    s["decode"], s["training"] = decode, training
    s["equivalence"] = equivalence_section(results, variants, reserves, baseline, acc, jobs)
    s["jobs"] = jobs
    s["acceptance"] = acceptance_checklist(s, acc)
    s["verdict"], s["reasons"] = verdict(s["acceptance"], jobs)
    return s


# ----------------------------------------------------------------------------- tables

def fmt_num(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_pct(x) -> str:
    return "" if x is None else f"{x:+.2f}%"


def fmt_ci(lo, hi, pct: bool = True) -> str:
    if lo is None or hi is None:
        return ""
    return f"[{lo:+.2f}, {hi:+.2f}]%" if pct else f"[{fmt_num(lo)}, {fmt_num(hi)}]"


def fmt_p(p) -> str:
    return "" if p is None else f"{p:.2g}"


def fmt_bytes(b) -> str:
    if b is None:
        return ""
    b = float(b)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024.0
    return str(b)


def short(sha) -> str:
    return str(sha or "")[:10]


def build_tables(s: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every table of the report as (header, rows of display strings); escaping is the renderer's job."""
    t = {}
    t["variants"] = (["variant", "ref", "sha"], [[v["name"], str(v["ref"] or ""), short(v["sha"])] for v in s["variants"]])
    t["environment"] = (
        ["variant", "sha", "status", "python", "torch", "cuda", "gpu", "driver", "FA-2", "nsa", "API", "installer",
         "routes (cmp / slc / win)", "packages"],
        [[r["variant"], short(r["sha"]), r["status"], fmt_num(r["python"]), fmt_num(r["torch"]), fmt_num(r["cuda"]),
          fmt_num(r["gpu"]), fmt_num(r["driver"]), fmt_num(r["fa2_available"]), fmt_num(r["nsa_version"]),
          fmt_num(r["api_version"]), fmt_num(r["installer"]),
          " / ".join(str(r["backends"].get(b, "")) for b in ("cmp", "slc", "win")), str(len(r["pip_freeze"]))]
         for r in s["environment"]])
    t["correctness"] = (
        ["suite", "marker", "variant", "reserve", "status", "passed", "failed", "skipped", "errors"],
        [[r["suite"], fmt_num(r["marker"]), r["variant"], r["reserve"], r["status"], fmt_num(r["passed"]),
          fmt_num(r["failed"]), fmt_num(r["skipped"]), fmt_num(r["errors"])] for r in s["correctness"]])
    t["decode"] = (
        ["variant", "reserve", "context", "mode", "n", "median ms", "IQR ms", "baseline ms", "delta",
         f"{int(s['acceptance_settings']['ci_level'] * 100)}% CI of delta", "p (MWU)", "call"],
        [[r["variant"], r["reserve"], fmt_num(r.get("context")), fmt_num(r.get("mode")), fmt_num(r.get("n")),
          fmt_num(r.get("median_ms")), fmt_num(r.get("iqr_ms"), 3), fmt_num(r.get("baseline_median_ms")),
          fmt_pct(r.get("delta_pct")), fmt_ci(r.get("ci_low_pct"), r.get("ci_high_pct")), fmt_p(r.get("p_value")),
          r.get("call") or r["status"]] for r in s["decode"]["rows"]])
    t["aa"] = (
        ["A", "B", "reserve", "context", "mode", "median A ms", "median B ms", "delta", "CI of delta", "p (MWU)", "call"],
        [[r["variant_a"], r["variant_b"], r["reserve"], fmt_num(r.get("context")), fmt_num(r.get("mode")),
          fmt_num(r.get("median_a_ms")), fmt_num(r.get("median_b_ms")), fmt_pct(r.get("delta_pct")),
          fmt_ci(r.get("ci_low_pct"), r.get("ci_high_pct")), fmt_p(r.get("p_value")), r.get("call") or r["status"]]
         for r in s["decode"]["aa"]])
    t["training"] = (
        ["variant", "reserve", "status", "steps", "batch × seq", "tokens/s (median)", "CI", "dense tokens/s",
         "NSA / dense", "loss first → last", "loss fell", "NaN", "peak mem", "delta vs baseline", "CI of delta",
         "p (MWU)", "call"],
        [[r["variant"], r["reserve"], r["status"], fmt_num(r.get("steps")),
          f"{r.get('batch')} × {r.get('seq_len')}" if r["status"] == OK else "",
          fmt_num(r.get("tokens_per_s")), fmt_ci(r.get("tokens_per_s_ci_low"), r.get("tokens_per_s_ci_high"), False),
          fmt_num(r.get("dense_tokens_per_s")), fmt_num(r.get("nsa_over_dense"), 3),
          f"{fmt_num(r.get('loss_first'))} → {fmt_num(r.get('loss_last'))}" if r["status"] == OK else "",
          fmt_num(r.get("loss_fell")), fmt_num(r.get("nan")), fmt_bytes(r.get("peak_mem_bytes")),
          fmt_pct(r.get("delta_pct")), fmt_ci(r.get("ci_low_pct"), r.get("ci_high_pct")), fmt_p(r.get("p_value")),
          r.get("call") or ""] for r in s["training"]["rows"]])
    m = s["memory"]
    t["workspaces"] = (
        ["source", "variant", "reserve", "workspace", "allocations", "growth events", "bytes reserved",
         "high-water rows", "high-water keys", "capacity rows", "capacity keys", "requests"],
        [[r["source"], r["variant"], r["reserve"], r["workspace"], fmt_num(r["allocations"]),
          fmt_num(r["growth_events"]), fmt_bytes(r["bytes_reserved"]), fmt_num(r["high_water_rows"]),
          fmt_num(r["high_water_keys"]), fmt_num(r["capacity_rows"]), fmt_num(r["capacity_keys"]),
          fmt_num(r["requests"])] for r in m["workspace_rows"]])
    keys = []
    for r in m["allocator_rows"]:
        keys += [k for k in r if k not in ("source", "variant", "reserve") and k not in keys]
    t["allocator"] = (
        ["source", "variant", "reserve"] + keys,
        [[r["source"], r["variant"], r["reserve"]]
         + [fmt_bytes(r.get(k)) if "bytes" in k else fmt_num(r.get(k)) for k in keys] for r in m["allocator_rows"]])
    t["reserves"] = (
        ["workload", "workspace", "variable", "high-water mark", "recommended (next power of two)", "configured"],
        [[r["workload"], r["workspace"], r["variable"], fmt_num(r["high_water"]),
          fmt_num(r["recommended"]) if r["recommended"] else "unset (workspace not used)",
          ", ".join(f"{k}={val}" for k, val in r["configured"].items())] for r in m["recommended"]])
    t["equivalence"] = (
        ["variant", "reserve", "status", "max abs diff vs baseline", "per output", "within tolerance",
         "bit-identical to own first config"],
        [[r["variant"], r["reserve"], r["status"], fmt_num(r.get("max_abs_diff_all"), 3),
          ", ".join(f"{k}: {fmt_num(v, 3)}" for k, v in (r.get("max_abs_diff") or {}).items()),
          fmt_num(r.get("within_tolerance")), fmt_num(r.get("bit_identical"))] for r in s["equivalence"]["rows"]])
    t["acceptance"] = (
        ["criterion", "measured", "threshold", "result"],
        [[c["criterion"], str(c["measured"]), str(c["threshold"]),
          {True: "pass", False: "FAIL" if c["on_fail"] == "fail" else
           ("NOT TRUSTWORTHY" if c["on_fail"] == "incomplete" else "no"), None: "not judged"}[c["pass"]]]
         for c in s["acceptance"]])
    t["jobs"] = (
        ["stage", "variant", "reserve", "status", "error"],
        [[j["stage"], str(j.get("variant") or ""), str(j.get("reserve") or ""), j["status"], str(j.get("error") or "")]
         for j in s["jobs"]])
    return t


def md_cell(text) -> str:
    """Markdown table cell: pipes escaped, HTML-significant characters entity-encoded, one line."""
    text = "" if text is None else str(text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_(no rows)_\n"
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, set):
        return sorted(x)
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return str(x)


def _json_clean(x):
    """NaN/inf are not JSON: write them as strings so any JSON reader can load the summary."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return x


def _flat(row: dict, prefix: str = "") -> dict:
    """One CSV row: nested dicts become dotted columns, lists JSON; log tails stay in the JSON/report."""
    out = {}
    for k, v in row.items():
        if k in ("log_tail", "pip_freeze", "backend_reasons"):
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)):
            out[prefix + k] = json.dumps(v)
        else:
            out[prefix + k] = v
    return out


def raw_tables(s: dict) -> dict[str, list[dict]]:
    """Machine-readable rows (unformatted numbers) for the CSV files."""
    m = s["memory"]
    return {"environment": s["environment"], "correctness": s["correctness"], "decode": s["decode"]["rows"],
            "aa": s["decode"]["aa"], "training": s["training"]["rows"], "workspaces": m["workspace_rows"],
            "allocator": m["allocator_rows"], "reserves": m["recommended"], "equivalence": s["equivalence"]["rows"],
            "acceptance": s["acceptance"], "jobs": s["jobs"]}


def csv_rows(rows: list[dict]) -> str:
    flat = [_flat(r) for r in rows]
    header = []
    for r in flat:
        header += [k for k in r if k not in header]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(_json_clean(flat))
    return buf.getvalue()


def write_outputs(s: dict, out: Path, tables_dir: Path) -> None:
    # CSV: raw values for further analysis; markdown: the formatted tables of the report.
    for name, rows in raw_tables(s).items():
        write_atomic(tables_dir / f"{name}.csv", csv_rows(rows))
    for name, (header, rows) in build_tables(s).items():
        write_atomic(tables_dir / f"{name}.md", markdown_table(header, rows))
    # The summary last: a rule that waits for it then finds the tables complete too.
    write_atomic(out, json.dumps(_json_clean(s), indent=1, default=_json_default, allow_nan=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", help="the pipeline's results directory")
    ap.add_argument("--out", default=None, help="summary JSON (default: RESULTS/summary.json)")
    ap.add_argument("--tables", default=None, help="CSV/markdown table directory (default: RESULTS/tables)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "summary.json"
    tables_dir = Path(args.tables) if args.tables else results / "tables"
    s = build_summary(results)
    write_outputs(s, out, tables_dir)
    print(f"verdict: {s['verdict']}")
    for r in s["reasons"]:
        print(f"  - {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
