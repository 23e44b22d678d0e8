"""The GPU-only selection kernels (Triton forward, FlexAttention forward/backward) against the
float64 reference of ``nsa.ops.selection_attention``; bf16 inputs, relative error <= 1e-2."""

from __future__ import annotations

import pytest
import torch

import nsa
from nsa.ops import select_blocks, selection_attention

pytestmark = [pytest.mark.selection_v2, pytest.mark.gpu]

CASES = [  # B, T, G, h, d_k, d_v, l_sel, n_sel
    (2, 1000, 2, 4, 32, 32, 64, 16),
    (1, 777, 4, 16, 192, 128, 64, 16),
    (3, 77, 1, 1, 16, 24, 64, 3),
    (1, 64, 2, 3, 32, 16, 64, 4),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(case, device, gen):
    B, T, G, h, dk, dv, bs, n = case
    q, k, v = (torch.randn(*shape, generator=gen).to(device, torch.bfloat16)
               for shape in ((B, T, G * h, dk), (B, T, G, dk), (B, T, G, dv)))
    idx = select_blocks(torch.rand(B, T, G, -(-T // bs), generator=gen).to(device), sel_block_len=bs, n_sel=n)
    return q, k, v, idx, bs


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-G{}-h{}-dk{}-dv{}-l{}-n{}".format(*c))
def test_triton_selection_equals_reference(case, cuda, gen):
    from nsa.ops import triton_selection

    if not triton_selection.available():
        pytest.skip("Triton is not installed")
    q, k, v, idx, bs = _inputs(case, cuda, gen)
    ref = selection_attention(q.double(), k.double(), v.double(), idx, sel_block_len=bs)
    out = triton_selection.selection_attention_triton(q, k, v, idx, sel_block_len=bs)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-2


# d_k = d_v = 128 (issue 8's shape): Hopper's flex backward tiles keys by 128 there.
@pytest.mark.parametrize("case", CASES[:3] + [(1, 640, 4, 16, 128, 128, 64, 16)],
                         ids=lambda c: "B{}-T{}-G{}-h{}-dk{}-dv{}-l{}-n{}".format(*c))
def test_flex_selection_values_and_grads_equal_reference(case, cuda, gen):
    from nsa.ops.flex import selection_attention_flex

    q, k, v, idx, bs = _inputs(case, cuda, gen)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = selection_attention(q64, k64, v64, idx, sel_block_len=bs)
    grad_out = torch.randn(ref.shape, generator=gen).to(cuda, torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    qb, kb, vb = (x.clone().requires_grad_() for x in (q, k, v))
    out = selection_attention_flex(qb, kb, vb, idx, sel_block_len=bs)
    grads = torch.autograd.grad(out, (qb, kb, vb), grad_out.bfloat16())
    assert _rel(out, ref) <= 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 2e-2


def test_module_inference_routes_agree(cuda, gen, override):
    """The module's no-grad prefill (Triton) equals its packed route and its flex route."""
    cfg = nsa.NSAConfig(dim=128, groups=2, heads_per_group=4, d_k=32, d_v=32, block_len=32, block_stride=16,
                        sel_block_len=64, n_sel=8, window=128)
    attn = nsa.NSAAttention(cfg).to(cuda, torch.bfloat16)
    x = torch.randn(2, 700, 128, generator=gen).to(cuda, torch.bfloat16)
    with torch.no_grad():
        assert nsa.backends(cuda, torch.bfloat16, 32, 32)["slc_inference"]["route"] == "triton-sparse"
        y_triton = attn(x)
        with override(use_triton=False):
            y_flex = attn(x)
        with override(use_triton=False, use_flex=False):
            y_packed = attn(x)
    assert _rel(y_triton, y_packed) <= 1e-2
    assert _rel(y_flex, y_packed) <= 1e-2
