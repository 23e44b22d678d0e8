"""Helpers shared by the harness scripts (build_env, run_suites, bench_*, equivalence).

Each stage runs in two processes: a *coordinator* under the interpreter that runs Snakemake, and
a *worker* under the commit's own environment. The worker may crash, hang or be killed for memory;
the coordinator then still writes a result, ``{"status": "failed", "error", "log_tail"}``, so one
bad commit never stops the others. Results are written to a temporary file and renamed, so an
interrupted job never leaves a file that reads as complete.

Only the standard library is imported here: workers import torch themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

LOG_TAIL_LINES = 40


# ----------------------------------------------------------------------------- files

def write_atomic(path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other readers
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _finite(x):
    """JSON has no NaN/inf: write them as strings, so every JSON reader loads the file."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def log_tail(text: str | None, lines: int = LOG_TAIL_LINES) -> str:
    if not text:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def file_tail(path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return log_tail(Path(path).read_text(errors="replace"), lines)
    except OSError:
        return ""


def failed(error: str, tail: str = "", **extra) -> dict:
    return {"status": "failed", "error": condense_oom(error), "log_tail": tail, **extra}


_OTHER_PROCESS = re.compile(r"Process \d+ has ([\d.]+) ([KMG]iB) memory in use\. ?")
_UNITS = {"KiB": 1 / 2**20, "MiB": 1 / 2**10, "GiB": 1.0}


def condense_oom(error: str) -> str:
    """PyTorch's CUDA out-of-memory message names every process on the GPU with its memory (35
    sentences when a benchmark's workers fill the card): those sentences become one count and sum."""
    others = _OTHER_PROCESS.findall(error)
    if len(others) < 2:
        return error
    total = sum(float(n) * _UNITS[unit] for n, unit in others)
    first = _OTHER_PROCESS.search(error).start()
    rest = _OTHER_PROCESS.sub("", error[first:])
    return f"{error[:first]}{len(others)} other processes hold {total:.2f} GiB. {rest}"


# ----------------------------------------------------------------------------- environments

def env_record(env_json) -> dict:
    """The env.json of a commit; a missing or unreadable one counts as a failed environment."""
    try:
        rec = read_json(env_json)
    except (OSError, ValueError) as e:
        return failed(f"environment record {env_json} unreadable: {e}")
    return rec if isinstance(rec, dict) else failed(f"environment record {env_json} is not a JSON object")


def env_python(env_dir) -> str:
    # Absolute: suites run with the checkout as working directory.
    return os.path.abspath(os.path.join(env_dir, "bin", "python"))


def child_env(variables: dict | None = None, device: str | None = None, extra_path: str | None = None) -> dict:
    """The environment a worker runs in: ours, minus anything that would change which ``nsa`` it
    imports or how it behaves (PYTHONPATH, inherited ``NSA_*``), plus the job's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSA_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"  # the user site, if needed, is named in the env's .pth file
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (variables or {}).items():
        env[str(key)] = str(int(value)) if isinstance(value, bool) else str(value)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run on a GPU host must not reach the GPU
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return env


# CPU benchmark workers keep freed memory for reuse. glibc's malloc maps each allocation above its
# threshold (128 KiB, rising dynamically to at most 32 MiB) fresh from the kernel and returns it on
# free, so every step of a layer whose tensors are a few MiB pays its page faults again: on the
# 2-core CI machine a TinyLM training step took 600 000 page faults per 30 steps and varied by
# 11-17% within one process; with these settings 5 000 faults and 2-5%. Other allocators ignore them.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                  "MALLOC_TOP_PAD_": str(256 << 20)}

# The workflow's start-up puts the Snakemake process's pid here, for exit_on_sigterm to watch.
MAIN_PID_VAR = "VALIDATION_WORKFLOW_PID"


def _stat(pid: int, field: int) -> str | None:
    """Field ``field`` (1-based, as in proc(5)) of /proc/<pid>/stat; None for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[field - 3]
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int:
    return int(_stat(pid, 4) or 0)


def _start_ticks(pid: int) -> str | None:
    """The process's start time: tells a reused pid apart."""
    return _stat(pid, 22)


def _is_ancestor(pid: int) -> bool:
    here = os.getppid()
    while here and here > 1:
        if here == pid:
            return True
        here = _parent_of(here)
    return False


# ----------------------------------------------------------------------------- where a job runs

def visible_gpu() -> str:
    """The GPU a worker's ``cuda:0`` is, as ``nvidia-smi -i`` names it: the first of
    CUDA_VISIBLE_DEVICES (on a cluster node, the GPU SLURM gave this job, not the node's first)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or platform.node()


def gpu_model() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible_gpu()],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[0].strip() if r.returncode == 0 and r.stdout.strip() else None


def placement(device: str, gpu: str | None = None) -> dict:
    """Where this job ran: node, SLURM job id (None outside SLURM) and GPU model (device cuda)."""
    if device == "cuda" and gpu is None:
        gpu = gpu_model()
    return {"node": node_name(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "gpu": gpu}


def job_start(device: str) -> None:
    """First thing in every job that runs a commit's code: on a node that cannot run it (device
    cuda, no GPU visible to the job) stop with a message, not a worker's traceback; then
    :func:`exit_on_sigterm`."""
    if device == "cuda" and gpu_model() is None:
        sys.exit(f"node {node_name()}: no GPU visible to this job (CUDA_VISIBLE_DEVICES="
                 f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but config key device is 'cuda': give the stage's "
                 f"job a GPU (config key resources.cuda.<stage>.gpu) or set device: cpu")
    exit_on_sigterm()


def exit_on_sigterm(poll_s: float = 2.0) -> None:
    """Turn SIGTERM (how Snakemake stops jobs on Ctrl-C) into SystemExit, so the ``finally`` and
    ``except BaseException`` blocks kill the workers (they run in their own process groups).

    A ``kill -9`` of Snakemake sends nothing, and the job's shell, this process's parent, lives on:
    a watchdog thread notices that this process was re-parented or that the Snakemake process
    (``MAIN_PID_VAR``, when it is an ancestor: a job on another host has none) is gone, and stops
    this process the same way, so no coordinator or worker outlives the run.
    """
    import threading
    import time

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parent = os.getppid()
    main = int(os.environ.get(MAIN_PID_VAR) or 0)
    main_start = _start_ticks(main) if main and _is_ancestor(main) else None

    def watch():
        while os.getppid() == parent and (main_start is None or _start_ticks(main) == main_start):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def stage_parser(description: str, worker_help: str, sizes_help: str, timeout: int) -> argparse.ArgumentParser:
    """Arguments shared by the per-commit stages that hand their work to a worker in the commit's env."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--worker-spec", help=f"(inside the commit's env) {worker_help}")
    ap.add_argument("--env-json", type=Path)
    ap.add_argument("--sizes", help=f"JSON: {sizes_help}")
    ap.add_argument("--model", default="{}", help="JSON: the model dict (workflow/adapters/README.md)")
    ap.add_argument("--adapter", help="the adapter file")
    ap.add_argument("--vars", default="{}", help="JSON: the job's environment variables")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=timeout)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log", type=Path)
    return ap


def run_stage_worker(args, script: str, spec: dict, tmp: Path, what: str) -> dict:
    """Coordinator side of a stage: run ``script --worker-spec`` in the commit's env, writing ``tmp``.

    Returns the worker's record, or a failed record (environment failed, crash, timeout, OOM kill)
    with the log's tail. The caller writes it; ``tmp`` is the caller's to remove.
    """
    job_start(args.device)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    env = env_record(args.env_json)
    if env.get("status") != "ok":
        return failed(f"environment failed: {env.get('error')}", env.get("log_tail", ""))
    tmp.unlink(missing_ok=True)
    cmd = worker_command(env["env_dir"], script, "--worker-spec", json.dumps(spec), "--out", str(tmp))
    rc, how = run_logged(cmd, args.log, child_env(json.loads(args.vars), args.device), args.timeout)
    if rc == 0 and tmp.exists():
        return read_json(tmp)
    return failed(f"{what} {how}", file_tail(args.log))


def worker_record(run) -> dict:
    """Inside a worker: ``run()``'s record, or "not supported by this implementation" when the
    adapter raises Unsupported."""
    import adapter_api

    try:
        return run()
    except adapter_api.Unsupported as e:
        return {"status": "unsupported", "reason": str(e)}


def check_host(python: str, device: str) -> str:
    """The device the run uses, after checking that ``python`` (whose packages every environment
    inherits) exists and has what building an environment needs. ValueError names the config key.

    ``cuda`` is taken as given (a cluster's login node has no GPU): :func:`check_gpu_here` checks
    it where the jobs run here, :func:`job_start` on a cluster's node."""
    import shutil

    exe = shutil.which(python) or python
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise ValueError(f"config key python = {python!r}: no such executable; accepted: the path of a Python "
                         f"interpreter that has torch (null: the one running snakemake)")
    probe = subprocess.run([exe, "-c", "import importlib.util as u, json; print(json.dumps("
                            "[m for m in ('torch', 'setuptools', 'pytest') if u.find_spec(m) is None]))"],
                           capture_output=True, text=True)
    missing = json.loads(probe.stdout or "null") if probe.returncode == 0 else None
    if missing is None:
        raise ValueError(f"config key python = {python!r} does not run: {probe.stderr.strip()[-300:]}")
    if missing:
        raise ValueError(f"{exe} lacks {', '.join(missing)}, which every commit's environment inherits; install "
                         f"them first (the CPU build of torch: pip install torch --index-url "
                         f"https://download.pytorch.org/whl/cpu; then pip install setuptools pytest)")
    return detect_device(device, exe)


def check_gpu_here(python: str) -> None:
    """``device: cuda`` with jobs on this host: its torch must see a GPU."""
    if detect_device("auto", python) != "cuda":
        raise ValueError(f"config key device = 'cuda', but {python}'s torch sees no CUDA device here; "
                         f"accepted on this host: auto or cpu")


def detect_device(setting: str, python: str) -> str:
    """``auto`` -> ``cuda`` when ``python``'s torch sees a GPU. The cheap checks come first, so that
    start-up (and a rerun with nothing to do) stays fast on machines without a GPU."""
    import shutil

    if setting != "auto":
        return setting
    if not (os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi")):
        return "cpu"
    r = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    return "cuda" if r.stdout.strip() == "True" else "cpu"


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (killed: out of memory?)" if -rc == signal.SIGKILL else ""
        return f"terminated by {name}{hint}"
    return f"exit status {rc}"


# ----------------------------------------------------------------------------- process groups

# Every process group the harness starts is listed here (under the workflow's working directory)
# while it runs, so that a later run can name the ones left behind when everything of this one was
# killed; the coordinators themselves stop their groups on timeout, Ctrl-C and a kill -9 of Snakemake.
GROUPS_DIR = Path("results") / "logs" / "processes"


def start_group(cmd: list[str], groups_dir=GROUPS_DIR, **popen) -> subprocess.Popen:
    """``Popen(cmd)`` as the leader of a new process group, listed in ``groups_dir`` until end_group."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    write_json(Path(groups_dir) / f"{proc.pid}.json", {"pgid": proc.pid, "start": _start_ticks(proc.pid),
                                                      "cmd": " ".join(cmd)[:300]})
    proc.groups_dir = Path(groups_dir)
    return proc


# CPU seconds of the group members end_group killed besides each leader (a worker's compile
# subprocesses): init reaps them, so they are missing from os.times()' children and would otherwise
# count as other work on the machine (interleave.cpu_usage).
_killed_cpu_s = 0.0


def killed_members_cpu_s() -> float:
    return _killed_cpu_s


def _group_members_cpu_s(pgid: int) -> float:
    """CPU seconds (their own and their reaped children's) of the processes in group ``pgid`` other
    than its leader, from /proc."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5: the process group
                total += sum(int(v) for v in fields[11:15])  # fields 14-17: utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def end_group(proc: subprocess.Popen) -> None:
    """Kill what is left of the group (a worker's own children too), reap the leader, unlist it."""
    global _killed_cpu_s
    _killed_cpu_s += _group_members_cpu_s(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    (proc.groups_dir / f"{proc.pid}.json").unlink(missing_ok=True)


def leftover_groups(groups_dir=GROUPS_DIR) -> list[str]:
    """Process groups an earlier run started that still run (one line each, with how to stop them);
    the records of those that ended are removed."""
    out = []
    for path in sorted(Path(groups_dir).glob("*.json")):
        try:
            rec = read_json(path)
            alive = rec["start"] is not None and _start_ticks(int(rec["pgid"])) == rec["start"]
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if not alive:
            path.unlink(missing_ok=True)
            continue
        out.append(f"process group {rec['pgid']} of an earlier run is still running and competes with this run's "
                   f"workers: {rec['cmd'][:120]} ... (stop it: kill -- -{rec['pgid']})")
    return out


def run_logged(cmd: list[str], log_path, env: dict, timeout: float, cwd=None) -> tuple[int, str]:
    """Run ``cmd``, appending its output to ``log_path``; returns (exit code, description).

    A timeout kills the whole process group and reads as a failure, never as a hang of the job.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = start_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -signal.SIGKILL, f"timed out after {timeout:.0f} s"
        finally:  # timeout, Ctrl-C, SIGTERM: take the worker and what it started down with us
            end_group(proc)
    return rc, describe_exit(rc)


def worker_command(env_dir, script: str, *args: str) -> list[str]:
    """``<env python> <this scripts dir>/<script> args``: the harness comes from this checkout,
    the code under test from the commit's environment."""
    return [env_python(env_dir), str(Path(__file__).resolve().parent / script), *args]


# ----------------------------------------------------------------------------- worker side (torch)

def worker_adapter(spec: dict):
    """The adapter a worker drives: the implementation's (``spec["adapter"]``, a file) or, for the
    reference workload (``spec["layer"] == "dense"``), the harness's own dense layer."""
    if spec.get("layer") == "dense":
        from tinylm import DENSE

        return DENSE
    import adapter_api

    return adapter_api.load(spec["adapter"])


def safe_routes(adapter, layer):
    """The adapter's routes for ``layer``; an error in them is recorded, never fatal to a measurement."""
    import adapter_api

    try:
        return adapter_api.call_optional(adapter, "routes", layer)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def set_threads(n: int | None) -> None:
    """Intra-op threads of a benchmark worker: from the config, never from Snakemake's --cores."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def end_compile_workers() -> None:
    """End torch.compile's pool of compile subprocesses once a worker has set up. Inductor starts up
    to one per core (each importing torch) in every process that compiles; left alive they compete
    with the timed steps of host-bound modes, and, killed with the worker's group, their CPU time
    showed as "other work" (on the H100: 2 of 16 cores on average during decode and training). A
    compile after this starts a new pool; a worker that never compiled has none."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    shutdown = getattr(async_compile, "shutdown_compile_workers", None)
    if shutdown is not None:
        shutdown()


def serve(make_worker, handlers: dict) -> int:
    """Worker side of the coordinator's line protocol (JSON lines on a private copy of stdout).

    ``make_worker()`` sets up; ``handlers[cmd](worker, msg)`` answers each request. Setup answers
    ``{"ready": true, "info": ...}``, ``{"unsupported": reason}`` or ``{"error": ...}``; anything the
    code under test prints goes to the log (stderr), never into the protocol.
    """
    import traceback

    import adapter_api

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(_finite(obj), default=str) + "\n")
        proto.flush()

    try:
        worker = make_worker()
        end_compile_workers()
    except adapter_api.Unsupported as e:
        send({"unsupported": str(e)})
        return 0
    except Exception as e:
        traceback.print_exc()
        send({"error": f"setup failed: {type(e).__name__}: {e}"})
        return 1
    send({"ready": True, "info": getattr(worker, "info", {})})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "finish":
            send(handlers["finish"](worker, msg))
            return 0
        try:
            send(handlers[cmd](worker, msg))
        except adapter_api.Unsupported as e:
            send({"unsupported": str(e)})
            return 0
        except Exception as e:
            traceback.print_exc()
            send({"error": f"{cmd} failed: {type(e).__name__}: {e}"})
            return 1
    return 0


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def set_determinism(device: str, flush_denormal: bool) -> None:
    import torch

    if device == "cpu" and flush_denormal:
        # Denormals make early training steps up to 20x slower on x86; the same setting for every
        # commit, so comparisons stay fair. Equivalence runs leave it off (it changes numerics).
        torch.set_flush_denormal(True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class Timer:
    """Times one call in ms: CUDA events on GPU (the device's own clock), perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    @property
    def name(self) -> str:
        return "cuda_events" if self.cuda else "perf_counter"

    def __call__(self, fn) -> float:
        import time

        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


class MemoryProbe:
    """Allocator counters over a stretch of steady-state work (several stretches add up).

    GPU: ``torch.cuda.memory_stats()`` deltas (allocations, segment growth) and the peak of
    allocated bytes. CPU has no such allocator counters: only the process's peak RSS is known.
    """

    def __init__(self, device: str):
        self.device = device
        self.allocations = 0
        self.segment_growth = 0
        self.peak_bytes = 0
        self.total = {}
        self._before = None

    def start(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_stats()

    def stop(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            after = torch.cuda.memory_stats()
            b = self._before or {}
            self.allocations += int(after.get("allocation.all.allocated", 0) - b.get("allocation.all.allocated", 0))
            self.segment_growth += int(after.get("segment.all.allocated", 0) - b.get("segment.all.allocated", 0))
            self.peak_bytes = max(self.peak_bytes, int(after.get("allocated_bytes.all.peak", 0)))
            self.total = after

    def as_dict(self) -> dict:
        if self.device == "cuda":
            t = self.total
            return {"allocations": self.allocations, "segment_growth": self.segment_growth,
                    "peak_bytes": self.peak_bytes,
                    "reserved_bytes": int(t.get("reserved_bytes.all.current", 0)),
                    "num_alloc_retries": int(t.get("num_alloc_retries", 0)),
                    "num_ooms": int(t.get("num_ooms", 0))}
        return {"allocations": None, "segment_growth": None, "peak_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int | None:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb * (1 if sys.platform == "darwin" else 1024))
    except (ImportError, OSError):
        return None
