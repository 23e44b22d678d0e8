"""Decode and prefill speed check: ``python -m nsa.bench_smoke [--json out.json]``.

Decode: ms per ``decode_step`` on the seed report's layer (dim 256, 8 heads in 2 groups, d_k=d_v=32,
l=32, d=16, l_sel=64, n_sel=16, w=512) after prefilling 512 / 1024 / 2048 tokens (``--contexts``;
``--batches`` sets the batch sizes, default 1: e.g. ``--contexts 65536 --batches 1,8``), eager and
replayed as a CUDA graph (``--compile`` adds ``compile_decode()`` rows), next to two dense GQA decode
layers of the same size: "dense" repeats K/V across each group's heads every step (the issue's
baseline), "dense_gqa" lets SDPA share them (``enable_gqa``). Each step is timed on its own with CUDA
events after warm-up (perf_counter on CPU); medians and quartiles.
Prefill: ms for T=8192 at the paper's config (G=4, h=16, d_k=192, d_v=128, bf16) next to dense
``scaled_dot_product_attention`` over the same heads, in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from . import NSAAttention, NSAConfig, backends, workspace_stats

SEED_CFG = dict(dim=256, groups=2, heads_per_group=4, d_k=32, d_v=32, block_len=32, block_stride=16,
                sel_block_len=64, n_sel=16, window=512)
PAPER_CFG = dict(dim=2048, groups=4, heads_per_group=16, d_k=192, d_v=128, block_len=32, block_stride=16,
                 sel_block_len=64, n_sel=16, window=512)


class _Timer:
    """Times one call: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def write_json(path: str | None, result: dict) -> None:
    """The benchmarks' ``--json`` output (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)


def summarise(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "q25_ms": q[0], "q75_ms": q[2], "n": len(samples)}


class DenseDecode(torch.nn.Module):
    """A dense GQA decode layer of the same size, for orientation (static shapes, graph-capturable).

    ``expand=True`` repeats K/V across each group's heads every step (the issue's baseline, "dense");
    ``expand=False`` lets SDPA share them (``enable_gqa``, "dense_gqa"): no per-step copy of the cache.
    """

    def __init__(self, cfg: NSAConfig, expand: bool = True):
        super().__init__()
        self.cfg, self.expand = cfg, expand
        H, G = cfg.num_heads, cfg.groups
        self.qkv = torch.nn.Linear(cfg.dim, H * cfg.d_k + G * (cfg.d_k + cfg.d_v), bias=False)
        self.out = torch.nn.Linear(H * cfg.d_v, cfg.dim, bias=False)

    def new_cache(self, batch, max_len, device, dtype):
        G = self.cfg.groups
        return {"k": torch.zeros(batch, G, max_len, self.cfg.d_k, device=device, dtype=dtype),
                "v": torch.zeros(batch, G, max_len, self.cfg.d_v, device=device, dtype=dtype),
                "pos": torch.zeros(1, dtype=torch.long, device=device)}

    @torch.no_grad()
    def prefill(self, x, cache):
        cfg, (B, T) = self.cfg, x.shape[:2]
        _, k, v = self.qkv(x).split([cfg.num_heads * cfg.d_k, cfg.groups * cfg.d_k, cfg.groups * cfg.d_v], dim=-1)
        cache["k"][:, :, :T] = k.view(B, T, cfg.groups, -1).transpose(1, 2)
        cache["v"][:, :, :T] = v.view(B, T, cfg.groups, -1).transpose(1, 2)
        cache["pos"].fill_(T)

    @torch.no_grad()
    def decode_step(self, x, cache):
        cfg = self.cfg
        H, G, dk, B = cfg.num_heads, cfg.groups, cfg.d_k, x.shape[0]
        q, k, v = self.qkv(x).split([H * dk, G * dk, G * cfg.d_v], dim=-1)
        cache["k"].index_copy_(2, cache["pos"], k.view(B, G, 1, dk))
        cache["v"].index_copy_(2, cache["pos"], v.view(B, G, 1, -1))
        keep = (torch.arange(cache["k"].shape[2], device=x.device) <= cache["pos"]).view(1, 1, 1, -1)
        h, k, v = H // G, cache["k"], cache["v"]
        gqa = {"enable_gqa": True}
        if self.expand:
            k, v, gqa = k.repeat_interleave(h, 1), v.repeat_interleave(h, 1), {}
        o = F.scaled_dot_product_attention(q.view(B, 1, H, dk).transpose(1, 2), k, v, attn_mask=keep, **gqa)
        cache["pos"].add_(1)
        return self.out(o.transpose(1, 2).reshape(B, 1, -1))


def capture_step(step, x_t, cache) -> torch.cuda.CUDAGraph:
    """``step(x_t, cache)`` captured in a CUDA graph, after three steps on a side stream (warm-up, and
    compilation for a compiled step). Capture records the step without running it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(x_t, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x_t, cache)
    return graph


def time_decode(layer, make_cache, prefill, context, steps, warmup, device, dtype, graph: bool, step_fn=None,
                batch: int = 1):
    """Per-step times of ``steps`` decode steps after ``context`` prefilled tokens."""
    timer = _Timer(device)
    step = step_fn or layer.decode_step
    cache = make_cache(context + warmup + steps + 8)
    x = torch.randn(batch, context, layer.cfg.dim, device=device, dtype=dtype)
    prefill(x, cache)
    x_t = torch.randn(batch, 1, layer.cfg.dim, device=device, dtype=dtype)
    if not graph:
        for _ in range(warmup):
            step(x_t, cache)
        return [timer(lambda: step(x_t, cache)) for _ in range(steps)]
    g = capture_step(step, x_t, cache)
    for _ in range(warmup):
        g.replay()
    return [timer(g.replay) for _ in range(steps)]


def bench_decode(device, dtype, contexts, steps, warmup, compile_modes=False, batches=(1,)):
    torch.manual_seed(0)
    cfg = NSAConfig(**SEED_CFG)
    nsa_layer = NSAAttention(cfg).to(device=device, dtype=dtype).eval()
    dense = DenseDecode(cfg).to(device=device, dtype=dtype).eval()
    dense_gqa = DenseDecode(cfg, expand=False).to(device=device, dtype=dtype).eval()
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    if compile_modes:
        modes += ["compiled", "compiled+graph"] if device.type == "cuda" else ["compiled"]
    compiled = {}
    rows = []
    for batch, context in ((b, c) for b in batches for c in contexts):
        for name, layer, make, pre in (
            ("nsa", nsa_layer, lambda n: nsa_layer.new_cache(batch, n, device, dtype),
             lambda x, c: nsa_layer.prefill(x, c)),
            ("dense", dense, lambda n: dense.new_cache(batch, n, device, dtype),
             lambda x, c: dense.prefill(x, c)),
            ("dense_gqa", dense_gqa, lambda n: dense_gqa.new_cache(batch, n, device, dtype),
             lambda x, c: dense_gqa.prefill(x, c)),
        ):
            for mode in modes:
                step_fn = None
                if mode.startswith("compiled"):
                    # torch.compile fuses the step's ~200 small ops; the graph then removes launch gaps.
                    if name not in compiled:  # a copy, so the eager rows keep timing the eager step
                        twin = copy.deepcopy(layer)
                        compiled[name] = (twin.compile_decode().decode_step if name == "nsa"
                                          else torch.compile(twin.decode_step, dynamic=False))
                    step_fn = compiled[name]
                with torch.no_grad():
                    samples = time_decode(layer, make, pre, context, steps, warmup, device, dtype,
                                          mode.endswith("graph"), step_fn, batch)
                rows.append({"layer": name, "batch": batch, "context": context, "mode": mode, **summarise(samples)})
                print(f"decode {name:9s} B={batch} ctx={context:5d} {mode:5s} median {rows[-1]['median_ms']:.4f} ms "
                      f"(IQR {rows[-1]['q25_ms']:.4f}-{rows[-1]['q75_ms']:.4f}, n={len(samples)})", flush=True)
    return rows


def bench_prefill(device, dtype, T, repeats):
    torch.manual_seed(0)
    cfg = NSAConfig(**PAPER_CFG)
    layer = NSAAttention(cfg).to(device=device, dtype=dtype).eval()
    timer = _Timer(device)
    x = torch.randn(1, T, cfg.dim, device=device, dtype=dtype)
    H, G = cfg.num_heads, cfg.groups
    q = torch.randn(1, H, T, cfg.d_k, device=device, dtype=dtype)
    k = torch.randn(1, G, T, cfg.d_k, device=device, dtype=dtype)
    v = torch.randn(1, G, T, cfg.d_v, device=device, dtype=dtype)

    def dense():
        h = H // G
        F.scaled_dot_product_attention(q, k.repeat_interleave(h, 1), v.repeat_interleave(h, 1), is_causal=True)

    rows = []
    with torch.no_grad():
        for name, fn in (("nsa_layer", lambda: layer(x)), ("dense_sdpa", dense)):
            fn()
            samples = [timer(fn) for _ in range(repeats)]
            rows.append({"what": name, "T": T, **summarise(samples)})
            print(f"prefill {name:10s} T={T} median {rows[-1]['median_ms']:.3f} ms "
                  f"(IQR {rows[-1]['q25_ms']:.3f}-{rows[-1]['q75_ms']:.3f}, n={len(samples)})", flush=True)
    return rows


def decode_ratios(rows: list[dict]) -> list[dict]:
    """Per (batch, context, mode): each dense step's median time over NSA's in the same run
    (``vs_dense``: K/V repeated per head, the seed report's baseline; ``vs_dense_gqa``: SDPA's
    ``enable_gqa``). Above 1, NSA's step is the faster."""
    med = {(r["layer"], r["batch"], r["context"], r["mode"]): r["median_ms"] for r in rows}
    out = []
    for (layer, batch, context, mode), ms in med.items():
        if layer != "nsa":
            continue
        entry = {"batch": batch, "context": context, "mode": mode}
        for dense in ("dense", "dense_gqa"):
            if (dense, batch, context, mode) in med:
                entry[f"vs_{dense}"] = med[(dense, batch, context, mode)] / ms
        out.append(entry)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", default="512,1024,2048")
    ap.add_argument("--batches", default="1", help="decode batch sizes, e.g. 1,8")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 200 GPU, 20 CPU)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--prefill-T", type=int, default=None, help="default 8192 on GPU, 1024 on CPU")
    ap.add_argument("--prefill-repeats", type=int, default=None)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd decode steps")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    steps = args.steps or (200 if gpu else 20)
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu'}; torch {torch.__version__}; dtype {dtype}")
    print("routes:", json.dumps({k: v["route"] for k, v in backends(device, dtype, 32, 32, 64, groups=2, heads_per_group=4).items()
                                 if isinstance(v, dict) and "route" in v}))
    batches = [int(b) for b in args.batches.split(",")]
    result = {"device": str(device), "decode": bench_decode(device, dtype, contexts, steps, args.warmup, args.compile,
                                                            batches)}
    if not args.skip_prefill:
        T = args.prefill_T or (8192 if gpu else 1024)
        result["prefill"] = bench_prefill(device, dtype, T, args.prefill_repeats or (20 if gpu else 2))
    result["workspace_stats"] = workspace_stats()
    print("\nsummary (median ms/step):")
    for r in result["decode"]:
        print(f"  {r['layer']:9s} B={r['batch']} ctx {r['context']:5d} {r['mode']:5s} {r['median_ms']:.4f}")
    for r in result.get("prefill", []):
        print(f"  prefill {r['what']:10s} T={r['T']} {r['median_ms']:.3f}")
    result["decode_ratios"] = decode_ratios(result["decode"])
    print("\nNSA's decode step against the dense ones (their time / NSA's; above 1 NSA is faster):")
    for e in result["decode_ratios"]:
        print(f"  B={e['batch']} ctx {e['context']:5d} {e['mode']:14s} dense {e.get('vs_dense', float('nan')):.2f}x, "
              f"dense_gqa {e.get('vs_dense_gqa', float('nan')):.2f}x")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
