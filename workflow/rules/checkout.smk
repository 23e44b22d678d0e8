# The variants' metadata, and each commit's tree extracted with `git archive` (the user's working
# tree is never touched).


localrules:
    meta,


rule meta:
    output:
        f"{RESULTS}/meta/variants.json",
    params:
        meta=as_json(META),
    log:
        f"{RESULTS}/logs/meta.log",
    run:
        harness.write_json(output[0], json.loads(params.meta))


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
