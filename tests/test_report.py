"""aggregate -> plots -> report on synthetic raw results of schema 2 (the harness's contract: k worker
processes per run, a dense reference workload, recorded conditions), no snakemake.

Scenarios: unchanged code with an A/A twin (PASS, never FAIL, even when noisy), a 3x slowdown (FAIL
naming the cell), host-bound eager noise on a GPU (information only), a noisy machine
(INCONCLUSIVE with the numbers), "not supported by this implementation", suites not run,
decode != forward, selected blocks that differ, hostile names and failed jobs.
"""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
import acceptance  # noqa: E402
import aggregate  # noqa: E402
import gate  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402
import results_io  # noqa: E402
import stats  # noqa: E402
import tables  # noqa: E402

torch = pytest.importorskip("torch")

SHA = {"base": "a" * 40, "feature": "b" * 40, "evil": "c" * 40}
EVIL = "<script>alert(1)</script>"
CONTEXTS = (512, 1024, 2048)
PRESIZED = {"NSA_SEL_PACK_RESERVE_N": 4096, "NSA_SEL_PACK_RESERVE_L": 2048}


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _ws(presized: bool):
    return {"sel_pack": {"allocations": 1 if presized else 3, "growth_events": 0 if presized else 2,
                         "bytes_reserved": 1 << 20, "high_water_rows": 96, "high_water_keys": 1000,
                         "capacity_rows": 4096 if presized else 96, "capacity_keys": 2048 if presized else 1000,
                         "requests": 300}}


def build(root: Path, *, device="cpu", k=5, n=30, reserves=("none", "presized"), evil=False, twin=True,
          factor=None, between_sd=0.005, within_sd=0.01, twin_eager=1.0, ref_between_sd=None, ref_within=None,
          run_status=None, tests_status=None, consistency=None, flip_blocks=False, equiv_status=None,
          acceptance_given=None, warnings=(), modes=None, spread_of=None, generation_sd=0.0, alive=None,
          outlier=None, seed=0) -> Path:
    """A raw results tree of schema 2. ``ref_within``: (samples, relative sd) of the reference workload's
    processes. ``factor``: {(variant, reserve, mode): slowdown}; ``run_status``:
    {(variant, reserve): (status, reason)}; ``tests_status``: {suite: entry overrides};
    ``consistency``: {(sha_key, reserve): record overrides}. ``generation_sd``: process j of every run,
    the reference's too, shares one shift (relative sd), as processes measured in one generation do;
    ``alive``: the sizes' value (None: not written, as before generations); ``outlier``:
    {(variant, reserve): (process index, factor)}: that decode process's samples all times factor."""
    rng = np.random.default_rng(seed)
    generation = np.exp(rng.normal(0, generation_sd, k)) if generation_sd else np.ones(k)
    res = root / "results"
    variants = {"base": {"ref": "main~1", "sha": SHA["base"], "subject": "the baseline commit"}}
    if twin:
        variants["base-again"] = {"ref": "main~1", "sha": SHA["base"], "subject": "the baseline commit"}
    variants["feature"] = {"ref": "perf/presize", "sha": SHA["feature"], "subject": "presize the workspaces"}
    if evil:
        variants[EVIL] = {"ref": "<b>bad</b>", "sha": SHA["evil"], "subject": "<i>hostile</i>"}
    configs = {r: (PRESIZED if r != reserves[0] else {}) for r in reserves}
    modes = modes or (["eager"] if device == "cpu" else ["eager", "graph", "compiled_graph"])
    _dump(res / "meta" / "variants.json", {
        "repo": "/tmp/<repo>", "baseline": "base", "device": device, "variants": variants,
        # Written sorted, as a JSON writer may: the declared order is reserve_order.
        "reserve_configs": dict(sorted(configs.items())), "reserve_order": list(reserves),
        "common_env": {"NSA_USE_FA2": 0}, "suites": {"core": {"args": ["-m", "core"]}},
        "processes": k, "implementation": {"adapter": "nsa"},
        "capabilities": {"decode": True, "backward": True, "cuda_graph": device == "cuda", "compile": True,
                         "workspaces": True, "block_indices": True},
        "acceptance": acceptance_given if acceptance_given is not None else {"bootstrap_resamples": 400}})
    conditions = {"host": {"cpu_model": "Fake CPU", "cores": 2, "threads": 1, "loadavg_before": [0.1, 0.1, 0.1],
                           "loadavg_after": [0.2, 0.1, 0.1], "busy_cores_before": 0.1, "busy_cores_after": 0.2,
                           "other_cores_during": 0.04},
                  "gpu_before": None, "gpu_after": None,
                  "warnings": list(warnings)}
    factor = factor or {}
    run_status = run_status or {}

    def procs(level_of, mode_list, train=False, sd_override=None):
        out = []
        for j in range(k):
            p = {"index": j, "pid": 1000 + j, "status": "ok", "workspace_stats": None, "memory": {"peak_bytes": 3 << 20}}
            n_, within_ = ref_within if (ref_within and level_of is ref_level) else (n, within_sd)
            if train:
                level = level_of(None) * math.exp(rng.normal(0, between_sd)) * generation[j]
                p["tokens_per_s"] = (level * np.exp(rng.normal(0, within_, n_))).tolist()
                p["loss"] = (3.0 + 2.5 * np.exp(-np.arange(20) / 5.0)).tolist()
                p["peak_mem_bytes"] = 50 << 20
            else:
                p["contexts"] = {}
                for c in CONTEXTS:
                    p["contexts"][str(c)] = {}
                    for m in mode_list:
                        sd = ref_between_sd if (ref_between_sd is not None and level_of is ref_level) else between_sd
                        sd = sd_override if sd_override is not None else sd
                        level = level_of((c, m)) * math.exp(rng.normal(0, sd)) * generation[j]
                        p["contexts"][str(c)][f"{m}_ms"] = (level * np.exp(rng.normal(0, within_, n_))).tolist()
            out.append(p)
        return out

    def ref_level(cell):
        return 20.0 if cell is not None else 5000.0  # dense: 10x the NSA step (plots go log)

    runs, train_runs = [], []
    for name, v in variants.items():
        for r in reserves:
            base = {"variant": name, "sha": v["sha"], "reserve": r, "kind": "impl"}
            st = run_status.get((name, r)) or (("failed", "CUDA out of memory") if v["sha"] == SHA["evil"] else None)
            if st:
                extra = {"reason": st[1]} if st[0] == "unsupported" else \
                    {"error": st[1], "log_tail": "Traceback ...\nTAILMARK-DECODE <oom>"}
                runs.append({**base, "status": st[0], **extra, "routes": None, "processes": []})
                train_runs.append({**base, "status": st[0], **extra, "processes": []})
                continue

            def level(cell, name=name, r=r):
                if cell is None:
                    return 1000.0 / factor.get((name, r, "train"), 1.0)
                c, m = cell
                f = factor.get((name, r, m), 1.0) * (twin_eager if name == "base-again" and m == "eager" else 1.0)
                return (1.0 + c / 1024) * (0.5 if m != "eager" else 1.0) * f

            ps = procs(level, modes, sd_override=(spread_of or {}).get(name))
            if (name, r) in (outlier or {}):
                j, f = outlier[(name, r)]
                ps[j]["contexts"] = {c: {m: [x * f for x in xs] for m, xs in cell.items()}
                                     for c, cell in ps[j]["contexts"].items()}
            for p in ps:
                p["workspace_stats"] = _ws(r != reserves[0])
            runs.append({**base, "status": "ok", "routes": {"slc": {"route": "packed", "reason": "cpu"}},
                         "processes": ps})
            tp = procs(level, modes, train=True)
            for p in tp:
                p["workspace_stats"] = _ws(r != reserves[0])
            train_runs.append({**base, "status": "ok", "processes": tp})
    runs.append({"variant": "reference", "sha": None, "reserve": None, "kind": "reference", "status": "ok",
                 "routes": None, "processes": procs(ref_level, modes)})
    train_runs.append({"variant": "reference", "sha": None, "reserve": None, "kind": "reference", "status": "ok",
                       "processes": procs(ref_level, modes, train=True)})
    head = {"schema_version": 2, "device": device, "timer": "perf_counter" if device == "cpu" else "cuda_events",
            "rounds": 5, "processes": k, "conditions": conditions}
    gen = {} if alive is None else {"alive": alive}
    _dump(res / "decode" / "decode.json", {**head, "sizes": {"contexts": list(CONTEXTS), **gen}, "modes": modes,
                                           "runs": runs})
    _dump(res / "train" / "train.json", {**head, "sizes": {"batch": 2, "seq_len": 64, **gen}, "runs": train_runs})
    # Per commit: env, tests, consistency, equivalence.
    g = torch.Generator().manual_seed(0)
    ref_out = {"out": torch.randn(2, 16, 32, generator=g), "blocks": torch.randint(0, 40, (2, 16, 4), generator=g)}
    for key, sha in SHA.items():
        if key == "evil":
            if evil:
                _dump(res / "env" / sha / "env.json", {"status": "failed", "error": "pip install failed",
                                                       "log_tail": "ERROR: no <torch>\nTAILMARK-ENV"})
            continue
        _dump(res / "env" / sha / "env.json", {"schema_version": 2, "status": "ok", "python": "3.12", "torch": "2.13",
                                               "adapter": "nsa", "implementation_version": "0.1.0",
                                               "installer": "pip", "pip_freeze": ["numpy==2.0", "torch==2.13"]})
        for r in reserves:
            suite = {"passed": 10, "failed": 0, "skipped": 0, "errors": 0, "status": "ok", "junit": "j.xml"}
            suite.update((tests_status or {}).get((key, r), {}))
            _dump(res / "tests" / sha / r / "summary.json", {"status": "ok", "suites": {"core": suite}})
            cons = {"status": "ok", "dtype": "float32", "tolerance": 1e-4, "max_abs_err": 2e-6, "worst_position": 3,
                    "positions": 8, "passed": True}
            cons.update((consistency or {}).get((key, r), {}))
            _dump(res / "consistency" / sha / f"{r}.json", cons)
            d = res / "equiv" / sha
            est = (equiv_status or {}).get((key, r))
            if est:
                _dump(d / f"{r}.json", {"status": est[0], "reason": est[1]})
                continue
            out = {"out": ref_out["out"] + (1e-7 if key == "feature" else 0.0), "blocks": ref_out["blocks"].clone()}
            if flip_blocks and key == "feature":
                out["blocks"] = 39 - out["blocks"]
            d.mkdir(parents=True, exist_ok=True)
            torch.save(out, d / f"{r}.pt")
            _dump(d / f"{r}.json", {"status": "ok"})
    return res


def run_pipeline(res: Path):
    """aggregate -> plots -> report through their mains, as the Snakemake rules call them."""
    summary = res / "summary.json"
    assert aggregate.main(["--results", str(res), "--out", str(summary)]) == 0
    assert plots.main(["--summary", str(summary), "--out", str(res / "plots")]) == 0
    assert report.main(["--summary", str(summary), "--plots", str(res / "plots"),
                        "--out-html", str(res / "report.html"), "--out-md", str(res / "report.md")]) == 0
    return json.loads(summary.read_text()), (res / "report.html").read_text(), (res / "report.md").read_text()


def crit(s, cid):
    return next(c for c in s["acceptance"] if c["id"] == cid)


def test_unchanged_code_with_a_twin_passes_and_the_first_screen_says_it_once(tmp_path):
    s, html, md = run_pipeline(build(tmp_path))
    assert s["verdict"] == "PASS", s["reasons"]
    # One overview row per variant; the twin's per-commit facts are not repeated.
    ov = {r["variant"]: r for r in s["overview"]}
    assert list(ov) == ["base", "base-again", "feature"]
    assert ov["base"]["role"] == "baseline" and ov["base-again"]["role"] == "A/A twin of base"
    assert ov["base-again"]["correctness"] == "same commit as base"
    assert ov["base-again"]["decode"].startswith("A/A: largest |delta|")
    assert ov["feature"]["correctness"].startswith("passed (20 tests)") and "decode = forward" in ov["feature"]["correctness"]
    assert ov["feature"]["decode"].startswith("no change")
    # Comparison rows: only the feature commit vs the baseline, per its own reserve config.
    assert {(r["variant"], r["reserve"]) for r in s["decode"]["rows"]} == {("feature", "none"), ("feature", "presized")}
    assert len(s["decode"]["aa"]) == 2 * 3  # 2 reserves x 3 contexts, eager only on CPU
    # Noise floor: A/A twins and the reference's between-process spread, both measured.
    n = s["decode"]["noise"]["eager"]
    assert n["aa_pct"] is not None and n["reference_pct"] is not None and n["reference_processes"] == 5
    assert n["threshold_pct"] == 10.0  # the schema's CPU tolerance: the floor is below it
    # Within- and between-process spread side by side in every cell.
    assert all(c["within_pct"] is not None and c["between_pct"] is not None for c in s["decode"]["cells"])
    # Commit subjects reach the variants table; the report is self-contained and escapes.
    assert "presize the workspaces" in html and "/tmp/&lt;repo&gt;" in html
    assert html.count("data:image/png;base64,") == len(list((tmp_path / "results" / "plots").glob("*.png")))
    assert gate.main(["--summary", str(tmp_path / "results" / "summary.json")]) == 0
    # The pip freeze is shown once per commit, not once per variant.
    assert html.count("pip freeze of") == 2
    assert "## Method" in md
    # Other work on the machine: before, after and on average during each benchmark job.
    assert ("cores busy with other work 0.1 before, 0.2 after decode, on average 0.04 during decode and 0.04 "
            "during training") in md


def test_reference_reserve_config_is_the_first_declared_not_the_first_alphabetically(tmp_path):
    s = aggregate.build_summary(build(tmp_path, reserves=("zeta", "alpha")))
    assert s["reserves"] == ["zeta", "alpha"] and s["baseline"]["reserve"] == "zeta"
    assert {r["reserve"] for r in s["decode"]["reserve_rows"]} == {"alpha"}
    assert {r["reference_reserve"] for r in s["decode"]["reserve_rows"]} == {"zeta"}
    assert s["equivalence"]["reference"]["reserve"] == "zeta"


def test_three_times_slower_fails_naming_the_cell(tmp_path):
    slow = {("feature", r, m): 3.0 for r in ("none", "presized") for m in ("eager", "graph", "compiled_graph")}
    s, html, _ = run_pipeline(build(tmp_path, device="cuda", factor=slow))
    assert s["verdict"] == "FAIL"
    assert crit(s, "decode")["status"] == "fail"
    first = s["reasons"][0]
    assert re.match(r"decode 3\.0× slower at ctx \d+, (graph|compiled_graph) mode: feature vs base \(reserve none\), "
                    r"99% CI \+\d", first), first
    assert "Decode vs the baseline" not in first  # named by what failed, not by the pass condition
    assert "3.0× slower" in s["overview"][2]["decode"]
    assert gate.main(["--summary", str(tmp_path / "results" / "summary.json")]) == 1
    assert "3.0× slower" in html


def test_host_bound_eager_on_a_gpu_is_information_not_judged(tmp_path):
    s = aggregate.build_summary(build(tmp_path, device="cuda", twin_eager=1.25))
    assert s["decode"]["judged_modes"] == ["graph", "compiled_graph"]
    assert s["decode"]["noise"]["eager"]["too_noisy"] and not s["decode"]["noise"]["eager"]["judged"]
    assert s["verdict"] == "PASS", s["reasons"]
    assert "eager (not judged" in crit(s, "decode_noise")["measured"]


def test_gpu_without_cuda_graphs_judges_eager_and_says_why(tmp_path):
    s = aggregate.build_summary(build(tmp_path, device="cuda", modes=["eager"]))
    assert s["decode"]["judged_modes"] == ["eager"]
    assert "graph, compiled_graph not measured here" in s["decode"]["judged_note"]
    assert s["verdict"] == "PASS", s["reasons"]


def test_noisy_machine_is_inconclusive_with_the_numbers_and_unchanged_code_never_fails(tmp_path):
    s = aggregate.build_summary(build(tmp_path, between_sd=0.25, seed=3))
    assert s["verdict"] == "INCONCLUSIVE", s["reasons"]
    assert not any(c["status"] == "fail" for c in s["acceptance"])
    reason = next(r for r in s["reasons"] if "too noisy" in r)
    assert re.search(r"decode too noisy to judge in eager mode: noise floor \d+\.\d% exceeds the 10% tolerance by "
                     r"\d+\.\d points \(A/A twins differed by up to \d+\.\d%; the processes of its 21 cells "
                     r"spread \d+\.\d%, \d+\.\d% beyond .* between two cells; the reference workload's alone "
                     r"\d+\.\d%\)", reason), reason
    # The first screen says "not called", never "no change", when the noise could hide a change.
    assert s["overview"][2]["decode"].startswith("not called: within the ±")
    assert {r["call"] for r in s["decode"]["rows"]} <= {"within noise", "uncertain"}


def test_a_ci_too_wide_to_rule_out_a_regression_is_inconclusive_not_no_change(tmp_path):
    # Quiet machine (twins and reference agree), but the feature commit's own processes scatter 20%:
    # its CI holds changes beyond the tolerance either way, so nothing can be said about it.
    s = aggregate.build_summary(build(tmp_path, spread_of={"feature": 0.2}, seed=4))
    assert not s["decode"]["noise"]["eager"]["too_noisy"]
    assert crit(s, "decode")["status"] == "inconclusive"
    assert s["verdict"] == "INCONCLUSIVE"
    assert any(re.match(r"decode at ctx \d+, eager mode: feature vs base \(reserve \w+\) cannot be judged: "
                        r"[+-]\d+\.\d+%, 99% CI .* reaches beyond ±10\.0% \(5 processes per run: more processes would narrow the CI\)",
                        r) for r in s["reasons"]), s["reasons"]
    assert s["overview"][2]["decode"].startswith("uncertain: the CI reaches beyond ±10%")


def test_one_slow_process_is_named_where_a_comparison_cannot_be_judged(tmp_path):
    # Process 3 of feature x presized runs 1.4x slow throughout (as a process can on a VM): not a
    # regression of the code, and the reason says which process it was.
    s = aggregate.build_summary(build(tmp_path, outlier={("feature", "presized"): (2, 1.4)}, seed=1))
    assert s["verdict"] == "INCONCLUSIVE", s["reasons"]
    assert any("feature vs base (reserve presized) cannot be judged" in r and
               "±10.0%: process 3 of feature × presized ran 1.4" in r and "the median of its others" in r
               for r in s["reasons"]), s["reasons"]
    row = next(r for r in s["decode"]["rows"] if r["reserve"] == "presized")
    assert row["outlier"]["side"] == "candidate" and row["outlier"]["process"] == 2
    assert all(r["outlier"] is None for r in s["decode"]["rows"] if r["reserve"] == "none")


def test_a_ci_wide_only_on_the_faster_side_passes_and_says_not_slower(tmp_path):
    # The feature is ~8% faster and its processes scatter 4%: some CIs reach past -10% (maybe much
    # faster) but none past +10%, so nothing can hide a regression: PASS, and the words say why.
    fac = {("feature", r, "eager"): 0.92 for r in ("none", "presized")}
    s = aggregate.build_summary(build(tmp_path, factor=fac, spread_of={"feature": 0.04}, seed=4))
    assert "uncertain" in {r["call"] for r in s["decode"]["rows"] if r["variant"] == "feature"}
    assert s["verdict"] == "PASS", s["reasons"]
    assert s["overview"][2]["decode"].startswith("not slower beyond ±10% (may be faster; largest -"), s["overview"][2]
    # ... and is not coloured as a problem beside PASS, where a real slowdown is
    assert report.cell_class(s["overview"][2]["decode"]) == ""
    assert "bad" in report.cell_class("3.4× slower at ctx 2048, eager mode")


def test_a_reference_scattering_within_its_processes_does_not_make_the_run_too_noisy(tmp_path):
    # As the H200's dense training reference did: a host-bound step scattering 35% within each of its
    # processes, 24 samples each, and no process effect. Its process medians differ by several
    # percent from sampling alone; the runs judged carry their own sampling noise in their CIs.
    # (With 5 processes the estimate is itself noisy: over seeds 0-11, 10 of 12 such runs PASS, where
    # counting the whole spread made 10 of 12 too noisy in training.)
    s = aggregate.build_summary(build(tmp_path, ref_within=(24, 0.35), seed=0))
    train = s["training"]["noise"]["train"]
    assert stats.reference_noise_pct(train["reference_between_pct"], 5) > 10  # the whole spread: too noisy
    for n in (s["decode"]["noise"]["eager"], train):
        assert n["reference_process_pct"] <= n["reference_between_pct"] and not n["too_noisy"], n
    assert s["verdict"] == "PASS", s["reasons"]


def test_processes_in_generations_are_compared_in_pairs(tmp_path):
    # As the H200's GPU training in generations did: every run's first process ~10% slower than its
    # later ones (shifts common to all runs, 12% sd here). Unpaired, that shift is noise: the
    # reference's spread makes the run too noisy. Paired by generation (alive: 1) it cancels, and
    # unchanged code passes; a real 3x slowdown still fails.
    for alive, verdict in (("all", "INCONCLUSIVE"), (1, "PASS")):
        s = aggregate.build_summary(build(tmp_path / str(alive), generation_sd=0.12, alive=alive, seed=2))
        assert s["verdict"] == verdict, (alive, s["reasons"])
        assert s["decode"]["paired"] == (alive == 1) and all(r["paired"] == (alive == 1) for r in s["decode"]["rows"])
        assert s["training"]["noise"]["train"]["too_noisy"] == (alive == "all")
        facts = " ".join(report.run_facts(s))
        assert ("5 worker processes per run (1 of each run alive at a time: 5 generations, compared in pairs)"
                in facts) == (alive == 1), facts
    slow = {("feature", r, "eager"): 3.0 for r in ("none", "presized")}
    s = aggregate.build_summary(build(tmp_path / "slow", factor=slow, generation_sd=0.12, alive=1, seed=2))
    assert s["verdict"] == "FAIL" and any("3.0× slower" in r for r in s["reasons"]), s["reasons"]


def test_noise_without_a_twin_and_a_noisy_reference_alone(tmp_path):
    # No A/A twin: the spread between processes alone gives the floor, and a machine-wide one makes
    # the run too noisy ...
    s = aggregate.build_summary(build(tmp_path / "machine", twin=False, between_sd=0.3, seed=1))
    n = s["decode"]["noise"]["eager"]
    assert n["aa_pct"] is None and n["pooled_pct"] > 10 and n["too_noisy"]
    assert s["verdict"] == "INCONCLUSIVE"
    # ... while a reference that alone scatters between its processes (as the H100's host-bound dense
    # training step did: 11%, where the NSA runs' processes agreed within 1.3-6%) is one cell of
    # many: reported, and unchanged code still passes.
    s = aggregate.build_summary(build(tmp_path / "ref", twin=False, ref_between_sd=0.3, seed=1))
    n = s["decode"]["noise"]["eager"]
    assert n["reference_pct"] > 10 and n["pooled_pct"] < 5 and not n["too_noisy"], n
    assert s["verdict"] == "PASS", s["reasons"]


def test_a_real_slowdown_beyond_the_noise_still_fails_on_a_noisy_machine(tmp_path):
    slow = {("feature", r, "eager"): 3.0 for r in ("none", "presized")}
    s = aggregate.build_summary(build(tmp_path, between_sd=0.12, factor=slow, seed=2))
    assert s["decode"]["noise"]["eager"]["floor_pct"] > 10  # too noisy for a 10% tolerance ...
    assert s["verdict"] == "FAIL"  # ... but a 3x slowdown lies far beyond that noise
    assert any("decode 3.0× slower" in r for r in s["reasons"])


def test_reserve_config_slower_within_a_commit_is_its_own_criterion(tmp_path):
    slow = {(v, "presized", "eager"): 1.5 for v in ("base", "base-again", "feature")}
    s = aggregate.build_summary(build(tmp_path, factor=slow))
    assert crit(s, "decode")["status"] == "pass"  # feature vs base under the same config: unchanged
    assert crit(s, "decode_reserves")["status"] == "fail"
    assert any(re.match(r"decode (49|50|51)\.\d% slower at ctx \d+, eager mode: presized vs none on base", r)
               for r in s["reasons"]), s["reasons"]


def test_unsupported_is_shown_as_such_and_decides_nothing(tmp_path):
    res = build(tmp_path, run_status={("feature", "presized"): ("unsupported", "workspaces: no reserve knobs")},
                equiv_status={("feature", "presized"): ("unsupported", "no block indices")},
                consistency={("feature", "presized"): {"status": "unsupported", "reason": "no decode cache"}})
    s, html, _ = run_pipeline(res)
    assert s["verdict"] == "PASS", s["reasons"]
    assert not s["jobs"]
    row = next(r for r in s["decode"]["rows"] if r["reserve"] == "presized")
    assert row["status"] == "unsupported"
    assert "not supported by this implementation: workspaces: no reserve knobs" in html
    assert "MISSING" not in html and "FAILED" not in html


def test_suites_that_collected_too_few_tests_are_not_run_and_incomplete(tmp_path):
    res = build(tmp_path, tests_status={("feature", "none"): {"status": "not_run", "collected": 0, "min_tests": 3,
                                                              "passed": 0}})
    s, html, _ = run_pipeline(res)
    assert s["verdict"] == "INCOMPLETE"
    assert any("suite core did not run on feature (reserve none): collected 0 tests, needs at least 3" in r
               for r in s["reasons"])
    assert s["overview"][2]["correctness"].startswith("not run: core")


def test_decode_not_matching_forward_fails_naming_position_and_error(tmp_path):
    res = build(tmp_path, consistency={("feature", "none"): {"passed": False, "max_abs_err": 0.031,
                                                             "worst_position": 17}})
    s, _, _ = run_pipeline(res)
    assert s["verdict"] == "FAIL"
    assert ("decode does not match forward for feature (reserve none): max abs error 0.031 at position 17 "
            "(tolerance 0.0001, float32)") in s["reasons"]
    assert "decode ≠ forward" in s["overview"][2]["correctness"]


def test_selected_blocks_that_differ_fail_equivalence_even_when_outputs_match(tmp_path):
    s, html, _ = run_pipeline(build(tmp_path, flip_blocks=True))
    assert crit(s, "equivalence")["status"] == "pass"
    assert crit(s, "blocks")["status"] == "fail"
    assert s["verdict"] == "FAIL"
    assert any(re.match(r"selected blocks of feature \(reserve none\) differ from base \(reserve none\) in \d+ of 128",
                        r) for r in s["reasons"])
    assert "selected blocks differ" in s["overview"][2]["equivalence"]


def test_equivalence_says_what_its_float32_leaves_out_where_the_benchmarks_run_in_half_precision(tmp_path):
    res = build(tmp_path, device="cuda")
    s, _, md = run_pipeline(res)
    assert s["bench_dtype"] is None and "not compared across commits" not in md
    assert s["overview"][2]["equivalence"].startswith("float32 matches (max diff")
    decode = json.loads((res / "decode" / "decode.json").read_text())
    decode["sizes"]["dtype"] = "bfloat16"
    _dump(res / "decode" / "decode.json", decode)
    for f in (res / "consistency").glob("*/*.json"):
        _dump(f, {**json.loads(f.read_text()), "dtype": "bfloat16"})
    s, _, md = run_pipeline(res)
    assert s["bench_dtype"] == "bfloat16"
    section = md.split("## Equivalence", 1)[1].split("\n## ", 1)[0]
    assert "in float32 (TF32 off)" in section
    assert ("On cuda the benchmarks run in bfloat16" in section and "not compared across commits" in section
            and "with its forward pass in bfloat16." in section), section


def test_failed_jobs_hostile_names_and_each_log_tail_once(tmp_path):
    s, html, md = run_pipeline(build(tmp_path, evil=True))
    assert s["verdict"] == "INCOMPLETE"
    env = {r["variant"]: r for r in s["environment"]}
    assert env[EVIL]["status"] == "FAILED"
    # One reason for the broken commit (its environment), not one per later job.
    assert sum(EVIL in r for r in s["reasons"]) == 1
    assert EVIL not in html and "<b>bad</b>" not in html and "<i>hostile</i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("TAILMARK-ENV") == 1 and html.count("TAILMARK-DECODE") == 1
    assert EVIL not in md
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script" not in html and "<link" not in html
    assert gate.main(["--summary", str(tmp_path / "results" / "summary.json")]) == 2


def test_missing_everything_is_incomplete_not_a_crash(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    s, html, _ = run_pipeline(res)
    assert s["verdict"] == "INCOMPLETE"
    assert "variants.json" in " ".join(s["reasons"])


def test_half_written_decode_file(tmp_path):
    res = build(tmp_path)
    (res / "decode" / "decode.json").write_text('{"schema_version": 2, "runs": [')
    s, html, _ = run_pipeline(res)
    assert s["verdict"] == "INCOMPLETE"
    assert any(j["stage"] == "decode" and j["status"] == "FAILED" for j in s["jobs"])
    pngs = {p.name for p in (res / "plots").glob("*.png")}
    assert "decode_latency.png" not in pngs and "training_loss.png" in pngs
    assert "no decode results" in html


def test_unknown_schema_version_is_refused_with_a_message(tmp_path):
    res = build(tmp_path)
    (res / "decode" / "decode.json").write_text(json.dumps({"schema_version": 7, "runs": []}))
    s = aggregate.build_summary(res)
    job = next(j for j in s["jobs"] if j["stage"] == "decode")
    assert "schema_version 7 is not one this report reads" in job["error"]


def test_schema_1_benchmark_files_are_refused_saying_to_rerun(tmp_path):
    """One process per run and no reference workload cannot give a noise floor: not read."""
    res = build(tmp_path)
    (res / "decode" / "decode.json").write_text(json.dumps({"device": "cpu", "timer": "perf_counter", "runs": []}))
    s = aggregate.build_summary(res)
    assert s["verdict"] == "INCOMPLETE"
    job = next(j for j in s["jobs"] if j["stage"] == "decode")
    assert "schema_version 1" in job["error"] and "rerun the stage" in job["error"]


def test_acceptance_defaults_come_from_the_schema_only():
    acc = acceptance.effective_acceptance(None, "cpu")
    assert acc["decode_tolerance_pct"] == 10.0 and acc["ci_level"] == 0.99  # schema default + cpu override
    acc = acceptance.effective_acceptance({"decode_tolerance_pct": 3, "ci_level": None,
                                           "cuda": {"decode_tolerance_pct": 1}}, "cuda")
    assert acc["decode_tolerance_pct"] == 1.0 and acc["ci_level"] == 0.99
    assert acc["judge_modes"] == ["graph", "compiled_graph"]
    assert not hasattr(aggregate, "DEFAULT_ACCEPTANCE")
    # As config_check hands it over (defaults merged in): the user's top-level value wins over a
    # device default, a device value the user changed wins over both.
    merged = {**acceptance.schema_defaults(), "decode_tolerance_pct": 3.0}
    assert acceptance.effective_acceptance(merged, "cpu")["decode_tolerance_pct"] == 3.0
    assert acceptance.effective_acceptance(merged, "cpu")["train_tolerance_pct"] == 15.0
    merged["cpu"] = {**merged["cpu"], "decode_tolerance_pct": 20.0}
    assert acceptance.effective_acceptance(merged, "cpu")["decode_tolerance_pct"] == 20.0


def test_verdict_precedence():
    line = acceptance.line
    ok = [line("a", "A", "pass", "1"), line("i", "I", "info", "x", reasons=["just so you know"])]
    assert acceptance.verdict(ok, []) == ("PASS", ["every criterion passed"])
    noisy = ok + [line("n", "N", "inconclusive", "30%", reasons=["too noisy"])]
    assert acceptance.verdict(noisy, []) == ("INCONCLUSIVE", ["too noisy"])
    job = {"stage": "train", "variant": "v", "reserve": "none", "status": "FAILED", "error": "OOM"}
    v, reasons = acceptance.verdict(noisy, [job])
    assert v == "INCOMPLETE" and "OOM" in reasons[0] and reasons[1] == "also: too noisy"
    v, reasons = acceptance.verdict(noisy + [line("f", "F", "fail", "x", reasons=["decode 2.0× slower"])], [job])
    assert v == "FAIL" and reasons[0] == "decode 2.0× slower" and len(reasons) == 3


def test_change_words():
    assert acceptance.change_words(390.0) == "4.9× slower"
    assert acceptance.change_words(12.34) == "12.3% slower"
    assert acceptance.change_words(-30.0) == "30.0% faster"
    assert acceptance.change_words(-60.0, lower_is_better=False) == "2.5× slower"  # throughput fell to 40%
    assert acceptance.change_words(-75.0) == "4.0× faster"


def test_commit_subjects_are_never_coloured_as_verdicts():
    html = report.html_table(["variant", "ref", "subject", "call"],
                             [["head", "HEAD", "fix the FAIL verdict of slower runs", "3.0× slower"]])
    cells = re.findall(r"<td([^>]*)>([^<]*)</td>", html)
    assert cells[2] == ("", "fix the FAIL verdict of slower runs") and cells[3] == (' class="bad"', "3.0× slower")


def test_markdown_cells_are_escaped():
    md = tables.markdown_table(["a|b"], [["<x>|y\nz"]])
    assert "&lt;x&gt;\\|y z" in md and "a\\|b" in md


def test_read_record_statuses(tmp_path):
    assert results_io.read_record(tmp_path / "nope.json")["status"] == "MISSING"
    (tmp_path / "half.json").write_text('{"status": "ok", "nsa": {')
    assert results_io.read_record(tmp_path / "half.json")["status"] == "FAILED"
    (tmp_path / "u.json").write_text(json.dumps({"status": "unsupported", "reason": "no cuda"}))
    assert results_io.read_record(tmp_path / "u.json")["status"] == "unsupported"
    (tmp_path / "f.json").write_text(json.dumps({"status": "failed", "log_tail": ["a", "b"]}))
    rec = results_io.read_record(tmp_path / "f.json")
    assert rec["status"] == "FAILED" and rec["log_tail"] == "a\nb"


def test_a_noisy_reference_decides_nothing_when_no_run_of_the_implementation_was_measured(tmp_path):
    # e.g. fla on a CPU host: every run "not supported"; only the reference workload ran, noisily.
    gone = {(v, r): ("unsupported", "unsupported: device=cpu") for v in ("base", "feature") for r in ("none", "presized")}
    s = aggregate.build_summary(build(tmp_path, twin=False, ref_between_sd=0.3, run_status=gone, seed=1))
    assert s["decode"]["noise"]["eager"]["too_noisy"]  # measured and shown...
    assert not any(c["id"].endswith("_noise") for c in s["acceptance"])  # ...but judges nothing
    assert s["verdict"] != "INCONCLUSIVE", s["reasons"]


def _edit_meta(res: Path, **changes) -> Path:
    path = res / "meta" / "variants.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return res


def test_the_baseline_alone_compares_nothing_and_never_passes(tmp_path):
    res = build(tmp_path, twin=False)
    meta = json.loads((res / "meta" / "variants.json").read_text())
    s, html, _ = run_pipeline(_edit_meta(res, variants={"base": meta["variants"]["base"]}))
    assert s["verdict"] == "INCONCLUSIVE", s["reasons"]
    assert crit(s, "compared")["status"] == "inconclusive"
    assert s["reasons"][0].startswith("nothing compared: the configuration lists only the baseline variant base")
    assert gate.main(["--summary", str(res / "summary.json")]) == 3


def test_uncommitted_changes_are_said_on_the_first_screen(tmp_path):
    warning = "/repo has uncommitted changes, which are not measured (refs name commits, never the working tree): x.py"
    s, html, md = run_pipeline(_edit_meta(build(tmp_path), warnings=[warning]))
    assert s["warnings"] == [warning]
    assert f"Warning: {warning}" in md and "Warning: /repo has uncommitted changes" in html
