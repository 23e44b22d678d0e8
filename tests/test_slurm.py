"""The workflow on a real SLURM cluster: ``--profile profiles/slurm`` against a single-node cluster
on localhost (tools/slurm_local.sh: munged, slurmctld and slurmd from Debian's slurm-wlm and
munge), beside the same small config run locally.

Checks that every non-local job went through ``sbatch`` (``sacct -c`` reads them back from the
job-completion log; there is no slurmdbd), that checkout, metadata and the report stayed local,
that the report records each compared job's node and SLURM job, and that the summary is the local
run's: same verdict, same correctness, consistency and equivalence tables (timings aside).
Skips with the reason when the packages are missing or the test does not run as root (slurmd
runs the jobs). ``.ci/run`` installs the packages where it can.
"""

from __future__ import annotations

import importlib.util
import os
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workflow_run import ROOT, snakemake, tiny_config, workdir_with

sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import acceptance  # noqa: E402
import aggregate  # noqa: E402
import config_check  # noqa: E402
import harness  # noqa: E402
import scheduler  # noqa: E402

SCRIPT = ROOT / "tools" / "slurm_local.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "srun")
# The stages that run as SLURM jobs; meta, checkout, aggregate, plots and report are local rules.
CLUSTER_RULES = ("env", "correctness", "equivalence", "consistency", "decode", "train")
SMALL = {"cpus_per_task": 1, "mem_mb": 1000, "runtime": 10}


def skip_reason() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"needs Debian's slurm-wlm and munge ({', '.join(missing)} not found): "
                f"apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "needs root: tools/slurm_local.sh starts slurmd, which runs the jobs"
    if not os.access("/etc/munge/munge.key", os.R_OK):
        return "/etc/munge/munge.key is missing (the munge package makes it on install)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's 0700 tmp dir: munged runs as user munge and must reach its socket.
    d = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    d.chmod(0o755)
    try:
        start = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        env = {**os.environ, "SLURM_CONF": str(d / "etc" / "slurm.conf"), "PATH": f"{d / 'bin'}:{os.environ['PATH']}"}
        yield {"dir": d, "env": env}
    finally:  # the daemons stop whatever happened above
        subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


def small_config(fake_repo: dict) -> dict:
    """A correct commit and a 3 ms/step slower one (a FAIL that no noise can hide), one reserve
    config, one suite, two worker processes in two rounds; jobs small enough for one 2-core node."""
    return tiny_config(
        fake_repo, variants={"base": "base", "slow": "slow"}, reserve_configs={"none": {}},
        suites={"core": "core_invariants"},
        decode={"cpu": {"contexts": [16], "steps": 10, "warmup": 2, "rounds": 2, "processes": 2}},
        train={"cpu": {"steps": 4, "warmup": 1, "rounds": 2, "processes": 2, "batch": 2, "seq_len": 32, "layers": 1,
                       "vocab": 32, "lr": 0.02}},
        resources={"cpu": {**{s: SMALL for s in ("env", "tests", "equivalence", "consistency")},
                           **{s: {**SMALL, "cpus_per_task": 2} for s in ("decode", "train")}}})


def without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


# What does not depend on timings: the judgment of correctness, decode == forward, outputs and
# loss; the decode regression itself (30x slower) outruns any noise.
SAME_STATUS = ("correctness", "consistency", "decode", "loss", "equivalence", "blocks", "reserve_bits")


def comparable(s: dict) -> dict:
    return {"verdict": s["verdict"], "environment": s["environment"], "correctness": s["correctness"],
            "consistency": s["consistency"], "equivalence": without(s["equivalence"]["rows"], "placement"),
            "criteria": {c["id"]: c["status"] for c in s["acceptance"] if c["id"] in SAME_STATUS},
            "decode_calls": sorted((r["variant"], r["reserve"], r.get("context"), r["call"])
                                   for r in s["decode"]["rows"] if r.get("delta_pct") is not None)}


@pytest.mark.workflow
@pytest.mark.slurm
def test_slurm_run_goes_through_sbatch_and_reports_as_a_local_run(cluster, fake_repo, tmp_path):
    cfg = small_config(fake_repo)
    local, remote = workdir_with(tmp_path / "local", cfg), workdir_with(tmp_path / "slurm", cfg)
    # The profile as a user runs it, plus what this cluster needs: squeue for status (no
    # slurmdbd, so plain sacct fails), a short first status check, and no retries of a failure.
    # The local run goes alongside: the SLURM run mostly waits (job start-up, status polls), and
    # what is compared below does not depend on timings.
    runs = {"local": (local, ("--cores", "2", "all"), {}),
            "slurm": (remote, ("--profile", str(ROOT / "profiles" / "slurm"), "all", "--slurm-status-command",
                               "squeue", "--slurm-init-seconds-before-status-checks", "2", "--retries", "0"),
                      {"env": cluster["env"], "prefix": ("timeout", "-s", "INT", "-k", "30", "400"), "timeout": 460})}

    def timed(name):
        work, args, kw = runs[name]
        t0 = time.monotonic()
        return snakemake(work, *args, **kw), time.monotonic() - t0

    with ThreadPoolExecutor(2) as pool:
        (proc_local, local_s), (proc, slurm_s) = pool.map(timed, ("local", "slurm"))
    assert proc_local.returncode == 0, proc_local.stdout[-3000:] + proc_local.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(f"\nsame config, side by side: local run {local_s:.1f} s, SLURM run {slurm_s:.1f} s")

    # Every cluster rule's job was submitted with sbatch and completed; the local rules never were.
    submitted = [line for line in out.splitlines() if "has been submitted with SLURM jobid" in line]
    sacct = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True,
                           env=cluster["env"], timeout=30)
    assert sacct.returncode == 0, sacct.stderr
    states = dict(line.split("|") for line in sacct.stdout.split())
    ids = {line.split("SLURM jobid ")[1].split()[0] for line in submitted}
    assert ids and ids <= set(states) and {states[i] for i in ids} == {"COMPLETED"}, (ids, states)
    logs = remote / "results" / "logs" / "slurm"
    assert sorted(p.name for p in logs.iterdir()) == sorted(f"rule_{r}" for r in CLUSTER_RULES)
    assert len(ids) == 2 * 4 + 2  # env, tests, equivalence, consistency per commit; one decode, one train job
    # Each job script checks its node for the interpreter first (scheduler.node_check).
    script = subprocess.run(["scontrol", "write", "batch_script", min(ids), "-"], capture_output=True, text=True,
                            env=cluster["env"], timeout=30)
    assert "no interpreter" in script.stdout and sys.executable in script.stdout, script.stdout + script.stderr

    summaries = [json.loads((w / "results" / "summary.json").read_text()) for w in (local, remote)]
    assert comparable(summaries[1]) == comparable(summaries[0])
    assert summaries[1]["verdict"] == "FAIL"
    # The report says where every compared job ran: a node and a SLURM job, each a different one.
    placed = summaries[1]["placement"]
    assert {p["job"] for p in placed} == {"decode", "train", "equivalence"}
    assert all(p["node"] and p["slurm_job_id"] in ids for p in placed)
    assert all(p["slurm_job_id"] is None for p in summaries[0]["placement"])
    html = (remote / "results" / "report.html").read_text()
    assert "Where the jobs ran" in html and placed[0]["slurm_job_id"] in html


# ----------------------------------------------------------------------------- without a cluster


def test_gpu_jobs_ask_for_a_gpu_of_the_configured_model_and_cpu_stages_do_not():
    cfg = config_check.checked_config({"cluster": {"partition": "gpu", "gpu_type": "h100"}})
    decode = scheduler.job_resources(cfg, "cuda", "decode")
    assert decode == {"cpus_per_task": 8, "mem_mb": 64000, "runtime": 120, "gpu": 1, "gpu_model": "h100",
                      "slurm_extra": "--exclusive", "slurm_partition": "gpu"}
    env = scheduler.job_resources(cfg, "cuda", "env")
    assert "gpu" not in env and "gpu_model" not in env and env["slurm_partition"] == "gpu"
    assert all("gpu" not in scheduler.job_resources(cfg, "cpu", s) for s in ("env", "tests", "decode", "train"))
    # Unset account and partition are left to the profile or the command line.
    plain = scheduler.job_resources(config_check.checked_config({}), "cuda", "tests")
    assert plain == {"cpus_per_task": 4, "mem_mb": 32000, "runtime": 70, "gpu": 1}


def test_a_resource_key_set_in_the_config_keeps_the_other_defaults():
    cfg = config_check.checked_config({"resources": {"cuda": {"decode": {"mem_mb": 1000}}}})
    assert cfg["resources"]["cuda"]["decode"] == {"cpus_per_task": 8, "mem_mb": 1000, "runtime": 120, "gpu": 1,
                                                  "exclusive": True}
    with pytest.raises(config_check.ConfigError, match="unknown config key resources.cuda.decode.gpus"):
        config_check.checked_config({"resources": {"cuda": {"decode": {"gpus": 2}}}})


def test_a_node_without_the_interpreter_says_so(tmp_path):
    check = scheduler.node_check([sys.executable, str(tmp_path / "missing" / "python"), sys.executable])
    assert check.count(f"test -x {sys.executable}") == 1  # each interpreter checked once
    proc = subprocess.run(["bash", "-c", check], capture_output=True, text=True)
    assert "$" not in check and "`" not in check  # it travels inside sbatch --wrap="..."
    assert proc.returncode == 1
    assert f"no interpreter {tmp_path / 'missing' / 'python'} on this node: jobs run the Python" in proc.stderr
    assert subprocess.run(["bash", "-c", scheduler.node_check([sys.executable])]).returncode == 0


def test_a_cuda_job_on_a_node_without_a_gpu_stops_with_a_message(monkeypatch):
    monkeypatch.setattr(harness, "gpu_model", lambda: None)
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    with pytest.raises(SystemExit, match=r"node node7: no GPU visible to this job .*resources.cuda.<stage>.gpu"):
        harness.job_start("cuda")


def test_placement_names_the_node_and_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    assert harness.placement("cpu")["slurm_job_id"] is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-a3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert harness.visible_gpu() == "3"  # the job's GPU, not the node's first
    assert harness.placement("cuda", gpu="NVIDIA H100") == {"node": "gpu-a3", "slurm_job_id": "42", "gpu": "NVIDIA H100"}


def test_cuda_is_taken_as_given_at_start_up_and_checked_where_jobs_run(monkeypatch):
    # A cluster's login node has no GPU: start-up takes `device: cuda` as given ...
    monkeypatch.setattr(harness, "detect_device", lambda setting, python: "cpu" if setting == "auto" else setting)
    assert harness.check_host(sys.executable, "cuda") == "cuda"
    # ... and a run whose jobs run here checks it (onstart), naming the key.
    with pytest.raises(ValueError, match="config key device = 'cuda', but .* sees no CUDA device here"):
        harness.check_gpu_here(sys.executable)


def test_outputs_of_different_gpu_models_are_not_compared():
    def rec(gpu, node):
        return {"status": "ok", "placement": {"node": node, "gpu": gpu, "slurm_job_id": "1"}}

    assert aggregate.gpu_mismatch(rec("NVIDIA H100", "a"), rec("NVIDIA H100", "b"), "the baseline") is None
    assert aggregate.gpu_mismatch(rec(None, "a"), rec(None, "b"), "the baseline") is None
    why = aggregate.gpu_mismatch(rec("NVIDIA H100", "a"), rec("NVIDIA A100", "b"), "the baseline")
    assert why.startswith("not compared with the baseline: computed on a NVIDIA A100 (node b), the baseline on a "
                          "NVIDIA H100 (node a)") and "cluster.gpu_type" in why
    s = {"equivalence": {"rows": [{"variant": "head", "reserve": "none", "refused": [why]}]}}
    line = acceptance.one_gpu_model(s, {})
    assert line["status"] == acceptance.INCONCLUSIVE and line["reasons"] == [f"equivalence of head under none: {why}"]
