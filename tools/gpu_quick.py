"""Quick GPU checks used during development: decode == prefill on CUDA, no host sync, FA-2 routes."""
import inspect
import torch
import nsa
from nsa import NSAAttention, NSAConfig
from nsa.settings import override

print(torch.__version__, torch.cuda.get_device_name())
from torch.nn.attention import varlen
print("varlen_attn params:", list(inspect.signature(varlen.varlen_attn).parameters))
dev = torch.device("cuda")
torch.manual_seed(0)
cfg = NSAConfig(dim=256, groups=2, heads_per_group=4, d_k=32, d_v=32, block_len=32, block_stride=16,
                sel_block_len=64, n_sel=16, window=512)
m = NSAAttention(cfg).to(dev)
x = torch.randn(2, 700, 256, device=dev)
y = m(x)
cache = m.new_cache(2, 800)
outs = [m.prefill(x[:, :600], cache)]
torch.cuda.set_sync_debug_mode("error")
for t in range(600, 700):
    outs.append(m.decode_step(x[:, t:t + 1], cache))
torch.cuda.set_sync_debug_mode(0)
print("fp32 decode vs prefill max abs", (torch.cat(outs, 1) - y).abs().max().item())
mb = m.to(torch.bfloat16)
xb = x.bfloat16()
yref = mb(xb)
for flags in (dict(use_fa2=True, use_fa2_cmp=True, use_fa2_win=True), dict(use_fa2=True, use_fa2_cmp=True, use_fa2_win=False)):
    with override(**flags):
        print(flags, nsa.backends(dev, torch.bfloat16, 32, 32)["cmp"], nsa.backends(dev, torch.bfloat16, 32, 32)["win"])
        try:
            yf = mb(xb)
            print("  rel err fa2 vs ref", ((yf.float() - yref.float()).norm() / yref.float().norm()).item())
        except Exception as e:
            print("  FAILED", type(e).__name__, e)
print(nsa.workspace_stats())
