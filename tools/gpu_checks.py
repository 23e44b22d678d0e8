"""GPU checks beside the test suite: decode == prefill across routes, graph replay, flex == packed,
prefill timings per selection route (Triton / flex / packed).

Run on a CUDA machine: ``python tools/gpu_checks.py``. Prints one line per check with its number.
"""
import copy

import torch

from nsa import NSAAttention, NSAConfig
from nsa.bench_smoke import PAPER_CFG, SEED_CFG, _Timer, summarise
from nsa.ops import select_blocks, selection_attention
from nsa.ops.flex import selection_attention_flex
from nsa.flags import override


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def decode_vs_prefill(dtype, T=1500, split=700, compiled=False, graph=False):
    torch.manual_seed(0)
    m = NSAAttention(NSAConfig(**SEED_CFG)).cuda().to(dtype)
    x = torch.randn(2, T, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        y = m(x)
        step = copy.deepcopy(m).compile_decode() if compiled else m
        cache = m.new_cache(2, T)
        outs = [m.prefill(x[:, :split], cache)]
        if graph:
            x_t = torch.empty(2, 1, 256, device="cuda", dtype=dtype)
            x_t.copy_(x[:, split:split + 1])
            outs.append(step.decode_step(x_t, cache).clone())  # warm-up step (eager)
            g = torch.cuda.CUDAGraph()
            saved = cache.pos.clone()
            with torch.cuda.graph(g):
                out_t = step.decode_step(x_t, cache)
            cache.pos.copy_(saved)  # capture ran the step once; replay it for real
            for t in range(split + 1, T):
                x_t.copy_(x[:, t:t + 1])
                g.replay()
                outs.append(out_t.clone())
        else:
            torch.cuda.set_sync_debug_mode("error")
            for t in range(split, T):
                outs.append(step.decode_step(x[:, t:t + 1], cache))
            torch.cuda.set_sync_debug_mode(0)
    yd = torch.cat(outs, 1)
    return (yd.float() - y.float()).abs().max().item(), rel(yd, y)


for dtype in (torch.float32, torch.bfloat16):
    for compiled, graph in ((False, False), (False, True), (True, True)):
        mx, r = decode_vs_prefill(dtype, compiled=compiled, graph=graph)
        print(f"decode==prefill {dtype!s:15s} compiled={compiled} graph={graph}: max abs {mx:.2e}, rel {r:.2e}")

torch.manual_seed(0)
for (B, T, G, h, dk, dv, bs, n) in [(2, 1000, 2, 4, 32, 32, 64, 16), (1, 3000, 4, 16, 192, 128, 64, 16)]:
    q = torch.randn(B, T, G * h, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, G, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, G, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = select_blocks(torch.rand(B, T, G, -(-T // bs), device="cuda"), sel_block_len=bs, n_sel=n)
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = selection_attention(qf, kf, vf, idx, sel_block_len=bs)  # float64 reference
    go = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, (qf, kf, vf), go)
    o = selection_attention_flex(q, k, v, idx, sel_block_len=bs)
    g = torch.autograd.grad(o, (q, k, v), go.bfloat16())
    print(f"flex vs float64 packed B{B} T{T} G{G} h{h}: out rel {rel(o, ref):.2e}; "
          f"dq dk dv rel " + " ".join(f"{rel(a, b):.2e}" for a, b in zip(g, gref)))

timer = _Timer(torch.device("cuda"))
cfg = NSAConfig(**PAPER_CFG)
layer = NSAAttention(cfg).cuda().bfloat16()
x = torch.randn(1, 8192, cfg.dim, device="cuda", dtype=torch.bfloat16)
for flags in ({}, {"use_triton": False}, {"use_triton": False, "use_flex": False}):
    with override(**flags), torch.no_grad():
        layer(x)
        s = [timer(lambda: layer(x)) for _ in range(5)]
        print(f"prefill T=8192 paper config {flags or 'defaults'}: {summarise(s)['median_ms']:.2f} ms")
xg = x.clone().requires_grad_(True)
layer(xg).float().pow(2).mean().backward()
s = [timer(lambda: layer(xg).float().pow(2).mean().backward()) for _ in range(3)]
print(f"prefill fwd+bwd T=8192 paper config: {summarise(s)['median_ms']:.2f} ms")
