# Each commit's own suites (pytest markers), with its environment and each reserve configuration.


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
        suites=as_json(config["suites"]),
        vars=lambda wc: as_json(job_vars(wc.reserve)),
        test_dir=config["test_dir"],
        device=DEVICE,
        timeout=config["timeouts"]["tests"],
    log:
        f"{RESULTS}/logs/tests/{{sha}}/{{reserve}}.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{params.python:q} {input.script:q} --env-json {input.env:q} --checkout {params.checkout:q}"
        " --test-dir {params.test_dir:q} --suites {params.suites:q} --vars {params.vars:q}"
        " --device {params.device} --out {output:q} --results {params.results:q} --log {log:q}"
        " --timeout {params.timeout}"
