# One job for every (variant, reserve) run: interleaved rounds, so drift hits every run alike.
# It takes every core, so no other job competes with the timings.


rule decode:
    input:
        envs=[env_json(s) for s in SHAS],
        script=f"{SCRIPTS}/bench_decode.py",
    output:
        f"{RESULTS}/decode/decode.json",
    params:
        python=HOST_PYTHON,
        runs=as_json(decode_runs()),
        sizes=as_json(sizes("decode")),
        model=as_json(config["model"]),
        device=DEVICE,
        seed=config["seed"],
        denormal="" if config["cpu_flush_denormal"] else "--no-flush-denormal",
        timeout=config["timeouts"]["decode_request"],
        log_dir=f"{RESULTS}/logs/decode",
    threads: workflow.cores
    log:
        f"{RESULTS}/logs/decode/coordinator.log",
    conda:
        "../../envs/workflow.yaml"
    shell:
        "{params.python:q} {input.script:q} --runs {params.runs:q} --sizes {params.sizes:q}"
        " --model {params.model:q} --device {params.device} --seed {params.seed} {params.denormal}"
        " --timeout {params.timeout} --out {output:q} --log-dir {params.log_dir:q} > {log:q} 2>&1"
