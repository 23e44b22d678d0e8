# TinyLM training throughput and loss of every (variant, reserve) run and the dense twin (the
# reference run), k worker processes each, interleaved in rounds on the same machine, like decode.


rule train:
    input:
        envs=[env_json(s) for s in SHAS],
        script=f"{SCRIPTS}/bench_train.py",
        adapter=IMPL["adapter_file"],  # an edited adapter reruns the jobs it drives
    output:
        f"{RESULTS}/train/train.json",
    params:
        python=HOST_PYTHON,
        runs=as_json(bench_runs()),
        sizes=as_json(sizes("train")),
        model=as_json(config["model"]),
        device=DEVICE,
        seed=config["seed"],
        threads=config["threads"],
        denormal="" if config["cpu_flush_denormal"] else "--no-flush-denormal",
        malloc="" if config["cpu_malloc_reuse"] else "--no-malloc-reuse",
        timeout=config["timeouts"]["train"],
        log_dir=f"{RESULTS}/logs/train",
    threads: timing_threads("train")
    resources:
        **job_resources("train"),
    log:
        f"{RESULTS}/logs/train/coordinator.log",
    shell:
        "{params.python:q} {input.script:q} --runs {params.runs:q} --sizes {params.sizes:q}"
        " --model {params.model:q} --adapter {input.adapter:q} --device {params.device} --seed {params.seed}"
        " --threads {params.threads} {params.denormal} {params.malloc} --timeout {params.timeout} --out {output:q}"
        " --log-dir {params.log_dir:q} > {log:q} 2>&1"
