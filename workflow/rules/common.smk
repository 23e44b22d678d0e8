# Start-up: which commits, which configurations, which device; and the helpers the rules share.
import ast
import json
import os
import re
import sys
from pathlib import Path

from snakemake.logging import logger

import harness
import markers
import resolve_refs
import scheduler


SCRIPTS = f"{workflow.basedir}/workflow/scripts"
RESULTS = "results"
# The interpreter whose packages (torch, pytest, flash-attn) every commit's environment inherits.
HOST_PYTHON = config["python"] or sys.executable


# `device: cuda` is taken as given here: a cluster's login node has no GPU. Whether jobs run here
# is known only once the run starts (onstart below); a job on a node checks its own GPU
# (harness.job_start).
try:
    DEVICE = harness.check_host(HOST_PYTHON, config["device"])
except ValueError as e:
    raise WorkflowError(f"node {harness.node_name()}: {e}" if workflow.remote_exec else str(e)) from None


onstart:
    try:
        # `auto` found the GPU above already (importing torch takes seconds on a GPU host).
        if workflow.local_exec and config["device"] == "cuda":
            harness.check_gpu_here(HOST_PYTHON)
        if workflow.non_local_exec and config["device"] == "auto":
            raise ValueError("config key device = 'auto' with jobs on a cluster: this host cannot tell what the "
                             "nodes have; accepted: cuda or cpu")
    except ValueError as e:
        raise WorkflowError(str(e)) from None
    if workflow.non_local_exec:
        # Snakemake's --precommand runs first in every cluster job: a node without the interpreter
        # (which starts the job's own Snakemake) says so instead of "No such file or directory".
        check = scheduler.node_check([sys.executable, HOST_PYTHON])
        given = workflow.remote_execution_settings.precommand
        workflow.remote_execution_settings.precommand = f"{given} && {check}" if given else check


# The implementation: its adapter file (loaded by every worker), install mode and capabilities.
IMPL = config_check.implementation_problems(config, Path.cwd())[1]
SUITES = config_check.normalized_suites(config["suites"], config["test_dir"])

# Refs -> full SHAs. Every output below is keyed by SHA: a branch that moved reruns, one that
# did not is left alone.
REPO_SPEC = config["repo"] or workflow.basedir
try:
    REPO = str(resolve_refs.local_repo(REPO_SPEC, Path(RESULTS) / "repos"))
    VARIANTS = resolve_refs.resolve_variants(REPO, config["variants"], REPO_SPEC if resolve_refs.is_url(REPO_SPEC) else None)
except resolve_refs.RefError as e:
    raise WorkflowError(str(e)) from None
SHAS = sorted({v["sha"] for v in VARIANTS.values()})
# Jobs stop themselves when this process dies, even by kill -9 (harness.exit_on_sigterm).
os.environ[harness.MAIN_PID_VAR] = str(os.getpid())

# Workers of an earlier run that were left running would compete with this run's: name them.
for _line in harness.leftover_groups():
    logger.warning(f"Warning: {_line}")

# Said at start-up and in the report: a user who edited files expects them to be measured.
WARNINGS = [w for w in [resolve_refs.uncommitted_warning(REPO)] if w]
for _w in WARNINGS:
    logger.warning(f"Warning: {_w}")
# A suite's marker that no commit knows (a typo) would select nothing: stop here, not as a FAIL.
_marker_problems = markers.marker_problems(REPO, SHAS, SUITES)
if _marker_problems:
    raise WorkflowError("invalid configuration:\n  - " + "\n  - ".join(_marker_problems))
RESERVES = list(config["reserve_configs"])


wildcard_constraints:
    sha="[0-9a-f]{40}",
    reserve="|".join(re.escape(r) for r in RESERVES),


def job_vars(reserve):
    """Environment variables of a job running a commit's code under one reserve configuration."""
    return {**config["common_env"], **config["reserve_configs"][reserve]}


def sizes(stage):
    """This device's sizes for a stage (decode rounds overridden by `repeats` when set)."""
    out = dict(config[stage][DEVICE])
    if stage == "decode" and config["repeats"]:
        out["rounds"] = config["repeats"]
    return out


def job_resources(stage):
    return scheduler.job_resources(config, DEVICE, stage)


def timing_threads(stage):
    """A timing job takes every core it has, so nothing else runs beside it: all of --cores
    locally, its whole allocation (cpus_per_task) on a cluster. A function of the job: whether
    jobs run here is known only after parsing."""

    def threads(wildcards):
        if workflow.non_local_exec or workflow.remote_exec:
            return config["resources"][DEVICE][stage]["cpus_per_task"]
        return workflow.cores

    return threads


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def env_json(sha):
    return f"{RESULTS}/env/{sha}/env.json"


def checkout_dir(wildcards, input):
    """The extracted tree beside its marker file (results/checkouts/<sha>.json -> <sha>/)."""
    return input.checkout[: -len(".json")]


def bench_runs():
    """Every (variant, reserve) run of the interleaved benchmarks; A/A twins run separately."""
    return [{"variant": name, "sha": v["sha"], "reserve": r, "env_json": env_json(v["sha"]),
             "vars": job_vars(r)} for name, v in VARIANTS.items() for r in RESERVES]


def with_modules(script):
    """``script`` of workflow/scripts and every module there it imports, transitively: inputs of the
    local rules that judge and report, so a workflow upgrade that changes the judge redoes the verdict
    (only the script itself would leave a report made by the old judge). Hand-written: Snakemake's
    code rerun trigger follows a rule's own code, not the modules a shell command's script imports."""
    out, todo = [], [script]
    while todo:
        name = todo.pop()
        path = Path(SCRIPTS) / f"{name}.py"
        if str(path) in out or not path.exists():
            continue
        out.append(str(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module)
    return out


def per_sha_reserve(pattern):
    return [pattern.format(sha=s, reserve=r) for s in SHAS for r in RESERVES]


META = {
    "repo": str(REPO_SPEC),
    "baseline": config["baseline"],
    "device": DEVICE,
    "variants": VARIANTS,
    "reserve_configs": config["reserve_configs"],
    "common_env": config["common_env"],
    "suites": SUITES,
    "acceptance": config["acceptance"],
    "implementation": {k: IMPL[k] for k in ("adapter", "name", "install", "extra_requirements")},
    "capabilities": IMPL["capabilities"],
    "processes": {"decode": sizes("decode")["processes"], "train": sizes("train")["processes"]},
    "threads": config["threads"],
    "reserve_order": RESERVES,
    "warnings": WARNINGS,
}
