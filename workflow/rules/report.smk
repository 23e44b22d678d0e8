# Raw results -> summary.json and tables (aggregate.py) -> plots -> report.html / report.md.
# Quick and CPU-only: local rules, never a cluster job.


localrules:
    aggregate,
    plots,
    report,


rule aggregate:
    input:
        meta=f"{RESULTS}/meta/variants.json",
        envs=[env_json(s) for s in SHAS],
        tests=per_sha_reserve(f"{RESULTS}/tests/{{sha}}/{{reserve}}/summary.json"),
        decode=f"{RESULTS}/decode/decode.json",
        train=f"{RESULTS}/train/train.json",
        equiv=per_sha_reserve(f"{RESULTS}/equiv/{{sha}}/{{reserve}}.json"),
        consistency=per_sha_reserve(f"{RESULTS}/consistency/{{sha}}/{{reserve}}.json"),
        script=f"{SCRIPTS}/aggregate.py",
        modules=with_modules("aggregate"),
    output:
        f"{RESULTS}/summary.json",
    params:
        python=HOST_PYTHON,
        results=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "{params.python:q} {input.script:q} --results {params.results:q} --out {output:q} > {log:q} 2>&1"


rule plots:
    input:
        summary=f"{RESULTS}/summary.json",
        script=f"{SCRIPTS}/plots.py",
        modules=with_modules("plots"),
    output:
        directory(f"{RESULTS}/plots"),
    params:
        python=HOST_PYTHON,
    log:
        f"{RESULTS}/logs/plots.log",
    shell:
        "{params.python:q} {input.script:q} --summary {input.summary:q} --out {output:q} > {log:q} 2>&1"


rule report:
    input:
        summary=f"{RESULTS}/summary.json",
        plots=f"{RESULTS}/plots",
        script=f"{SCRIPTS}/report.py",
        modules=with_modules("report"),
    output:
        # update(): Snakemake keeps a copy and restores it when the job fails (a full disk, a bug), so a
        # failed rerun never deletes the report that was there.
        html=update(f"{RESULTS}/report.html"),
        md=update(f"{RESULTS}/report.md"),
    params:
        python=HOST_PYTHON,
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "{params.python:q} {input.script:q} --summary {input.summary:q} --plots {input.plots:q}"
        " --out-html {output.html:q} --out-md {output.md:q} > {log:q} 2>&1"
