# `snakemake --cores 1 gate`: the verdict as an exit status for CI (non-zero on FAIL; on
# INCOMPLETE too unless gate.allow_incomplete). No output file, so it runs every time it is asked.


localrules:
    gate,


rule gate:
    input:
        summary=f"{RESULTS}/summary.json",
        script=f"{SCRIPTS}/gate.py",
    params:
        python=HOST_PYTHON,
        allow="--allow-incomplete" if config["gate"]["allow_incomplete"] else "",
    log:
        f"{RESULTS}/logs/gate.log",
    shell:
        "{params.python:q} {input.script:q} --summary {input.summary:q} {params.allow} 2>&1 | tee {log:q}"
