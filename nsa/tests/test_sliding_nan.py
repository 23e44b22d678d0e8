"""No NaN/Inf from the window branch or the full module, whatever the dtype and row length.

Short rows, ``w > T``, ``w = 1``, ``T = 1``, rows with few keys, large logits; compressed-branch
rows that see no compressed token are exactly zero. Values are checked against the float32/float64
reference too (half dtypes: relative error <= 2e-2 of the reference's scale), so a finite but wrong
answer fails as well.
"""

from __future__ import annotations

import pytest
import torch

import nsa
from nsa import ops
from nsa.routes import route_cmp, route_win
from nsa.ops import compressed as compressed_mod
from nsa.ops import naive

from .conftest import max_rel_err

pytestmark = pytest.mark.sliding_nan

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_REL = 2e-2


def _run(fn, *args, **kwargs):
    """Call ``fn``; a dtype that this torch build cannot compute on this device skips the case."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as err:
        if "not implemented for" in str(err) or "Half" in str(err):
            pytest.skip(f"torch cannot compute this dtype here: {err}")
        raise


def _check_close(got, ref, dtype):
    assert torch.isfinite(got).all(), "NaN/Inf in output"
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), ref.float(), atol=1e-5, rtol=1e-5)
    else:
        assert max_rel_err(got, ref) <= HALF_REL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,w,scale", [(1, 1, 1.0), (1, 512, 1.0), (2, 1, 1.0), (5, 3, 1.0), (7, 100, 1.0),
                                       (12, 4, 30.0), (9, 9, 30.0), (16, 2, 1.0)])
def test_window_op_finite_and_right(dtype, T, w, scale, gen, qkv):
    q, k, v = qkv(2, T, T, 2, 2, 8, 8, generator=gen, scale=scale)
    got = _run(ops.sliding_window_attention, q.to(dtype), k.to(dtype), v.to(dtype), window=w, chunk=4)
    assert got.dtype == dtype
    # Reference from the same (rounded) inputs in float64.
    ref = naive.sliding_window_attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), window=w)
    if dtype != torch.float32 and scale > 1:
        # Logits of ~1e3 rounded to a half dtype move the softmax by more than any relative bound;
        # what must hold is that each output is a convex combination of its window's values.
        assert torch.isfinite(got).all()
        vd = v.to(dtype).double().repeat_interleave(2, dim=2)
        lo = torch.stack([vd[:, max(0, t - w + 1): t + 1].amin(1) for t in range(T)], 1)
        hi = torch.stack([vd[:, max(0, t - w + 1): t + 1].amax(1) for t in range(T)], 1)
        slack = 2e-2 * vd.abs().max()
        assert torch.all(got.double() >= lo - slack) and torch.all(got.double() <= hi + slack)
    else:
        _check_close(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_of_one_returns_own_value(dtype, gen, qkv):
    """w = 1 (and the first row of any window): softmax over one key is 1, so o_t = v_t exactly."""
    q, k, v = qkv(2, 11, 11, 2, 3, 8, 4, generator=gen, scale=50.0)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o = _run(ops.sliding_window_attention, q, k, v, window=1)
    want = v.repeat_interleave(3, dim=2)
    assert torch.equal(o, want)
    o = _run(ops.sliding_window_attention, q, k, v, window=6)
    assert torch.equal(o[:, 0], want[:, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_softmax_fully_masked_rows_are_zero(dtype, gen):
    from nsa.ops.common import masked_softmax

    s = (torch.randn(3, 5, 7, generator=gen) * 100).to(dtype).float()
    keep = torch.rand(3, 5, 7, generator=gen) < 0.3
    keep[:, 0] = False  # fully masked rows
    keep[:, 1] = False
    keep[:, 1, 2] = True  # a row with one key
    p = masked_softmax(s, keep)
    assert torch.isfinite(p).all()
    assert torch.all(p[:, 0] == 0)
    assert torch.all(p[:, 1, 2] == 1) and torch.all(p[:, 1].sum(-1) == 1)
    rows = keep.any(-1)
    torch.testing.assert_close(p.sum(-1)[rows], torch.ones_like(p.sum(-1)[rows]))
    assert torch.all(p[~keep] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [5, 8, 13])
def test_compressed_rows_without_tokens_are_exactly_zero(dtype, T, gen, qkv):
    l, d = 8, 4
    N = naive.num_cmp(T - 1, block_len=l, block_stride=d)
    q, k, v = qkv(2, T, N, 2, 2, 8, 8, generator=gen, scale=2.0)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o, p = _run(ops.compressed_attention, q, k, v, block_len=l, block_stride=d)
    assert torch.isfinite(o).all() and torch.isfinite(p).all()
    blind = l - 1  # rows 0 .. l-2 see no compressed token
    assert torch.all(o[:, :blind] == 0) and torch.all(p[:, :blind] == 0)
    if T >= l:
        ref, _ = naive.compressed_attention(q.double(), k.double(), v.double(), block_len=l, block_stride=d)
        _check_close(o, ref, dtype)
        assert o[:, blind:].abs().sum() > 0


@pytest.mark.parametrize("T", [5, 8, 13])
def test_compressed_fa2_folding_blind_rows_zero(T, gen, qkv):
    """The segment-folded route gives the same exact zeros (checked on CPU with a math kernel)."""
    import torch.nn.functional as F

    def attn(q, k, v):
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)

    N = naive.num_cmp(T - 1, block_len=8, block_stride=4)
    q, k, v = qkv(1, T, N, 2, 2, 8, 8, generator=gen)
    o = compressed_mod.compressed_attention_fa2(q, k, v, block_len=8, block_stride=4, attn_fn=attn)
    assert o.shape == (1, T, 4, 8) and torch.isfinite(o).all()
    assert torch.all(o[:, :7] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_rows_with_few_keys(dtype, gen, qkv):
    """Rows whose selected blocks hold one or two visible keys, large logits: finite and right."""
    T, l_sel = 6, 8
    idx = ops.select_blocks(torch.rand(2, T, 1, 1, generator=gen), sel_block_len=l_sel, n_sel=3)
    for scale in (1.0, 40.0):
        q, k, v = (x.to(dtype) for x in qkv(2, T, T, 1, 2, 8, 8, generator=gen, scale=scale))
        ref = naive.selection_attention(q.double(), k.double(), v.double(), idx, sel_block_len=l_sel)
        for packed in (True, False):
            got = _run(ops.selection_attention, q, k, v, idx, sel_block_len=l_sel, packed=packed)
            assert torch.isfinite(got).all()
            assert torch.equal(got[:, 0], v[:, 0].repeat_interleave(2, 1))  # row 0: its own key only
            if scale == 1.0:  # large logits rounded to half move the softmax beyond any bound
                _check_close(got, ref, dtype)


MODULE_CASES = [(1, 64), (3, 64), (3, 1), (8, 4), (13, 1), (13, 100), (20, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,w", MODULE_CASES)
def test_module_finite_every_dtype(dtype, T, w, make_cfg, gen):
    cfg = make_cfg(window=w)
    attn = nsa.NSAAttention(cfg)
    x = torch.randn(2, T, cfg.dim, generator=gen) * 3
    with torch.no_grad():
        ref = attn.double()(x.double())
        got = _run(attn.to(dtype), x.to(dtype))
    assert got.dtype == dtype
    _check_close(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_from_empty_cache_finite_every_dtype(dtype, make_cfg, gen):
    cfg = make_cfg(window=3)
    attn = nsa.NSAAttention(cfg)
    x = torch.randn(1, 12, cfg.dim, generator=gen)
    with torch.no_grad():
        ref = attn.double()(x.double())
        attn = attn.to(dtype)
        cache = attn.new_cache(1, 12)
        ys = torch.cat([_run(attn.decode_step, x[:, t: t + 1].to(dtype), cache) for t in range(12)], 1)
    _check_close(ys, ref, dtype)


# --- GPU: the FA-2 routes ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T,w", [(1, 1), (1, 512), (5, 1), (7, 100), (300, 4), (300, 256)])
def test_fa2_window_route_finite(dtype, T, w, cuda, override, gen, qkv):
    with override(use_fa2=True, use_fa2_win=True):
        route = route_win(cuda, dtype, 64, 64)
        if route.fn is None or not route.name.startswith("fa2"):
            pytest.skip(f"FA-2 window route not taken here: {route.reason}")
        q, k, v = qkv(2, T, T, 2, 2, 64, 64, dtype=dtype, device=cuda, generator=gen, scale=4.0)
        got = route.fn(q, k, v, window=w)
    ref = naive.sliding_window_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), window=w)
    _check_close(got.cpu(), ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [5, 31, 32, 200])
def test_fa2_cmp_route_blind_rows_zero(dtype, T, cuda, override, gen, qkv):
    with override(use_fa2=True, use_fa2_cmp=True):
        route = route_cmp(cuda, dtype, 64, 64)
        if route.fn is None:
            pytest.skip(f"FA-2 compressed route not taken here: {route.reason}")
        N = naive.num_cmp(T - 1, block_len=32, block_stride=16)
        q, k, v = qkv(1, T, N, 2, 2, 64, 64, dtype=dtype, device=cuda, generator=gen, scale=4.0)
        o = route.fn(q, k, v, block_len=32, block_stride=16)
    assert torch.isfinite(o).all() and torch.all(o[:, :31] == 0)
    if N:
        ref, _ = ops.compressed_attention(q.double(), k.double(), v.double(), block_len=32, block_stride=16)
        _check_close(o, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T,w", [(1, 512), (3, 1), (40, 1), (40, 16), (200, 1000)])
def test_fa2_module_finite(dtype, T, w, cuda, override, gen):
    cfg = nsa.NSAConfig(dim=128, groups=2, heads_per_group=2, d_k=32, d_v=32, block_len=16, block_stride=8,
                        sel_block_len=64, n_sel=3, window=w)
    attn = nsa.NSAAttention(cfg).to(cuda, dtype)
    x = torch.randn(2, T, cfg.dim, generator=gen).to(cuda, dtype)
    with torch.no_grad():
        # Reference routes in the same dtype: the same scores, so the same selected blocks.
        with override(use_fa2=False, use_flex=False, use_triton=False):
            ref = attn(x)
        with override(use_fa2=True, use_flex=False):
            got = attn(x)
    _check_close(got, ref, dtype)


@pytest.mark.parametrize("pos,W", [(0, 4), (2, 4), (3, 4), (4, 4), (10, 4), (17, 5), (6, 1)])
def test_decode_ring_window_is_the_window_over_the_unrolled_keys(pos, W, gen):
    """The decode step's window branch over its ring (token t in slot t % W, slots past pos empty)
    against the per-token reference over the whole sequence, float64, before and after the ring wraps."""
    from nsa.ops.window import ring_window_attention

    B, G, h, dk, dv = 2, 2, 3, 8, 6
    q = torch.randn(B, 1, G * h, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(B, pos + 1, G, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, pos + 1, G, dv, generator=gen, dtype=torch.float64)
    k_ring = torch.randn(B, W, G, dk, generator=gen, dtype=torch.float64)  # never-written slots: noise
    v_ring = torch.randn(B, W, G, dv, generator=gen, dtype=torch.float64)
    for t in range(max(0, pos - W + 1), pos + 1):
        k_ring[:, t % W], v_ring[:, t % W] = k[:, t], v[:, t]
    got = ring_window_attention(q, k_ring, v_ring, torch.tensor([pos]))
    ref = naive.sliding_window_attention(q, k, v, window=W, positions=torch.tensor([pos]))
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
