"""Decode microbenchmark for every (variant, reserve config), interleaved in rounds.

    bench_decode.py --runs '[{"variant": ..., "env_json": ...}]' --sizes '{"contexts": [512], ...}' --device cpu --out results/decode/decode.json

Machines drift (clocks, thermal state, other tenants): timing variant A for a minute and then
variant B measures the drift as much as the code. So one long-lived *worker* process per run
(each in its commit's environment, with its configuration's variables) sets up once, and the
coordinator asks each worker in turn, round after round and in a shuffled order, for one block of
samples: every run sees the same conditions, as in asv's interleaved rounds. Each sample is one
``decode_step`` after a prefill of ``context`` tokens, timed with CUDA events on GPU (optionally
also as a CUDA-graph replay) or perf_counter on CPU. Every round starts again from the same
prefilled cache, so all rounds measure the same positions. Raw samples are kept.

A worker that fails to start, crashes (OOM included) or hangs makes its run FAILED with its log's
tail; the other runs go on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


# ----------------------------------------------------------------------------- worker (commit's env)

class DecodeWorker:
    """Holds one prefilled cache per context; ``sample()`` times one block on each."""

    def __init__(self, spec: dict):
        import torch

        self.torch = torch
        self.nsa = harness.import_nsa()
        self.device = spec["device"]
        harness.set_determinism(self.device, spec.get("flush_denormal", True))
        self.steps, self.warmup, batch = spec["steps"], spec["warmup"], spec["batch"]
        self.graph = bool(spec.get("graph")) and self.device == "cuda"
        self.timer = harness.Timer(self.device)
        self.probe = harness.MemoryProbe(self.device)
        dtype = harness.torch_dtype(spec["dtype"])
        torch.manual_seed(spec["seed"])
        cfg = self.nsa.NSAConfig(**spec["model"])
        self.attn = self.nsa.NSAAttention(cfg).to(device=self.device, dtype=dtype).eval()
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        self.x_t = torch.randn(batch, 1, cfg.dim, generator=gen).to(self.device, dtype)
        # Room for warm-up, the timed steps and (graph mode) the capture's own steps.
        extra = self.warmup + self.steps + 8
        self.pristine, self.graphs = {}, {}
        with torch.no_grad():
            for ctx in spec["contexts"]:
                x = torch.randn(batch, ctx, cfg.dim, generator=gen).to(self.device, dtype)
                cache = self.attn.new_cache(batch, ctx + extra)
                self.attn.prefill(x, cache)
                self.pristine[ctx] = cache
                if self.graph:
                    self.graphs[ctx] = self._capture(copy.deepcopy(cache))
        # Workspace counters from here on describe steady-state decode, not the prefill.
        self.nsa.reset_workspaces()

    def _capture(self, cache):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.attn.decode_step(self.x_t, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.attn.decode_step(self.x_t, cache)
        return graph, cache

    @staticmethod
    def _restore(dst, src):
        """Put ``src``'s state into ``dst`` in place (a captured graph keeps ``dst``'s tensors)."""
        import torch

        for key, value in vars(src).items():
            target = getattr(dst, key)
            if torch.is_tensor(value):
                target.copy_(value)
            elif not torch.is_tensor(target):
                setattr(dst, key, copy.copy(value))

    def sample(self) -> dict:
        out = {}
        step = self.attn.decode_step
        for ctx, pristine in self.pristine.items():
            cache = copy.deepcopy(pristine)
            for _ in range(self.warmup):
                step(self.x_t, cache)
            self.probe.start()
            eager = [self.timer(lambda: step(self.x_t, cache)) for _ in range(self.steps)]
            self.probe.stop()
            out[str(ctx)] = {"eager_ms": eager}
            if self.graph:
                graph, gcache = self.graphs[ctx]
                self._restore(gcache, pristine)
                for _ in range(self.warmup):
                    graph.replay()
                self.probe.start()
                out[str(ctx)]["graph_ms"] = [self.timer(graph.replay) for _ in range(self.steps)]
                self.probe.stop()
        return out

    def finish(self) -> dict:
        return {"workspace_stats": self.nsa.workspace_stats(), "memory": self.probe.as_dict()}


def worker_main(spec_json: str) -> int:
    # Protocol on a private copy of stdout; anything the code under test prints goes to the log.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        worker = DecodeWorker(json.loads(spec_json))
    except Exception as e:
        import traceback

        traceback.print_exc()
        send({"error": f"setup failed: {type(e).__name__}: {e}"})
        return 1
    send({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line).get("cmd")
        if cmd == "sample":
            send({"contexts": worker.sample()})
        elif cmd == "finish":
            send(worker.finish())
            return 0
    return 0


# ----------------------------------------------------------------------------- coordinator

class Remote:
    """One worker process and its line protocol, with timeouts."""

    def __init__(self, run: dict, spec: dict, device: str, log_path: Path):
        self.run, self.log_path, self._buf = run, log_path, b""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "wb")
        cmd = harness.worker_command(run["env_dir"], "bench_decode.py", "worker", "--spec", json.dumps(spec))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=harness.child_env(run["vars"], device), start_new_session=True)

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

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
            self.send(obj)
        except (BrokenPipeError, OSError):
            rc = self.proc.wait()
            raise RuntimeError(f"worker ended ({harness.describe_exit(rc)})") from None
        return self.receive(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log.close()


def worker_spec(sizes: dict, device: str, model: dict, seed: int, flush_denormal: bool) -> dict:
    keys = ("contexts", "steps", "warmup", "batch", "dtype", "graph")
    return {**{k: sizes[k] for k in keys if k in sizes}, "device": device, "model": model, "seed": seed,
            "flush_denormal": flush_denormal}


def round_order(n: int, round_index: int, seed: int) -> list[int]:
    """Which run goes when in a round: shuffled per round (seeded), so no run is always first."""
    order = list(range(n))
    random.Random(seed * 7919 + round_index).shuffle(order)
    return order


def coordinate(runs: list[dict], spec: dict, rounds: int, device: str, log_dir: Path, timeout: float,
               seed: int) -> list[dict]:
    results = []
    remotes: dict[int, Remote] = {}
    for i, run in enumerate(runs):
        res = {"variant": run["variant"], "sha": run["sha"], "reserve": run["reserve"], "status": "ok",
               "contexts": {str(c): {"eager_ms": []} for c in spec["contexts"]}}
        results.append(res)
        if run.get("env_error"):
            res.update(harness.failed(f"environment failed: {run['env_error']}", run.get("env_log_tail", "")),
                       contexts={})
            continue
        name = f"{run['variant']}.{run['reserve']}".replace("/", "_")
        remotes[i] = Remote(run, spec, device, log_dir / f"{i:02d}-{name[:80]}.log")

    def fail(i, err):
        remote = remotes.pop(i)
        remote.close()
        # Samples from before a crash are dropped: a failed run is never read as a measurement.
        results[i].update(harness.failed(str(err), harness.file_tail(remote.log_path)), contexts={})
        print(f"decode run {results[i]['variant']}/{results[i]['reserve']} FAILED: {err}", flush=True)

    try:
        for i in list(remotes):  # workers set up concurrently; wait for each to say ready
            try:
                remotes[i].receive(timeout)
            except (RuntimeError, TimeoutError, ValueError) as e:
                fail(i, e)
        for r in range(rounds):
            for i in round_order(len(runs), r, seed):
                if i not in remotes:
                    continue
                try:
                    block = remotes[i].ask({"cmd": "sample"}, timeout)["contexts"]
                except (RuntimeError, TimeoutError, ValueError, KeyError) as e:
                    fail(i, e)
                    continue
                for ctx, modes in block.items():
                    for mode, samples in modes.items():
                        results[i]["contexts"].setdefault(ctx, {}).setdefault(mode, []).extend(samples)
            print(f"decode round {r + 1}/{rounds} done", flush=True)
        for i in list(remotes):
            try:
                end = remotes[i].ask({"cmd": "finish"}, timeout)
                results[i]["workspace_stats"] = end.get("workspace_stats", {})
                results[i]["memory"] = end.get("memory", {})
            except (RuntimeError, TimeoutError, ValueError) as e:
                fail(i, e)
    finally:
        for remote in remotes.values():
            remote.close()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode")
    w = sub.add_parser("worker", help="(inside a commit's env) serve samples over stdin/stdout")
    w.add_argument("--spec", required=True)
    ap.add_argument("--runs", help="JSON list of {variant, sha, reserve, env_json, vars}")
    ap.add_argument("--sizes", help="JSON: contexts, steps, warmup, rounds, batch, dtype, graph")
    ap.add_argument("--model", default="{}", help="JSON: NSAConfig fields")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flush-denormal", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one worker may take to answer")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--log-dir", type=Path)
    args = ap.parse_args(argv)
    if args.mode == "worker":
        return worker_main(args.spec)
    harness.exit_on_sigterm()
    sizes = json.loads(args.sizes)
    runs = []
    for run in json.loads(args.runs):
        env = harness.env_record(run["env_json"])
        run = {**run, "env_dir": env.get("env_dir")}
        if env.get("status") != "ok":
            run.update(env_error=env.get("error"), env_log_tail=env.get("log_tail", ""))
        runs.append(run)
    spec = worker_spec(sizes, args.device, json.loads(args.model), args.seed, not args.no_flush_denormal)
    results = coordinate(runs, spec, sizes["rounds"], args.device, args.log_dir, args.timeout, args.seed)
    harness.write_json(args.out, {"device": args.device, "timer": harness.Timer(args.device).name,
                                  "rounds": sizes["rounds"], "sizes": sizes, "runs": results})
    print(f"decode: {sum(r['status'] == 'ok' for r in results)}/{len(results)} runs ok -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
