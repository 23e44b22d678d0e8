# One venv per commit, inheriting the host interpreter's packages; env.json records what is in it.
# A commit that fails to install still gets an env.json (status "failed"), so it shows as FAILED
# and its later jobs record why they could not run.


rule env:
    input:
        f"{RESULTS}/checkouts/{{sha}}.json",
    output:
        f"{RESULTS}/env/{{sha}}/env.json",
    params:
        checkout=f"{RESULTS}/checkouts/{{sha}}",
        venv=f"{RESULTS}/envs/{{sha}}",
        device=DEVICE,
        timeout=config["timeouts"]["env"],
    log:
        f"{RESULTS}/logs/env/{{sha}}.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{HOST_PYTHON:q} {SCRIPTS:q}/build_env.py --checkout {params.checkout:q} --env {params.venv:q}"
        " --out {output:q} --log {log:q} --device {params.device} --timeout {params.timeout}"
