"""Decode == forward within one commit under one reserve configuration (a correctness stage).

    consistency.py --env-json results/env/SHA/env.json --adapter ADAPTER --sizes '{"batch": 1, "seq_len": 1152, "prefix": 1024, "dtype": "float32"}' \
        --vars '{...}' --device cpu --out results/consistency/SHA/none.json

``forward`` of the whole sequence is the reference. The adapter's ``prefill`` of the first
``prefix`` tokens must reproduce it on those positions, and each ``decode_step`` after it (the
harness threads the returned cache) on the next one. Passed when the largest error over all
positions is within ``tolerance x max(1, max |forward|)``, with the tolerance of the dtype; the
record names the worst position and its error either way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_api  # noqa: E402
import harness  # noqa: E402


def compare(adapter, spec: dict) -> dict:
    import torch

    import tinylm

    device, s = spec["device"], spec["sizes"]
    why = adapter_api.unsupported_on(adapter, device, s["dtype"])
    if why:
        raise adapter_api.Unsupported(why)
    if not adapter_api.capabilities(adapter)["decode"]:
        raise adapter_api.Unsupported("unsupported: decode (the adapter declares no decode cache)")
    torch.manual_seed(spec["seed"])
    layer = adapter.build_layer(spec["model"], device=device, dtype="float32").eval()
    tinylm.init_by_name(layer, spec["seed"])
    dtype = getattr(torch, s["dtype"])
    layer = layer.to(dtype)
    g = torch.Generator().manual_seed(spec["seed"] + 3)
    B, T, P = s["batch"], s["seq_len"], s["prefix"]
    x = torch.randn(B, T, spec["model"]["dim"], generator=g).to(device, dtype)
    with torch.no_grad():
        ref = adapter.forward(layer, x).float()
        y_prefix, cache = adapter.prefill(layer, x[:, :P], adapter.new_cache(layer, B, T))
        steps = [y_prefix.float()]
        for t in range(P, T):
            y_t, cache = adapter.decode_step(layer, x[:, t:t + 1], cache)
            steps.append(y_t.float().reshape(B, 1, -1))
        got = torch.cat(steps, dim=1)
    if tuple(got.shape) != tuple(ref.shape):
        return {"status": "ok", "passed": False, "dtype": s["dtype"], "positions": T,
                "error": f"prefill + decode gave shape {list(got.shape)}, forward {list(ref.shape)}"}
    err = (got - ref).abs().amax(dim=(0, 2))  # per position
    finite = bool(torch.isfinite(got).all())
    worst = int(err.nan_to_num(float("inf")).argmax())
    scale = max(1.0, float(ref.abs().max()))
    tol = spec["tolerance"][s["dtype"]]
    max_err = float(err.nan_to_num(float("inf")).max())
    return {"status": "ok", "dtype": s["dtype"], "positions": T, "prefix": P, "decode_steps": T - P,
            "tolerance": tol * scale, "tolerance_rel": tol, "output_scale": scale, "max_abs_err": max_err,
            "worst_position": worst, "worst_is_decode": worst >= P, "finite": finite,
            "max_abs_err_prefill": float(err[:P].max()) if P else None,
            "max_abs_err_decode": float(err[P:].max()) if T > P else None,
            "passed": finite and max_err <= tol * scale}


def worker_main(spec: dict, out: Path) -> int:
    def run():
        adapter = harness.worker_adapter(spec)
        harness.set_determinism(spec["device"], flush_denormal=False)
        return compare(adapter, spec)

    harness.write_json(out, harness.worker_record(run))
    return 0


def main(argv=None) -> int:
    ap = harness.stage_parser(__doc__.splitlines()[0], "run the comparison", "batch, seq_len, prefix, dtype",
                              timeout=1800)
    ap.add_argument("--tolerance", default="{}", help="JSON: dtype -> relative tolerance")
    args = ap.parse_args(argv)
    if args.worker_spec:
        return worker_main(json.loads(args.worker_spec), args.out)
    spec = {"device": args.device, "sizes": json.loads(args.sizes or "{}"), "model": json.loads(args.model),
            "seed": args.seed, "adapter": args.adapter, "tolerance": json.loads(args.tolerance)}
    tmp = args.out.with_name(f".{args.out.name}.worker")
    record = harness.run_stage_worker(args, "consistency.py", spec, tmp, "consistency run")
    tmp.unlink(missing_ok=True)
    harness.write_json(args.out, record)
    verdict = record["status"] if record["status"] != "ok" else ("pass" if record.get("passed") else "MISMATCH")
    print(f"consistency {args.out}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
