# Raw results -> summary.json and tables (aggregate.py) -> plots -> report.html / report.md.


localrules:
    all,


rule all:
    input:
        f"{RESULTS}/report.html",
        f"{RESULTS}/report.md",
    default_target: True


rule aggregate:
    input:
        meta=f"{RESULTS}/meta/variants.json",
        envs=[env_json(s) for s in SHAS],
        tests=per_sha_reserve(RESULTS + "/tests/{sha}/{reserve}/summary.json"),
        decode=f"{RESULTS}/decode/decode.json",
        train=per_sha_reserve(RESULTS + "/train/{sha}/{reserve}.json"),
        equiv=per_sha_reserve(RESULTS + "/equiv/{sha}/{reserve}.json"),
        script=f"{SCRIPTS}/aggregate.py",
    output:
        f"{RESULTS}/summary.json",
    log:
        f"{RESULTS}/logs/aggregate.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{HOST_PYTHON:q} {input.script:q} --results {RESULTS} --out {output:q} > {log:q} 2>&1"


rule plots:
    input:
        summary=f"{RESULTS}/summary.json",
        script=f"{SCRIPTS}/plots.py",
    output:
        directory(f"{RESULTS}/plots"),
    log:
        f"{RESULTS}/logs/plots.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{HOST_PYTHON:q} {input.script:q} --summary {input.summary:q} --out {output:q} > {log:q} 2>&1"


rule report:
    input:
        summary=f"{RESULTS}/summary.json",
        plots=f"{RESULTS}/plots",
        script=f"{SCRIPTS}/report.py",
    output:
        html=f"{RESULTS}/report.html",
        md=f"{RESULTS}/report.md",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{HOST_PYTHON:q} {input.script:q} --summary {input.summary:q} --plots {input.plots:q}"
        " --out-html {output.html:q} --out-md {output.md:q} > {log:q} 2>&1"
