"""Profile on the GPU: top kernels by CUDA time.

    python3 tools/gpu_profile.py prefill [T]        one forward of issue 8's layer (nsa.bench_prefill's
                                                    shape) at T tokens (default 65536)
    python3 tools/gpu_profile.py train [T]          one forward + backward of the same layer
    python3 tools/gpu_profile.py decode [CTX] [B]   20 compiled decode steps of the seed layer (default
                                                    64K context, B=1), then 20 replays of its CUDA graph
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from nsa import NSAAttention, NSAConfig
from nsa.bench_prefill import LONG_CFG
from nsa.bench_smoke import SEED_CFG, capture_step


def table(prof, rows=30):
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def prefill(T=65536, backward=False):
    """Kernels of one forward (``backward``: forward + backward) of issue 8's layer: where the time
    goes beside the four branches' Triton kernels (projections, compression, top-n, gates)."""
    cfg = NSAConfig(**LONG_CFG)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only to check the script, at small T
    layer = NSAAttention(cfg).to(device, torch.bfloat16)
    x = torch.randn(1, T, cfg.dim, device=device, dtype=torch.bfloat16, requires_grad=backward)

    def run():
        if backward:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)

    run()
    run()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        sync()
    print(f"{'forward + backward' if backward else 'forward'}, T={T}, routes {layer.routes_taken}")
    print(table(prof, 40))


def decode(context=65536, batch=1, steps=20):
    cfg = NSAConfig(**SEED_CFG)
    layer = NSAAttention(cfg).cuda().bfloat16().eval()
    step = layer.compile_decode().decode_step
    with torch.no_grad():
        cache = layer.new_cache(batch, context + 4 * steps + 16)
        layer.prefill(torch.randn(batch, context, cfg.dim, device="cuda", dtype=torch.bfloat16), cache)
        x_t = torch.randn(batch, 1, cfg.dim, device="cuda", dtype=torch.bfloat16)
        graph = capture_step(step, x_t, cache)  # warms up (compiles) first
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(x_t, cache)
            torch.cuda.synchronize()
        print(f"compiled decode step, ctx {context}, B={batch}, {steps} steps (CUDA time / steps = per step)")
        print(table(prof, 40))
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"graph replay: {start.elapsed_time(end) / steps * 1000:.1f} us per step (back to back)")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
        print(f"graph replays, {steps}")
        print(table(prof, 40))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "prefill"
    if what == "decode":
        decode(*(int(a) for a in sys.argv[2:4]))
    elif what in ("prefill", "train"):
        prefill(*(int(a) for a in sys.argv[2:3]), backward=what == "train")
    else:
        sys.exit(f"gpu_profile.py: unknown mode {what!r}; accepted: prefill [T], train [T], decode [CTX] [B]")
