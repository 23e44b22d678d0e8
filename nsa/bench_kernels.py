"""Op-level timings of the branches: ``python -m nsa.bench_kernels [--json out.json]``.

For each ``T`` (default 8192, 16384, 32768, 65536; B=1, H=64 query heads in G=4 groups, d=128,
window 512, compression l=32, d=16, bf16) it times forward and forward+backward of

- window: the Triton kernel (:mod:`nsa.ops.triton_attention`), FlexAttention (the ``flex-sliding-window``
  route), the FA-2 route where this machine has one, and the chunked band reference;
- compressed: the Triton kernel, the FA-2 route (segment folding over causal SDPA/flash_attn), and the
  masked-matmul reference (which also returns the probabilities the selection needs);
- scoring (forward only: indices): the selected blocks from the compressed keys, by the Triton
  scoring and top-n kernels and by the chunked reference (probabilities, overlap matmul, sort);
- selection (n=16 blocks of 64 per query and group, from random scores): the Triton kernel and
  FlexAttention;
- dense causal ``scaled_dot_product_attention`` over the same heads, for scale.

Each figure is the median of ``--reps`` calls timed with CUDA events after ``--warmup`` calls, with the
peak allocated memory of those calls (inputs included). A variant that fails (out of memory, no kernel for this
machine) is recorded with its error and not tried again at larger ``T``; once ``--budget-s`` seconds
have passed the remaining variants are recorded as skipped. The Triton and dense rows run first for
every ``T``, the other routes after. CUDA only (on CPU the Triton kernels need
``TRITON_INTERPRET=1``; ``--device cpu`` with tiny sizes only checks that the script runs).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from . import routes
from .bench_smoke import _Timer, summarise, write_json
from .flags import override
from .ops import compressed, flex, selection, triton_attention, triton_scoring, triton_selection, window
from .ops.selection import select_blocks

SCHEMA_VERSION = 1


def _dense_causal(q, k, v):
    """Dense causal attention over every query head (K/V repeated per group), flash kernel only."""
    h = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(h, dim=2), v.repeat_interleave(h, dim=2)))
    if q.is_cuda:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


def _fa2_route(route_fn, device, dtype, d):
    """The FA-2 route of a branch on this machine, or None."""
    with override(use_fa2=True):
        route = route_fn(device, dtype, d, d)
    return route if route.name.startswith("fa2") and route.fn is not None else None


def window_variants(device, dtype, d, w) -> tuple[list, list]:
    """``(first, later)`` lists of ``(name, fn(q, k, v))`` for the window branch."""
    first = [("triton", functools.partial(triton_attention.triton_window_attention, window=w))]
    later = []
    if device.type == "cuda":
        later.append(("flex", functools.partial(flex.sliding_window_attention_flex, window=w)))
        fa2 = _fa2_route(routes.route_win, device, dtype, d)
        if fa2 is not None:
            later.append((fa2.name, functools.partial(fa2.fn, window=w)))
    later.append(("reference-chunked", functools.partial(window.sliding_window_attention, window=w, validate=False)))
    return first, later


def compressed_variants(device, dtype, d, l, stride) -> tuple[list, list]:
    """``(first, later)`` lists of ``(name, fn(q, k_cmp, v_cmp))`` for the compressed branch's output."""
    first = [("triton", functools.partial(triton_attention.triton_compressed_attention, block_len=l,
                                          block_stride=stride))]
    later = []
    fa2 = _fa2_route(routes.route_cmp, device, dtype, d) if device.type == "cuda" else None
    if fa2 is not None:
        later.append((fa2.name, functools.partial(fa2.fn, block_len=l, block_stride=stride)))

    def reference(q, k, v):
        return compressed.compressed_attention(q, k, v, block_len=l, block_stride=stride, validate=False)[0]

    later.append(("reference-masked", reference))
    return first, later


def scoring_variants(device, G, l, stride, sel, n) -> tuple[list, list]:
    """``(first, later)`` lists of ``(name, fn(q, k_cmp, v_cmp))`` picking the selected blocks (forward only)."""
    kw = {"groups": G, "block_len": l, "block_stride": stride, "sel_block_len": sel, "n_sel": n}
    first = [("triton", functools.partial(triton_scoring.select_from_compressed, **kw))] if device.type == "cuda" else []
    return first, [("reference-chunked", functools.partial(selection.select_from_compressed, **kw))]


def selection_variants(device, sel, n) -> tuple[list, list]:
    """``(first, later)`` lists of ``(name, fn(q, k, v))`` for selection attention over ``n`` blocks per
    query and group, drawn from random scores (the block lists of an untrained layer)."""
    cache = {}

    def blocks(q, k):
        key = (tuple(q.shape), tuple(k.shape))
        if key not in cache:
            cache.clear()
            gen = torch.Generator().manual_seed(q.shape[1])
            scores = torch.rand(q.shape[0], q.shape[1], k.shape[2], -(-q.shape[1] // sel), generator=gen)
            cache[key] = select_blocks(scores.to(q.device), sel_block_len=sel, n_sel=n)
        return cache[key]

    def over(fn):
        return lambda q, k, v: fn(q, k, v, blocks(q, k), sel_block_len=sel)

    if device.type != "cuda":
        return [], []
    return [("triton", over(triton_selection.selection_attention_triton))], [("flex", over(flex.selection_attention_flex))]


def measure(fn, inputs, backward: bool, warmup: int, reps: int, device) -> dict:
    """Median time (ms) and peak memory of ``fn(*inputs)`` (and its backward)."""
    timer = _Timer(device)
    xs = [x.detach().requires_grad_(backward) for x in inputs]
    grad = None

    def call():
        o = fn(*xs)
        if backward:
            o.backward(grad)

    if backward:
        with torch.no_grad():
            o = fn(*xs)
        grad = torch.randn_like(o)
        del o
    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        for _ in range(warmup):
            call()
            for x in xs:
                x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        samples = []
        for _ in range(reps):
            samples.append(timer(call))
            for x in xs:
                x.grad = None
    out = summarise(samples)
    out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return out


def _inputs(T, B, H, G, d, S, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen) * 0.5).to(device, dtype)
            for shape in ((B, T, H, d), (B, S, G, d), (B, S, G, d))]


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    B, H, G, d, w, l, stride = args.batch, args.heads, args.groups, args.dim, args.window, args.block_len, args.block_stride
    seqs = [int(s) for s in args.seq.split(",")]
    start = time.perf_counter()
    rows, failed = [], set()
    win_first, win_later = window_variants(device, dtype, d, w)
    cmp_first, cmp_later = compressed_variants(device, dtype, d, l, stride)
    score_first, score_later = scoring_variants(device, G, l, stride, args.sel_block_len, args.n_sel)
    slc_first, slc_later = selection_variants(device, args.sel_block_len, args.n_sel)
    dense = [("sdpa-dense-causal", _dense_causal)]
    plan = []  # (T, branch, name, fn, backward): the Triton and dense rows for every T first
    for groups in ((("window", win_first), ("compressed", cmp_first), ("scoring", score_first),
                    ("selection", slc_first), ("dense", dense)),
                   (("window", win_later), ("compressed", cmp_later), ("scoring", score_later),
                    ("selection", slc_later))):
        for T in seqs:
            for branch, variants in groups:
                for name, fn in variants:
                    for backward in (False, True) if branch != "scoring" else (False,):  # indices: no gradient
                        plan.append((T, branch, name, fn, backward))
    for T, branch, name, fn, backward in plan:
        mode = "fwd+bwd" if backward else "fwd"
        row = {"branch": branch, "variant": name, "T": T, "mode": mode}
        S = (T - l) // stride + 1 if branch in ("compressed", "scoring") else T
        key = (branch, name, mode)
        if key in failed:
            row["skipped"] = "failed at a smaller T"
        elif branch == "dense" and backward and T > args.dense_bwd_max:
            row["skipped"] = f"T > --dense-bwd-max {args.dense_bwd_max}"
        elif time.perf_counter() - start > args.budget_s:
            row["skipped"] = f"time budget of {args.budget_s} s spent"
        else:
            try:
                inputs = _inputs(T, B, H, G, d, S, dtype, device, seed=T)
                row.update(measure(fn, inputs, backward, args.warmup, args.reps, device))
            except Exception as exc:  # OOM, no kernel for this device, compile failure: record, go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                failed.add(key)
            finally:
                inputs = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        _print_row(row)
    return {"schema_version": SCHEMA_VERSION, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": getattr(triton_attention.triton, "__version__", None),
            "config": {"B": B, "H": H, "G": G, "d": d, "window": w, "block_len": l, "block_stride": stride,
                       "sel_block_len": args.sel_block_len, "n_sel": args.n_sel,
                       "dtype": args.dtype, "warmup": args.warmup, "reps": args.reps},
            "seconds": time.perf_counter() - start, "rows": rows}


def _print_row(r: dict) -> None:
    if "median_ms" in r:
        peak = "" if r.get("peak_mib") is None else f"{r['peak_mib']:10.0f}"
        what = f"{r['median_ms']:10.3f}{peak}"
    else:
        what = "  " + (r.get("error") or f"skipped: {r.get('skipped')}")
    print(f"{r['branch']:10s} {r['variant']:22s} {r['T']:6d} {r['mode']:7s}{what}", flush=True)


def table(result: dict) -> str:
    """Median ms per (branch, variant, mode) across T, one line each."""
    seqs = sorted({r["T"] for r in result["rows"]})
    lines = [f"{'branch':10s} {'variant':22s} {'mode':7s}" + "".join(f"{'T=' + str(T):>12s}" for T in seqs)]
    keys = list(dict.fromkeys((r["branch"], r["variant"], r["mode"]) for r in result["rows"]))
    for branch, variant, mode in keys:
        cells = []
        for T in seqs:
            r = next((r for r in result["rows"] if (r["branch"], r["variant"], r["mode"], r["T"]) ==
                      (branch, variant, mode, T)), None)
            cells.append(f"{r['median_ms']:10.2f}ms" if r and "median_ms" in r else
                         f"{'error' if r and 'error' in r else '-':>12s}")
        lines.append(f"{branch:10s} {variant:22s} {mode:7s}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", default="8192,16384,32768,65536", help="comma-separated T values")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128, help="d_k = d_v")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block-len", type=int, default=32)
    ap.add_argument("--block-stride", type=int, default=16)
    ap.add_argument("--sel-block-len", type=int, default=64)
    ap.add_argument("--n-sel", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense-bwd-max", type=int, default=32768, help="largest T for dense fwd+bwd")
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop starting new measurements after this")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    if args.heads % args.groups:
        ap.error("--heads must be a multiple of --groups")
    result = run(args)
    print(f"\n{result['device']}; torch {result['torch']}; triton {result['triton']}; {result['seconds']:.0f} s")
    print(table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
