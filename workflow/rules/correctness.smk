# Each commit's own suites (pytest arguments from its root), with its environment and each reserve
# configuration; a suite that collects fewer than its min_tests is "not run", never "ok".


rule correctness:
    input:
        env=env_json("{sha}"),
        checkout=f"{RESULTS}/checkouts/{{sha}}.json",
        script=f"{SCRIPTS}/run_suites.py",
    output:
        f"{RESULTS}/tests/{{sha}}/{{reserve}}/summary.json",
    params:
        python=HOST_PYTHON,
        checkout=checkout_dir,
        results=lambda wildcards, output: Path(output[0]).parents[3],
        suites=as_json(SUITES),
        vars=lambda wc: as_json(job_vars(wc.reserve)),
        device=DEVICE,
        timeout=config["timeouts"]["tests"],
    resources:
        **job_resources("tests"),
    log:
        f"{RESULTS}/logs/tests/{{sha}}/{{reserve}}.log",
    shell:
        "{params.python:q} {input.script:q} --env-json {input.env:q} --checkout {params.checkout:q}"
        " --suites {params.suites:q} --vars {params.vars:q} --device {params.device} --out {output:q}"
        " --results {params.results:q} --log {log:q} --timeout {params.timeout} 2>> {log:q}"
