# NSA validation workflow: commits x reserve configurations -> tests, benchmarks, deltas, report.
#
#     snakemake --cores 1 all      # then open results/report.html
#     snakemake --cores 1 gate     # exit status for CI: non-zero when the verdict is FAIL
#
# Stages live in workflow/rules/ (one each), the Python they run in workflow/scripts/.
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, f"{workflow.basedir}/workflow/scripts")
import config_check  # noqa: E402


configfile: "config.yaml"


# Validate before any job: a bad key or value stops the run here, naming the key.
try:
    _checked = config_check.checked_config(config)
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
include: "workflow/rules/report.smk"
include: "workflow/rules/gate.smk"
