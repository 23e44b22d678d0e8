# NSA validation workflow: commits x reserve configurations -> tests, benchmarks, deltas, report.
#
#     snakemake --cores 1 all      # then open results/report.html
#     snakemake --cores 1 gate     # exit status for CI: non-zero unless the verdict is PASS
#     snakemake --profile profiles/slurm all   # on a SLURM cluster (README, "On a cluster")
#
# Stages live in workflow/rules/ (one each), the Python they run in workflow/scripts/.
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, f"{workflow.basedir}/workflow/scripts")
import config_check  # noqa: E402
import retry  # noqa: E402


# Snakemake's own message for malformed YAML names neither the file nor the line: check first.
if os.path.exists("config.yaml"):
    try:
        config_check.load_yaml("config.yaml")
    except config_check.ConfigError as e:
        raise WorkflowError(str(e)) from None


# Values given with --configfile / --config extend this file (--replace-workflow-config: replace it),
# except the mappings in config_check.REPLACED_KEYS (variants, suites, reserve_configs, common_env):
# a --configfile that defines one replaces it whole.
configfile: "config.yaml"


# Validate before any job: a bad key or value stops the run here, naming the key.
try:
    _given = config_check.replace_mappings(
        config, workflow.config_settings.configfiles, workflow.config_settings.config
    )
    _checked = config_check.checked_config(_given)
except config_check.ConfigError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_checked)


include: "workflow/rules/common.smk"
include: "workflow/rules/checkout.smk"
include: "workflow/rules/env.smk"
include: "workflow/rules/correctness.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/equivalence.smk"
include: "workflow/rules/consistency.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/gate.smk"


# The default target lives here, not in an included file: Snakemake ignores `default_target`
# in included files (snakemake/snakemake#2773).
localrules:
    all,


rule all:
    input:
        f"{RESULTS}/report.html",
        f"{RESULTS}/report.md",
    default_target: True


# Failed jobs of the harness write records, which a plain rerun keeps: say which, and how to rerun them.
onsuccess:
    hint = retry.rerun_hint([f for f in rules.aggregate.input if f.endswith(".json")])
    if hint:
        logger.warning(hint)


onerror:
    logger.error(retry.ON_ERROR)
    hint = retry.rerun_hint([f for f in rules.aggregate.input if f.endswith(".json")])
    if hint:
        logger.warning(hint)
