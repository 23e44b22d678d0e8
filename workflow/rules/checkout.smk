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
    conda:
        "../../envs/workflow.yaml"
    run:
        harness.write_json(output[0], json.loads(params.meta))


rule checkout:
    output:
        f"{RESULTS}/checkouts/{{sha}}.json",
    params:
        repo=REPO,
        dest=f"{RESULTS}/checkouts/{{sha}}",
    log:
        f"{RESULTS}/logs/checkout/{{sha}}.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{HOST_PYTHON:q} {SCRIPTS:q}/checkout.py --repo {params.repo:q} --sha {wildcards.sha}"
        " --dest {params.dest:q} --out {output:q} > {log:q} 2>&1"
