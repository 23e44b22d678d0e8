"""The judge: one small function per acceptance criterion, the list of them, and the verdict.

Each criterion reads the summary (built by aggregate.py) and returns one line: what it checks, a
status, a short measured value, and reasons in plain words naming what failed ("decode 4.9× slower
at ctx 512, graph mode: ..."), never the pass condition. Statuses:

- ``fail``: the code is wrong or slower beyond the noise  -> verdict FAIL;
- ``incomplete``: something that should have run did not -> INCOMPLETE;
- ``inconclusive``: the run was too noisy to judge         -> INCONCLUSIVE (never FAIL or PASS);
- ``pass``; ``info`` (shown, never decisive); ``not judged`` (nothing to judge, e.g. one variant).

The thresholds come from meta/variants.json's ``acceptance``, which config_check filled from the
schema; a key missing there (results written by an older checkout) is taken from the schema
itself, so the defaults live in workflow/schemas/config.schema.yaml only.
"""

from __future__ import annotations

import math
from pathlib import Path

import stats
from results_io import FAILED, MISSING, NOT_RUN, OK, UNSUPPORTED

PASS, FAIL, INCOMPLETE, INCONCLUSIVE, INFO, NOT_JUDGED = "pass", "fail", "incomplete", "inconclusive", "info", \
    "not judged"
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
NUMERIC = ("alpha", "ci_level", "bootstrap_resamples", "decode_tolerance_pct", "train_tolerance_pct", "equiv_atol",
           "loss_window", "min_loss_drop_pct")


def schema_defaults() -> dict:
    import yaml

    return yaml.safe_load(SCHEMA.read_text())["properties"]["acceptance"]["default"]


def effective_acceptance(given: dict | None, device: str | None) -> dict:
    """Schema defaults <- the run's acceptance <- its per-device overrides (cpu / cuda)."""
    defaults, given = schema_defaults(), dict(given or {})
    acc = {k: v for layer in (defaults, given) for k, v in layer.items() if not isinstance(v, dict)}
    dev_default, dev_given = defaults.get(device) or {}, given.get(device) or {}
    # config_check merged the default device blocks into the run's acceptance, so a device value
    # equal to the default is the default: it must not hide a top-level value the user set
    # (`decode_tolerance_pct: 3` means 3 on a CPU too, not the CPU default of 10).
    for key, value in {**dev_default, **dev_given}.items():
        user_top = key in given and given[key] != defaults.get(key)
        user_dev = key in dev_given and dev_given[key] != dev_default.get(key)
        if user_dev or not user_top:
            acc[key] = value
    for key in NUMERIC:
        cast = int if key in ("bootstrap_resamples", "loss_window") else float
        try:
            acc[key] = cast(acc[key])
        except (TypeError, ValueError, KeyError):
            acc[key] = cast(defaults[key])
    return acc


def line(cid, title, status, measured, threshold="", reasons=()) -> dict:
    return {"id": cid, "title": title, "status": status, "measured": measured, "threshold": threshold,
            "reasons": [r for r in reasons if r]}


# ----------------------------------------------------------------------------- wording

def pct(x, digits=1) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}%"


def change_words(delta, lower_is_better=True) -> str:
    """'4.9× slower', '12.3% slower', '30.0% faster' (latency: lower is better; throughput: higher)."""
    ratio = 1 + delta / 100.0
    worse = ratio > 1 if lower_is_better else ratio < 1
    factor = ratio if ratio >= 1 else (1 / ratio if ratio > 0 else math.inf)
    word = "slower" if worse else "faster"
    if factor >= 2:
        return f"{factor:.1f}× {word}"
    return f"{abs(delta):.1f}% {word}"


def ci_words(r, level) -> str:
    return f"{int(round(level * 100))}% CI {pct(r['ci_low_pct'])} to {pct(r['ci_high_pct'])}"


def where(r, stage) -> str:
    if stage == "train":
        return ""
    return f" at ctx {r['context']}, {r['mode']} mode"


def _worst_per_pair(rows, key):
    """(worst cell, text naming how many more) per compared pair (variant, reserve)."""
    by_pair = {}
    for r in rows:
        by_pair.setdefault((r["variant"], r["reserve"]), []).append(r)
    return [(max(cells, key=key), f" (and {len(cells) - 1} more cell{'s' if len(cells) > 2 else ''})"
             if len(cells) > 1 else "") for cells in by_pair.values()]


def _perf_reasons(rows, stage, what, lower_is_better, level, against) -> list[str]:
    """'decode 3.0× slower at ctx 512, graph mode: feature vs base (reserve none), 99% CI ...'."""
    return [f"{what} {change_words(w['delta_pct'], lower_is_better)}{where(w, stage)}: {against(w)}, "
            f"{ci_words(w, level)}{more}" for w, more in _worst_per_pair(rows, lambda r: abs(r["delta_pct"]))]


def outlier_words(r) -> str:
    """': process 2 of head × presized ran 1.38× the median of its others, …' for a row with an outlier."""
    o = r.get("outlier")
    if not o:
        return ""
    if o["side"] == "candidate":
        run = f"{r['variant']} × {r['reserve']}"
    else:
        run = f"{r.get('baseline_variant', r['variant'])} × {r.get('reference_reserve', r['reserve'])}"
    return (f": process {o['process'] + 1} of {run} ran {o['ratio']:.2f}× the median of its others, which a rerun "
            f"may not repeat")


def _uncertain_reasons(rows, stage, what, lower_is_better, level, against) -> list[str]:
    """'decode at ctx 32, eager mode: slow vs base (reserve none) cannot be judged: ...', naming the
    cell whose CI reaches furthest to the worse side, and a process far from its cell's others."""
    procs = min(min(r["processes"], r["baseline_processes"]) for r in rows)
    worse = (lambda r: r["ci_high_pct"]) if lower_is_better else (lambda r: -r["ci_low_pct"])
    return [f"{what}{where(w, stage)}: {against(w)} cannot be judged: {pct(w['delta_pct'])}, {ci_words(w, level)} "
            f"reaches beyond ±{w['threshold_pct']:.1f}%{outlier_words(w)} ({procs} processes per run: more processes "
            f"would narrow the CI){more}"
            for w, more in _worst_per_pair(rows, worse)]


# ----------------------------------------------------------------------------- criteria

def _env_failed(s) -> set:
    return {e["sha"] for e in s["environment"] if e["status"] in (FAILED, MISSING)}


def something_compared(s, acc):
    """A run of the baseline alone compares nothing: it must never read as PASS."""
    others = [v["name"] for v in s.get("variants") or [] if v["name"] != s["baseline"]["variant"]]
    if others:
        return None
    return line("compared", "Something compared with the baseline", INCONCLUSIVE, "only the baseline",
                "another variant", [f"nothing compared: the configuration lists only the baseline variant "
                                    f"{s['baseline']['variant']}; add the variant to compare (or the baseline's ref "
                                    f"again under another name, for an A/A test)"])


def correctness(s, acc):
    # A commit whose environment failed, or a suite file that never appeared, is a failed job
    # already (listed once in the verdict); its suites are not repeated here.
    rows = [r for r in s["correctness"] if r["sha"] not in _env_failed(s) and not r.get("job")]
    if not rows:
        return line("correctness", "Correctness suites", NOT_JUDGED, "no suites configured")
    failed = [r for r in rows if r["status"] == FAILED and (r.get("failed") or r.get("errors"))]
    not_run = [r for r in rows if r["status"] in (NOT_RUN, MISSING) or (r["status"] == FAILED and r not in failed)]
    unsupported = [r for r in rows if r["status"] == UNSUPPORTED]
    passed = sum(int(r.get("passed") or 0) for r in rows if r["status"] == OK)
    reasons = [f"suite {r['suite']} failed on {r['variant']} (reserve {r['reserve']}): {r['failed']} failed, "
               f"{r['errors']} errors" for r in failed]
    reasons += [f"suite {r['suite']} did not run on {r['variant']} (reserve {r['reserve']}): "
                + (r.get("note") or r.get("error") or r["status"]) for r in not_run]
    status = FAIL if failed else INCOMPLETE if not_run else PASS if passed else INCOMPLETE
    if status == INCOMPLETE and not reasons:
        reasons = ["no test passed anywhere"]
    measured = f"{passed} tests passed; {len(failed)} suite runs failed, {len(not_run)} not run" + \
        (f", {len(unsupported)} not supported by this implementation" if unsupported else "")
    return line("correctness", "Correctness suites", status, measured, "every suite passes", reasons)


def consistency(s, acc):
    if s.get("consistency") is None:
        return None
    rows = [r for r in s["consistency"] if r["sha"] not in _env_failed(s)]
    bad = [r for r in rows if r["status"] == OK and r.get("passed") is False]
    gone = [r for r in rows if r["status"] in (FAILED, MISSING)]
    ok = [r for r in rows if r["status"] == OK and r.get("passed")]
    reasons = [f"decode does not match forward for {r['variant']} (reserve {r['reserve']}): max abs error "
               f"{_g(r.get('max_abs_err'), '.3g')} at position {r.get('worst_position')} (tolerance "
               f"{_g(r.get('tolerance'), '.2g')}, {r.get('dtype')})" for r in bad]
    status = FAIL if bad else INCOMPLETE if gone else PASS if ok else NOT_JUDGED
    return line("consistency", "Decode matches forward within each commit", status,
                f"{len(ok)} of {len(rows)} match" + (f", {len(gone)} did not run" if gone else ""),
                "every position within the dtype's tolerance", reasons)


def may_be_worse(r, lower_is_better) -> bool:
    """An uncertain cell whose CI reaches past the threshold on the worse side."""
    bound = r["ci_high_pct"] if lower_is_better else -r["ci_low_pct"]
    return r["call"] == stats.UNCERTAIN and bound > r["threshold_pct"]


def _perf_vs(s, acc, stage, table, cid, title, against):
    sec = s["decode" if stage == "decode" else "training"]
    lower = stage == "decode"
    what = "decode" if stage == "decode" else "training"
    rows = [r for r in sec[table] if r["status"] == OK and r.get("judged") and r.get("delta_pct") is not None]
    if not rows:
        return line(cid, title, NOT_JUDGED, "nothing to compare")
    calls = {c: [r for r in rows if r["call"] == c] for c in (stats.SLOWER, stats.FASTER, stats.NO_CHANGE,
                                                                stats.UNCERTAIN, "within noise")}
    worst = max(rows, key=lambda r: r["delta_pct"] if lower else -r["delta_pct"])
    measured = ", ".join(f"{len(v)} {k}" for k, v in calls.items() if v) + \
        f" of {len(rows)} cells; worst {pct(worst['delta_pct'])}"
    threshold = "whole CI beyond ±max(tolerance, noise floor)"
    if calls[stats.SLOWER]:
        return line(cid, title, FAIL, measured, threshold,
                    _perf_reasons(calls[stats.SLOWER], stage, what, lower, acc["ci_level"], against))
    # A CI wide enough to hold a regression beyond the threshold proves nothing either way; where the
    # mode is too noisy, the noise criterion says so already (once).
    noise = sec.get("noise") or {}
    unsure = [r for r in rows if may_be_worse(r, lower) and not noise.get(r["mode"], {}).get("too_noisy")]
    if unsure:
        return line(cid, title, INCONCLUSIVE, measured, threshold,
                    _uncertain_reasons(unsure, stage, what, lower, acc["ci_level"], against))
    return line(cid, title, PASS, measured, threshold)


def _vs_baseline(stage, title):
    return lambda s, acc: _perf_vs(s, acc, stage, "rows", stage, title,
                                   lambda r: f"{r['variant']} vs {r['baseline_variant']} (reserve {r['reserve']})")


def _vs_reserve(stage, what):
    def criterion(s, acc):
        if len(s["reserves"]) < 2:
            return None
        return _perf_vs(s, acc, stage, "reserve_rows", f"{stage}_reserves",
                        f"{what}: reserve configs vs {s['reserves'][0]} within each commit",
                        lambda r: f"{r['reserve']} vs {r['reference_reserve']} on {r['variant']}")
    return criterion


decode_vs_baseline = _vs_baseline("decode", "Decode vs the baseline commit")
decode_reserves = _vs_reserve("decode", "Decode")
train_vs_baseline = _vs_baseline("train", "Training tokens/s vs the baseline commit")
train_reserves = _vs_reserve("train", "Training")


def noise_words(n, what) -> str:
    parts = []
    if n["aa_pct"] is not None:
        parts.append(f"A/A twins differed by up to {n['aa_pct']:.1f}%")
    if n.get("pooled_pct") is not None:
        shift = " beside each generation's common shift" if n.get("paired") else ""
        ref = (f"; the reference workload's alone {n['reference_process_pct']:.1f}%"
               if n.get("reference_process_pct") is not None else "")
        parts.append(f"the processes of its {n['pooled_cells']} cells spread {n['pooled_between_pct']:.1f}%{shift}, "
                     f"{n['pooled_process_pct']:.1f}% beyond what their own samples' scatter explains "
                     f"(±{n['pooled_pct']:.1f}% between two cells{ref})")
    mode = f" in {n['mode']} mode" if n["mode"] != "train" else ""
    return (f"{what} too noisy to judge{mode}: noise floor {n['floor_pct']:.1f}% exceeds the "
            f"{n['tolerance_pct']:g}% tolerance by {n['floor_pct'] - n['tolerance_pct']:.1f} points "
            f"({'; '.join(parts)})")


def _noise(s, acc, stage):
    sec = s["decode" if stage == "decode" else "training"]
    what = "decode" if stage == "decode" else "training"
    judged = [n for n in sec.get("noise", {}).values() if n["judged"]]
    measured = [n for n in judged if n["measured"]]
    title = f"{what.capitalize()} noise floor within tolerance"
    if not judged:
        return None
    if not any(r.get("kind") != "reference" and r.get("status") == "ok" for r in sec.get("runs", [])):
        return None  # no run of the implementation was measured: there is no comparison to doubt
    if not measured:
        return line(f"{stage}_noise", title, NOT_JUDGED, "not measured (no A/A twin, no reference workload)")
    noisy = [n for n in measured if n["too_noisy"]]
    text = ", ".join(f"{n['mode']}: {n['floor_pct']:.2f}%" for n in measured)
    others = [n for n in sec["noise"].values() if not n["judged"] and n["measured"]]
    reasons = [noise_words(n, what) for n in noisy]
    info = [f"{n['mode']} (not judged; host-bound on a GPU): noise floor {n['floor_pct']:.1f}%" for n in others]
    return line(f"{stage}_noise", title, INCONCLUSIVE if noisy else PASS,
                text + ("; " + "; ".join(info) if info else ""), f"≤ {judged[0]['tolerance_pct']:g}%", reasons)


def decode_noise(s, acc):
    return _noise(s, acc, "decode")


def train_noise(s, acc):
    return _noise(s, acc, "train")


def loss_falls(s, acc):
    rows = s["training"].get("loss_rows", [])
    if not rows:
        return line("loss", "Training loss falls, never NaN", NOT_JUDGED, "no training results")
    bad = [r for r in rows if r["nan"] or not r["loss_fell"]]
    reasons = [f"training loss {'became NaN/inf' if r['nan'] else 'did not fall'} for {r['variant']} "
               f"(reserve {r['reserve']}): {_g(r['loss_first'])} → {_g(r['loss_last'])}"
               + ("" if r["nan"] else f" ({pct(-r['loss_drop_pct']) if r['loss_drop_pct'] is not None else 'n/a'}, "
                                      f"needs a drop of {acc['min_loss_drop_pct']:g}%)") for r in bad]
    worst = min(rows, key=lambda r: r["loss_drop_pct"] if r["loss_drop_pct"] is not None
                and r["loss_drop_pct"] == r["loss_drop_pct"] else -math.inf)
    return line("loss", "Training loss falls, never NaN", FAIL if bad else PASS,
                f"smallest drop {_g(worst['loss_drop_pct'], '.1f')}% over {len(rows)} runs",
                f"drop ≥ {acc['min_loss_drop_pct']:g}%", reasons)


def _g(x, spec=".4g"):
    return "n/a" if x is None else format(x, spec)


def equivalence_outputs(s, acc):
    rows = [r for r in s["equivalence"]["rows"] if r.get("max_abs_diff_all") is not None]
    if not rows:
        return line("equivalence", "Outputs match the baseline commit", NOT_JUDGED, "nothing compared")
    ref = s["equivalence"]["reference"]
    bad = [r for r in rows if not r["within_tolerance"]]
    reasons = [f"outputs of {r['variant']} (reserve {r['reserve']}) differ from {ref['variant']} "
               f"(reserve {ref['reserve']}) by up to {_g(r['max_abs_diff_all'], '.3g')} "
               f"(tolerance {acc['equiv_atol']:g}; worst output {r.get('worst_output')})" for r in bad]
    worst = max(rows, key=lambda r: math.inf if r["max_abs_diff_all"] != r["max_abs_diff_all"] else r["max_abs_diff_all"])
    return line("equivalence", "Outputs match the baseline commit", FAIL if bad else PASS,
                f"max abs diff {_g(worst['max_abs_diff_all'], '.3g')} over {len(rows)} runs",
                f"≤ {acc['equiv_atol']:g}", reasons)


def equivalence_blocks(s, acc):
    rows = [r for r in s["equivalence"]["rows"] if r.get("blocks_equal") is not None]
    if not rows:
        return None
    ref = s["equivalence"]["reference"]
    bad = [r for r in rows if not r["blocks_equal"]]
    reasons = [f"selected blocks of {r['variant']} (reserve {r['reserve']}) differ from {ref['variant']} "
               f"(reserve {ref['reserve']}) in {r['blocks_differ']} of {r['blocks_total']} entries" for r in bad]
    return line("blocks", "Selected block indices match the baseline commit", FAIL if bad else PASS,
                f"{len(rows) - len(bad)} of {len(rows)} identical", "identical", reasons)


def reserves_bit_identical(s, acc):
    rows = [r for r in s["equivalence"]["rows"] if r.get("bit_identical") is not None]
    if len(s["reserves"]) < 2 or not rows:
        return None
    bad = [r for r in rows if not r["bit_identical"]]
    reasons = [f"outputs of {r['variant']} under {r['reserve']} are not bit-identical to {s['reserves'][0]} "
               f"(max abs diff {_g(r.get('diff_vs_own_reference'), '.3g')})" for r in bad]
    return line("reserve_bits", f"Reserve configs give the same bits as {s['reserves'][0]}",
                FAIL if bad else PASS, f"{len(rows) - len(bad)} of {len(rows)} identical", "bit for bit", reasons)


def one_gpu_model(s, acc):
    refused = [f"equivalence of {r['variant']} under {r['reserve']}: {why}"
               for r in s["equivalence"]["rows"] for why in r.get("refused") or []]
    if not refused:
        return None
    return line("gpu_model", "Compared outputs come from one GPU model", INCONCLUSIVE,
                f"{len(refused)} comparisons refused", "one GPU model", refused)


def timer(s, acc):
    t, dev = s["decode"].get("timer"), s["decode"].get("device") or s.get("device")
    if not t:
        return None
    good = t == "cuda_events" if dev == "cuda" else True
    return line("timer", "Decode timed with the device's own clock", INFO, f"{t} on {dev}",
                reasons=[] if good else [f"decode on {dev} timed with {t}: host time, not device time"])


def conditions(s, acc):
    warnings = s.get("conditions", {}).get("warnings") or []
    if not warnings:
        return None
    return line("conditions", "Machine conditions steady during the run", INFO, f"{len(warnings)} warnings",
                reasons=warnings)


def memory_growth(s, acc):
    ws = s["memory"]["workspace_rows"]
    if not ws or len(s["reserves"]) < 2:
        return None
    first = s["reserves"][0]
    growth = {}
    for r in ws:
        growth[r["reserve"]] = growth.get(r["reserve"], 0) + int(r["growth_events"] or 0)
    others = {k: v for k, v in growth.items() if k != first}
    worse = [k for k, v in others.items() if v > growth.get(first, 0)]
    return line("memory", "Reserve configs reduce workspace growth", INFO,
                ", ".join(f"{k}: {v} growth events" for k, v in growth.items()),
                reasons=[f"{k} grows its workspaces more often than {first}" for k in worse])


CRITERIA = [something_compared, correctness, consistency, decode_vs_baseline, decode_reserves, decode_noise, train_vs_baseline,
            train_reserves, train_noise, loss_falls, equivalence_outputs, equivalence_blocks, reserves_bit_identical,
            one_gpu_model, timer, conditions, memory_growth]


def checklist(s: dict, acc: dict) -> list[dict]:
    return [c for c in (fn(s, acc) for fn in CRITERIA) if c is not None]


def job_reason(j: dict) -> str:
    where_ = " ".join(f"{k} {j[k]}" for k in ("variant", "reserve") if j.get(k))
    return f"{j['stage']} job {where_} {'did not finish' if j['status'] == MISSING else 'failed'}: " \
           f"{j.get('error') or 'see its log'}".replace("  ", " ")


def verdict(lines: list[dict], jobs: list[dict]) -> tuple[str, list[str]]:
    """FAIL > INCOMPLETE > INCONCLUSIVE > PASS; the reasons of every lesser state follow as 'also'."""
    by = {st: [r for c in lines if c["status"] == st for r in (c["reasons"] or [f"{c['title']}: {c['measured']}"])]
          for st in (FAIL, INCOMPLETE, INCONCLUSIVE)}
    # A commit whose environment failed cannot have run anything else: say so once, not per job.
    env_failed = {j.get("sha") for j in jobs if j["stage"] == "env"}
    by[INCOMPLETE] += [job_reason(j) + (" (its later jobs could not run)" if j["stage"] == "env" else "")
                       for j in jobs if j["stage"] == "env" or j.get("sha") not in env_failed]
    order = [("FAIL", FAIL), ("INCOMPLETE", INCOMPLETE), ("INCONCLUSIVE", INCONCLUSIVE)]
    for i, (name, st) in enumerate(order):
        if by[st]:
            also = [f"also: {r}" for _, other in order[i + 1:] for r in by[other]]
            return name, by[st] + also
    return "PASS", ["every criterion passed"]
