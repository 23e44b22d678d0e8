# One venv per commit, inheriting the host interpreter's packages; env.json records what is in it.
# It depends only on the commit and the implementation's install settings (adapter, install mode,
# extra requirements): changing the model, sizes or flags never rebuilds it. A commit that fails to
# install still gets an env.json (status "failed"), so it shows as FAILED and its later jobs say why.


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
        adapter=IMPL["adapter_file"],  # a param: editing the adapter does not rebuild environments
        install=IMPL["install"],
        extra=as_json(IMPL["extra_requirements"]),
    resources:
        **job_resources("env"),
    log:
        f"{RESULTS}/logs/env/{{sha}}.log",
    shell:
        "{params.python:q} {input.script:q} --checkout {params.checkout:q} --env {params.venv:q}"
        " --out {output:q} --log {log:q} --device {params.device} --timeout {params.timeout}"
        " --adapter {params.adapter:q} --install {params.install} --extra {params.extra:q} 2>> {log:q}"
