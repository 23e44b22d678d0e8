"""Long-context prefill and training speed: ``python -m nsa.bench_prefill [--json out.json]``.

For each length T: the NSA layer's forward (no autograd) and forward + backward (on a GPU twice: with
its default routes, and with ``NSA_USE_TRITON_ELEMENTWISE=0``, RoPE and the gated combine as eager
ops), next to dense causal ``scaled_dot_product_attention`` over the same heads (GQA), and fla-core's ``parallel_nsa``
(compressed + selected branches only) when the ``fla`` package is installed. Shape (issue 8): B=1,
64 query heads in 4 groups, d_k = d_v = 128, l=32, d=16, l'=64, n=16, w=512, bf16 on a GPU.
Every variant of one length is timed in the same rounds, interleaved, with CUDA events after a
untimed warm-up call (compilation, autotuning); the peak memory of each call is recorded, and the
variant's own (its inputs and parameters plus what the call allocated: what it alone needs). A variant
that fails (out of memory included) is recorded with its error and skipped for longer lengths; one
whose first timed call takes more than ``--max-call-s`` is timed once. The NSA layer includes its projections; dense SDPA and fla are the
attention alone (their projections would add what the layer's do): ``nsa_projections`` times the layer's
linear maps alone, so the layer's attention is the difference. After each length it prints each NSA
variant's speed and own memory as multiples of dense SDPA's (and its speed as a multiple of fla's:
the layer's, and, where ``nsa_projections`` ran in the same run, its attention's, the layer's median
less the projections'), the terms of issue 8's targets; the JSON keeps them as ``ratios``.
"""

from __future__ import annotations

import argparse
import json
import re

import torch
import torch.nn.functional as F

from . import NSAAttention, NSAConfig, backends, override_settings
from .bench_smoke import _Timer, summarise, write_json

LONG_CFG = dict(dim=2048, groups=4, heads_per_group=16, d_k=128, d_v=128, block_len=32, block_stride=16,
                sel_block_len=64, n_sel=16, window=512)
TINY_CFG = dict(dim=64, groups=2, heads_per_group=2, d_k=16, d_v=16, block_len=8, block_stride=4,
                sel_block_len=16, n_sel=4, window=32)


def _fla_parallel_nsa():
    try:
        from fla.ops.nsa import parallel_nsa  # optional extra: fla-core
    except Exception:  # not installed, or built for another torch/triton
        return None
    return parallel_nsa


def variants(cfg: NSAConfig, T: int, device, dtype):
    """name -> (forward callable, forward+backward callable, the tensors it owns: inputs and
    parameters) for one length, inputs built here."""
    layer = NSAAttention(cfg).to(device=device, dtype=dtype)
    x = torch.randn(1, T, cfg.dim, device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_(True)
    H, G = cfg.num_heads, cfg.groups
    q = torch.randn(1, H, T, cfg.d_k, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, G, T, cfg.d_k, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, G, T, cfg.d_v, device=device, dtype=dtype, requires_grad=True)

    def nsa_fwd():
        with torch.no_grad():
            layer(x)

    def nsa_fwd_bwd():
        layer(x_grad).sum().backward()

    def eager_elementwise(fn):
        # NSA_USE_TRITON_ELEMENTWISE=0: RoPE and the gated combine as eager ops (the default's one Triton
        # pass each, timed beside them).
        def run():
            with override_settings(use_triton_elementwise=False):
                fn()
        return run

    o = torch.randn(1, T, H * cfg.d_v, device=device, dtype=dtype, requires_grad=True)

    def projections(xx, oo):
        # The layer's linear maps alone (input projection, gate MLP if any, output projection): what
        # its timing holds and dense SDPA's and fla's do not.
        y = layer.proj(xx).sum() + layer.out(oo).sum()
        return y + layer.gate_mlp(xx).sum() if layer.gate_mlp is not None else y

    def proj_fwd():
        with torch.no_grad():
            projections(x, o)

    def proj_fwd_bwd():
        projections(x_grad, o).backward()

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def dense_fwd():
        with torch.no_grad():
            dense()

    def dense_fwd_bwd():
        dense().sum().backward()

    params = tuple(layer.parameters())
    out = {"nsa_layer": (nsa_fwd, nsa_fwd_bwd, (x_grad, *params)),
           "nsa_projections": (proj_fwd, proj_fwd_bwd, (x_grad, o, *params)),
           "dense_sdpa": (dense_fwd, dense_fwd_bwd, (q, k, v))}
    if device.type == "cuda":
        out["nsa_layer_eager_elementwise"] = (eager_elementwise(nsa_fwd), eager_elementwise(nsa_fwd_bwd),
                                              (x_grad, *params))
    parallel_nsa = _fla_parallel_nsa() if device.type == "cuda" else None
    if parallel_nsa is not None:
        # fla's layout: [B, T, heads, d]; block_indices [B, T, G, n] (selection from its own scores
        # is what a user runs: block_indices=None lets it pick).
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
        g_cmp = torch.ones(1, T, H, device=device, dtype=dtype)
        g_slc = torch.ones(1, T, H, device=device, dtype=dtype)

        def fla():
            return parallel_nsa(qf, kf, vf, g_cmp=g_cmp, g_slc=g_slc, block_indices=None, block_counts=cfg.n_sel,
                                block_size=cfg.sel_block_len)

        def fla_fwd():
            with torch.no_grad():
                fla()

        def fla_fwd_bwd():
            fla().sum().backward()

        out["fla_parallel_nsa"] = (fla_fwd, fla_fwd_bwd, (qf, kf, vf, g_cmp, g_slc))
    return out


def _call(fn, timer, device, leaves=()) -> tuple[float, int | None, int | None]:
    """(ms, peak bytes allocated, of which above what was allocated before the call). Every
    variant's gradients are dropped first, as a training step's ``zero_grad(set_to_none=True)``
    does: what the call allocates for them counts, no variant's leftovers do."""
    for t in leaves:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    ms = timer(fn)
    if device.type != "cuda":
        return ms, None, None
    peak = int(torch.cuda.max_memory_allocated(device))
    return ms, peak, peak - before


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _error(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        # The request that failed says where to look (a 128 GiB one at 128K was a dense T x T mask).
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(e))
        return "out of memory" + (f" (tried to allocate {asked.group(1)})" if asked else "")
    return f"{type(e).__name__}: {str(e)[:300]}"


VARIANTS = ("nsa_layer", "nsa_layer_eager_elementwise", "nsa_projections", "dense_sdpa",
            "fla_parallel_nsa")


def _peak(row) -> str:
    """The call's peak, and its own footprint: the tensors it owns plus what it allocated."""
    if not row.get("peak_bytes"):
        return ""
    return f"peak {row['peak_bytes'] / 2**30:6.2f} GiB, own {row['own_peak_bytes'] / 2**30:6.2f} GiB"


def bench_length(cfg, T, device, dtype, reps, max_call_s, dead: set, only=None) -> list[dict]:
    """Rows for one length: each (variant, pass) warmed up, then timed in interleaved rounds.
    ``only``: the variant names to measure (None: all there are)."""
    timer = _Timer(device)
    cases = {}
    here = variants(cfg, T, device, dtype)
    leaves = [t for *_, own in here.values() for t in own if t.requires_grad]
    absent = sorted(set(only or ()) - set(here))
    if absent:  # e.g. nsa_layer_eager_elementwise on a CPU, fla_parallel_nsa without fla installed
        print(f"T={T:6d} not available here: {', '.join(absent)}", flush=True)
    for name, (fwd, fwd_bwd, own) in here.items():
        if only and name not in only:
            continue
        for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            cases[(name, what)] = (fn, _nbytes(own))
    # peak_bytes: all that was allocated at the call's peak, every variant's inputs included;
    # own_peak_bytes: the variant's own inputs and parameters plus what the call allocated above
    # what was there before it: what it alone would need (issue 8's memory target compares these).
    rows = {key: {"variant": key[0], "pass": key[1], "T": T, "samples": [], "peak_bytes": None,
                  "input_bytes": own, "own_peak_bytes": None} for key, (_, own) in cases.items()}

    def record(key, peak, extra):
        if peak is not None:
            rows[key]["peak_bytes"] = max(rows[key]["peak_bytes"] or 0, peak)
            rows[key]["own_peak_bytes"] = max(rows[key]["own_peak_bytes"] or 0, rows[key]["input_bytes"] + extra)

    slow = set()
    for key, (fn, _) in cases.items():  # warm-up (untimed: compiles, autotunes, fills caches)
        if key in dead:
            rows[key]["error"] = "skipped: failed at a shorter length"
            continue
        try:
            _call(fn, timer, device, leaves)
            ms, peak, extra = _call(fn, timer, device, leaves)  # the first timed call tells whether to repeat it
            rows[key]["samples"].append(ms)
            record(key, peak, extra)
            if ms > max_call_s * 1e3:
                slow.add(key)
            # Progress: a long length's warm-ups (compiles, autotuning) take minutes on their own.
            print(f"T={T:6d} {key[0]:27s} {key[1]:8s} first timed call {ms:9.2f} ms {_peak(rows[key])}", flush=True)
        except Exception as e:  # noqa: BLE001 -- every failure is a row, the others go on
            rows[key]["error"] = _error(e)
            dead.add(key)
            print(f"T={T:6d} {key[0]:27s} {key[1]:8s} {rows[key]['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for _ in range(reps - 1):
        for key, (fn, _) in cases.items():
            if key in dead or key in slow or "error" in rows[key]:
                continue
            ms, peak, extra = _call(fn, timer, device, leaves)
            rows[key]["samples"].append(ms)
            record(key, peak, extra)
    out = []
    for row in rows.values():
        if row["samples"]:
            row.update(summarise(row["samples"]))
        out.append(row)
        ms = f"median {row['median_ms']:9.2f} ms" if row["samples"] else f"{row.get('error', 'no samples')}"
        print(f"T={T:6d} {row['variant']:27s} {row['pass']:8s} {ms} {_peak(row)}", flush=True)
    return out


def ratios(rows: list[dict], T: int) -> list[dict]:
    """Each NSA layer variant's (T, pass) against dense SDPA's and fla's in the same run: ``speedup``
    (their median time / its), ``memory`` (its own footprint / dense's); ``attention_speedup_vs_fla``:
    fla's median over the layer's less ``nsa_projections``' (fla's call holds no projections: this
    compares attention with attention). Absent where either side has no number."""
    by = {(r["variant"], r["pass"]): r for r in rows if r["T"] == T and r.get("median_ms")}
    out = []
    for (variant, what), row in by.items():
        if not variant.startswith("nsa_layer"):
            continue
        entry = {"T": T, "variant": variant, "pass": what}
        dense, fla = by.get(("dense_sdpa", what)), by.get(("fla_parallel_nsa", what))
        if dense:
            entry["speedup_vs_dense"] = dense["median_ms"] / row["median_ms"]
            if row.get("own_peak_bytes") and dense.get("own_peak_bytes"):
                entry["memory_vs_dense"] = row["own_peak_bytes"] / dense["own_peak_bytes"]
        if fla:
            entry["speedup_vs_fla"] = fla["median_ms"] / row["median_ms"]
            proj = by.get(("nsa_projections", what))
            if proj and row["median_ms"] > proj["median_ms"]:
                entry["attention_speedup_vs_fla"] = fla["median_ms"] / (row["median_ms"] - proj["median_ms"])
        out.append(entry)
    return out


def _ratio_line(e: dict) -> str:
    parts = [f"{e['speedup_vs_dense']:.2f}x dense's speed" if "speedup_vs_dense" in e else "",
             f"{e['memory_vs_dense']:.2f}x its memory" if "memory_vs_dense" in e else "",
             f"{e['speedup_vs_fla']:.2f}x fla's speed" if "speedup_vs_fla" in e else "",
             f"attention alone (less nsa_projections) {e['attention_speedup_vs_fla']:.2f}x fla's"
             if "attention_speedup_vs_fla" in e else ""]
    return f"T={e['T']:6d} {e['variant']:27s} {e['pass']:8s} " + ", ".join(p for p in parts if p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="sequence lengths (default 8192 16384 32768 65536 131072 on a GPU, 256 512 on CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per length (default 5 GPU, 2 CPU)")
    ap.add_argument("--max-call-s", type=float, default=5.0, help="a call slower than this is timed once")
    ap.add_argument("--tiny", action="store_true", help="a small layer (smoke test) instead of issue 8's shape")
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                    help=f"measure only these variants (of {', '.join(VARIANTS)}; default: all available)")
    ap.add_argument("--json", default=None, help="write every row here (rewritten after each length)")
    args = ap.parse_args(argv)
    bad = sorted(set(args.only or ()) - set(VARIANTS))
    if bad:
        ap.error(f"--only {' '.join(bad)}: no such variant; accepted: {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = NSAConfig(**(TINY_CFG if args.tiny else LONG_CFG))
    lengths = args.lengths or ([8192, 16384, 32768, 65536, 131072] if gpu else [256, 512])
    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu'}; torch {torch.__version__}; dtype {dtype}; "
          f"fla parallel_nsa {'found' if _fla_parallel_nsa() else 'not installed'}")
    shape = dict(groups=cfg.groups, heads_per_group=cfg.heads_per_group, block_len=cfg.block_len,
                 block_stride=cfg.block_stride)
    routes = {k: v["route"] for k, v in backends(device, dtype, cfg.d_k, cfg.d_v, cfg.sel_block_len, **shape).items()
              if isinstance(v, dict) and "route" in v}
    print("routes:", json.dumps(routes), flush=True)
    if gpu:
        with override_settings(use_triton_elementwise=False):
            eager = {k: v["route"] for k, v in backends(device, dtype, cfg.d_k, cfg.d_v, cfg.sel_block_len,
                                                         **shape).items() if isinstance(v, dict) and "route" in v}
        print("routes of nsa_layer_eager_elementwise:", json.dumps(eager), flush=True)
        routes = {"nsa_layer": routes, "nsa_layer_eager_elementwise": eager}
    dead: set = set()
    result = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "config": dict(TINY_CFG if args.tiny else LONG_CFG), "routes": routes,
              "lengths": lengths, "complete": False, "rows": [], "ratios": []}
    for T in lengths:
        result["rows"] += bench_length(cfg, T, device, dtype, args.reps or (5 if gpu else 2), args.max_call_s, dead,
                                       args.only)
        here = ratios(result["rows"], T)
        for entry in here:
            if len(entry) > 3:  # something to compare with
                print(_ratio_line(entry), flush=True)
        result["ratios"] += here
        result["complete"] = T == lengths[-1]
        write_json(args.json, result)  # after each length: a run stopped at a longer one keeps these
    return result


if __name__ == "__main__":
    main()
