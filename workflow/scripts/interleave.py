"""The interleaved benchmark coordinator shared by decode and training (asv's rounds, with the
process as the unit of replication).

Every run (a commit x reserve configuration, plus the reference workload: the harness's dense
layer, identical code everywhere) is measured by ``processes`` independent worker processes, each
in its commit's environment with its configuration's variables. The processes go in generations
of ``alive`` per run (one generation with ``alive: all``): a generation's workers set up first;
then, round after round, each is asked in turn (shuffled per round, seeded) for one block of
measurements, so machine drift hits every run alike and only one worker measures at a time; then
they end and the next generation starts.
Between-process differences (placement, allocator state, host dispatch speed) are thereby
sampled ``processes`` times per run, which per-sample statistics of one process cannot see.

A worker that fails to start, crashes (OOM included) or hangs marks its process failed (and its
run failed) with its log's tail; the others go on. A worker that answers "unsupported" makes its
run "not supported by this implementation".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import subprocess
import time
from pathlib import Path

import harness

SCHEMA_VERSION = 2


class Remote:
    """One worker process and its JSON-line protocol, with timeouts."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path):
        self.log_path, self._buf = log_path, b""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "wb")
        self.log.write(f"$ {' '.join(cmd)}\n".encode())
        self.log.flush()
        self.proc = harness.start_group(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    rc = self.proc.wait()
                    raise RuntimeError(f"worker ended ({harness.describe_exit(rc)})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg

    def ask(self, obj, timeout: float) -> dict:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            rc = self.proc.wait()
            raise RuntimeError(f"worker ended ({harness.describe_exit(rc)})") from None
        return self.receive(timeout)

    def close(self) -> None:
        harness.end_group(self.proc)
        self.log.close()


def round_order(n: int, round_index: int, seed: int) -> list[int]:
    """Which worker goes when in a round: shuffled per round (seeded), so none is always first."""
    order = list(range(n))
    random.Random(seed * 7919 + round_index).shuffle(order)
    return order


def setup_waves(specs: list, runs: list[dict], setup_parallel: int, warm_first: bool) -> list[list]:
    """The order in which workers set up: waves of ``setup_parallel`` (0: all at once).

    ``warm_first``: a first wave holds one worker of each distinct code (commit and layer kind), so
    the compilations a worker makes while it sets up (``compile_decode()``, Triton autotuning) run
    once each and fill the on-disk caches the later waves read, instead of every worker compiling
    the same graphs at once. ``specs`` items start with their run's index in ``runs``.
    """
    first, seen = [], set()
    for n, spec in enumerate(specs):
        code = (runs[spec[0]].get("sha"), runs[spec[0]].get("kind"))
        if warm_first and code not in seen:
            seen.add(code)
            first.append(n)
    leaders = set(first)
    rest = [spec for n, spec in enumerate(specs) if n not in leaders]
    waves = []
    for group in ([specs[n] for n in first], rest):
        size = setup_parallel or max(len(group), 1)
        waves += [group[i:i + size] for i in range(0, len(group), size)]
    return waves


def generations(specs: list, alive: int | None) -> list[list]:
    """``specs`` (each holding its process record second) in generations: process indices ``0..alive-1``
    of every run first, then the next ``alive``, and so on (``None`` or 0: one generation of all)."""
    if not alive:
        return [specs] if specs else []
    by_gen: dict[int, list] = {}
    for spec in specs:
        by_gen.setdefault(spec[1]["index"] // alive, []).append(spec)
    return [by_gen[g] for g in sorted(by_gen)]


def coordinate(runs: list[dict], *, script: str, request: dict, merge, processes: int, rounds: int, device: str,
               log_dir: Path, timeout: float, seed: int, threads: int | None, setup_parallel: int = 0,
               alive: int | None = None, malloc_reuse: bool = True) -> list[dict]:
    """Measure every run with ``processes`` workers of ``script`` over ``rounds`` interleaved rounds.

    ``runs``: dicts with variant, sha, reserve, kind, spec, vars, and env_dir or env_error.
    ``merge(process_record, answer)`` folds one answer to ``request`` into the process's record.
    ``alive``: worker processes of each run alive at once (None: all). The processes then go in
    generations (:func:`generations`): each generation sets up, is measured through every round, and
    ends before the next starts, so at most ``alive`` x runs workers hold memory at any time (35
    decode workers of the default config did not fit an 80 GB GPU together). Every generation holds
    one process of each run, so every run is still measured in every stretch of the job. A run that
    failed or was found unsupported starts no more workers.
    ``setup_parallel``: workers of a generation setting up at once (0: all). Set-up is when a worker
    peaks in memory (a training worker's warm-up steps); measuring is one worker at a time anyway.
    On CUDA one worker per distinct code sets up first (:func:`setup_waves`), in the first
    generation. ``malloc_reuse``: CPU workers run with :data:`harness.CPU_MALLOC_ENV`.
    """
    results, specs = [], []  # specs: (run index, process record, command, env, log)
    for i, run in enumerate(runs):
        res = {k: run.get(k) for k in ("variant", "sha", "reserve", "kind")}
        res.update(status="ok", routes=None, processes=[])
        results.append(res)
        if run.get("env_error"):
            res.update(harness.failed(f"environment failed: {run['env_error']}", run.get("env_log_tail", "")))
            continue
        env = harness.child_env(run["vars"], device)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        if device == "cpu" and malloc_reuse:
            env.update(harness.CPU_MALLOC_ENV)
        for j in range(processes):
            cmd = harness.worker_command(run["env_dir"], script, "--spec", json.dumps(run["spec"]))
            name = f"{i:02d}-{run['variant']}.{run.get('reserve') or 'ref'}.p{j}"
            proc = {"index": j, "status": "ok"}
            res["processes"].append(proc)
            specs.append((i, proc, cmd, env, log_dir / f"{name[:100]}.log"))

    gens = generations(specs, alive)
    t0 = time.monotonic()  # elapsed times in the progress lines: where a long job spends its time
    for g, gen in enumerate(gens):
        for spec in gen:
            if results[spec[0]]["status"] == "failed":
                spec[1].update(status="not started", error="its run failed in an earlier generation")
        gen = [spec for spec in gen if results[spec[0]]["status"] == "ok"]
        label = f"{script}: " + (f"generation {g + 1}/{len(gens)}: " if len(gens) > 1 else "")
        waves = setup_waves(gen, runs, setup_parallel, warm_first=device == "cuda" and g == 0)
        _measure_generation(waves, len(gen), results, request=request, merge=merge, rounds=rounds,
                            timeout=timeout, seed=seed + 104729 * g, script=script, label=label, t0=t0)
    for res in results:
        if res["status"] == "failed":  # samples of a failed process are never read as measurements
            for proc in res["processes"]:
                if proc["status"] != "ok":
                    proc.pop("contexts", None)
        elif res["status"] == "unsupported":
            res["processes"] = []
    return results


def _measure_generation(waves: list[list], n: int, results: list[dict], *, request: dict, merge, rounds: int,
                        timeout: float, seed: int, script: str, label: str, t0: float) -> None:
    """Set up one generation's workers wave by wave, ask them round after round, finish and end them."""
    workers: list = []  # (run index, process record, Remote), in start order
    alive: list[int] = []
    started_at: dict[int, float] = {}

    def drop(w, err, unsupported=False):
        i, proc, remote = workers[w]
        remote.close()
        alive.remove(w)
        if unsupported:
            results[i].update(status="unsupported", reason=str(err))
            for other in [v for v in alive if workers[v][0] == i]:
                drop(other, err, unsupported=True)
            return
        proc.update(harness.failed(str(err), harness.file_tail(remote.log_path)))
        if results[i]["status"] == "ok":
            results[i].update(status="failed", error=f"process {proc['index']}: {proc['error']}", log_tail=proc["log_tail"])
        print(f"{script} {results[i]['variant']}/{results[i]['reserve']} process {proc['index']} FAILED: {proc['error']}",
              flush=True)

    try:  # workers start inside: a Ctrl-C while they start still stops those already started
        for wave in waves:  # a wave of workers sets up at once; each says ready
            started = len(workers)
            for i, proc, cmd, env, log in wave:
                if results[i]["status"] == "unsupported":  # an earlier wave's answer covers the run
                    continue
                started_at[len(workers)] = time.monotonic()
                workers.append((i, proc, Remote(cmd, env, log)))
                alive.append(len(workers) - 1)
            for w in range(started, len(workers)):
                if w not in alive:
                    continue
                try:
                    msg = workers[w][2].receive(timeout)
                except (RuntimeError, TimeoutError, ValueError) as e:
                    drop(w, e)
                    continue
                if "unsupported" in msg:
                    drop(w, msg["unsupported"], unsupported=True)
                    continue
                i, proc, remote = workers[w]
                # seconds from start to ready (read in start order, so at most the wave's slowest)
                proc["setup_s"] = round(time.monotonic() - started_at[w], 1)
                proc["pid"] = remote.proc.pid
                info = msg.get("info") or {}
                if results[i]["routes"] is None and info.get("routes") is not None:
                    results[i]["routes"] = info["routes"]
                proc["info"] = {k: v for k, v in info.items() if k != "routes"}
        print(f"{label}{len(alive)}/{n} workers ready after {time.monotonic() - t0:.0f} s", flush=True)
        for r in range(rounds):
            for w in round_order(len(workers), r, seed):
                if w not in alive:
                    continue
                try:
                    answer = workers[w][2].ask(request, timeout)
                except (RuntimeError, TimeoutError, ValueError, KeyError) as e:
                    drop(w, e)
                    continue
                if "unsupported" in answer:
                    drop(w, answer["unsupported"], unsupported=True)
                    continue
                merge(workers[w][1], answer)
            print(f"{label}round {r + 1}/{rounds} done after {time.monotonic() - t0:.0f} s", flush=True)
        for w in list(alive):
            try:
                end = workers[w][2].ask({"cmd": "finish"}, timeout)
                if end.get("routes") is not None:  # routes at the end include fallbacks taken meanwhile
                    results[workers[w][0]]["routes"] = end["routes"]
                workers[w][1].update({k: v for k, v in end.items() if k != "routes"})
            except (RuntimeError, TimeoutError, ValueError) as e:
                drop(w, e)
    finally:
        for _, _, remote in workers:
            remote.close()


# ----------------------------------------------------------------------------- conditions

def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_line() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat in jiffies: user, nice, system, idle, iowait, irq,
    softirq, steal, ... (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values or None


def busy_cores(window_s: float = 0.5) -> float | None:
    """Cores kept busy by *other* work right now (/proc/stat over ``window_s``), taken while none of
    our workers runs. The load average cannot tell that: it lags a minute behind, so it still counts
    the workers of the job that just ended."""
    import time

    def sample():
        values = _cpu_line()
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (TypeError, IndexError):  # no /proc/stat, or too few fields
        return None
    if total1 <= total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def cpu_ticks() -> tuple[int, int] | None:
    """``(all, steal)`` jiffies of /proc/stat's cpu line. Steal is time the hypervisor gave this
    virtual machine's CPUs to other guests: invisible to the load average and to busy_cores' idle
    count, it slows every worker at random (a neighbour on the physical host)."""
    values = _cpu_line()
    return (sum(values), values[7] if len(values) > 7 else 0) if values else None


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of the CPU time between two :func:`cpu_ticks` readings that the hypervisor took."""
    if not before or not after or after[0] <= before[0]:
        return None
    return round((after[1] - before[1]) / (after[0] - before[0]) * 100, 2)


STEAL_WARN_PCT = 2.0  # above this, a warning: per-step timings then scatter visibly on a VM


def cpu_usage() -> tuple[float, float, float] | None:
    """``(wall, busy, own)`` seconds now: the monotonic clock, the CPU time every CPU spent on any
    work (/proc/stat: user, nice, system, irq, softirq; steal and idle excluded), and the CPU time of
    this process, its waited-for children (every benchmark worker, once it has ended) and the
    workers' own subprocesses ended with them (harness.end_group)."""
    values = _cpu_line()
    if not values or len(values) < 7:
        return None
    t = os.times()
    busy = (values[0] + values[1] + values[2] + values[5] + values[6]) / os.sysconf("SC_CLK_TCK")
    own = t.user + t.system + t.children_user + t.children_system + harness.killed_members_cpu_s()
    return time.monotonic(), busy, own


def other_cores(before, after) -> float | None:
    """Cores that work other than this job kept busy, on average, between two :func:`cpu_usage`
    readings. The before/after readings (:func:`busy_cores`) miss what comes and goes during the
    job, such as a test suite run beside it; this counts all of it."""
    if not before or not after or after[0] - before[0] < 1.0:
        return None
    other = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, other) / (after[0] - before[0]), 2)


def other_cores_warn(cores: int | None) -> float:
    """Other work, in cores on average, above which the report warns: a quarter of a core (on a
    2-core machine the measured worker and set-ups use the rest), or a tenth of a bigger machine."""
    return max(0.25, 0.1 * (cores or 1))


def host_conditions(threads: int | None) -> dict:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "threads": threads, "loadavg": load,
            "busy_cores": busy_cores(), "hostname": harness.node_name()}


GPU_FIELDS = ("name", "clocks.sm", "clocks.mem", "clocks.max.sm", "temperature.gpu", "power.draw", "utilization.gpu",
              "memory.used", "clocks_throttle_reasons.active")


def gpu_conditions() -> dict | None:
    """Clocks, temperature, power and the compute processes on the job's GPU (nvidia-smi), or None."""
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits",
                            "-i", harness.visible_gpu()], capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        values = [v.strip() for v in r.stdout.strip().splitlines()[0].split(",")]
        out = dict(zip(GPU_FIELDS, values))
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        out["processes"] = [line.strip() for line in apps.stdout.splitlines() if line.strip()]
        return out
    except (OSError, subprocess.TimeoutExpired):
        return None


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# Bits of nvidia-smi's clocks_throttle_reasons.active that slow a busy GPU (0x1 idle and 0x2
# application clocks do not).
SLOWDOWN_BITS = {0x4: "software power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
                 0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}


def slowdowns(reasons: str | None) -> list[str]:
    """The slowdowns named by a clocks_throttle_reasons.active reading ('0x...'), in plain words."""
    try:
        bits = int(str(reasons), 16)
    except ValueError:
        return []
    return [name for bit, name in SLOWDOWN_BITS.items() if bits & bit]


def condition_warnings(host_before: dict, host_after: dict, gpu_before: dict | None, gpu_after: dict | None,
                       steal: float | None = None, other: float | None = None) -> list[str]:
    """Plain-words warnings where the machine was busy or changed during the measurement."""
    out = []
    if steal is not None and steal >= STEAL_WARN_PCT:
        out.append(f"the hypervisor took {steal:.1f}% of the CPU time during the measurement (steal: other guests "
                   "on the physical host), so timings scatter more than on a dedicated machine")
    cores = host_before.get("cores") or 1
    if other is not None and other >= other_cores_warn(cores):
        out.append(f"other work kept {other:.2f} of {cores} cores busy on average during the measurement, "
                   "so some workers' timings ran beside it")
    for when, host in (("before", host_before), ("after", host_after)):
        busy = host.get("busy_cores")
        if busy is not None and busy > 0.5 * cores:
            out.append(f"other work kept {busy:.1f} of {cores} cores busy {when} the measurement")
    if gpu_before and gpu_after:
        # The current SM clock is not compared: before the job the GPU idles at a few hundred MHz and
        # boosts under load (seen: 345 -> 1980 MHz on an H200), which says nothing about the timings.
        # A changed clock ceiling or an active slowdown does.
        b, a = _num(gpu_before.get("clocks.max.sm")), _num(gpu_after.get("clocks.max.sm"))
        if b and a and a != b:
            out.append(f"GPU maximum SM clock changed from {b:.0f} to {a:.0f} MHz during the measurement")
        for when, gpu in (("before", gpu_before), ("after", gpu_after)):
            held = slowdowns(gpu.get("clocks_throttle_reasons.active"))
            if held:
                out.append(f"GPU clocks held back ({', '.join(held)}) {when} the measurement")
        tb, ta = _num(gpu_before.get("temperature.gpu")), _num(gpu_after.get("temperature.gpu"))
        if tb is not None and ta is not None and ta - tb >= 10:
            out.append(f"GPU temperature rose from {tb:.0f} to {ta:.0f} C during the measurement")
        others = gpu_before.get("processes") or []
        if others:
            out.append(f"other processes were on the GPU before the measurement: {'; '.join(others)}")
    return out


def measure_conditions(threads: int | None, device: str, body):
    """Run ``body()`` and return (its result, the conditions before/after with warnings)."""
    host_before, gpu_before = host_conditions(threads), gpu_conditions() if device == "cuda" else None
    ticks, usage = cpu_ticks(), cpu_usage()
    result = body()
    steal, other = steal_pct(ticks, cpu_ticks()), other_cores(usage, cpu_usage())
    host_after, gpu_after = host_conditions(threads), gpu_conditions() if device == "cuda" else None
    warnings = condition_warnings(host_before, host_after, gpu_before, gpu_after, steal, other)
    host = {k: v for k, v in host_before.items() if k not in ("loadavg", "busy_cores")}
    host.update(loadavg_before=host_before["loadavg"], loadavg_after=host_after["loadavg"],
                busy_cores_before=host_before["busy_cores"], busy_cores_after=host_after["busy_cores"],
                steal_pct=steal, other_cores_during=other)
    return result, {"host": host, "gpu_before": gpu_before, "gpu_after": gpu_after, "warnings": warnings}


def runs_from_args(runs_json: str, reference_env: bool = True) -> list[dict]:
    """The coordinator's runs from the rule's JSON, with each commit's environment looked up, and
    the reference workload (kind "reference") in the first healthy environment."""
    runs = []
    for run in json.loads(runs_json):
        env = harness.env_record(run["env_json"])
        run = {**run, "kind": "impl", "env_dir": env.get("env_dir")}
        if env.get("status") != "ok":
            run.update(env_error=env.get("error"), env_log_tail=env.get("log_tail", ""))
        runs.append(run)
    healthy = [r for r in runs if not r.get("env_error")]
    if reference_env and healthy:
        runs.append({"variant": "reference", "sha": None, "reserve": None, "kind": "reference",
                     "env_dir": healthy[0]["env_dir"], "vars": {}})
    return runs


# ----------------------------------------------------------------------------- the benchmark jobs

def bench_parser(description: str, sizes_help: str, timeout: int) -> argparse.ArgumentParser:
    """Arguments of the interleaved benchmark jobs (bench_decode.py, bench_train.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", required=True, help="JSON list of {variant, sha, reserve, env_json, vars}")
    ap.add_argument("--sizes", required=True, help=f"JSON: {sizes_help}")
    ap.add_argument("--model", default="{}", help="JSON: the model dict")
    ap.add_argument("--adapter", required=True, help="the adapter file")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of each worker")
    ap.add_argument("--no-flush-denormal", action="store_true")
    ap.add_argument("--no-malloc-reuse", action="store_true", help="CPU workers without harness.CPU_MALLOC_ENV")
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds one worker may take to answer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log-dir", type=Path, required=True)
    return ap


def setup_parallel(value) -> int:
    """Workers setting up at once for the config value: an integer (0: all), or ``"cores"``: the CPUs
    this job may use (its affinity mask: a SLURM allocation's cores; not Snakemake's ``--cores``,
    which is 1 in the default command, while nothing else runs beside a timing job anyway). Set-up
    is mostly CPU work (importing torch, building the layer, a prefill), and more workers at once
    than cores only contend: 35 at once on 2 cores were ready after 62 s, two at a time after 54 s."""
    if value == "cores":
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, usable or 1)
    return int(value)


def alive_per_run(value) -> int | None:
    """Worker processes of each run alive at once for the config value: an integer, or ``"all"``
    (None: every process of every run alive through all rounds; so is 0, as in :func:`generations`)."""
    return None if value in ("all", None) or int(value) == 0 else int(value)


def run_benchmark(args, spec: dict, *, script: str, request: dict, merge, what: str) -> list[dict]:
    """Measure every run of ``args.runs`` (and the reference) with ``script`` workers, and write
    ``args.out`` with the results and the machine's conditions. Returns the runs' results."""
    harness.job_start(args.device)
    sizes = json.loads(args.sizes)
    runs = runs_from_args(args.runs)
    for run in runs:
        run["spec"] = {**spec, "layer": "dense" if run["kind"] == "reference" else "impl"}
    parallel = setup_parallel(sizes.get("setup_parallel", 0))
    alive = alive_per_run(sizes.get("alive", "all"))
    results, conditions = measure_conditions(args.threads, args.device, lambda: coordinate(
        runs, script=script, request=request, merge=merge, processes=sizes["processes"], rounds=sizes["rounds"],
        device=args.device, log_dir=args.log_dir, timeout=args.timeout, seed=args.seed, threads=args.threads,
        setup_parallel=parallel, alive=alive, malloc_reuse=not args.no_malloc_reuse))
    conditions["host"]["malloc_reuse"] = args.device == "cpu" and not args.no_malloc_reuse
    conditions["host"]["setup_parallel"] = parallel
    record = {"schema_version": SCHEMA_VERSION, "device": args.device, "timer": harness.Timer(args.device).name,
              "rounds": sizes["rounds"], "processes": sizes["processes"], "sizes": sizes, "conditions": conditions,
              "placement": harness.placement(args.device, (conditions["gpu_before"] or {}).get("name")), "runs": results}
    if what == "decode":
        order = ["eager", "graph", "compiled_graph"]
        record["modes"] = sorted({m[: -len("_ms")] for r in results for p in r["processes"]
                                  for c in p.get("contexts", {}).values() for m in c}, key=order.index)
    harness.write_json(args.out, record)
    print(f"{what}: {sum(r['status'] == 'ok' for r in results)}/{len(results)} runs ok -> {args.out}")
    return results
