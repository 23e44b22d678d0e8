"""Training worker: one process in a commit's environment training the harness's TinyLM.

    train_worker.py --spec JSON      (started by bench_train.py; talks JSON lines on stdin/stdout)

The TinyLM (workflow/scripts/tinylm.py) is built around the adapter's layer, or around the
harness's dense layer for the reference run (the dense twin: identical code in every commit).
Set-up runs the warm-up steps; each ``steps`` request then runs one untimed step and ``n`` timed
optimizer steps, and answers the timed steps' tokens/s (CUDA events on GPU, perf_counter on CPU)
and every step's loss.
Half precision runs through autocast over float32 master weights, as a training loop would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_api  # noqa: E402
import harness  # noqa: E402


def tokens_per_s(batch: int, seq_len: int, ms: float) -> float:
    return batch * seq_len / (ms / 1e3) if ms > 0 else float("inf")


class TrainWorker:
    def __init__(self, spec: dict):
        import torch

        import tinylm

        self.torch = torch
        harness.set_threads(spec.get("threads"))
        self.adapter = harness.worker_adapter(spec)
        self.device, s = spec["device"], spec["sizes"]
        why = adapter_api.unsupported_on(self.adapter, self.device, s["dtype"])
        if why:
            raise adapter_api.Unsupported(why)
        if not adapter_api.capabilities(self.adapter)["backward"]:
            raise adapter_api.Unsupported("unsupported: training (the adapter declares no backward pass)")
        harness.set_determinism(self.device, spec.get("flush_denormal", True))
        self.s = s
        torch.manual_seed(spec["seed"])
        self.model = tinylm.TinyLM(self.adapter, spec["model"], s["vocab"], s["layers"], self.device).to(self.device)
        # CPU: the harness's AdamW (torch's imports torch._dynamo, most of a CPU worker's set-up);
        # GPU: torch's, whose multi-tensor update launches a few kernels instead of several per tensor.
        adamw = tinylm.AdamW if self.device == "cpu" else torch.optim.AdamW
        self.opt = adamw(self.model.parameters(), lr=s["lr"])
        self.batches = tinylm.synthetic_batches(s["vocab"], s["batch"], s["seq_len"], seed=spec["seed"],
                                                device=self.device)
        half = s["dtype"] != "float32"
        self.autocast = (lambda: torch.autocast(device_type=self.device, dtype=getattr(torch, s["dtype"]))) if half \
            else contextlib.nullcontext
        self.timer, self.probe = harness.Timer(self.device), harness.MemoryProbe(self.device)
        adapter_api.call_optional(self.adapter, "reset_workspaces")
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model.train()
        self.warmup_loss = [self._step()[1] for _ in range(s["warmup"])]
        self.info = {"warmup_loss": self.warmup_loss}
        self._release()

    def _release(self) -> None:
        """Give cached GPU memory back while idle: every run's workers stay alive between their
        turns, and a step's activations (GBs) kept by each would exhaust the GPU (seen: 25 workers
        x 8.5 GB on a 140 GB H200)."""
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def _step(self) -> tuple[float, float]:
        tokens = next(self.batches)
        holder = {}

        def step():
            with self.autocast():
                loss = self.model.loss(tokens)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            holder["loss"] = loss.detach()

        ms = self.timer(step)
        return tokens_per_s(self.s["batch"], self.s["seq_len"], ms), float(holder["loss"].float())

    def steps(self, n: int) -> dict:
        # One untimed step first: after waiting for the other workers' turns, a worker's first step
        # runs cold (CPU: caches, about 1.5x slower on the 2-core CI machine; GPU: the allocator takes
        # back what _release gave away), and training runs its steps back to back. It trains like
        # any other, so its loss joins the curve (the loss check compares the curve's ends).
        untimed = [self._step()[1]] if n else []
        self.probe.start()
        tps, loss = zip(*(self._step() for _ in range(n))) if n else ((), ())
        self.probe.stop()
        self._release()
        return {"tokens_per_s": list(tps), "loss": untimed + list(loss)}

    def finish(self) -> dict:
        torch = self.torch
        peak = int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else harness.peak_rss_bytes()
        return {"peak_mem_bytes": peak, "workspace_stats": adapter_api.call_optional(self.adapter, "workspace_stats"),
                "memory": self.probe.as_dict(), "routes": harness.safe_routes(self.adapter, self.model.blocks[0].attn)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    return harness.serve(lambda: TrainWorker(spec), {"steps": lambda w, m: w.steps(int(m["n"])),
                                                      "finish": lambda w, m: w.finish()})


if __name__ == "__main__":
    sys.exit(main())
