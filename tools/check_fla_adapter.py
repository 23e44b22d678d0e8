"""GPU check of the fla adapter (workflow/adapters/fla.py) at a small model: does every call the
workflow makes work on CUDA, and what does fla's NSA do there.

    python tools/check_fla_adapter.py [--wheel WHEEL_OR_DIR ...] [--seq-len 1024]

fla must be importable (``pip install fla-core``), or give ``--wheel`` with downloaded wheels (a file
or a folder of them) for a machine without an index, e.g. made with
``pip download --no-deps fla-core==0.6.0 einops -d build/wheels``: they are pure Python, unpacked
into a temporary folder put first on sys.path (triton comes with CUDA torch). The window branch
needs flash-attn. Prints one line per check, then a JSON summary.
Exit status: 0 all good; 1 an error (exception, wrong shape, non-finite output, a refused model
that should run); 2 no CUDA; 3 the adapter works but decode disagrees with forward beyond the
workflow's bfloat16 tolerance (a finding about fla, reported with its numbers); 4 flash-attn is
not installed (no window branch, so nothing to run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import adapter_api  # noqa: E402

MODEL = {"dim": 256, "groups": 2, "heads_per_group": 16, "d_k": 64, "d_v": 64, "block_len": 32, "block_stride": 32,
         "sel_block_len": 32, "n_sel": 16, "window": 64}
TOL_BF16 = 5e-2  # config.yaml consistency.tolerance.bfloat16, times max(1, max |forward|)


def timed_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forced_blocks_present(blocks, block_len: int) -> bool:
    """Block 0, the query's block and the one before are among each query's selected blocks."""
    import torch

    B, T, G, n = blocks.shape
    t = torch.arange(T, device=blocks.device).view(1, T, 1, 1)
    own = t // block_len
    has = lambda b: ((blocks == b) | (b < 0)).any(-1)  # noqa: E731
    return bool((has(torch.zeros_like(own)) & has(own) & has(own - 1)).all())


def check(args, out: dict) -> int:
    import torch

    ad = adapter_api.load(adapter_api.adapter_path("fla"))
    out["fla_version"] = ad.version()
    import fla.ops.nsa.parallel as parallel

    out["flash_attn"] = parallel.flash_attn_func is not None
    out["cached_inference"] = ad._has_cached_inference()
    print(f"fla {out['fla_version']} from {Path(parallel.__file__).parents[2]}; flash-attn: {out['flash_attn']}; "
          f"cached inference: {out['cached_inference']}")
    if not out["flash_attn"]:
        print("cannot check: fla computes the window branch with flash_attn.flash_attn_func and flash-attn is not "
              "installed (the workflow reports every stage 'not supported' here)")
        return 4

    for change in ({"heads_per_group": 8}, {"block_stride": 16}, {"d_v": 32}):
        try:
            ad.build_layer({**MODEL, **change}, device="cuda", dtype="bfloat16")
            print(f"ERROR: {change} was accepted")
            return 1
        except adapter_api.Unsupported as exc:
            print(f"refused as expected: {exc}")
    try:
        ad.build_layer(MODEL, device="cuda", dtype="float32")
        print("ERROR: float32 was accepted")
        return 1
    except adapter_api.Unsupported as exc:
        print(f"refused as expected: {exc}")

    torch.manual_seed(0)
    B, T, dim = args.batch, args.seq_len, MODEL["dim"]
    layer = ad.build_layer(MODEL, device="cuda", dtype="bfloat16")
    x = torch.randn(B, T, dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = ad.forward(layer, x)
    out["forward_shape"] = list(y.shape)
    out["forward_finite"] = bool(torch.isfinite(y).all())
    with torch.no_grad():
        out["forward_ms"] = timed_ms(lambda: ad.forward(layer, x))
    print(f"forward {list(x.shape)} -> {out['forward_shape']}, finite {out['forward_finite']}, "
          f"{out['forward_ms']:.3f} ms (median of 20, B={B}, T={T}, bf16)")
    if out["forward_shape"] != [B, T, dim] or not out["forward_finite"]:
        print("ERROR: forward shape or values wrong")
        return 1

    xg = x.clone().requires_grad_(True)
    ad.forward(layer, xg).float().square().mean().backward()
    grads = [p.grad for p in layer.parameters()]
    out["backward_ok"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads) and bool(
        torch.isfinite(xg.grad).all())

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        ad.forward(layer, xg).float().square().mean().backward()

    out["forward_backward_ms"] = timed_ms(fwd_bwd, iters=10)
    print(f"backward: grads finite {out['backward_ok']}, forward+backward {out['forward_backward_ms']:.3f} ms")
    if not out["backward_ok"]:
        print("ERROR: backward gave missing or non-finite gradients")
        return 1

    blocks = ad.selected_blocks(layer, x)
    out["blocks_shape"] = list(blocks.shape)
    out["forced_blocks_present"] = forced_blocks_present(blocks, MODEL["block_len"])
    print(f"selected blocks {out['blocks_shape']}, forced blocks (0, own, previous) present: "
          f"{out['forced_blocks_present']}")
    if out["blocks_shape"] != [B, T, MODEL["groups"], MODEL["n_sel"]]:
        print("ERROR: selected blocks have the wrong shape")
        return 1

    # n_sel not a power of two: the adapter passes block_counts as a tensor
    odd = {**MODEL, "n_sel": 12}
    layer12 = ad.build_layer(odd, device="cuda", dtype="bfloat16")
    with torch.no_grad():
        y12 = ad.forward(layer12, x)
    b12 = ad.selected_blocks(layer12, x)
    out["n_sel_12"] = {"finite": bool(torch.isfinite(y12).all()), "blocks_shape": list(b12.shape),
                       "forced_blocks_present": forced_blocks_present(b12, MODEL["block_len"]),
                       "route": ad.routes(layer12)["selection"]["reason"]}
    print(f"n_sel=12: {out['n_sel_12']}")

    if not out["cached_inference"]:
        print("decode: not supported by this fla (no cached inference)")
        return 0
    prefix = T - args.decode_steps
    with torch.no_grad():
        cache = ad.new_cache(layer, B, T)
        y_p, cache = ad.prefill(layer, x[:, :prefix], cache)
        parts = [y_p]
        step_ms = []
        for t in range(prefix, T):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y_t, cache = ad.decode_step(layer, x[:, t:t + 1], cache)
            end.record()
            parts.append(y_t)
            torch.cuda.synchronize()
            step_ms.append(start.elapsed_time(end))
    err = (torch.cat(parts, 1).float() - y.float()).abs()
    per_pos = err.amax(dim=(0, 2))
    scale = max(1.0, y.float().abs().max().item())
    out["decode"] = {"prefix": prefix, "steps": args.decode_steps, "max_abs_err_prefill": per_pos[:prefix].max().item(),
                     "max_abs_err_decode": per_pos[prefix:].max().item(), "worst_position": int(per_pos.argmax()),
                     "tolerance": TOL_BF16 * scale, "step_ms_median": statistics.median(step_ms[5:] or step_ms)}
    print(f"decode == forward: {out['decode']}")
    if max(out["decode"]["max_abs_err_prefill"], out["decode"]["max_abs_err_decode"]) > out["decode"]["tolerance"]:
        print("FINDING: decode disagrees with forward beyond the bfloat16 tolerance")
        return 3
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", action="append", default=[],
                        help="a pure-Python wheel, or a folder of them, to use when fla (or einops) is not installed")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: fla's NSA runs on CUDA only")
        return 2
    wheels = [w for arg in args.wheel for w in (sorted(Path(arg).glob("*.whl")) if Path(arg).is_dir() else [Path(arg)])]
    if wheels:
        target = tempfile.mkdtemp(prefix="fla-wheels-")
        for wheel in wheels:
            zipfile.ZipFile(wheel).extractall(target)
        sys.path.insert(0, target)
        print(f"unpacked onto sys.path: {', '.join(w.name for w in wheels)}")
    out = {"model": MODEL, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        status = check(args, out)
    except Exception:  # any failure of the adapter or of fla is this script's answer
        traceback.print_exc()
        status = 1
    out["status"] = status
    print(json.dumps(out, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
