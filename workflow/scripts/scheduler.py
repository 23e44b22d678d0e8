"""What the workflow's jobs ask a cluster scheduler for, and the check each cluster job runs first.

Pure functions of the checked configuration; workflow/rules/common.smk hands their results to
Snakemake (rule resources, --precommand), and snakemake-executor-plugin-slurm turns the resources
into sbatch options (cpus_per_task -> --cpus-per-task, mem_mb -> --mem, runtime -> --time,
gpu / gpu_model -> --gpus, slurm_partition -> -p, slurm_account -> -A, slurm_extra verbatim).
"""

from __future__ import annotations

import shlex


def job_resources(cfg: dict, device: str, stage: str) -> dict:
    """Resources of one stage's job: config ``resources.<device>.<stage>``, sent where config key
    ``cluster`` says. Unset partition or account are left to the profile, the command line
    (--default-resources slurm_partition=...) or the cluster's defaults."""
    want = cfg["resources"][device][stage]
    out = {k: want[k] for k in ("cpus_per_task", "mem_mb", "runtime")}
    if want["gpu"]:
        out["gpu"] = want["gpu"]
        if cfg["cluster"]["gpu_type"]:  # every compared GPU result from one model
            out["gpu_model"] = cfg["cluster"]["gpu_type"]
    if want.get("exclusive"):  # a timing job: nothing else on its node
        out["slurm_extra"] = "--exclusive"
    for key in ("partition", "account"):
        if cfg["cluster"][key]:
            out[f"slurm_{key}"] = cfg["cluster"][key]
    return out


def node_check(interpreters: list[str]) -> str:
    """A shell command that stops a job, saying why, on a node that lacks one of ``interpreters``
    (the one that starts the job's own Snakemake, and config key ``python``). No ``$`` or
    backquote: the SLURM executor passes it inside a double-quoted ``sbatch --wrap``, where the
    submitting shell would expand them."""
    checks = []
    for path in dict.fromkeys(interpreters):
        why = (f"no interpreter {path} on this node: jobs run the Python that runs Snakemake (and config key "
               f"python); keep it, like results/, on a filesystem every node mounts at the same path. Node:")
        checks.append(f"{{ test -x {shlex.quote(path)} || {{ echo {shlex.quote(why)} >&2; hostname >&2; exit 1; }}; }}")
    return " && ".join(checks)
