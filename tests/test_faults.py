"""Fault injection on the workflow, on the fake repository (tests/fixtures/fake_nsa).

One disturbed run of a small configuration (the tiny one cut to two commits and one reserve config): Ctrl-C (SIGINT to Snakemake's process group, as a
terminal sends it) while a benchmark's workers run, a rerun killed with ``kill -9`` of Snakemake
alone while a benchmark's workers run again, then ``--unlock`` and a rerun that finishes. After each
fault no process of the run is left, and the finished results equal those of the undisturbed run
(``e2e``, conftest.py) for the same commits except for timings. Then, in that run's directory: a full disk (ENOSPC
injected into one coordinator's write) reaches the job's log and the same command retries the job;
a failed report rerun keeps the previous report; process groups of an earlier run that still
run are reported at start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_run import ROOT, snakemake, snakemake_cmd, tiny_config, workdir_with

sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import harness  # noqa: E402

pytestmark = pytest.mark.workflow

# Imported by every Python process that has it on PYTHONPATH; only the scripts named in
# FAULT_ENOSPC_SCRIPTS get a disk that is full when they write their output (fsync fails).
SITECUSTOMIZE = """
import errno, os, sys
if os.path.basename(sys.argv[0]) in os.environ.get("FAULT_ENOSPC_SCRIPTS", "").split(","):
    def _full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    os.fsync = _full
"""


def processes_in(work: Path) -> list[str]:
    """The processes working in ``work`` (every job and worker of the run has its cwd there): pid and command."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.readlink(d / "cwd").startswith(str(work)):
                out.append(f"{d.name} {(d / 'cmdline').read_bytes().replace(bytes(1), b' ').decode()[:160]}")
        except OSError:
            pass
    return out


def wait_for_workers(work: Path, script: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until a process group running ``script`` is listed (harness.GROUPS_DIR) in ``work``."""
    deadline = time.monotonic() + timeout
    groups = work / harness.GROUPS_DIR
    while time.monotonic() < deadline and proc.poll() is None:
        for rec in groups.glob("*.json"):
            try:
                if script in json.loads(rec.read_text())["cmd"]:
                    return
            except (OSError, ValueError):
                pass
        time.sleep(0.3)
    raise AssertionError(f"no {script} started (snakemake exit {proc.poll()})")


def wait_until_none_left(work: Path, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while processes_in(work) and time.monotonic() < deadline:
        time.sleep(0.3)
    return processes_in(work)


def start(work: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(snakemake_cmd(work, "--cores", "2", "all", *extra), cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


SMALL_VARIANTS = {"base": "base", "slow": "slow"}


def small_config(fake_repo: dict) -> dict:
    """The tiny configuration (conftest's e2e run) cut to two commits and one reserve config: its
    records are then those of the e2e run for the same commits, and the suite stays short."""
    return tiny_config(fake_repo, variants=SMALL_VARIANTS, reserve_configs={"none": {}})


def comparable(work: Path, sha_names: dict) -> dict:
    """Everything of a finished run that is not a timing, for the small config's commits and reserve
    config: records per commit, benchmark run statuses, equivalence rows, the verdict."""
    res = work / "results"

    def read(rel):
        return json.loads((res / rel).read_text())

    out = {}
    for sha, name in sha_names.items():
        env = read(f"env/{sha}/env.json")
        out[f"env {name}"] = (env["status"], env.get("error"))
        tests = read(f"tests/{sha}/none/summary.json")
        out[f"tests {name}"] = {k: {c: s.get(c) for c in ("passed", "failed", "skipped", "status")}
                                for k, s in (tests.get("suites") or {}).items()} or tests["status"]
        cons = read(f"consistency/{sha}/none.json")
        out[f"consistency {name}"] = (cons.get("passed"), cons.get("max_abs_err"), cons.get("error"))
        equiv = read(f"equiv/{sha}/none.json")
        out[f"equiv {name}"] = (equiv["status"], equiv.get("shapes"))
    keep = {*SMALL_VARIANTS, "reference"}
    for stage in ("decode", "train"):
        out[stage] = sorted((r["variant"], str(r["reserve"]), r["status"], len(r["processes"]))
                            for r in read(f"{stage}/{stage}.json")["runs"]
                            if r["variant"] in keep and r["reserve"] in ("none", None))
    summary = read("summary.json")
    out["verdict"] = summary["verdict"]
    out["equivalence rows"] = [r for r in summary["equivalence"]["rows"]
                               if r.get("variant") in keep and r.get("reserve") == "none"]
    return out


@pytest.fixture(scope="module")
def disturbed(fake_repo, tmp_path_factory):
    work = workdir_with(tmp_path_factory.mktemp("disturbed"), small_config(fake_repo))
    faults = {}
    # Ctrl-C while benchmark workers (decode or train) run: Snakemake and its jobs get SIGINT, the
    # workers (their own process groups) do not.
    proc = start(work)
    wait_for_workers(work, "_worker.py", proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    faults["sigint"] = {"left": wait_until_none_left(work), "rc": proc.returncode}
    # kill -9 of Snakemake alone while benchmark workers run: nobody tells the jobs. The training job
    # is forced, so workers start whatever the Ctrl-C left to do (it may have hit the last benchmark
    # as it finished).
    proc = start(work, "--forcerun", "results/train/train.json")
    wait_for_workers(work, "_worker.py", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    faults["sigkill"] = {"left": wait_until_none_left(work), "groups": list((work / harness.GROUPS_DIR).glob("*"))}
    # Snakemake's lock outlives a kill -9; its message says to --unlock.
    assert snakemake(work, "--unlock").returncode == 0
    final = snakemake(work, "--cores", "2", "all", timeout=600)
    return {"work": work, "faults": faults, "final": final}


def test_ctrl_c_leaves_no_process_behind(disturbed):
    assert disturbed["faults"]["sigint"]["rc"] != 0
    assert disturbed["faults"]["sigint"]["left"] == []


def test_kill_9_of_snakemake_leaves_no_process_behind(disturbed):
    assert disturbed["faults"]["sigkill"]["left"] == []
    assert disturbed["faults"]["sigkill"]["groups"] == []  # every group unlisted as it was stopped


def test_rerun_after_faults_equals_an_undisturbed_run(disturbed, e2e, fake_repo):
    final = disturbed["final"]
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    names = {fake_repo[t]: t for t in SMALL_VARIANTS}
    assert comparable(disturbed["work"], names) == comparable(e2e["work"], names)


def _fault_env(tmp_path: Path, scripts: str) -> dict:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "FAULT_ENOSPC_SCRIPTS": scripts}


def test_a_full_disk_reaches_the_log_and_the_same_command_retries(disturbed, fake_repo, tmp_path):
    work, sha = disturbed["work"], fake_repo["base"]
    target = f"results/consistency/{sha}/none.json"
    proc = snakemake(work, "--cores", "2", "all", "--forcerun", target, env=_fault_env(tmp_path, "consistency.py"))
    assert proc.returncode != 0 and not (work / target).exists()
    assert "No space left on device" in (work / f"results/logs/consistency/{sha}/none.log").read_text()
    assert "rerun the same command to run it again" in proc.stdout + proc.stderr
    again = snakemake(work, "--cores", "2", "all", "--forcerun", target)  # the same command, disk freed
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((work / target).read_text())["passed"] is True


def test_a_failed_report_rerun_keeps_the_previous_report(disturbed, tmp_path):
    work = disturbed["work"]
    before = (work / "results" / "report.html").read_text()
    proc = snakemake(work, "--cores", "1", "all", "--forcerun", "results/report.html",
                     env=_fault_env(tmp_path, "report.py"))
    assert proc.returncode != 0
    assert "No space left on device" in (work / "results" / "logs" / "report.log").read_text()
    assert (work / "results" / "report.html").read_text() == before


def test_a_rerun_reports_process_groups_it_did_not_start(disturbed):
    work = disturbed["work"]
    stray = harness.start_group(["sleep", "60"], groups_dir=work / harness.GROUPS_DIR)
    try:
        proc = snakemake(work, "-n", "all")
        assert f"process group {stray.pid} of an earlier run is still running" in proc.stdout + proc.stderr
        assert f"kill -- -{stray.pid}" in proc.stdout + proc.stderr
    finally:
        harness.end_group(stray)
    assert "still running" not in (snakemake(work, "-n", "all").stderr)


def test_a_cuda_oom_message_names_the_other_processes_once():
    others = " ".join(f"Process {100 + n} has {size} memory in use." for n, size in
                      enumerate(["1.01 GiB", "4.72 GiB", "736.00 MiB"]))
    error = (f"setup failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total "
             f"capacity of 79.18 GiB of which 5.44 MiB is free. {others} Including non-PyTorch memory, this process "
             f"has 736.00 MiB memory in use. Of the allocated memory 38.07 MiB is allocated by PyTorch.")
    short = harness.failed(error)["error"]
    assert "Process 10" not in short and "3 other processes hold 6.45 GiB." in short  # 1.01 + 4.72 + 0.72
    assert short.startswith("setup failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB.")
    assert short.endswith("this process has 736.00 MiB memory in use. Of the allocated memory 38.07 MiB is "
                          "allocated by PyTorch.")
    assert harness.failed("worker ended (exit 1)")["error"] == "worker ended (exit 1)"
