# The variants' metadata, and each commit's tree extracted with `git archive` (the user's working
# tree is never touched). Both are quick and need no GPU: local rules, never a cluster job.


localrules:
    meta,
    checkout,


# A shell job, not `run:`: its values come from this process (refs resolved once, the config as
# this process read it), never from a second Snakemake process that parses the config again.
rule meta:
    output:
        f"{RESULTS}/meta/variants.json",
    params:
        python=HOST_PYTHON,
        meta=as_json(META),
        write=f"import sys; sys.path.insert(0, {SCRIPTS!r}); import json, harness; "
        "harness.write_json(sys.argv[1], json.loads(sys.argv[2]))",
    log:
        f"{RESULTS}/logs/meta.log",
    shell:
        "{params.python:q} -c {params.write:q} {output:q} {params.meta:q} > {log:q} 2>&1"


rule checkout:
    input:
        script=f"{SCRIPTS}/checkout.py",
    output:
        f"{RESULTS}/checkouts/{{sha}}.json",
    params:
        python=HOST_PYTHON,
        repo=lambda wildcards: REPO,  # a function: a path, but not a file of this workflow
        dest=f"{RESULTS}/checkouts/{{sha}}",
    log:
        f"{RESULTS}/logs/checkout/{{sha}}.log",
    shell:
        "{params.python:q} {input.script:q} --repo {params.repo:q} --sha {wildcards.sha}"
        " --dest {params.dest:q} --out {output:q} > {log:q} 2>&1"
