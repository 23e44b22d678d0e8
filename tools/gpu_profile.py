"""Profile one prefill of the paper config at T=8192 (GPU): top kernels by CUDA time."""
import torch
from torch.profiler import ProfilerActivity, profile

from nsa import NSAAttention, NSAConfig
from nsa.bench_smoke import PAPER_CFG

cfg = NSAConfig(**PAPER_CFG)
layer = NSAAttention(cfg).cuda().bfloat16()
x = torch.randn(1, 8192, cfg.dim, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    layer(x)
    layer(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        layer(x)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
