# TinyLM training throughput and loss per commit x reserve configuration, with the dense twin.
# Takes every core, so no other job competes with the timings.


rule train:
    input:
        env=env_json("{sha}"),
        script=f"{SCRIPTS}/bench_train.py",
    output:
        f"{RESULTS}/train/{{sha}}/{{reserve}}.json",
    params:
        python=HOST_PYTHON,
        sizes=as_json(sizes("train")),
        model=as_json(config["model"]),
        vars=lambda wc: as_json(job_vars(wc.reserve)),
        device=DEVICE,
        seed=config["seed"],
        denormal="" if config["cpu_flush_denormal"] else "--no-flush-denormal",
        timeout=config["timeouts"]["train"],
    threads: workflow.cores
    log:
        f"{RESULTS}/logs/train/{{sha}}/{{reserve}}.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{params.python:q} {input.script:q} --env-json {input.env:q} --sizes {params.sizes:q}"
        " --model {params.model:q} --vars {params.vars:q} --device {params.device} --seed {params.seed}"
        " {params.denormal} --timeout {params.timeout} --out {output:q} --log {log:q}"
