"""GPU development checks: flex selection == packed (values and gradients), prefill timings."""
import time
import torch
import nsa
from nsa import NSAAttention, NSAConfig
from nsa.bench_smoke import PAPER_CFG, _Timer, summarise
from nsa.ops import select_blocks, selection_attention
from nsa.ops.flex import selection_attention_flex
from nsa.settings import override

dev = torch.device("cuda")
torch.manual_seed(0)
for (B, T, G, h, dk, dv, bs, n) in [(2, 1000, 2, 4, 32, 32, 64, 16), (1, 3000, 4, 16, 192, 128, 64, 16), (1, 77, 1, 1, 16, 16, 64, 3)]:
    q = torch.randn(B, T, G * h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, G, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, G, dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    idx = select_blocks(torch.rand(B, T, G, -(-T // bs), device=dev), bs, n)
    o = selection_attention(q, k, v, idx, bs)
    go = torch.randn_like(o)
    g1 = torch.autograd.grad(o, (q, k, v), go)
    o2 = selection_attention_flex(q, k, v, idx, bs)
    g2 = torch.autograd.grad(o2, (q, k, v), go)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    print(f"flex vs packed B{B} T{T} G{G} h{h}: out rel {rel(o2, o):.2e}; grads " + " ".join(f"{rel(a, b):.2e}" for a, b in zip(g2, g1)))

timer = _Timer(dev)
cfg = NSAConfig(**PAPER_CFG)
layer = NSAAttention(cfg).to(dev, torch.bfloat16)
x = torch.randn(1, 8192, cfg.dim, device=dev, dtype=torch.bfloat16)
for flags in (dict(), dict(use_fa2=True), dict(use_flex=False)):
    with override(**flags), torch.no_grad():
        layer(x)
        s = [timer(lambda: layer(x)) for _ in range(5)]
        print("prefill T=8192", flags, nsa.backends(dev, torch.bfloat16, 192, 128)["slc"]["route"], f"{summarise(s)['median_ms']:.2f} ms")
with override():
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    s = [timer(lambda: layer(xg).float().pow(2).mean().backward()) for _ in range(3)]
    print(f"fwd+bwd T=8192 {summarise(s)['median_ms']:.2f} ms")
