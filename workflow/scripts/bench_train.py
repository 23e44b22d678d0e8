"""Training throughput of one commit under one reserve configuration, next to its dense twin.

    bench_train.py --env-json results/env/SHA/env.json --sizes '{"steps": 16, ...}' \
        --vars '{...}' --device cpu --out results/train/SHA/none.json --log LOG

``nsa.models.TinyLM`` learns ``nsa.models.synthetic_batches``; the same model with
``attention="dense"`` (same parameters, same seed, same batches) runs in the same job, so the
ratio compares like with like on the same machine state. Per step: the loss (every step) and
tokens/s (after warm-up), timed with CUDA events on GPU, perf_counter on CPU. Peak memory,
workspace counters and allocator counters come with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def tokens_per_s(batch: int, seq_len: int, ms: float) -> float:
    return batch * seq_len / (ms / 1e3) if ms > 0 else float("inf")


def train_one(nsa, attention: str, spec: dict) -> tuple[dict, dict, dict]:
    """(series, workspace stats, allocator counters) for ``steps`` optimizer steps."""
    import contextlib

    import torch
    from nsa.models import TinyLM, synthetic_batches

    device, s = spec["device"], spec["sizes"]
    torch.manual_seed(spec["seed"])
    cfg = nsa.NSAConfig(**spec["model"])
    model = TinyLM(s["vocab"], cfg.dim, s["layers"], cfg, attention=attention).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"])
    batches = synthetic_batches(s["vocab"], s["batch"], s["seq_len"], seed=spec["seed"], device=device)
    # Half precision through autocast (float32 master weights), as a training loop would do.
    half = s["dtype"] != "float32"
    autocast = (lambda: torch.autocast(device_type=device, dtype=harness.torch_dtype(s["dtype"]))) if half \
        else contextlib.nullcontext
    timer, probe = harness.Timer(device), harness.MemoryProbe(device)
    nsa.reset_workspaces()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, tps = [], []
    for i in range(s["steps"]):
        tokens = next(batches)
        holder = {}

        def step():
            with autocast():
                loss = model.loss(tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            holder["loss"] = loss.detach()

        if i == s["warmup"]:
            probe.start()
        ms = timer(step)
        losses.append(float(holder["loss"].float()))
        if i >= s["warmup"]:
            tps.append(tokens_per_s(s["batch"], s["seq_len"], ms))
    probe.stop()
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else harness.peak_rss_bytes()
    return {"tokens_per_s": tps, "loss": losses, "peak_mem_bytes": peak}, nsa.workspace_stats(), probe.as_dict()


def worker_main(spec: dict, out: Path) -> int:
    nsa = harness.import_nsa()
    harness.set_determinism(spec["device"], spec.get("flush_denormal", True))
    nsa_series, ws, mem = train_one(nsa, "nsa", spec)
    dense_series, _, dense_mem = train_one(nsa, "dense", spec)
    s = spec["sizes"]
    harness.write_json(out, {
        "status": "ok", "device": spec["device"], "steps": s["steps"], "warmup": s["warmup"], "batch": s["batch"],
        "seq_len": s["seq_len"], "layers": s["layers"], "vocab": s["vocab"], "dtype": s["dtype"],
        "nsa": nsa_series, "dense": dense_series, "workspace_stats": ws, "memory": mem, "dense_memory": dense_mem,
        "peak_mem_note": "torch.cuda.max_memory_allocated per phase" if spec["device"] == "cuda"
        else "process peak RSS (the dense phase runs second, so its value includes the NSA phase's)",
    })
    return 0


def main(argv=None) -> int:
    ap = harness.stage_parser(__doc__.splitlines()[0], "run the benchmark described by this JSON",
                              "steps, warmup, batch, seq_len, layers, vocab, lr, dtype", timeout=3600)
    ap.add_argument("--no-flush-denormal", action="store_true")
    args = ap.parse_args(argv)
    if args.worker_spec:
        return worker_main(json.loads(args.worker_spec), args.out)
    spec = {"device": args.device, "sizes": json.loads(args.sizes or "{}"), "model": json.loads(args.model),
            "seed": args.seed, "flush_denormal": not args.no_flush_denormal}
    tmp = args.out.with_name(f".{args.out.name}.worker")
    record = harness.run_stage_worker(args, "bench_train.py", spec, tmp, "training benchmark")
    tmp.unlink(missing_ok=True)
    harness.write_json(args.out, record)
    print(f"train {args.out}: {record['status']}" + (f" ({record.get('error')})" if record["status"] != "ok" else ""))
    return 0

if __name__ == "__main__":
    sys.exit(main())
