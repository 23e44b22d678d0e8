"""The Snakemake workflow on CPU, end to end, against a throwaway repo of a tiny fake ``nsa``.

One full run (module fixture, ~1 minute on 2 cores) covers: a correct commit listed twice (A/A),
a commit whose decode step is 3 ms slower (a real regression: verdict FAIL), and a commit that
does not install (FAILED rows with its log, everything else finishes). Then: a rerun does
nothing, an added variant only adds its own jobs, the gate fails, bad configs stop before any
job with a message naming the key, and ``snakemake --lint`` is clean. Fast unit tests of the
harness's pure functions come last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import build_env  # noqa: E402
import config_check  # noqa: E402
import harness  # noqa: E402
import interleave  # noqa: E402
import resolve_refs  # noqa: E402
import run_suites  # noqa: E402
from workflow_run import TINY_MODEL, snakemake, tiny_config, workdir_with  # noqa: E402,F401

def _read(work: Path, rel: str):
    return json.loads((work / "results" / rel).read_text())


@pytest.mark.workflow
def test_full_run_finishes_despite_a_broken_commit(e2e):
    proc = e2e["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work, repo = e2e["work"], e2e["repo"]
    # The broken commit: a FAILED environment record with the installer's log, and its later
    # jobs record why they could not run instead of crashing the workflow.
    env = _read(work, f"env/{repo['broken']}/env.json")
    assert env["status"] == "failed" and "pyproject.toml is not valid TOML" in env["error"] and env["log_tail"]
    assert _read(work, f"tests/{repo['broken']}/none/summary.json")["status"] == "failed"
    train = {(r["variant"], r["reserve"]): r for r in _read(work, "train/train.json")["runs"]}
    assert train[("broken", "presized")]["error"].startswith("environment failed")
    assert _read(work, f"consistency/{repo['broken']}/none.json")["error"].startswith("environment failed")
    ok = _read(work, f"env/{repo['base']}/env.json")
    assert ok["status"] == "ok" and ok["adapter"]["name"] == "nsa" and ok["installer"] in ("pip", "uv")
    assert ok["implementation_version"] == "0.0.1"
    assert ok["package_files"][0].startswith(str(work / "results" / "envs" / repo["base"]))
    assert ok["torch_file"] == __import__("torch").__file__  # the host's torch, inherited
    assert ok["pip_freeze"]
    # The broken commit's failure is a record, which a plain rerun keeps: the run says how to redo it.
    out = proc.stdout + proc.stderr
    assert "a plain rerun keeps these records" in out and f"--forcerun results/env/{repo['broken']}/env.json" in out


@pytest.mark.workflow
def test_raw_results_follow_the_contract(e2e):
    work, repo = e2e["work"], e2e["repo"]
    meta = _read(work, "meta/variants.json")
    assert meta["device"] == "cpu" and meta["baseline"] == "base"
    assert meta["variants"]["base-again"]["sha"] == meta["variants"]["base"]["sha"] == repo["base"]
    assert meta["variants"]["slow"]["subject"] == "slower decode" and meta["reserve_order"] == ["none", "presized"]
    assert meta["implementation"]["adapter"] == "nsa" and meta["capabilities"]["decode"] is True
    tests = _read(work, f"tests/{repo['base']}/presized/summary.json")
    assert tests["status"] == "ok"
    assert {k: tests["suites"]["core"][k] for k in ("passed", "failed", "skipped", "errors", "collected")} == \
        {"passed": 2, "failed": 0, "skipped": 0, "errors": 0, "collected": 2}
    assert {k: tests["suites"]["selection"][k] for k in ("passed", "skipped")} == {"passed": 3, "skipped": 1}
    assert (work / "results" / tests["suites"]["core"]["junit"]).exists()
    decode = _read(work, "decode/decode.json")
    assert decode["schema_version"] == 2 and decode["timer"] == "perf_counter" and decode["rounds"] == 3
    assert decode["modes"] == ["eager"] and decode["conditions"]["host"]["threads"] == 1
    runs = {(r["variant"], r["reserve"]): r for r in decode["runs"]}
    assert set(runs) == {(v, r) for v in ("base", "base-again", "slow", "broken") for r in ("none", "presized")} \
        | {("reference", None)}
    base = runs[("base", "none")]
    assert base["status"] == "ok" and len(base["processes"]) == 2 and base["routes"]
    # Two independent processes, each with steps x rounds samples per context.
    assert len({p["pid"] for p in base["processes"]}) == 2
    assert all(len(p["contexts"]["16"]["eager_ms"]) == 30 for p in base["processes"])
    assert runs[("reference", None)]["status"] == "ok" and runs[("reference", None)]["kind"] == "reference"
    assert runs[("broken", "none")]["status"] == "failed"
    # Pre-sizing shows in the workspace counters: no growth once reserved.
    assert all(p["workspace_stats"]["sel_pack"]["growth_events"] == 0 for p in runs[("base", "presized")]["processes"])
    assert base["processes"][0]["workspace_stats"]["sel_pack"]["growth_events"] > 0
    train = {(r["variant"], r["reserve"]): r for r in _read(work, "train/train.json")["runs"]}
    proc = train[("base", "none")]["processes"][0]
    assert train[("base", "none")]["status"] == "ok" and len(train[("base", "none")]["processes"]) == 2
    # losses: warm-up + 3 rounds x (1 untimed + 3 timed steps); tokens/s of the timed steps only
    assert len(proc["loss"]) == 2 + 3 * (1 + 3) and len(proc["tokens_per_s"]) == 9
    assert train[("reference", None)]["status"] == "ok" and train[("broken", "none")]["status"] == "failed"
    assert _read(work, f"equiv/{repo['slow']}/presized.json")["status"] == "ok"
    assert (work / "results" / "equiv" / repo["slow"] / "presized.pt").exists()
    consistency = _read(work, f"consistency/{repo['base']}/none.json")
    assert consistency["passed"] is True and consistency["positions"] == 24 and consistency["max_abs_err"] < 1e-5


@pytest.mark.workflow
def test_summary_and_report(e2e):
    work = e2e["work"]
    summary = _read(work, "summary.json")
    # The slow commit is a real regression, so FAIL (which outranks the broken commit's INCOMPLETE).
    assert summary["verdict"] == "FAIL", summary["reasons"]
    slow_rows = [r for r in summary["decode"]["rows"] if r["variant"] == "slow" and r.get("delta_pct") is not None]
    assert slow_rows and all(r["delta_pct"] > 100 and r["call"] == "slower" for r in slow_rows)
    assert any(r["variant"] == "broken" and r["status"] == "FAILED" for r in summary["environment"])
    equiv = {(r["variant"], r["reserve"]): r for r in summary["equivalence"]["rows"]}
    assert equiv[("slow", "presized")]["bit_identical"] is True
    assert equiv[("slow", "none")]["max_abs_diff_all"] == 0.0
    html = (work / "results" / "report.html").read_text()
    assert "FAILED" in html and "broken" in html and "FAIL" in html
    assert (work / "results" / "report.md").exists()


@pytest.mark.workflow
def test_rerun_with_nothing_changed_does_nothing(e2e):
    t0 = time.monotonic()
    proc = snakemake(e2e["work"], "--cores", "2", "all")
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert seconds < 10, f"no-op rerun took {seconds:.1f} s"


@pytest.mark.workflow
def test_a_changed_judge_module_redoes_the_verdict(e2e):
    """The judging rules take every module their script imports as input, not the script alone."""
    proc = snakemake(e2e["work"], "--cores", "1", "--detailed-summary")
    assert proc.returncode == 0, proc.stderr[-2000:]
    inputs = {line.split("\t")[0]: line for line in proc.stdout.splitlines()}
    for output, modules in (("results/summary.json", ("stats.py", "acceptance.py", "performance.py", "tables.py")),
                            ("results/report.html", ("report.py", "tables.py"))):
        assert all(f"workflow/scripts/{m}" in inputs[output] for m in modules), (output, inputs[output][:2000])


@pytest.mark.workflow
def test_gate_fails_on_a_fail_verdict(e2e):
    proc = snakemake(e2e["work"], "--cores", "1", "gate")
    assert proc.returncode != 0
    assert "verdict: FAIL" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_adding_a_variant_adds_only_its_own_per_commit_jobs(e2e, fake_repo):
    repo = Path(fake_repo["repo"])
    from conftest import git

    git(repo, "checkout", "-q", "-b", "extra", "base")
    (repo / "README").write_text("another commit\n")
    git(repo, "add", "README")
    git(repo, "commit", "-q", "-m", "extra commit")
    cfg = tiny_config(fake_repo)
    cfg["variants"]["extra"] = "extra"
    (e2e["work"] / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        proc = snakemake(e2e["work"], "-n", "--quiet", "rules", "all")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-2000:]
        counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit()}
        assert counts.get("checkout") == 1 and counts.get("env") == 1, counts
        assert counts.get("correctness") == 2 and counts.get("equivalence") == 2 and counts.get("consistency") == 2
        # The interleaved benchmark jobs measure every run together, so they rerun as a whole.
        assert counts.get("decode") == 1 and counts.get("train") == 1
    finally:
        (e2e["work"] / "config.yaml").write_text(yaml.safe_dump(tiny_config(fake_repo)))


@pytest.mark.workflow
def test_lint_is_clean(e2e):
    proc = snakemake(e2e["work"], "--lint")
    out = proc.stdout + proc.stderr
    # The one lint we accept: rules declare no conda environment, on purpose. Every job runs in the
    # interpreter that runs Snakemake (envs/snakemake.yaml makes one) and each commit gets its own
    # venv on top of it; a conda env per rule would be one that no job's command uses.
    lints = {line.strip() for line in out.splitlines() if line.startswith("    * ")}
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, out[-3000:]


BAD_CONFIGS = [
    ("unknown key", {"colour": "blue"}, "unknown config key colour"),
    ("unknown baseline", {"baseline": "nope"}, "config key baseline = 'nope' is not a variant"),
    ("negative size", {"decode": {"cpu": {"steps": -5}}}, "config key decode.cpu.steps = -5"),
    ("reserve not an integer", {"reserve_configs": {"big": {"NSA_SEL_PACK_RESERVE_N": "4k"}}},
     "config key reserve_configs.big: NSA_SEL_PACK_RESERVE_N='4k' is invalid"),
    ("misspelt variable", {"common_env": {"NSA_USE_FA": 1}}, "config key common_env: NSA_USE_FA='1': nsa reads no such variable"),
    ("bad flag in a suite", {"suites": {"core": {"args": ["nsa/tests"], "env": {"NSA_USE_FA2": "maybe"}}}},
     "config key suites.core.env: NSA_USE_FA2='maybe' is invalid; accepted: 0 or 1"),
    ("unknown adapter", {"implementation": {"adapter": "flash-nsa"}}, "implementation.adapter = 'flash-nsa': no such adapter"),
    ("name escaping results", {"suites": {"../../x": "core_invariants"}}, "config key suites: the name '../../x' is not accepted"),
    ("selection blind", {"equivalence": {"cpu": {"batch": 1, "seq_len": 12, "decode_steps": 3}}},
     "config key equivalence.cpu.seq_len = 12 is too short to see the selection"),
    ("only forced blocks", {"model": {**TINY_MODEL, "n_sel": 3}}, "config key model.n_sel = 3 leaves no block"),
    ("unknown ref", {"variants": {"base": "no-such-branch"}}, "git ref 'no-such-branch' does not name a commit"),
    ("no such interpreter", {"python": "/nonexistent/python"}, "config key python = '/nonexistent/python': no such executable"),
    ("flag maybe", {"common_env": {"NSA_USE_FA2": "maybe"}},
     "config key common_env: NSA_USE_FA2='maybe' is invalid; accepted: 0 or 1"),
    ("misspelt reserve variable", {"reserve_configs": {"big": {"NSA_SEL_PACK_RESERVE": 64}}},
     "config key reserve_configs.big: NSA_SEL_PACK_RESERVE='64': nsa reads no such variable"),
    ("300-character name", {"reserve_configs": {"r" * 300: {}}}, "config key reserve_configs: the name 'rrrr"),
    ("marker typo", {"suites": {"core": "core_invariant"}},
     "config key suites.core: the pytest marker core_invariant (in -m 'core_invariant') appears in none of the commits"),
    ("marker typo in args", {"suites": {"core": {"args": ["nsa/tests", "-m", "selection_v2 or core_invariant"]}}},
     "accepted: a marker they use: core_invariants, selection_v2"),
]
if not __import__("torch").cuda.is_available():
    BAD_CONFIGS.append(("cuda on a CPU host", {"device": "cuda"}, "config key device = 'cuda', but"))


@pytest.mark.workflow
@pytest.mark.parametrize("case,override,message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_stops_before_any_job(fake_repo, tmp_path, case, override, message):
    cfg = tiny_config(fake_repo, **override)
    work = workdir_with(tmp_path / "w", cfg)
    proc = snakemake(work, "--cores", "1", "all", timeout=60)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    assert not (work / "results").exists()


@pytest.mark.workflow
def test_a_host_without_torch_says_what_to_install(fake_repo, tmp_path):
    """Without this check every environment failed on `invalid command 'bdist_wheel'`."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    work = workdir_with(tmp_path / "w", tiny_config(fake_repo, python=str(bare / "bin" / "python")))
    proc = snakemake(work, "--cores", "1", "all", timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "lacks torch, setuptools, pytest" in out, out[-2000:]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in out
    assert not (work / "results").exists()


@pytest.mark.workflow
def test_malformed_yaml_stops_before_any_job(fake_repo, tmp_path):
    work = workdir_with(tmp_path / "w", "variants: {base: base\nbaseline: [\n")
    proc = snakemake(work, "--cores", "1", "all", timeout=60)
    assert proc.returncode != 0
    assert "config.yaml" in proc.stdout + proc.stderr
    assert not (work / "results").exists()


# ----------------------------------------------------------------------------- unit tests (fast)

def test_config_defaults_and_messages():
    full = config_check.checked_config({})
    assert full["baseline"] in full["variants"]
    assert full["reserve_configs"]["presized"]["NSA_VARLEN_RESERVE_K"] == 33554432
    assert full["common_env"]["NSA_USE_FA2_WIN"] == 0
    # Setting one tolerance keeps the other defaults (acceptance merges); variants replace.
    partial = config_check.checked_config({"acceptance": {"alpha": 0.05}, "variants": {"a": "HEAD"}, "baseline": "a"})
    assert partial["acceptance"]["alpha"] == 0.05 and partial["acceptance"]["aa_max_delta_pct"] == 2.0
    assert list(partial["variants"]) == ["a"]
    with pytest.raises(config_check.ConfigError, match=r"train\.cpu\.warmup = 9 must be below"):
        config_check.checked_config({"train": {"cpu": {"steps": 5, "warmup": 9}}})
    with pytest.raises(config_check.ConfigError, match="accepted: one of auto, cpu, cuda"):
        config_check.checked_config({"device": "tpu"})
    with pytest.raises(config_check.ConfigError, match=r"decode\.cpu\.setup_parallel = 'all' is invalid; "
                       r"accepted: an integer >= 1, 0 \(all at once\) or cores"):
        config_check.checked_config({"decode": {"cpu": {"setup_parallel": "all"}}})
    assert full["train"]["cpu"]["setup_parallel"] == "cores" and full["train"]["cuda"]["setup_parallel"] == 0
    with pytest.raises(config_check.ConfigError, match=r"train\.cuda\.alive = 0 is invalid; accepted: an integer >= 1 "
                                                        r"or all"):
        config_check.checked_config({"train": {"cuda": {"alive": 0}}})
    assert full["decode"]["cuda"]["alive"] == 2 and full["decode"]["cpu"]["alive"] == 1 and config_check.checked_config(
        {"decode": {"cuda": {"alive": "all"}}})["decode"]["cuda"]["alive"] == "all"


def test_default_config_file_is_valid():
    cfg = config_check.checked_config(config_check.load_yaml(ROOT / "config.yaml"))
    assert cfg == config_check.checked_config({})  # config.yaml writes out the schema's defaults


def test_shallow_clone_error_says_how_to_fetch(fake_repo, tmp_path):
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{fake_repo['repo']}", str(shallow)], check=True)
    with pytest.raises(resolve_refs.RefError, match="fetch --unshallow"):
        resolve_refs.resolve_ref(shallow, "HEAD~2")
    assert resolve_refs.resolve_ref(Path(fake_repo["repo"]), "base") == fake_repo["base"]


def test_junit_counts_and_suite_status(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="2" errors="1" skipped="1"/></testsuites>')
    assert run_suites.junit_counts(xml) == {"passed": 3, "failed": 2, "skipped": 1, "errors": 1}
    suite = {"args": ["tests/test_x.py"], "env": {}, "min_tests": 1}
    empty = tmp_path / "empty.xml"
    empty.write_text('<testsuites><testsuite tests="0" failures="0" errors="0" skipped="0"/></testsuites>')
    nothing = run_suites.suite_result("s", suite, 5, "exit status 5", empty, "empty.xml")
    assert nothing["status"] == "not_run" and "fewer than min_tests=1" in nothing["error"]  # never "ok"
    few = tmp_path / "few.xml"
    few.write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="0"/></testsuites>')
    assert run_suites.suite_result("s", {**suite, "min_tests": 3}, 0, "exit status 0", few, "few.xml")["status"] == "not_run"
    assert run_suites.suite_result("s", suite, 0, "exit status 0", few, "few.xml")["status"] == "ok"
    crashed = run_suites.suite_result("s", suite, -9, "terminated by SIGKILL", tmp_path / "none.xml", "none.xml")
    assert crashed["status"] == "failed" and crashed["errors"] == 1
    usage = run_suites.suite_result("s", suite, 4, "exit status 4", tmp_path / "none.xml", "none.xml")
    assert usage["status"] == "failed"  # a missing test path is a failure, not "not run"
    assert run_suites.suite_result("s", suite, 1, "exit status 1", xml, "j.xml")["status"] == "failed"


def test_marker_expressions_match_as_pytest_selects():
    m = run_suites.marker_matcher("(alpha or beta) and not gamma")
    assert m(["alpha"]) and m(["beta", "other"]) and not m(["alpha", "gamma"]) and not m([])
    assert run_suites.marker_matcher("not in")(["is"])  # Python keywords are marker names here
    for unsupported in ("", "alpha and", "slow(reason=1)", "a.b", "__import__('os')"):
        assert run_suites.marker_matcher(unsupported) is None, unsupported  # those suites run alone
    suites = config_check.normalized_suites({"a": "alpha", "b": "beta", "e": {"args": ["t", "-m", "alpha"],
                                             "env": {"X": 1}}, "k": {"args": ["t", "-k", "x"]}}, "t")
    assert run_suites.batches(suites) == [["a", "b"], ["e"], ["k"]]


SUITE_TESTS = """
import pytest
@pytest.mark.alpha
def test_a(): pass
@pytest.mark.alpha
@pytest.mark.beta
def test_ab(): pass
@pytest.mark.beta
@pytest.mark.parametrize("n", [1, 2])
def test_b(n): assert n == 1, "beta fails at n=2"
@pytest.mark.gamma
@pytest.mark.skip(reason="not here")
def test_g(): pass
def test_unmarked(): pass
"""


@pytest.mark.parametrize("broken", [False, True], ids=["tests", "collection-error"])
def test_marker_suites_in_one_pytest_give_what_each_alone_gives(tmp_path, broken):
    checkout = tmp_path / "checkout"
    (checkout / "t").mkdir(parents=True)
    (checkout / "t" / "test_m.py").write_text(SUITE_TESTS)
    (checkout / "pytest.ini").write_text("[pytest]\nmarkers =\n  alpha\n  beta\n  gamma\n  delta\n  epsilon\n")
    # A conftest that marks a test while collecting (pytest's -m sees it; so must the split)
    (checkout / "t" / "conftest.py").write_text(
        "import pytest\n"
        "def pytest_collection_modifyitems(items):\n"
        "    for item in items:\n"
        "        if item.name == 'test_unmarked':\n"
        "            item.add_marker(pytest.mark.delta)\n")
    if broken:
        (checkout / "t" / "test_broken.py").write_text("import pytest\n@pytest.mark.alpha\ndef test_x(:\n")
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (env_dir / "bin" / "python").chmod(0o755)
    suites = config_check.normalized_suites({"alpha": "alpha", "beta": "beta", "alpha_only": "alpha and not beta",
                                             "gamma": "gamma", "delta": "delta", "epsilon": "epsilon",
                                             "keyword": {"args": ["t", "-k", "unmarked"]}}, "t")

    def run(names, out):
        return run_suites.run_suites(env_dir, checkout, {n: suites[n] for n in names}, {}, "cpu", tmp_path / out,
                                     tmp_path, tmp_path / f"{out}.log", 120)

    together = run(list(suites), "together")
    alone = {n: run([n], f"alone-{n}")["suites"][n] for n in suites}
    strip = ("junit", "error", "args")
    for name in suites:
        t, a = together["suites"][name], alone[name]
        assert {k: v for k, v in t.items() if k not in strip} == {k: v for k, v in a.items() if k not in strip}, name
    got = {n: (s["status"], s["passed"], s["failed"], s["skipped"], s["errors"]) for n, s in together["suites"].items()}
    if broken:  # a module that does not import fails every suite it might hold tests of
        assert all(s[0] == "failed" for n, s in got.items() if n != "keyword"), got
    else:
        assert got == {"alpha": ("ok", 2, 0, 0, 0), "beta": ("failed", 2, 1, 0, 0), "alpha_only": ("ok", 1, 0, 0, 0),
                       "gamma": ("ok", 0, 0, 1, 0), "delta": ("ok", 1, 0, 0, 0), "epsilon": ("not_run", 0, 0, 0, 0),
                       "keyword": ("ok", 1, 0, 0, 0)}
        assert "beta fails at n=2" in together["log_tail"] and together["status"] == "failed"
        junit = tmp_path / together["suites"]["beta"]["junit"]
        assert run_suites.junit_counts(junit) == {"passed": 2, "failed": 1, "skipped": 0, "errors": 0}
    assert not (tmp_path / "together" / "combined.xml").exists()


def test_round_order_is_a_fresh_permutation_each_round():
    orders = [interleave.round_order(5, r, seed=0) for r in range(6)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders == [interleave.round_order(5, r, seed=0) for r in range(6)]  # reproducible


def test_host_site_dirs_never_include_an_nsa_package(tmp_path, monkeypatch):
    (tmp_path / "with" / "nsa").mkdir(parents=True)
    (tmp_path / "with" / "nsa" / "__init__.py").write_text("")
    (tmp_path / "plain").mkdir()
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'with'}:{tmp_path / 'plain'}")
    dirs = build_env.host_site_dirs()
    assert str(tmp_path / "plain") in dirs and str(tmp_path / "with") not in dirs


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "r.json"

    class Boom(str):
        def encode(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harness.write_atomic(target, Boom("x"))
    assert list(tmp_path.iterdir()) == []
    harness.write_json(target, {"x": float("nan")})
    assert json.loads(target.read_text()) == {"x": "NaN"}


def test_child_env_drops_inherited_nsa_flags(monkeypatch):
    monkeypatch.setenv("NSA_USE_FA2", "1")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = harness.child_env({"NSA_SEL_PACK_RESERVE_N": 64, "FLAG": True}, device="cpu")
    assert "NSA_USE_FA2" not in env and "PYTHONPATH" not in env
    assert env["NSA_SEL_PACK_RESERVE_N"] == "64" and env["FLAG"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.workflow
def test_a_configfile_replaces_the_mappings_it_defines(fake_repo, tmp_path):
    work = workdir_with(tmp_path / "w", tiny_config(fake_repo))
    (work / "mine.yaml").write_text("variants: {only: slow, only-again: slow}\nbaseline: only\n"
                                    "reserve_configs: {plain: {}}\n")
    proc = snakemake(work, "-n", "--quiet", "rules", "all", "--configfile", "mine.yaml", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    # One commit and one reserve configuration: config.yaml's four variants and two configs are gone.
    assert counts.get("checkout") == 1 and counts.get("correctness") == 1 and counts.get("consistency") == 1, counts


def test_replace_mappings_takes_each_defined_mapping_whole(tmp_path):
    merged = {"variants": {"baseline": "HEAD~1", "a": "x"}, "suites": {"s": "m"}, "seed": 3}
    mine = tmp_path / "mine.yaml"
    mine.write_text("variants: {a: x}\nseed: 4\n")
    out = config_check.replace_mappings(merged, [mine], {"common_env": {"X": 1}})
    assert out["variants"] == {"a": "x"} and out["suites"] == {"s": "m"} and out["common_env"] == {"X": 1}


def test_a_branch_known_only_as_origin_branch_resolves(fake_repo, tmp_path):
    from conftest import git

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", fake_repo["repo"], str(clone)], check=True)
    git(Path(fake_repo["repo"]), "branch", "-f", "side", "slow")
    git(clone, "fetch", "-q", "origin")
    assert resolve_refs.resolve_ref(clone, "side") == fake_repo["slow"]


def test_dependencies_come_from_the_commits_own_metadata(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "vibe"\ndependencies = ["numpy", "hydra-core>=1.3"]\n')
    assert build_env.declared_requirements(tmp_path) == ["numpy", "hydra-core>=1.3"]
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndynamic = ["dependencies"]\n')
    with pytest.raises(build_env.StepFailed, match="dynamic; use install: pip"):
        build_env.declared_requirements(tmp_path)
    # The distributions installed *into* an environment, not a same-named package on the host.
    site = tmp_path / "site"
    (site / "vibe-0.1.dist-info").mkdir(parents=True)
    (site / "vibe-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vibe\nVersion: 0.1\n"
                                                          "Requires-Dist: omegaconf\n")
    out = subprocess.run([sys.executable, "-c", build_env.INSTALLED_REQUIRES, str(site)], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == ["omegaconf"]


@pytest.mark.workflow
def test_unchanged_code_never_fails(fake_repo, tmp_path):
    """An A/A-only configuration (one commit under two names): PASS, or INCONCLUSIVE with a reason on
    a noisy machine, never FAIL."""
    cfg = tiny_config(fake_repo, variants={"base": "base", "base-again": "base"}, suites={"core": "core_invariants"},
                      reserve_configs={"none": {}})
    work = workdir_with(tmp_path / "w", cfg)
    proc = snakemake(work, "--cores", "2", "all", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _read(work, "summary.json")
    assert summary["verdict"] in ("PASS", "INCONCLUSIVE"), summary["reasons"]
    assert not [c for c in summary["acceptance"] if c["status"] == "fail"], summary["acceptance"]
    if summary["verdict"] == "INCONCLUSIVE":
        assert summary["reasons"], "INCONCLUSIVE must say why"


def test_an_unreachable_url_is_an_error_not_stale_refs(fake_repo, tmp_path):
    source = tmp_path / "upstream"
    subprocess.run(["git", "clone", "-q", "--bare", fake_repo["repo"], str(source)], check=True)
    url = f"file://{source}"
    mirror = resolve_refs.local_repo(url, tmp_path / "mirrors")
    assert resolve_refs.resolve_ref(mirror, "base") == fake_repo["base"]
    import shutil

    shutil.rmtree(source)  # the URL no longer answers
    with pytest.raises(resolve_refs.RefError, match="git fetch failed .* set repo to that path to use them offline"):
        resolve_refs.local_repo(url, tmp_path / "mirrors")
    assert resolve_refs.resolve_ref(mirror, "base") == fake_repo["base"]  # the offline path still works


def test_a_ref_missing_from_a_url_repo_is_hinted_at_the_url(fake_repo, tmp_path):
    """Commands run in the URL's mirror fix nothing (it is fetched whole at each start-up)."""
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--bare", "--depth", "1", f"file://{fake_repo['repo']}", str(shallow)],
                   check=True)
    url = f"file://{shallow}"
    mirror = resolve_refs.local_repo(url, tmp_path / "mirrors")
    with pytest.raises(resolve_refs.RefError, match=f"in {url}; {url} serves a shallow history") as e:
        resolve_refs.resolve_variants(mirror, {"old": "HEAD~2"}, url)
    assert "git -C" not in str(e.value) and "set repo to the path of a full clone" in str(e.value)
    with pytest.raises(resolve_refs.RefError, match=f"check the spelling, or push it to {url}"):
        resolve_refs.resolve_ref(mirror, "no-such-branch", url)


def test_uncommitted_changes_are_named_as_not_measured(fake_repo, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", fake_repo["repo"], str(clone)], check=True)
    assert resolve_refs.uncommitted_warning(clone) is None
    (clone / "nsa" / "core.py").write_text("# edited\n")
    (clone / "new.py").write_text("")
    warning = resolve_refs.uncommitted_warning(clone)
    assert "uncommitted changes, which are not measured" in warning and "nsa/core.py, new.py" in warning


def test_a_configfile_with_a_yaml_error_is_named_with_its_line(tmp_path, capsys):
    """Snakemake parses --configfile files before the workflow runs (its message names no file);
    config_check.py checks them as Snakemake merges them, naming the file and line."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("variants: {a: HEAD}\nbaseline: a\nseed: [\n")
    assert config_check.main([str(ROOT / "config.yaml"), str(mine)]) == 1
    err = capsys.readouterr().err
    assert f"{mine}: malformed YAML" in err and "line 4" in err
    mine.write_text("variants: {a: HEAD, a-again: HEAD}\nbaseline: a\n")
    assert config_check.main([str(ROOT / "config.yaml"), str(mine)]) == 0
    assert list(yaml.safe_load(capsys.readouterr().out)["variants"]) == ["a", "a-again"]  # replaced whole


@pytest.mark.workflow
@pytest.mark.parametrize("replace", [False, True], ids=["merged", "replace-workflow-config"])
def test_meta_is_the_config_this_process_read(fake_repo, tmp_path, replace):
    """meta/variants.json comes from the start-up's values (refs resolved once), never from a second
    Snakemake process that merges the config files again; a run directory needs no config.yaml."""
    work = tmp_path / "w"
    work.mkdir()
    mine = tmp_path / "mine.yaml"  # outside the run directory, as the README advises
    mine.write_text(yaml.safe_dump(tiny_config(fake_repo, variants={"only": "slow", "only-again": "slow"},
                                               baseline="only")))
    if replace:
        (work / "config.yaml").write_text(yaml.safe_dump(tiny_config(fake_repo)))
    extra = ["--replace-workflow-config"] if replace else []
    proc = snakemake(work, "--cores", "1", "results/meta/variants.json", "--configfile", str(mine), *extra)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    meta = json.loads((work / "results" / "meta" / "variants.json").read_text())
    assert list(meta["variants"]) == ["only", "only-again"] and meta["variants"]["only"]["sha"] == fake_repo["slow"]


def test_a_timed_out_build_step_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the process groups are listed under the working directory
    log = tmp_path / "log"
    with open(log, "w") as f, pytest.raises(build_env.StepFailed, match="timed out after 1 s"):
        build_env.run(["bash", "-c", "sleep 60 & echo $! > child; wait"], f, cwd=tmp_path, timeout=1)
    child = int((tmp_path / "child").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert list((tmp_path / harness.GROUPS_DIR).glob("*.json")) == []  # listed while it ran, not after


def test_job_times_pairs_each_jobs_start_and_finish_stamps(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import job_times

    log = """[Sat Dec  5 05:11:40 2026]
localrule equivalence:
    input: x
    jobid: 14
    wildcards: sha=a
[Sat Dec  5 05:11:47 2026]
Finished jobid: 14 (Rule: equivalence)
[Sat Dec  5 05:11:47 2026]
localrule train:
    jobid: 13
[Sat Dec  5 05:15:38 2026]
Finished jobid: 13 (Rule: train)
[Sat Dec  5 05:15:38 2026]
localrule equivalence:
    jobid: 15
[Sat Dec  5 05:15:42 2026]
Error in rule equivalence:
"""
    assert job_times.job_times(log.splitlines()) == [("equivalence", "14", 7.0), ("train", "13", 231.0)]
    (tmp_path / "log").write_text(log)
    assert job_times.main([str(tmp_path / "log")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["train", "1", "231", "231"] and out[-1].split() == ["all", "jobs", "2", "238"]
