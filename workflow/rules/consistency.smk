# Decode == forward within each commit x reserve configuration: prefill a prefix, decode the rest,
# compare every position with forward of the whole sequence (tolerance per dtype).


rule consistency:
    input:
        env=env_json("{sha}"),
        script=f"{SCRIPTS}/consistency.py",
        adapter=IMPL["adapter_file"],  # an edited adapter reruns the jobs it drives
    output:
        f"{RESULTS}/consistency/{{sha}}/{{reserve}}.json",
    params:
        python=HOST_PYTHON,
        sizes=as_json(config["consistency"][DEVICE]),
        tolerance=as_json(config["consistency"]["tolerance"]),
        model=as_json(config["model"]),
        vars=lambda wc: as_json(job_vars(wc.reserve)),
        device=DEVICE,
        seed=config["seed"],
        timeout=config["timeouts"]["consistency"],
    resources:
        **job_resources("consistency"),
    log:
        f"{RESULTS}/logs/consistency/{{sha}}/{{reserve}}.log",
    shell:
        "{params.python:q} {input.script:q} --env-json {input.env:q} --sizes {params.sizes:q}"
        " --tolerance {params.tolerance:q} --model {params.model:q} --adapter {input.adapter:q}"
        " --vars {params.vars:q} --device {params.device} --seed {params.seed} --timeout {params.timeout}"
        " --out {output:q} --log {log:q} 2>> {log:q}"
