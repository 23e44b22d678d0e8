"""Autograd through every branch: ``torch.autograd.gradcheck`` in float64 on small shapes (fixed
``block_idx`` for selection), and gradients of the vectorised ops equal those of the naive ops
(float64, ``atol = 1e-10``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nsa
from nsa import ops
from nsa.ops import compressed as compressed_mod
from nsa.ops import naive

pytestmark = pytest.mark.gradients

F64 = {"atol": 1e-10, "rtol": 1e-8}


def _leaves(*xs):
    return tuple(x.detach().double().requires_grad_() for x in xs)


def _qkv64(B, T, S, G, h, dk, dv, gen):
    return _leaves(torch.randn(B, T, G * h, dk, generator=gen), torch.randn(B, S, G, dk, generator=gen),
                   torch.randn(B, S, G, dv, generator=gen))


@pytest.mark.parametrize("T,l,d", [(12, 4, 2), (9, 8, 4), (6, 8, 4)])
def test_gradcheck_compressed_attention(T, l, d, gen):
    N = max(1, naive.num_cmp(T - 1, block_len=l, block_stride=d))
    q, k, v = _qkv64(1, T, N, 2, 2, 4, 3, gen)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.compressed_attention(q, k, v, block_len=l, block_stride=d), (q, k, v))


@pytest.mark.parametrize("mode", ["linear", "mean"])
def test_gradcheck_compress_tokens(mode, gen):
    l, d, D = 4, 2, 3
    x, w, b, pe = _leaves(torch.randn(1, 9, 2, D, generator=gen), torch.randn(l * D, 2, generator=gen),
                          torch.randn(2, generator=gen), torch.randn(l, D, generator=gen))
    if mode == "mean":
        assert torch.autograd.gradcheck(lambda x, pe: ops.compress_tokens(x, None, None, pe, block_len=l, block_stride=d, mode="mean"), (x, pe))
    else:
        assert torch.autograd.gradcheck(lambda *a: ops.compress_tokens(*a, block_len=l, block_stride=d), (x, w, b, pe))


def test_gradcheck_compressed_attention_through_compression(gen):
    """q, raw keys/values and phi's parameters -> compressed-branch output and probabilities."""
    l, d, T, G, h, D = 4, 2, 10, 1, 2, 2
    q, kc, vc, wk, wv, pk, pv = _leaves(
        torch.randn(1, T, G * h, D, generator=gen), torch.randn(1, T, G, D, generator=gen),
        torch.randn(1, T, G, D, generator=gen), torch.randn(l * D, D, generator=gen) * 0.3,
        torch.randn(l * D, D, generator=gen) * 0.3, torch.randn(l, D, generator=gen), torch.randn(l, D, generator=gen))

    def branch(q, kc, vc, wk, wv, pk, pv):
        k_cmp = ops.compress_tokens(kc, wk, None, pk, block_len=l, block_stride=d)
        v_cmp = ops.compress_tokens(vc, wv, None, pv, block_len=l, block_stride=d)
        return ops.compressed_attention(q, k_cmp, v_cmp, block_len=l, block_stride=d)

    assert torch.autograd.gradcheck(branch, (q, kc, vc, wk, wv, pk, pv))


def _fixed_blocks(B, T, G, n, l_sel, gen):
    scores = torch.rand(B, T, G, -(-T // l_sel), generator=gen)
    return ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "gather"])
def test_gradcheck_selection_attention(packed, gen):
    B, T, G, h, l_sel = 1, 11, 2, 2, 2
    q, k, v = _qkv64(B, T, T, G, h, 3, 2, gen)
    idx = _fixed_blocks(B, T, G, 3, l_sel, gen)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=packed), (q, k, v))


@pytest.mark.parametrize("w", [1, 3, 50])
def test_gradcheck_sliding_window(w, gen):
    q, k, v = _qkv64(1, 9, 9, 2, 2, 3, 2, gen)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.sliding_window_attention(q, k, v, window=w, chunk=4), (q, k, v))


def test_gradcheck_rope(gen):
    (x,) = _leaves(torch.randn(1, 5, 2, 4, generator=gen))
    assert torch.autograd.gradcheck(lambda x: ops.apply_rope(x, torch.arange(5) * 7), (x,))


def test_gradcheck_compressed_fa2_folding(gen):
    def attn(q, k, v):
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)

    q, k, v = _qkv64(1, 11, naive.num_cmp(10, block_len=4, block_stride=2), 2, 1, 2, 2, gen)
    assert torch.autograd.gradcheck(lambda q, k, v: compressed_mod.compressed_attention_fa2(q, k, v, block_len=4, block_stride=2, attn_fn=attn),
                                    (q, k, v))


@pytest.mark.parametrize("cfg_kw", [
    {},
    {"groups": 1, "heads_per_group": 1, "d_k": 4, "d_v": 2, "compress": "mean", "gate_hidden": 3},
])
def test_gradcheck_module_wrt_input(cfg_kw, make_cfg, gen):
    base = {"dim": 6, "groups": 2, "heads_per_group": 1, "d_k": 2, "d_v": 2, "block_len": 4, "block_stride": 2, "sel_block_len": 2,
                "n_sel": 3, "window": 3}
    base.update(cfg_kw)
    attn = nsa.NSAAttention(make_cfg(**base)).double()
    (x,) = _leaves(torch.randn(1, 11, base["dim"], generator=gen))
    assert torch.autograd.gradcheck(attn, (x,))


# --- fast gradients == naive gradients --------------------------------------------------------------

def _grads(fn, inputs, weights):
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    return torch.autograd.grad(loss, inputs)


def _compare(fast, slow, inputs, gen):
    with torch.no_grad():
        outs = fast(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    for gf, gs in zip(_grads(fast, inputs, weights), _grads(slow, inputs, weights)):
        torch.testing.assert_close(gf, gs, **F64)
        assert gf.abs().sum() > 0


def test_grad_compressed_attention_fast_equals_naive(gen):
    q, k, v = _qkv64(2, 14, naive.num_cmp(13, block_len=4, block_stride=2), 2, 2, 4, 3, gen)
    _compare(lambda *a: ops.compressed_attention(*a, block_len=4, block_stride=2),
             lambda *a: naive.compressed_attention(*a, block_len=4, block_stride=2), (q, k, v), gen)


@pytest.mark.parametrize("mode", ["linear", "mean"])
def test_grad_compress_tokens_fast_equals_naive(mode, gen):
    x, w, b, pe = _leaves(torch.randn(2, 13, 2, 3, generator=gen), torch.randn(12, 5, generator=gen),
                          torch.randn(5, generator=gen), torch.randn(4, 3, generator=gen))
    if mode == "mean":
        _compare(lambda x, pe: ops.compress_tokens(x, None, None, pe, block_len=4, block_stride=2, mode="mean"),
                 lambda x, pe: naive.compress_tokens(x, None, None, pe, block_len=4, block_stride=2, mode="mean"), (x, pe), gen)
    else:
        _compare(lambda *a: ops.compress_tokens(*a, block_len=4, block_stride=2),
                 lambda *a: naive.compress_tokens(*a, block_len=4, block_stride=2), (x, w, b, pe), gen)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "gather"])
def test_grad_selection_fast_equals_naive(packed, gen):
    q, k, v = _qkv64(2, 13, 13, 2, 2, 4, 3, gen)
    idx = _fixed_blocks(2, 13, 2, 3, 3, gen)
    _compare(lambda *a: ops.selection_attention(*a, idx, sel_block_len=3, packed=packed),
             lambda *a: naive.selection_attention(*a, idx, sel_block_len=3), (q, k, v), gen)


def test_grad_window_fast_equals_naive(gen):
    q, k, v = _qkv64(2, 13, 13, 2, 2, 4, 3, gen)
    _compare(lambda *a: ops.sliding_window_attention(*a, window=4, chunk=5),
             lambda *a: naive.sliding_window_attention(*a, window=4), (q, k, v), gen)


def test_grad_selection_scores_fast_equals_naive(gen):
    (p,) = _leaves(torch.softmax(torch.randn(2, 12, 4, 5, generator=gen), -1))
    kw = {"groups": 2, "block_len": 4, "block_stride": 2, "sel_block_len": 4, "num_blocks": 3}
    _compare(lambda p: ops.selection_scores(p, **kw), lambda p: naive.selection_scores(p, **kw), (p,), gen)


def test_grad_module_batched_equals_sequential(make_cfg, override, gen):
    """Gradients w.r.t. the input and every parameter agree between the two prefill routes."""
    attn = nsa.NSAAttention(make_cfg()).double()
    (x,) = _leaves(torch.randn(2, 21, attn.cfg.dim, generator=gen))
    w = torch.randn(2, 21, attn.cfg.dim, generator=gen, dtype=torch.float64)
    params = [p for p in attn.parameters()]
    grads = []
    for batched in (True, False):
        with override(prefill_batched=batched):
            grads.append(torch.autograd.grad((attn(x) * w).sum(), [x, *params]))
    for name, gb, gs in zip(["x"] + [n for n, _ in attn.named_parameters()], *grads):
        torch.testing.assert_close(gb, gs, **F64, msg=lambda m, name=name: f"{name}: {m}")
    assert all(g.abs().sum() > 0 for g in grads[0])  # every parameter (phi, gates, branch K/V) gets a gradient
