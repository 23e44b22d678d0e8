"""The GPU-only selection kernels (Triton forward, FlexAttention forward/backward) and the flex window
route against the float64 references (``nsa.ops.selection_attention``, ``sliding_window_attention``);
bf16 inputs, relative error <= 1e-2 (gradients 2e-2)."""

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


def _qkv(B, T, G, h, dk, dv, device, gen):
    return tuple(torch.randn(*shape, generator=gen).to(device, torch.bfloat16)
                 for shape in ((B, T, G * h, dk), (B, T, G, dk), (B, T, G, dv)))


def _inputs(case, device, gen):
    B, T, G, h, dk, dv, bs, n = case
    q, k, v = _qkv(B, T, G, h, dk, dv, device, gen)
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


@pytest.mark.parametrize("T,window", [(1000, 512), (777, 200), (300, 64), (640, 1)])
def test_flex_window_values_and_grads_equal_reference(T, window, cuda, gen):
    """The training window route (flex over the band's tile lists) against the float64 reference."""
    from nsa.ops import sliding_window_attention
    from nsa.ops.flex import sliding_window_attention_flex

    q, k, v = _qkv(1, T, 4, 16, 128, 128, cuda, gen)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = sliding_window_attention(q64, k64, v64, window=window)
    grad_out = torch.randn(ref.shape, generator=gen).to(cuda, torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    qb, kb, vb = (x.clone().requires_grad_() for x in (q, k, v))
    out = sliding_window_attention_flex(qb, kb, vb, window=window)
    grads = torch.autograd.grad(out, (qb, kb, vb), grad_out.bfloat16())
    assert _rel(out, ref) <= 1e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        if window == 1 and name in "qk":  # one visible key: the softmax is constant, dq and dk are zero
            assert r.abs().max() == 0 and g.double().norm() <= 1e-4 * ref_grads[2].norm(), (name, g.abs().max())
        else:
            assert _rel(g, r) <= 2e-2, name


def test_module_inference_routes_agree(cuda, gen, override):
    """The module's no-grad prefill (Triton selection and window) equals its packed route and its flex route."""
    cfg = nsa.NSAConfig(dim=128, groups=2, heads_per_group=4, d_k=32, d_v=32, block_len=32, block_stride=16,
                        sel_block_len=64, n_sel=8, window=128)
    attn = nsa.NSAAttention(cfg).to(cuda, torch.bfloat16)
    x = torch.randn(2, 700, 128, generator=gen).to(cuda, torch.bfloat16)
    with torch.no_grad():
        b = nsa.backends(cuda, torch.bfloat16, 32, 32)
        assert b["slc_inference"]["route"] == "triton-sparse" and b["win_inference"]["route"] == "triton-window"
        y_triton = attn(x)
        assert attn.routes_taken["win"]["route"] == "triton-window"
        with override(use_triton=False):
            y_flex = attn(x)
        with override(use_triton=False, use_flex=False):
            y_packed = attn(x)
    assert _rel(y_triton, y_packed) <= 1e-2
    assert _rel(y_flex, y_packed) <= 1e-2


@pytest.mark.parametrize("flags", [{}, {"use_fa2": True, "use_fa2_cmp": True, "use_fa2_win": False},
                                   {"use_flex": False}], ids=["defaults", "workflow-fa2", "no-flex"])
def test_autocast_training_takes_the_half_routes_and_agrees_with_float32(flags, cuda, gen, override):
    """Training as the workflow's TinyLM (and most training loops) runs it: float32 parameters under
    bf16 autocast. The branches get bf16 tensors, so they must take the bf16 routes (Triton / flex /
    FA-2), train without error, and agree with the same layer run in float32. T=1024 at the seed
    layer keeps near-tie selection flips rare (on CPU: output 0.5% apart). pos_k and phi_k_bias
    are left out of the gradient check: a bias shared by every compressed key cancels in the
    softmax, so their float32 gradients are ~0 and any relative error is meaningless."""
    cfg = nsa.NSAConfig(dim=256, groups=2, heads_per_group=4, d_k=32, d_v=32, block_len=32, block_stride=16,
                        sel_block_len=64, n_sel=16, window=512)
    layer = nsa.NSAAttention(cfg).to(cuda)
    x = torch.randn(2, 1024, cfg.dim, generator=gen).to(cuda).requires_grad_()
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    params = [x, *layer.parameters()]
    with override(**flags):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        grads = torch.autograd.grad(y.float().square().mean(), params)
        taken = {b: r["route"] for b, r in layer.routes_taken.items()}
        half = nsa.backends(cuda, torch.bfloat16, cfg.d_k, cfg.d_v, cfg.sel_block_len, groups=cfg.groups,
                            heads_per_group=cfg.heads_per_group)
        y32 = layer(x)
        grads32 = torch.autograd.grad(y32.square().mean(), params)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert taken == {b: half[b]["route"] for b in taken}, (taken, half)
    assert _rel(y, y32) <= 3e-2
    for name, g, g32 in zip(names, grads, grads32):
        assert torch.isfinite(g).all(), name
        if name not in ("pos_k", "phi_k_bias"):
            assert _rel(g, g32) <= 5e-2, name
