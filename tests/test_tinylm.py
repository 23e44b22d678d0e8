"""The harness's TinyLM pieces that stand in for library code: its AdamW against torch.optim.AdamW."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
import tinylm  # noqa: E402


@pytest.mark.parametrize("weight_decay", [1e-2, 0.0])
def test_adamw_follows_torch_adamw(weight_decay):
    """Eight steps of a small model on fresh random data: every parameter equal to torch's AdamW's
    (same single-tensor update on CPU: bit for bit), including a parameter that gets no gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    unused = torch.nn.Parameter(torch.randn(3))
    twin = [p.detach().clone().requires_grad_() for p in [*model.parameters(), unused]]
    ours = tinylm.AdamW([*model.parameters(), unused], lr=3e-3, weight_decay=weight_decay)
    ref = torch.optim.AdamW(twin, lr=3e-3, weight_decay=weight_decay, foreach=False)
    params = [*model.parameters(), unused]
    first = params[0].detach().clone()
    for _ in range(8):
        x, y = torch.randn(64, 16), torch.randn(64, 4)
        for opt, ps in ((ours, params), (ref, twin)):
            opt.zero_grad(set_to_none=True)
            out = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, ps[0], ps[1])),
                                             ps[2], ps[3])
            torch.nn.functional.mse_loss(out, y).backward()
            opt.step()
    apart = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(params, twin))
    assert apart == 0.0, apart
    assert float((first - params[0].detach()).abs().max()) > 1e-3  # the steps did move the weights
    assert torch.equal(unused, twin[4])  # no gradient: untouched, as torch leaves it
