"""Aggregate the pipeline's raw result files into one summary (JSON) plus CSV/markdown tables.

Usage: aggregate.py --results results --out results/summary.json [--tables results/tables]

Reading is results_io.py, decode/training statistics performance.py, judging acceptance.py, tables
tables.py; this module puts the summary together. Any raw file may be missing, failed or
"unsupported": a failed or missing job becomes a row saying so and makes the verdict INCOMPLETE;
an unsupported one is shown as "not supported by this implementation" and judged by nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acceptance
import performance
import results_io as io
import stats
import tables
from results_io import FAILED, MISSING, NOT_RUN, OK, UNSUPPORTED

SCHEMA_VERSION = 2


def job(stage: str, rec: dict, **keys) -> dict:
    return {"stage": stage, **keys, "status": rec.get("status"), "error": rec.get("error"),
            "log_tail": rec.get("log_tail"), "path": rec.get("path")}


def per_commit(meta: dict):
    """(first variant, sha, reserve) for every commit x reserve configuration, in declared order."""
    for sha, name in io.first_variant_per_sha(meta["variants"]).items():
        for reserve in meta["reserves"]:
            yield name, sha, reserve


# ----------------------------------------------------------------------------- per-commit sections

def environment_rows(results: Path, meta: dict, jobs: list) -> list[dict]:
    rows = []
    for sha, name in io.first_variant_per_sha(meta["variants"]).items():
        rec = io.load_env(results, sha)
        if rec["status"] not in (OK, UNSUPPORTED):
            jobs.append(job("env", rec, variant=name, sha=sha))
        rows.append({"variant": name, "variants": [n for n, v in meta["variants"].items() if v["sha"] == sha],
                     "sha": sha, "status": rec["status"],
                     **{k: rec.get(k) for k in ("python", "torch", "cuda", "gpu", "driver", "adapter",
                                                "implementation_version", "nsa_version", "api_version",
                                                "installer", "error", "log_tail")},
                     "pip_freeze": list(rec.get("pip_freeze") or [])})
    return rows


def correctness_rows(results: Path, meta: dict, jobs: list) -> list[dict]:
    rows = []
    for name, sha, reserve in per_commit(meta):
        rec = io.load_tests(results, sha, reserve)
        got = rec.get("suites") or {}
        if rec["status"] in (FAILED, MISSING):
            jobs.append(job("tests", rec, variant=name, sha=sha, reserve=reserve))
        for suite in list(meta["suites"]) + [x for x in got if x not in meta["suites"]]:
            s = got.get(suite)
            base = {"suite": suite, "variant": name, "sha": sha, "reserve": reserve, "junit": None, "note": None,
                    "passed": None, "failed": None, "skipped": None, "errors": None}
            if not isinstance(s, dict):
                status = rec["status"] if rec["status"] != OK else MISSING
                rows.append({**base, "status": status, "reason": rec.get("reason"), "job": rec["status"] != OK,
                             "error": rec.get("error") or f"suite {suite} absent from the summary"})
                continue
            counts = {k: int(io.num(s.get(k)) or 0) for k in ("passed", "failed", "skipped", "errors")}
            status = io.norm_status(s.get("status"), "ok")
            if counts["failed"] or counts["errors"]:
                status = FAILED
            note = s.get("note")
            if status == NOT_RUN:
                note = (f"collected {s.get('collected', 0)} tests, needs at least {s.get('min_tests', 1)}: not run")
            elif status == FAILED and not (counts["failed"] or counts["errors"]):
                note = f"the suite failed without a failing test (pytest could not run it): {note or ''}".strip(": ")
            rows.append({**base, **counts, "status": status, "junit": s.get("junit"), "note": note,
                         "reason": s.get("reason"), "error": None})
    return rows


def consistency_rows(results: Path, meta: dict, jobs: list) -> list[dict] | None:
    if not meta["has_consistency"] and not (Path(results) / "consistency").exists():
        return None  # results from before the stage existed
    rows = []
    for name, sha, reserve in per_commit(meta):
        rec = io.load_consistency(results, sha, reserve)
        if rec["status"] in (FAILED, MISSING):
            jobs.append(job("consistency", rec, variant=name, sha=sha, reserve=reserve))
        rows.append({"variant": name, "sha": sha, "reserve": reserve, "status": rec["status"],
                     **{k: rec.get(k) for k in ("reason", "error", "dtype", "tolerance", "max_abs_err",
                                                "worst_position", "positions", "passed")}})
    return rows


def _max_abs_diff(a, b) -> float:
    import torch

    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - b.detach().double()).abs()
    return math.nan if torch.isnan(d).any() else float(d.max())


def _bitwise_equal(a, b) -> bool:
    import torch

    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    # Compare the bytes, not the values: NaN != NaN and -0.0 == 0.0 would both mislead here.
    return torch.equal(a.detach().contiguous().view(-1).view(torch.uint8),
                       b.detach().contiguous().view(-1).view(torch.uint8))


def compare_outputs(ref: dict, out: dict, atol: float) -> dict:
    """Max abs diff per output tensor, and the selected block indices ("blocks") compared exactly."""
    names = sorted((set(ref) | set(out)) - {"blocks"})
    diffs = {k: _max_abs_diff(ref.get(k), out.get(k)) for k in names}
    worst = max(diffs, key=lambda k: math.inf if math.isnan(diffs[k]) else diffs[k], default=None)
    row = {"max_abs_diff": diffs, "max_abs_diff_all": diffs[worst] if worst else 0.0, "worst_output": worst}
    row["within_tolerance"] = bool(math.isfinite(row["max_abs_diff_all"]) and row["max_abs_diff_all"] <= atol)
    a, b = ref.get("blocks"), out.get("blocks")
    if a is not None and b is not None:
        same_shape = tuple(a.shape) == tuple(b.shape)
        row["blocks_total"] = int(b.numel())
        row["blocks_differ"] = int((a != b).sum()) if same_shape else int(b.numel())
        row["blocks_equal"] = same_shape and row["blocks_differ"] == 0
    return row


def equivalence_section(results: Path, meta: dict, acc: dict, jobs: list) -> dict:
    tensors, recs = {}, {}
    for name, sha, reserve in per_commit(meta):
        rec, t = io.load_equiv(results, sha, reserve)
        recs[(sha, reserve)], tensors[(sha, reserve)] = rec, t
        if rec["status"] in (FAILED, MISSING):
            jobs.append(job("equiv", rec, variant=name, sha=sha, reserve=reserve))
    base = meta["baseline"]
    ref_key = (meta["variants"].get(base, {}).get("sha"), meta["reserves"][0] if meta["reserves"] else None)
    ref = tensors.get(ref_key)
    rows = []
    for name, sha, reserve in per_commit(meta):
        rec, out = recs[(sha, reserve)], tensors[(sha, reserve)]
        row = {"variant": name, "sha": sha, "reserve": reserve, "status": rec["status"], "reason": rec.get("reason"),
               "error": rec.get("error"), "log_tail": rec.get("log_tail"), "is_reference": (sha, reserve) == ref_key,
               "placement": rec.get("placement")}
        own_key = (sha, meta["reserves"][0])
        refused = [why for why in (gpu_mismatch(recs.get(ref_key), rec, "the baseline"),
                                   gpu_mismatch(recs.get(own_key), rec, f"its own {own_key[1]} run")) if why]
        row["refused"] = refused or None
        if out is not None and ref is not None and not refused:
            row.update(compare_outputs(ref, out, float(acc["equiv_atol"])))
        own = tensors.get(own_key)
        row["bit_identical"] = None
        if out is not None and reserve != meta["reserves"][0] and own is not None and not refused:
            keys = set(own) | set(out)
            row["bit_identical"] = all(_bitwise_equal(own.get(k), out.get(k)) for k in keys)
            row["diff_vs_own_reference"] = max((_max_abs_diff(own.get(k), out.get(k)) for k in keys - {"blocks"}),
                                               default=0.0)
        rows.append(row)
    return {"reference": {"variant": base, "sha": ref_key[0], "reserve": ref_key[1]}, "rows": rows}


def gpu_mismatch(ref: dict | None, rec: dict, what: str) -> str | None:
    """Why outputs computed on two GPU models are not compared (None: one model, or no GPU)."""
    a, b = ((r or {}).get("placement") or {} for r in (ref, rec))
    if not (a.get("gpu") and b.get("gpu")) or a["gpu"] == b["gpu"]:
        return None
    return (f"not compared with {what}: computed on a {b['gpu']} (node {b.get('node')}), {what} on a {a['gpu']} "
            f"(node {a.get('node')}); different GPU models give different bits. Set config key cluster.gpu_type "
            f"so every GPU job gets one model")


def placement_rows(decode_bench: dict, train_bench: dict, equivalence: dict) -> list[dict]:
    """Node, GPU and SLURM job of every job whose results are compared with another's."""
    rows = [{"job": stage, "variant": "every run", "reserve": "", **(bench.get("placement") or {})}
            for stage, bench in (("decode", decode_bench), ("train", train_bench))]
    rows += [{"job": "equivalence", "variant": r["variant"], "reserve": r["reserve"], **(r.get("placement") or {})}
             for r in equivalence["rows"]]
    return [{k: r.get(k) for k in ("job", "variant", "reserve", "node", "gpu", "slurm_job_id")} for r in rows]


def mark_env_failed(s: dict) -> None:
    """A commit whose environment failed ran nothing else: its later rows say that, briefly (the
    environment's own row and log carry the details, once)."""
    broken = {e["sha"] for e in s["environment"] if e["status"] in (FAILED, MISSING)}
    for rows in (s["correctness"], s.get("consistency") or [], s["equivalence"]["rows"]):
        for r in rows:
            if r["sha"] in broken and r["status"] in (FAILED, MISSING):
                r.update(status=NOT_RUN, error="environment failed", note="environment failed", log_tail=None)


# ----------------------------------------------------------------------------- benchmarks

def bench_jobs(stage: str, bench: dict, section: dict, jobs: list) -> None:
    if bench["status"] != OK:
        jobs.append(job(stage, bench))
        return
    for r in section["runs"]:
        if r["status"] in (FAILED, MISSING):
            jobs.append(job(stage, r, variant=r["variant"], sha=r["sha"], reserve=r["reserve"]))


def conditions(decode: dict, train: dict) -> dict:
    out = {"decode": decode.get("conditions") or {}, "train": train.get("conditions") or {}, "warnings": []}
    for stage in ("decode", "train"):
        out["warnings"] += [f"{stage}: {w}" for w in out[stage].get("warnings") or []]
    return out


def routes_rows(decode_bench: dict) -> list[dict]:
    """Which implementation each branch dispatched to, and why, once per commit."""
    rows, seen = [], set()
    for run in decode_bench["runs"]:
        if run["kind"] == "impl" and run.get("routes") and run["sha"] not in seen:
            seen.add(run["sha"])
            rows += [{"variant": run["variant"], "sha": run["sha"], "branch": b,
                      "route": r.get("route") if isinstance(r, dict) else r,
                      "reason": r.get("reason") if isinstance(r, dict) else None} for b, r in run["routes"].items()]
    return rows


# ----------------------------------------------------------------------------- first screen

def _perf_cell(rows: list[dict], lower_is_better: bool, acc: dict, tolerance: float) -> str:
    """The first screen's words for one variant's comparisons: the cell that matters most."""
    rows = [r for r in rows if r.get("status") == OK and r.get("judged") and r.get("delta_pct") is not None]
    if not rows:
        return ""
    # An uncertain cell whose CI cannot reach a slowdown past the threshold is "not slower": it
    # passes, and the words must not read as a doubt about the verdict.
    not_worse = "not slower"

    def call(r):
        if r["call"] == stats.UNCERTAIN and not acceptance.may_be_worse(r, lower_is_better):
            return not_worse
        return r["call"]

    order = (stats.SLOWER, stats.FASTER, stats.UNCERTAIN, performance.WITHIN_NOISE, not_worse, stats.NO_CHANGE)
    pick = next((p for p in ([r for r in rows if call(r) == c] for c in order) if p), rows)
    r = max(pick, key=lambda r: abs(r["delta_pct"]))
    where = acceptance.where(r, "decode" if r["mode"] != performance.TRAIN_MODE else "train")
    ci = acceptance.ci_words(r, acc["ci_level"])
    res = f", {r['reserve']}" if r.get("reserve") else ""
    largest = f"largest {acceptance.pct(r['delta_pct'])}{where}{res}, {ci}"
    if r["call"] in (stats.SLOWER, stats.FASTER):
        more = f"; {len(pick) - 1} more cell{'s' if len(pick) > 2 else ''}" if len(pick) > 1 else ""
        return f"{acceptance.change_words(r['delta_pct'], lower_is_better)}{where}{res} ({ci}{more})"
    if call(r) in (stats.UNCERTAIN, performance.WITHIN_NOISE) and r["threshold_pct"] > tolerance:
        return f"not called: within the ±{r['threshold_pct']:.0f}% noise ({largest})"
    if call(r) == stats.UNCERTAIN:
        return f"uncertain: the CI reaches beyond ±{r['threshold_pct']:.0f}% ({largest})"
    if call(r) == not_worse:
        return f"not slower beyond ±{r['threshold_pct']:.0f}% (may be faster; {largest})"
    return f"no change ({largest})"


def _correctness_cell(s: dict, sha) -> str:
    corr = [r for r in s["correctness"] if r["sha"] == sha]
    bad = [r for r in corr if r["status"] == FAILED]
    nr = [r for r in corr if r["status"] in (NOT_RUN, MISSING)]
    passed = sum(int(r.get("passed") or 0) for r in corr if r["status"] == OK)
    text = (f"FAILED: {', '.join(sorted({r['suite'] for r in bad}))}" if bad else
            f"not run: {', '.join(sorted({r['suite'] for r in nr}))}" if nr else
            f"passed ({passed} tests)" if passed else ("no suites" if not corr else "not supported"))
    cons = [r for r in (s.get("consistency") or []) if r["sha"] == sha]
    if any(r["status"] == OK and r.get("passed") is False for r in cons):
        text += "; decode ≠ forward"
    elif cons and all(r["status"] == OK and r.get("passed") for r in cons):
        text += "; decode = forward"
    return text


def _status_words(statuses: list[dict]) -> str | None:
    for st, text in ((FAILED, "FAILED"), (MISSING, "did not finish"), (UNSUPPORTED, "not supported")):
        hit = [r for r in statuses if r["status"] == st]
        if hit:
            reason = hit[0].get("reason") or hit[0].get("error")
            return text + (f": {reason}" if reason and st == UNSUPPORTED else "")
    return None


def overview(s: dict) -> list[dict]:
    """The first screen: one row per variant, each fact once."""
    acc = s["acceptance_settings"]
    base = s["baseline"]["variant"]
    first = {v["sha"]: v["name"] for v in reversed(s["variants"])}
    out = []
    for v in s["variants"]:
        name, sha = v["name"], v["sha"]
        row = {"variant": name, "sha": sha, "role": ""}
        if name == base:
            row["role"] = "baseline"
        elif first.get(sha) != name:
            row["role"] = f"A/A twin of {first.get(sha)}"
        env = next((e for e in s["environment"] if e["sha"] == sha), None)
        if env and env["status"] not in (OK,):
            row.update(correctness=f"environment {env['status']}", decode="", training="", equivalence="",
                       memory="")
            out.append(row)
            continue
        if row["role"].startswith("A/A"):
            twin = f"same commit as {first.get(sha)}"
            row.update(correctness=twin, equivalence=twin, memory=twin)
            for key, sec in (("decode", s["decode"]), ("training", s["training"])):
                aa = [r for r in sec["aa"] if r.get("variant_b") == name and r.get("delta_pct") is not None
                      and r.get("judged")]
                row[key] = (f"A/A: largest |delta| {max(abs(r['delta_pct']) for r in aa):.1f}%" if aa else
                            _status_words([r for r in sec["runs"] if r["variant"] == name]) or twin)
            out.append(row)
            continue
        row["correctness"] = _correctness_cell(s, sha)
        for key, sec, lower, tol in (("decode", s["decode"], True, "decode_tolerance_pct"),
                                     ("training", s["training"], False, "train_tolerance_pct")):
            runs = [r for r in sec["runs"] if r["variant"] == name]
            row[key] = _status_words(runs) or ("baseline" if name == base else
                                               _perf_cell([r for r in sec["rows"] if r["variant"] == name], lower,
                                                          acc, acc[tol]))
        eq = [r for r in s["equivalence"]["rows"] if r["sha"] == sha]
        row["equivalence"] = _equiv_cell(eq)
        lr = [r for r in s["training"].get("loss_rows", []) if r["variant"] == name and r.get("peak_mem_bytes")]
        row["memory"] = ("training peak " + ", ".join(f"{tables.fmt_bytes(r['peak_mem_bytes'])} ({r['reserve']})"
                                                      for r in lr)) if lr else ""
        out.append(row)
    return out


def _equiv_cell(rows: list[dict]) -> str:
    st = _status_words(rows)
    if st:
        return st
    if all(r.get("is_reference") or r.get("max_abs_diff_all") is None for r in rows):
        return "reference" if any(r.get("is_reference") for r in rows) else ""
    parts = []
    bad = [r for r in rows if r.get("within_tolerance") is False]
    worst = max((r["max_abs_diff_all"] for r in rows if r.get("max_abs_diff_all") is not None), default=0.0)
    parts.append(f"DIFFERS by {worst:.3g} in float32" if bad else f"float32 matches (max diff {worst:.2g})")
    if any(r.get("blocks_equal") is False for r in rows):
        parts.append("selected blocks differ")
    if any(r.get("bit_identical") is False for r in rows):
        parts.append("reserve configs not bit-identical")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- driver

def build_summary(results: Path) -> dict:
    results = Path(results)
    meta = io.load_meta(results)
    jobs: list[dict] = []
    if meta["status"] != OK:
        jobs.append(job("meta", meta["record"]))
    acc = acceptance.effective_acceptance(meta["acceptance"], meta["device"])
    base = meta["baseline"]
    s = {
        "schema_version": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "repo": meta["repo"], "device": meta["device"], "implementation": meta["implementation"],
        "capabilities": meta["capabilities"], "processes": meta["processes"],
        "baseline": {"variant": base, "reserve": meta["reserves"][0] if meta["reserves"] else None,
                     "sha": meta["variants"].get(base, {}).get("sha")},
        "variants": [{"name": n, **v} for n, v in meta["variants"].items()],
        "reserves": meta["reserves"], "reserve_configs": meta["reserve_configs"], "common_env": meta["common_env"],
        "suites": meta["suites"], "acceptance_settings": acc, "warnings": meta["warnings"],
    }
    s["environment"] = environment_rows(results, meta, jobs)
    s["correctness"] = correctness_rows(results, meta, jobs)
    s["consistency"] = consistency_rows(results, meta, jobs)
    decode_bench = io.load_decode(results)
    train_bench = io.load_train(results)
    # the dtype decode was timed in (the report says what equivalence's float32 does not cover)
    s["bench_dtype"] = (decode_bench.get("sizes") or {}).get("dtype")
    decode = performance.analyse(decode_bench, meta, acc, performance.DECODE)
    training = performance.analyse(train_bench, meta, acc, performance.TRAIN)
    performance.training_extras(training, acc)
    bench_jobs("decode", decode_bench, decode, jobs)
    bench_jobs("train", train_bench, training, jobs)
    s["memory"] = performance.memory_section(decode, training, meta)
    for sec in (decode, training):
        sec.pop("_runs"), sec.pop("_reference")
    s["decode"], s["training"] = decode, training
    s["routes"] = routes_rows(decode_bench)
    s["conditions"] = conditions(decode_bench, train_bench)
    s["equivalence"] = equivalence_section(results, meta, acc, jobs)
    s["placement"] = placement_rows(decode_bench, train_bench, s["equivalence"])
    s["jobs"] = jobs
    mark_env_failed(s)
    s["acceptance"] = acceptance.checklist(s, acc)
    s["verdict"], s["reasons"] = acceptance.verdict(s["acceptance"], jobs)
    s["overview"] = overview(s)
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", help="the pipeline's results directory")
    ap.add_argument("--out", default=None, help="summary JSON (default: RESULTS/summary.json)")
    ap.add_argument("--tables", default=None, help="CSV/markdown table directory (default: RESULTS/tables)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "summary.json"
    s = build_summary(results)
    tables.write_outputs(s, out, Path(args.tables) if args.tables else results / "tables")
    print(f"verdict: {s['verdict']}")
    for r in s["reasons"]:
        print(f"  - {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
