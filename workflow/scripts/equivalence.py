"""Outputs of one commit under one reserve configuration, for the equivalence check.

    equivalence.py --env-json results/env/SHA/env.json --sizes '{"batch": 2, "seq_len": 640, "decode_steps": 4}' \
        --vars '{...}' --device cpu --out results/equiv/SHA/none.json

The same weights and inputs go through every commit: parameters are set from their *names*
(a seeded generator per parameter name), not from the module's own initialisation, so two commits
that create parameters in a different order still get identical weights. Float32, TF32 off.
Writes ``<out>.pt`` (``{"prefill": forward(x), "decode": decode_step outputs after prefilling
the first seq_len - decode_steps tokens}``) and then ``<out>`` (``{"status": ...}``); the report
compares the tensors (max abs diff vs the baseline, bit-identity across reserve configs).
"""

from __future__ import annotations

import io
import json
import math
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def init_by_name(module, seed: int) -> None:
    """Every parameter drawn from a generator seeded by (seed, its name), scaled by its width."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            scale = 1.0 / math.sqrt(max(p.shape)) if p.dim() >= 2 else 0.02
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def outputs(nsa, spec: dict) -> dict:
    import torch

    device, s = spec["device"], spec["sizes"]
    cfg = nsa.NSAConfig(**spec["model"])
    attn = nsa.NSAAttention(cfg).to(device).eval()
    init_by_name(attn, spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    x = torch.randn(s["batch"], s["seq_len"], cfg.dim, generator=g).to(device)
    with torch.no_grad():
        prefill = attn(x)
        t0 = s["seq_len"] - s["decode_steps"]
        cache = attn.new_cache(s["batch"], s["seq_len"])
        attn.prefill(x[:, :t0], cache)
        steps = [attn.decode_step(x[:, t:t + 1], cache) for t in range(t0, s["seq_len"])]
        decode = torch.cat(steps, dim=1) if steps else x[:, :0]
    return {"prefill": prefill.detach().cpu(), "decode": decode.detach().cpu()}


def worker_main(spec: dict, out: Path) -> int:
    import torch

    nsa = harness.import_nsa()
    harness.set_determinism(spec["device"], flush_denormal=False)
    tensors = outputs(nsa, spec)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    harness.write_atomic(out.with_suffix(".pt"), buf.getvalue())
    harness.write_json(out, {"status": "ok", "shapes": {k: list(v.shape) for k, v in tensors.items()},
                             "finite": {k: bool(torch.isfinite(v).all()) for k, v in tensors.items()}})
    return 0


def main(argv=None) -> int:
    ap = harness.stage_parser(__doc__.splitlines()[0], "compute and save the outputs",
                              "batch, seq_len, decode_steps", timeout=1800)
    args = ap.parse_args(argv)
    if args.worker_spec:
        return worker_main(json.loads(args.worker_spec), args.out)
    pt = args.out.with_suffix(".pt")
    pt.unlink(missing_ok=True)  # never pair a fresh status with an old tensor file
    spec = {"device": args.device, "sizes": json.loads(args.sizes or "{}"), "model": json.loads(args.model),
            "seed": args.seed}
    tmp = args.out.with_name(f".{args.out.stem}.worker.json")
    tmp.with_suffix(".pt").unlink(missing_ok=True)
    record = harness.run_stage_worker(args, "equivalence.py", spec, tmp, "equivalence run")
    if record["status"] == "ok":
        if tmp.with_suffix(".pt").exists():
            tmp.with_suffix(".pt").replace(pt)
        else:
            record = harness.failed("equivalence run wrote no tensor file", harness.file_tail(args.log))
    for leftover in (tmp, tmp.with_suffix(".pt")):
        leftover.unlink(missing_ok=True)
    harness.write_json(args.out, record)
    print(f"equivalence {args.out}: {record['status']}" + (f" ({record.get('error')})" if record["status"] != "ok" else ""))
    return 0

if __name__ == "__main__":
    sys.exit(main())
