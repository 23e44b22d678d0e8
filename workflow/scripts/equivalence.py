"""Outputs of one commit under one reserve configuration, for the cross-commit equivalence check.

    equivalence.py --env-json results/env/SHA/env.json --adapter ADAPTER --sizes '{"batch": 2, "seq_len": 1152, "decode_steps": 4}' \
        --vars '{...}' --device cpu --out results/equiv/SHA/none.json

The same weights and inputs go through every commit: parameters are set from their *names*
(tinylm.init_by_name), so two commits that create parameters in a different order still get
identical weights. Float32, TF32 off. Writes ``<out>.pt`` (``{"prefill": forward(x), "decode": the
decode_step outputs after prefilling the first seq_len - decode_steps tokens, "blocks": the
selected block indices where the adapter exposes them}``) and then ``<out>``; the report compares
the tensors (max abs diff and selected blocks vs the baseline, bit-identity across reserve configs).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_api  # noqa: E402
import harness  # noqa: E402


def outputs(adapter, spec: dict) -> dict:
    import torch

    import tinylm

    device, s = spec["device"], spec["sizes"]
    why = adapter_api.unsupported_on(adapter, device, "float32")
    if why:
        raise adapter_api.Unsupported(why)
    caps = adapter_api.capabilities(adapter)
    layer = adapter.build_layer(spec["model"], device=device, dtype="float32").eval()
    tinylm.init_by_name(layer, spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    x = torch.randn(s["batch"], s["seq_len"], spec["model"]["dim"], generator=g).to(device)
    out = {}
    with torch.no_grad():
        out["prefill"] = adapter.forward(layer, x)
        if caps["decode"] and s["decode_steps"]:
            t0 = s["seq_len"] - s["decode_steps"]
            _, cache = adapter.prefill(layer, x[:, :t0], adapter.new_cache(layer, s["batch"], s["seq_len"]))
            steps = []
            for t in range(t0, s["seq_len"]):
                y_t, cache = adapter.decode_step(layer, x[:, t:t + 1], cache)
                steps.append(y_t)
            out["decode"] = torch.cat(steps, dim=1)
        if caps["block_indices"]:
            blocks = adapter_api.call_optional(adapter, "selected_blocks", layer, x)
            if blocks is not None:
                out["blocks"] = blocks
    return {k: v.detach().cpu() for k, v in out.items()}


def worker_main(spec: dict, out: Path) -> int:
    import torch

    def run():
        adapter = harness.worker_adapter(spec)
        harness.set_determinism(spec["device"], flush_denormal=False)
        tensors = outputs(adapter, spec)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        harness.write_atomic(out.with_suffix(".pt"), buf.getvalue())
        return {"status": "ok", "shapes": {k: list(v.shape) for k, v in tensors.items()},
                "finite": {k: bool(torch.isfinite(v.float()).all()) for k, v in tensors.items()}}

    harness.write_json(out, harness.worker_record(run))
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
            "seed": args.seed, "adapter": args.adapter}
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
    if record["status"] == "ok":  # outputs of two GPU models are not compared: say where these came from
        record["placement"] = harness.placement(args.device)
    harness.write_json(args.out, record)
    print(f"equivalence {args.out}: {record['status']}" + (f" ({record.get('error')})" if record["status"] == "failed" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
