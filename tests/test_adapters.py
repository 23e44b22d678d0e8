"""The adapter protocol against fake implementations, one per capability set, through the real
workers and coordinator (no Snakemake): what each stage records when an implementation lacks
decode, lacks backward, refuses a model field, or decodes differently from its forward.

The fake implementation is a causal running mean (``y_t = W mean(x_<=t)``): exact, tiny, and its
decode cache is a running sum, so decode == forward holds to rounding unless a test breaks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import adapter_api  # noqa: E402
import bench_train  # noqa: E402
import interleave  # noqa: E402

MODEL = {"dim": 8, "groups": 1, "heads_per_group": 2, "d_k": 4, "d_v": 4, "block_len": 4, "block_stride": 2,
         "sel_block_len": 4, "n_sel": 2, "window": 8}

TEMPLATE = '''
ADAPTER_API = 1
NAME = "toy"
CAPABILITIES = {caps!r}


class _Mean:
    pass


def build_layer(model, *, device, dtype):
    import torch
    from adapter_api import Unsupported

    if {refuse!r} and model["block_stride"] != model["block_len"]:
        raise Unsupported(f"unsupported: block_stride={{model['block_stride']}} (toy needs block_stride == block_len)")

    class RunningMean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(model["dim"], model["dim"], bias=False)

        def forward(self, x):
            n = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
            return self.proj(x.cumsum(1) / n)

    return RunningMean().to(device=device, dtype=getattr(torch, dtype))


def forward(layer, x):
    return layer(x)


def new_cache(layer, batch, max_len):
    import torch

    w = layer.proj.weight
    return {{"sum": torch.zeros(batch, 1, w.shape[1], dtype=w.dtype, device=w.device), "n": 0}}


def prefill(layer, x, cache):
    cache = {{"sum": x.sum(1, keepdim=True), "n": x.shape[1]}}
    return layer(x), cache


def decode_step(layer, x_t, cache):
    cache = {{"sum": cache["sum"] + x_t, "n": cache["n"] + 1}}
    return layer.proj(cache["sum"] / cache["n"]) + {decode_offset!r}, cache
'''


def write_adapter(tmp_path, name, *, decode=True, backward=True, refuse=False, decode_offset=0.0,
                  devices=("cpu", "cuda")) -> Path:
    caps = {"decode": decode, "backward": backward, "devices": list(devices)}
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(TEMPLATE.format(caps=caps, refuse=refuse, decode_offset=decode_offset)))
    return path


def run_coordinator(tmp_path, adapter: Path, script: str, request: dict, merge, spec: dict, rounds=2,
                    processes=2) -> dict:
    """One impl run and the reference run, in this interpreter's environment (sys.prefix)."""
    runs = [{"variant": "toy", "sha": "0" * 40, "reserve": "none", "kind": "impl", "env_dir": sys.prefix,
             "vars": {}, "spec": {**spec, "adapter": str(adapter), "layer": "impl"}},
            {"variant": "reference", "sha": None, "reserve": None, "kind": "reference", "env_dir": sys.prefix,
             "vars": {}, "spec": {**spec, "adapter": str(adapter), "layer": "dense"}}]
    results = interleave.coordinate(runs, script=script, request=request, merge=merge, processes=processes,
                                    rounds=rounds, device="cpu", log_dir=tmp_path / "logs", timeout=120, seed=0,
                                    threads=1)
    return {r["variant"]: r for r in results}


DECODE_SPEC = {"contexts": [8], "steps": 3, "warmup": 1, "batch": 1, "dtype": "float32", "modes": ["eager"],
               "device": "cpu", "model": MODEL, "seed": 0, "flush_denormal": True, "threads": 1}
TRAIN_SPEC = {"device": "cpu", "model": MODEL, "seed": 0, "flush_denormal": True, "threads": 1,
              "sizes": {"steps": 2, "warmup": 1, "rounds": 2, "processes": 2, "batch": 2, "seq_len": 8, "layers": 1,
                        "vocab": 16, "lr": 0.01, "dtype": "float32"}}


def _merge_decode(proc, answer):
    for ctx, modes in answer["contexts"].items():
        for mode, samples in modes.items():
            proc.setdefault("contexts", {}).setdefault(ctx, {}).setdefault(mode, []).extend(samples)


def test_protocol_checks_name_what_is_missing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("ADAPTER_API = 2\nCAPABILITIES = {'decode': True, 'wings': True}\n")
    with pytest.raises(adapter_api.AdapterError) as e:
        adapter_api.load(bad)
    text = str(e.value)
    assert "ADAPTER_API is 2" in text and "defines no build_layer()" in text and "unknown keys ['wings']" in text
    assert "new_cache/prefill/decode_step are not all defined" in text
    with pytest.raises(adapter_api.AdapterError, match="no such adapter; accepted: nsa, nsa-vibe"):
        adapter_api.adapter_path("nope")
    assert adapter_api.adapter_path("nsa").name == "nsa.py"
    toy = adapter_api.load(write_adapter(tmp_path, "toy_cpu", devices=["cpu"]))
    assert adapter_api.capabilities(toy)["cuda_graph"] is False  # missing flags are false
    assert "device=cuda" in adapter_api.unsupported_on(toy, "cuda")


@pytest.mark.workflow
def test_decode_with_and_without_a_decode_cache(tmp_path):
    full = run_coordinator(tmp_path, write_adapter(tmp_path, "toy_full"), "decode_worker.py", {"cmd": "sample"},
                           _merge_decode, DECODE_SPEC)
    assert full["toy"]["status"] == "ok" and len(full["toy"]["processes"]) == 2
    assert all(len(p["contexts"]["8"]["eager_ms"]) == 6 for p in full["toy"]["processes"])  # steps x rounds
    assert full["reference"]["status"] == "ok"
    none = run_coordinator(tmp_path, write_adapter(tmp_path, "toy_nodecode", decode=False), "decode_worker.py",
                           {"cmd": "sample"}, _merge_decode, DECODE_SPEC)
    assert none["toy"]["status"] == "unsupported" and "decode" in none["toy"]["reason"]
    assert none["toy"]["processes"] == [] and none["reference"]["status"] == "ok"


@pytest.mark.workflow
def test_training_without_backward_is_not_supported(tmp_path):
    ok = run_coordinator(tmp_path, write_adapter(tmp_path, "toy_train"), "train_worker.py", {"cmd": "steps", "n": 1},
                         bench_train.merge, TRAIN_SPEC)
    assert ok["toy"]["status"] == "ok" and all(len(p["tokens_per_s"]) == 2 for p in ok["toy"]["processes"])
    none = run_coordinator(tmp_path, write_adapter(tmp_path, "toy_nobwd", backward=False), "train_worker.py",
                           {"cmd": "steps", "n": 1}, bench_train.merge, TRAIN_SPEC)
    assert none["toy"]["status"] == "unsupported" and "backward" in none["toy"]["reason"]


def _fake_remote(on_start, on_receive=lambda: None):
    """A stand-in for ``interleave.Remote``: ``on_start(env)`` gives its pid; ready when received
    from; one sample per request."""

    class FakeRemote:
        def __init__(self, cmd, env, log_path):
            self.log_path, self.proc = log_path, types.SimpleNamespace(pid=on_start(env))

        def receive(self, timeout):
            on_receive()
            return {"info": {}}

        def ask(self, obj, timeout):
            return {} if obj["cmd"] == "finish" else {"sample": 1.0}

        def close(self):
            pass

    return FakeRemote


def test_setup_parallel_bounds_the_workers_setting_up_at_once(tmp_path, monkeypatch):
    state = {"setting_up": 0, "most": 0, "started": 0}

    def start(env):
        state["setting_up"] += 1
        state["started"] += 1
        state["most"] = max(state["most"], state["setting_up"])
        return state["started"]

    def ready():
        state["setting_up"] -= 1

    monkeypatch.setattr(interleave, "Remote", _fake_remote(start, ready))
    runs = [{"variant": f"v{i}", "sha": "0" * 40, "reserve": "none", "kind": "impl", "env_dir": sys.prefix,
             "vars": {}, "spec": {}} for i in range(3)]
    for parallel, most in ((0, 6), (1, 1), (4, 4)):
        state.update(setting_up=0, most=0, started=0)
        results = interleave.coordinate(runs, script="worker.py", request={"cmd": "sample"},
                                        merge=lambda p, a: p.setdefault("samples", []).append(a["sample"]),
                                        processes=2, rounds=3, device="cpu", log_dir=tmp_path, timeout=1, seed=0,
                                        threads=None, setup_parallel=parallel)
        assert state["most"] == most and state["started"] == 6
        assert all(r["status"] == "ok" and [len(p["samples"]) for p in r["processes"]] == [3, 3] for r in results)


def test_alive_bounds_the_workers_alive_at_once_and_a_failed_run_starts_no_more(tmp_path, monkeypatch):
    state = {"alive": 0, "most": 0, "started": []}

    class Remote:
        def __init__(self, cmd, env, log_path):
            self.run = json.loads(cmd[-1])["run"]
            state["started"].append(self.run)
            state["alive"] += 1
            state["most"] = max(state["most"], state["alive"])
            self.log_path, self.proc, self.open = log_path, types.SimpleNamespace(pid=len(state["started"])), True

        def receive(self, timeout):
            return {"info": {}}

        def ask(self, obj, timeout):
            if self.run == "bad" and obj["cmd"] == "sample":
                raise RuntimeError("CUDA out of memory")  # as a worker dying mid-round reads
            return {} if obj["cmd"] == "finish" else {"sample": 1.0}

        def close(self):
            state["alive"] -= self.open
            self.open = False

    monkeypatch.setattr(interleave, "Remote", Remote)
    monkeypatch.setattr(interleave.harness, "file_tail", lambda path: "")
    runs = [{"variant": v, "sha": "0" * 40, "reserve": "none", "kind": "impl", "env_dir": sys.prefix, "vars": {},
             "spec": {"run": v}} for v in ("a", "b", "bad")]
    for alive, most, gens in ((None, 15, 1), (1, 3, 5), (2, 6, 3)):
        state.update(alive=0, most=0, started=[])
        results = interleave.coordinate(runs, script="worker.py", request={"cmd": "sample"},
                                        merge=lambda p, a: p.setdefault("samples", []).append(a["sample"]),
                                        processes=5, rounds=3, device="cpu", log_dir=tmp_path, timeout=1, seed=0,
                                        threads=None, alive=alive)
        assert state["most"] == most and state["alive"] == 0, alive
        assert [r["status"] for r in results] == ["ok", "ok", "failed"]
        assert all([len(p["samples"]) for p in r["processes"]] == [3] * 5 for r in results[:2])
        # the failed run's later generations never start: one generation's worth of its workers
        assert state["started"].count("bad") == (alive or 5)
        assert sum(p["status"] == "not started" for p in results[2]["processes"]) == 5 - (alive or 5)
        assert len(interleave.generations([(0, {"index": j}) for j in range(5)], alive)) == gens
    assert interleave.alive_per_run("all") is None and interleave.alive_per_run(2) == 2


def test_setup_parallel_cores_is_the_cpus_the_job_may_use(monkeypatch):
    assert interleave.setup_parallel("cores") == len(os.sched_getaffinity(0))
    monkeypatch.setattr(interleave.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert interleave.setup_parallel("cores") == 3  # not Snakemake's --cores, which the worker never sees
    assert interleave.setup_parallel(0) == 0 and interleave.setup_parallel(3) == 3


def test_cpu_workers_keep_freed_memory_unless_told_not_to(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(interleave, "Remote", _fake_remote(lambda env: seen.append(env) or len(seen)))
    runs = [{"variant": "v", "sha": "0" * 40, "reserve": "none", "kind": "impl", "env_dir": sys.prefix, "vars": {},
             "spec": {}}]
    for device, reuse, expected in (("cpu", True, True), ("cpu", False, False), ("cuda", True, False)):
        seen.clear()
        interleave.coordinate(runs, script="worker.py", request={"cmd": "sample"}, merge=lambda p, a: None,
                              processes=2, rounds=1, device=device, log_dir=tmp_path, timeout=1, seed=0, threads=1,
                              malloc_reuse=reuse)
        assert len(seen) == 2
        assert all((env.get("MALLOC_MMAP_THRESHOLD_") == str(32 << 20)) == expected for env in seen), (device, reuse)


def test_on_cuda_one_worker_per_distinct_code_sets_up_first():
    runs = [{"sha": "a", "kind": "reference"}, {"sha": "a", "kind": "impl"}, {"sha": "b", "kind": "impl"},
            {"sha": "a", "kind": "impl"}]  # the last: an A/A twin of run 1, the same code
    specs = [(i, f"r{i}p{j}") for i in range(4) for j in range(3)]
    waves = interleave.setup_waves(specs, runs, 0, warm_first=True)
    assert [[s[1] for s in w] for w in waves] == [["r0p0", "r1p0", "r2p0"],
                                                  [s[1] for s in specs if s[1] not in ("r0p0", "r1p0", "r2p0")]]
    waves = interleave.setup_waves(specs, runs, 2, warm_first=True)
    assert [len(w) for w in waves] == [2, 1, 2, 2, 2, 2, 1]
    assert sorted(s[1] for w in waves for s in w) == sorted(s[1] for s in specs)
    assert interleave.setup_waves(specs, runs, 5, warm_first=False) == [specs[:5], specs[5:10], specs[10:]]


def _stage(tmp_path, script: str, adapter: Path, sizes: dict, **extra) -> dict:
    out = tmp_path / f"{adapter.stem}-{script}.json"
    env_json = tmp_path / "env.json"
    env_json.write_text(json.dumps({"status": "ok", "env_dir": sys.prefix}))
    cmd = [sys.executable, str(ROOT / "workflow" / "scripts" / script), "--env-json", str(env_json), "--adapter",
           str(adapter), "--sizes", json.dumps(sizes), "--model", json.dumps(MODEL), "--device", "cpu",
           "--out", str(out), "--log", str(tmp_path / f"{adapter.stem}.log")]
    for key, value in extra.items():
        cmd += [f"--{key}", json.dumps(value)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return json.loads(out.read_text())


@pytest.mark.workflow
def test_consistency_finds_a_decode_that_disagrees_with_forward(tmp_path):
    sizes = {"batch": 1, "seq_len": 12, "prefix": 5, "dtype": "float32"}
    tol = {"tolerance": {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}}
    good = _stage(tmp_path, "consistency.py", write_adapter(tmp_path, "toy_good"), sizes, **tol)
    assert good["status"] == "ok" and good["passed"] is True and good["max_abs_err"] < 1e-5
    bad = _stage(tmp_path, "consistency.py", write_adapter(tmp_path, "toy_off", decode_offset=0.01), sizes, **tol)
    assert bad["passed"] is False and bad["worst_is_decode"] and bad["worst_position"] >= 5
    assert bad["max_abs_err"] == pytest.approx(0.01, rel=1e-3) and bad["max_abs_err_prefill"] < 1e-5
    none = _stage(tmp_path, "consistency.py", write_adapter(tmp_path, "toy_nd", decode=False), sizes, **tol)
    assert none["status"] == "unsupported" and "decode" in none["reason"]


@pytest.mark.workflow
def test_a_refused_model_field_is_not_supported_never_failed(tmp_path):
    refusing = write_adapter(tmp_path, "toy_refuse", refuse=True)
    rec = _stage(tmp_path, "equivalence.py", refusing, {"batch": 1, "seq_len": 12, "decode_steps": 2})
    assert rec["status"] == "unsupported" and rec["reason"].startswith("unsupported: block_stride=2")
    runs = run_coordinator(tmp_path, refusing, "decode_worker.py", {"cmd": "sample"}, _merge_decode, DECODE_SPEC)
    assert runs["toy"]["status"] == "unsupported" and "block_stride=2" in runs["toy"]["reason"]
    eq = _stage(tmp_path, "equivalence.py", write_adapter(tmp_path, "toy_eq"), {"batch": 1, "seq_len": 12, "decode_steps": 2})
    assert eq["status"] == "ok" and eq["shapes"] == {"prefill": [1, 12, 8], "decode": [1, 2, 8]}


@pytest.mark.workflow
def test_no_worker_outlives_a_killed_parent(tmp_path):
    """kill -9 of the process that started a benchmark job (Snakemake) leaves no coordinator or worker."""
    import signal

    adapter = write_adapter(tmp_path, "toy_long")
    env_json = tmp_path / "env.json"
    env_json.write_text(json.dumps({"status": "ok", "env_dir": sys.prefix}))
    runs = [{"variant": "toy", "sha": "0" * 40, "reserve": "none", "env_json": str(env_json), "vars": {}}]
    sizes = {**{k: DECODE_SPEC[k] for k in ("contexts", "warmup", "batch", "dtype", "modes")}, "steps": 200000,
             "rounds": 50, "processes": 2}
    marker = str(adapter)  # in the coordinator's command line and in each worker's spec
    cmd = [sys.executable, str(ROOT / "workflow" / "scripts" / "bench_decode.py"), "--runs", json.dumps(runs),
           "--sizes", json.dumps(sizes), "--model", json.dumps(MODEL), "--adapter", str(adapter), "--device", "cpu",
           "--threads", "1", "--out", str(tmp_path / "d.json"), "--log-dir", str(tmp_path / "logs")]
    parent = subprocess.Popen(["bash", "-c", f"{' '.join(map(repr, cmd))} & wait"], start_new_session=True)

    def ours():
        out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        return [p for p in out if int(p) != parent.pid]

    deadline = time.monotonic() + 60
    while len(ours()) < 3 and time.monotonic() < deadline:  # the coordinator and its workers
        time.sleep(0.5)
    assert len(ours()) >= 3, "the benchmark did not start"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while ours() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ours() == [], "processes outlived the killed parent"


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"


def test_other_work_during_a_measurement_counts_what_is_not_ours(tmp_path):
    """A worker's CPU time is ours; a process that is not our child (it outlives its parent, as a
    test suite started beside the run would) is other work, although busy before and after was 0."""
    def ours():
        subprocess.run([sys.executable, "-c", BURN], check=True)

    def someone_elses():
        subprocess.run(["sh", "-c", f"{sys.executable} -c '{BURN}' >/dev/null 2>&1 &"], check=True)
        time.sleep(2.5)  # the orphan burns 1.5 s of CPU meanwhile and is never reaped by us

    def a_workers_subprocess():  # still running when the worker's group is killed, as compile pools are
        burn_then_wait = f"{BURN}\ntime.sleep(60)"
        proc = interleave.harness.start_group(["sh", "-c", f"{sys.executable} -c '{burn_then_wait}' & sleep 60"],
                                   groups_dir=tmp_path)
        time.sleep(2.5)
        interleave.harness.end_group(proc)

    _, quiet = interleave.measure_conditions(1, "cpu", ours)
    _, killed = interleave.measure_conditions(1, "cpu", a_workers_subprocess)
    _, busy = interleave.measure_conditions(1, "cpu", someone_elses)
    assert quiet["host"]["other_cores_during"] < 0.25, quiet["host"]
    assert killed["host"]["other_cores_during"] < 0.25, killed["host"]
    assert 0.4 <= busy["host"]["other_cores_during"] <= 1.5, busy["host"]
    assert any("on average during the measurement" in w for w in busy["warnings"]), busy["warnings"]


def test_a_worker_ends_torch_compiles_subprocess_pool_once_set_up(tmp_path):
    """Inductor's compile pool (started here as torch.compile starts it) is gone when set-up ends."""
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT / "workflow" / "scripts")!r})
        import harness
        import torch._inductor.async_compile as ac

        def children():
            me = str(os.getpid())
            return [d for d in os.listdir("/proc") if d.isdigit() and harness._stat(int(d), 4) == me]

        ac.AsyncCompile.warm_pool()
        deadline = time.monotonic() + 30
        while not children() and time.monotonic() < deadline:
            time.sleep(0.2)
        before = len(children())
        harness.end_compile_workers()
        deadline = time.monotonic() + 30
        while children() and time.monotonic() < deadline:
            time.sleep(0.2)
        print(before, len(children()))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert before >= 1 and after == 0, out.stdout


def test_condition_warnings_name_other_work_and_gpu_changes():
    quiet, busy = {"cores": 2, "busy_cores": 0.1}, {"cores": 2, "busy_cores": 1.6}
    assert interleave.condition_warnings(quiet, quiet, None, None) == []
    assert interleave.condition_warnings(busy, quiet, None, None) == [
        "other work kept 1.6 of 2 cores busy before the measurement"]
    idle = {"clocks.sm": "345", "clocks.max.sm": "1980", "temperature.gpu": "34", "processes": [],
            "clocks_throttle_reasons.active": "0x0000000000000001"}
    boosted = {**idle, "clocks.sm": "1980", "clocks_throttle_reasons.active": "0x0000000000000000"}
    assert interleave.condition_warnings(quiet, quiet, idle, boosted) == []  # idle -> boost is no warning
    hot = {**idle, "clocks.max.sm": "1500", "temperature.gpu": "55", "clocks_throttle_reasons.active": "0x0000000000000024"}
    text = " ".join(interleave.condition_warnings(quiet, quiet, {**idle, "processes": ["123, python, 500"]}, hot))
    assert "maximum SM clock changed from 1980 to 1500 MHz" in text and "rose from 34 to 55 C" in text
    assert "held back (software power cap, software thermal slowdown) after" in text
    assert "other processes were on the GPU" in text
    assert 0 <= interleave.busy_cores(0.05) <= 2 * (os.cpu_count() or 1)
    # Time the hypervisor gave to other guests during the measurement
    assert interleave.steal_pct((1000, 10), (2000, 40)) == 3.0
    assert interleave.steal_pct((1000, 10), (1000, 10)) is None and interleave.steal_pct(None, (1, 0)) is None
    stolen = interleave.condition_warnings(quiet, quiet, None, None, steal=3.0)
    assert stolen and "hypervisor took 3.0% of the CPU time" in stolen[0]
    assert interleave.condition_warnings(quiet, quiet, None, None, steal=0.5) == []
    # Other work during the measurement: all CPU time minus this process tree's, per wall second.
    assert interleave.other_cores((0.0, 100.0, 10.0), (10.0, 125.0, 30.0)) == 0.5
    assert interleave.other_cores((0.0, 100.0, 10.0), (10.0, 118.0, 30.0)) == 0.0  # never negative
    assert interleave.other_cores((0.0, 1.0, 1.0), (0.5, 2.0, 1.0)) is None and interleave.other_cores(None, None) is None
    during = interleave.condition_warnings(quiet, quiet, None, None, other=0.5)
    assert during == ["other work kept 0.50 of 2 cores busy on average during the measurement, so some workers' "
                      "timings ran beside it"]
    assert interleave.condition_warnings(quiet, quiet, None, None, other=0.2) == []
    assert interleave.condition_warnings({"cores": 16}, {"cores": 16}, None, None, other=1.0) == []  # < 1.6
    ticks = interleave.cpu_ticks()
    assert ticks is None or (ticks[0] >= ticks[1] >= 0)
