# Identical weights and inputs through every commit x reserve configuration; outputs (and selected
# blocks where the adapter exposes them) saved (.pt) for the report to compare across commits.


rule equivalence:
    input:
        env=env_json("{sha}"),
        script=f"{SCRIPTS}/equivalence.py",
        adapter=IMPL["adapter_file"],  # an edited adapter reruns the jobs it drives
    output:
        f"{RESULTS}/equiv/{{sha}}/{{reserve}}.json",
    params:
        python=HOST_PYTHON,
        sizes=as_json(config["equivalence"][DEVICE]),
        model=as_json(config["model"]),
        vars=lambda wc: as_json(job_vars(wc.reserve)),
        device=DEVICE,
        seed=config["seed"],
        timeout=config["timeouts"]["equivalence"],
    resources:
        **job_resources("equivalence"),
    log:
        f"{RESULTS}/logs/equiv/{{sha}}/{{reserve}}.log",
    shell:
        "{params.python:q} {input.script:q} --env-json {input.env:q} --sizes {params.sizes:q}"
        " --model {params.model:q} --adapter {input.adapter:q} --vars {params.vars:q} --device {params.device}"
        " --seed {params.seed} --timeout {params.timeout} --out {output:q} --log {log:q} 2>> {log:q}"
