# One venv per commit, inheriting the host interpreter's packages; env.json records what is in it.
# A commit that fails to install still gets an env.json (status "failed"), so it shows as FAILED
# and its later jobs record why they could not run.


rule env:
    input:
        checkout=f"{RESULTS}/checkouts/{{sha}}.json",
        script=f"{SCRIPTS}/build_env.py",
    output:
        f"{RESULTS}/env/{{sha}}/env.json",
    params:
        python=HOST_PYTHON,
        checkout=checkout_dir,
        venv=f"{RESULTS}/envs/{{sha}}",
        device=DEVICE,
        timeout=config["timeouts"]["env"],
        # Routes are recorded under the jobs' common flags, for the measured layer and dtype.
        vars=as_json(config["common_env"]),
        model=as_json(config["model"]),
        dtype=sizes("decode")["dtype"],
    log:
        f"{RESULTS}/logs/env/{{sha}}.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{params.python:q} {input.script:q} --checkout {params.checkout:q} --env {params.venv:q}"
        " --out {output:q} --log {log:q} --device {params.device} --timeout {params.timeout}"
        " --vars {params.vars:q} --model {params.model:q} --dtype {params.dtype}"
