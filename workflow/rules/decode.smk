# One job for every (variant, reserve) run and the dense reference workload: k worker processes
# each, interleaved in rounds, so drift hits every run alike. It takes every core, so no other job
# competes with the timings (the workers' own threads come from config key `threads`).


rule decode:
    input:
        envs=[env_json(s) for s in SHAS],
        script=f"{SCRIPTS}/bench_decode.py",
        adapter=IMPL["adapter_file"],  # an edited adapter reruns the jobs it drives
    output:
        f"{RESULTS}/decode/decode.json",
    params:
        python=HOST_PYTHON,
        runs=as_json(bench_runs()),
        sizes=as_json(sizes("decode")),
        model=as_json(config["model"]),
        device=DEVICE,
        seed=config["seed"],
        threads=config["threads"],
        denormal="" if config["cpu_flush_denormal"] else "--no-flush-denormal",
        malloc="" if config["cpu_malloc_reuse"] else "--no-malloc-reuse",
        timeout=config["timeouts"]["decode_request"],
        log_dir=f"{RESULTS}/logs/decode",
    threads: timing_threads("decode")
    resources:
        **job_resources("decode"),
    log:
        f"{RESULTS}/logs/decode/coordinator.log",
    shell:
        "{params.python:q} {input.script:q} --runs {params.runs:q} --sizes {params.sizes:q}"
        " --model {params.model:q} --adapter {input.adapter:q} --device {params.device} --seed {params.seed}"
        " --threads {params.threads} {params.denormal} {params.malloc} --timeout {params.timeout} --out {output:q}"
        " --log-dir {params.log_dir:q} > {log:q} 2>&1"
