"""Long context on a GPU: training memory grows linearly in T at the paper's head layout.

The layer once held float32 ``[T, heads, N]`` compressed scores (N = T/16), so its memory grew with
T squared and 32K tokens did not fit in 80 GB. A regression back to anything quadratic quadruples
the peak from T to 2T; linear growth doubles it.
"""

from __future__ import annotations

import pytest
import torch

from nsa import NSAAttention, NSAConfig, backends
from nsa.ops import flex

pytestmark = pytest.mark.gpu

LENGTHS = (8192, 16384, 32768)
GROWTH = 2.3  # peak(2T) / peak(T): 2 for linear growth, plus what rounding and workspaces add


def _train_step_peak(layer, T, device):
    """Bytes a forward + backward at ``T`` allocates above what was live before it (after one warm-up
    step at the same length, so kernels are compiled and workspaces sized; masks built again)."""
    x = torch.randn(1, T, layer.cfg.dim, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).float().square().mean().backward()

    step()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    # The flex window route caches its mask per length: build it again inside the measured step
    # (create_block_mask's dense T x T grid once made 128K need 128 GiB, unseen after a warm-up).
    flex._window_mask.cache_clear()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def test_training_memory_grows_linearly_in_T(cuda):
    cfg = NSAConfig(dim=1024, groups=4, heads_per_group=16, d_k=192, d_v=128, block_len=32, block_stride=16,
                    sel_block_len=64, n_sel=16, window=512)
    layer = NSAAttention(cfg).to(cuda, torch.bfloat16)
    peaks = {T: _train_step_peak(layer, T, cuda) for T in LENGTHS}
    gib = {T: round(p / 2**30, 2) for T, p in peaks.items()}
    routes = {k: v["route"] for k, v in backends(cuda, torch.bfloat16, cfg.d_k, cfg.d_v, cfg.sel_block_len,
                                                     groups=cfg.groups, heads_per_group=cfg.heads_per_group).items()
              if "route" in v}  # (the "fa2" entry names a provider, not a route)
    for short, long in zip(LENGTHS, LENGTHS[1:]):
        assert peaks[long] <= GROWTH * peaks[short], (f"peak GiB by T {gib}: {long} is "
                                                      f"{peaks[long] / peaks[short]:.2f}x {short}", routes)
