"""Each vectorised op against its plain reference in ``nsa.ops.naive`` on fresh random inputs.

Tolerance: float32, ``atol = rtol = 1e-5`` (TOL below); integer outputs (blocks, ranges) exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from nsa import ops
from nsa.ops import compressed as compressed_mod
from nsa.ops import naive
from nsa.ops.selection import select_from_compressed

pytestmark = pytest.mark.ops

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --- compression -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["linear", "mean"])
@pytest.mark.parametrize("S,l,d", [(5, 8, 4), (8, 8, 4), (8, 8, 8), (21, 8, 4), (30, 6, 2), (17, 4, 4)])
def test_compress_tokens_matches_naive(mode, S, l, d, gen):
    B, G, D, d_out = 2, 3, 5, 7
    x = torch.randn(B, S, G, D, generator=gen)
    weight = torch.randn(l * D, d_out, generator=gen)
    bias = torch.randn(d_out, generator=gen)
    pos_emb = torch.randn(l, D, generator=gen)
    got = ops.compress_tokens(x, weight, bias, pos_emb, block_len=l, block_stride=d, mode=mode)
    ref = naive.compress_tokens(x, weight, bias, pos_emb, block_len=l, block_stride=d, mode=mode)
    n = naive.num_cmp(S - 1, block_len=l, block_stride=d)
    assert got.shape == ref.shape == (B, n, G, D if mode == "mean" else d_out)
    torch.testing.assert_close(got, ref, **TOL)
    if mode == "mean" and n:
        # Token i is the mean of its block (plus the position embedding): check one by hand.
        i = n - 1
        torch.testing.assert_close(got[:, i], (x[:, i * d: i * d + l] + pos_emb[:, None]).mean(1), **TOL)


def test_compress_tokens_without_bias(gen):
    x = torch.randn(1, 20, 2, 4, generator=gen)
    w, pe = torch.randn(8 * 4, 3, generator=gen), torch.randn(8, 4, generator=gen)
    torch.testing.assert_close(ops.compress_tokens(x, w, None, pe, block_len=8, block_stride=4),
                               naive.compress_tokens(x, w, None, pe, block_len=8, block_stride=4), **TOL)


@pytest.mark.parametrize("l,d", [(8, 4), (32, 16), (6, 3), (5, 5), (4, 1)])
def test_num_cmp_tensor_matches_formula(l, d):
    t = torch.arange(0, 200)
    got = ops.num_cmp(t, block_len=l, block_stride=d)
    want = torch.tensor([0 if ti + 1 < l else (ti + 1 - l) // d + 1 for ti in range(200)])
    assert torch.equal(got, want)
    assert torch.equal(got, torch.tensor([naive.num_cmp(ti, block_len=l, block_stride=d) for ti in range(200)]))


# --- compressed attention --------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,G,h,dk,dv,l,d", [
    (1, 5, 1, 1, 4, 4, 8, 4),      # T < l: no row sees anything
    (2, 8, 2, 1, 4, 6, 8, 4),      # T == l: only the last row sees one token
    (2, 23, 2, 3, 8, 4, 8, 4),
    (1, 30, 3, 2, 6, 6, 6, 2),
    (2, 19, 1, 4, 4, 8, 4, 4),
])
def test_compressed_attention_matches_naive(B, T, G, h, dk, dv, l, d, gen, qkv):
    N = naive.num_cmp(T - 1, block_len=l, block_stride=d)
    q, k, v = qkv(B, T, N, G, h, dk, dv, generator=gen)
    o, p = ops.compressed_attention(q, k, v, block_len=l, block_stride=d)
    o_ref, p_ref = naive.compressed_attention(q, k, v, block_len=l, block_stride=d)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(p, p_ref, **TOL)
    # Visible rows are distributions, the others exactly zero.
    seen = torch.tensor([naive.num_cmp(t, block_len=l, block_stride=d) > 0 for t in range(T)])
    torch.testing.assert_close(p.sum(-1)[:, seen], torch.ones_like(p.sum(-1)[:, seen]), **TOL)
    assert torch.all(o[:, ~seen] == 0) and torch.all(p[:, ~seen] == 0)


def test_compressed_attention_with_positions_and_scale(gen, qkv):
    """Decode-style queries at arbitrary absolute positions over a longer compressed cache."""
    B, G, h, l, d = 2, 2, 2, 8, 4
    N = 10
    positions = torch.tensor([3, 7, 8, 15, 30, 50])  # 50 would see 11 > N tokens: clipped to N
    q, k, v = qkv(B, len(positions), N, G, h, 6, 5, generator=gen)
    o, p = ops.compressed_attention(q, k, v, block_len=l, block_stride=d, positions=positions, scale=0.3)
    o_ref, p_ref = naive.compressed_attention(q, k, v, block_len=l, block_stride=d, positions=positions, scale=0.3)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(p, p_ref, **TOL)


def test_compressed_attention_against_softmax_by_hand(gen, qkv):
    """One row computed from the formula, independent of both implementations."""
    q, k, v = qkv(1, 20, 4, 1, 2, 4, 3, generator=gen)
    o, p = ops.compressed_attention(q, k, v, block_len=8, block_stride=4)
    t, head = 15, 1  # num_cmp(15) = (16 - 8)//4 + 1 = 3
    s = (k[0, :3, 0] @ q[0, t, head]) / math.sqrt(4)
    want_p = torch.softmax(s, 0)
    torch.testing.assert_close(p[0, t, head, :3], want_p, **TOL)
    assert torch.all(p[0, t, head, 3:] == 0)
    torch.testing.assert_close(o[0, t, head], want_p @ v[0, :3, 0], **TOL)


# --- selection: scores, blocks, ranges, attention ---------------------------------------------------

@pytest.mark.parametrize("T,G,h,l,d,l_sel", [(20, 1, 1, 8, 4, 8), (40, 2, 3, 8, 4, 16), (33, 3, 2, 6, 2, 4),
                                             (64, 2, 2, 32, 16, 64), (50, 1, 4, 4, 4, 12)])
def test_selection_scores_matches_naive(T, G, h, l, d, l_sel, gen):
    B, N = 2, naive.num_cmp(T - 1, block_len=l, block_stride=d)
    nb = -(-T // l_sel)
    p = torch.softmax(torch.randn(B, T, G * h, N, generator=gen), -1)
    got = ops.selection_scores(p, groups=G, block_len=l, block_stride=d, sel_block_len=l_sel, num_blocks=nb)
    ref = naive.selection_scores(p, groups=G, block_len=l, block_stride=d, sel_block_len=l_sel, num_blocks=nb)
    assert got.shape == (B, T, G, nb)
    torch.testing.assert_close(got, ref, **TOL)
    # Every compressed block lies inside [0, T) and each raw position is shared once, so the scores
    # of a row sum to the group's total probability mass (h heads) times l / l = 1 per head.
    torch.testing.assert_close(got.sum(-1), p.reshape(B, T, G, h, N).sum((-1, -2)), **TOL)


@pytest.mark.parametrize("T,G,nb_extra,l_sel,n_sel", [(30, 2, 0, 4, 3), (30, 1, 0, 4, 5), (64, 3, 0, 8, 4),
                                                      (17, 2, 2, 4, 16), (9, 1, 0, 16, 3), (48, 2, 0, 6, 6)])
@pytest.mark.parametrize("ties", [False, True])
def test_select_blocks_matches_naive(T, G, nb_extra, l_sel, n_sel, ties, gen):
    B = 2
    nb = -(-T // l_sel) + nb_extra
    if ties:  # few distinct values: ties everywhere, so the tie-break is exercised
        scores = torch.randint(0, 3, (B, T, G, nb), generator=gen).float()
    else:
        scores = torch.rand(B, T, G, nb, generator=gen)
    got = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    ref = naive.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    assert got.dtype == torch.long and got.shape == (B, T, G, n_sel)
    assert torch.equal(got, ref)


def test_select_blocks_with_positions_matches_naive(gen):
    positions = torch.tensor([0, 5, 16, 17, 40, 63])
    scores = torch.rand(2, len(positions), 2, 8, generator=gen)
    assert torch.equal(ops.select_blocks(scores, sel_block_len=8, n_sel=4, positions=positions),
                       naive.select_blocks(scores, sel_block_len=8, n_sel=4, positions=positions))


@pytest.mark.parametrize("T,G,h,l,d,l_sel,n_sel,chunk", [(70, 2, 3, 8, 4, 8, 4, 1), (70, 2, 3, 8, 4, 8, 4, 13),
                                                        (100, 1, 2, 16, 8, 16, 3, 64), (5, 2, 1, 8, 4, 8, 3, 2),
                                                        (129, 2, 2, 8, 4, 16, 5, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_from_compressed_equals_the_unchunked_ops(T, G, h, l, d, l_sel, n_sel, chunk, dtype, gen, qkv):
    B = 2
    N = naive.num_cmp(T - 1, block_len=l, block_stride=d)
    q, k, v = qkv(B, T, N, G, h, 16, 8, dtype=dtype, generator=gen)
    nb = -(-T // l_sel)
    _, p = ops.compressed_attention(q, k, v, block_len=l, block_stride=d)
    scores = ops.selection_scores(p, groups=G, block_len=l, block_stride=d, sel_block_len=l_sel, num_blocks=nb)
    want = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    q.requires_grad_(True)
    got = select_from_compressed(q, k, v, groups=G, block_len=l, block_stride=d, sel_block_len=l_sel, n_sel=n_sel,
                                 num_blocks=nb, chunk_rows=chunk)
    assert got.shape == (B, T, G, n_sel) and not got.requires_grad
    assert torch.equal(got, want)


@pytest.mark.parametrize("T,l_sel,n_sel", [(12, 4, 3), (40, 8, 4), (7, 16, 3), (33, 5, 6)])
def test_selection_ranges_v2_matches_naive(T, l_sel, n_sel, gen):
    scores = torch.rand(2, T, 2, -(-T // l_sel), generator=gen)
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    got = ops.selection_ranges(idx, sel_block_len=l_sel, version=2)
    ref = naive.selection_ranges(idx, sel_block_len=l_sel)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # The ranges cover exactly the selected tokens <= t.
    lengths = (got[1] - got[0]).sum(-1)
    want = torch.stack([((idx[:, t].clamp_min(0)[..., None] * l_sel + torch.arange(l_sel) <= t)
                         & (idx[:, t] >= 0)[..., None]).sum((-1, -2)) for t in range(T)], 1)
    assert torch.equal(lengths, want)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("B,T,S,G,h,dk,dv,l_sel,n_sel", [
    (1, 6, 6, 1, 1, 4, 4, 8, 3),     # T < l_sel
    (2, 16, 16, 2, 2, 4, 6, 4, 3),
    (1, 21, 21, 1, 3, 8, 4, 5, 4),
    (2, 12, 30, 2, 1, 4, 4, 8, 4),   # more keys than queries (a decode-like cache)
])
def test_selection_attention_matches_naive(packed, B, T, S, G, h, dk, dv, l_sel, n_sel, gen, qkv):
    q, k, v = qkv(B, T, S, G, h, dk, dv, generator=gen)
    scores = torch.rand(B, T, G, -(-S // l_sel), generator=gen)
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    got = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=packed)
    ref = naive.selection_attention(q, k, v, idx, sel_block_len=l_sel)
    torch.testing.assert_close(got, ref, **TOL)


def test_selection_attention_with_positions_matches_naive(gen, qkv):
    positions = torch.tensor([2, 9, 17, 23])
    q, k, v = qkv(2, 4, 24, 2, 2, 4, 4, generator=gen)
    idx = ops.select_blocks(torch.rand(2, 4, 2, 6, generator=gen), sel_block_len=4, n_sel=3, positions=positions)
    ref = naive.selection_attention(q, k, v, idx, sel_block_len=4, positions=positions)
    for packed in (True, False):
        torch.testing.assert_close(ops.selection_attention(q, k, v, idx, sel_block_len=4, positions=positions, packed=packed),
                                   ref, **TOL)


def test_selection_attention_chunked_rows_match_naive(gen, qkv):
    """Small chunks (several prefill chunks) give the same answer as one chunk and the reference."""
    q, k, v = qkv(2, 20, 20, 2, 2, 4, 4, generator=gen)
    idx = ops.select_blocks(torch.rand(2, 20, 2, 5, generator=gen), sel_block_len=4, n_sel=3)
    ref = naive.selection_attention(q, k, v, idx, sel_block_len=4)
    for packed in (True, False):
        torch.testing.assert_close(ops.selection_attention(q, k, v, idx, sel_block_len=4, packed=packed, chunk_rows=12), ref, **TOL)


# --- sliding window ----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,G,h,dk,dv,w,chunk", [
    (1, 1, 1, 1, 4, 4, 1, 0),
    (2, 9, 2, 2, 4, 6, 1, 0),
    (2, 13, 1, 3, 8, 4, 4, 5),     # chunks of 5 queries, window crosses chunk borders
    (1, 17, 2, 2, 4, 4, 100, 4),   # w > T
    (2, 16, 2, 1, 6, 6, 16, 3),    # w == T
])
def test_sliding_window_matches_naive(B, T, G, h, dk, dv, w, chunk, gen, qkv):
    q, k, v = qkv(B, T, T, G, h, dk, dv, generator=gen)
    got = ops.sliding_window_attention(q, k, v, window=w, chunk=chunk)
    ref = naive.sliding_window_attention(q, k, v, window=w)
    torch.testing.assert_close(got, ref, **TOL)


def test_sliding_window_scale_matches_naive(gen, qkv):
    q, k, v = qkv(1, 10, 10, 1, 2, 4, 4, generator=gen)
    torch.testing.assert_close(ops.sliding_window_attention(q, k, v, window=3, scale=0.7),
                               naive.sliding_window_attention(q, k, v, window=3, scale=0.7), **TOL)


# --- RoPE ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,theta", [(2, 10000.0), (8, 10000.0), (16, 500.0), (6, 1e6)])
def test_apply_rope_matches_complex_rotation(d, theta, gen):
    """Rotate-half convention: pair ``(x[i], x[i + d/2])`` is the complex number rotated by ``pos * theta^(-2i/d)``."""
    x = torch.randn(2, 11, 3, d, generator=gen)
    positions = torch.randint(0, 5000, (11,), generator=gen)
    got = ops.apply_rope(x, positions, theta=theta)
    xd = x.double()
    z = torch.complex(xd[..., : d // 2], xd[..., d // 2:])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(11, d // 2, dtype=torch.float64), positions.double()[:, None] * freq)
    zr = z * rot[:, None, :]
    want = torch.cat([zr.real, zr.imag], -1).float()
    # float32 angles pos * freq for pos up to 5000 carry ~5000 * 6e-8 = 3e-4 rad of rounding.
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    small = torch.arange(11)  # small positions: float32 angles are exact to ~1e-6
    rot = torch.polar(torch.ones(11, d // 2, dtype=torch.float64), small.double()[:, None] * freq)
    want = torch.cat([(z * rot[:, None]).real, (z * rot[:, None]).imag], -1).float()
    torch.testing.assert_close(ops.apply_rope(x, small, theta=theta), want, **TOL)
    # A rotation keeps each pair's norm.
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), **TOL)


def test_apply_rope_position_zero_is_identity_and_float64(gen):
    x = torch.randn(1, 4, 2, 8, generator=gen, dtype=torch.float64)
    y = ops.apply_rope(x, torch.zeros(4, dtype=torch.long))
    assert y.dtype == torch.float64 and torch.equal(y, x)


def test_apply_rope_relative_positions(gen):
    """<rope(q, m), rope(k, n)> depends on m - n only."""
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)
    dots = [(ops.apply_rope(q, torch.tensor([m])) * ops.apply_rope(k, torch.tensor([m - 3]))).sum()
            for m in (3, 10, 50)]
    torch.testing.assert_close(dots[1], dots[0], **TOL)
    torch.testing.assert_close(dots[2], dots[0], **TOL)


# --- varlen packing helper ------------------------------------------------------------------------------

def test_pack_varlen_copies_exactly(gen):
    x = torch.randn(2, 3, 5, 4, generator=gen).transpose(1, 2)
    with torch.no_grad():
        out = compressed_mod.pack_varlen(x, "q", rows=2 * 5, keys=None)
    assert out.is_contiguous() and torch.equal(out, x)


@pytest.mark.parametrize("T,l_sel,kv_block,q_block", [(100, 16, 32, 32), (100, 32, 16, 32), (70, 16, 16, 16)])
@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex on CPU says it is slow: it is the check here
def test_flex_selection_key_tiles_of_several_or_part_blocks_match_reference(T, l_sel, kv_block, q_block, gen, qkv):
    """The flex route's mask with key tiles holding several selection blocks (or part of one): the
    tiling of Hopper's backward (128-key tiles over 64-key blocks), at CPU sizes, uncompiled. Flex
    has no backward on CPU: gradients are checked on the GPU (test_gpu_kernels.py)."""
    from nsa.ops.flex import selection_attention_flex

    q, k, v = qkv(2, T, T, 2, 2, 16, 8, dtype=torch.float64, generator=gen)
    idx = ops.select_blocks(torch.rand(2, T, 2, -(-T // l_sel), generator=gen), sel_block_len=l_sel, n_sel=3)
    ref = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel)
    out = selection_attention_flex(q, k, v, idx, sel_block_len=l_sel, q_block=q_block, kv_block=kv_block,
                                   compiled=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("length,window", [(128, 512), (256, 512), (1024, 512), (1024, 1), (1024, 64), (1024, 128),
                                           (1024, 129), (1024, 255), (1024, 256), (1024, 257), (2048, 700),
                                           (512, 2000)])
def test_flex_window_mask_equals_create_block_mask(length, window):
    """The window route's BlockMask, built from tile grids, is flex's own ``create_block_mask`` (which
    evaluates the mask on the dense grid of positions) tensor for tensor: the same partial and full
    tiles in the same order, key side and query side (the backward's)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from nsa.ops.flex import _window_mask

    got = _window_mask(length, window, torch.device("cpu"))
    ref = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k < window), None, None, length, length, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.seq_lengths == ref.seq_lengths and got.BLOCK_SIZE == ref.BLOCK_SIZE


def test_flex_window_mask_is_linear_in_length():
    """At T=128K the dense grid ``create_block_mask`` evaluates is 128 GiB (the H100's out-of-memory);
    the tile lists are 1024 x 1024 int32: built here, on the CPU, in well under a second."""
    from nsa.ops.flex import _window_mask

    m = _window_mask(131072, 512, torch.device("cpu"))
    n = 1024
    assert m.kv_num_blocks.sum().item() == n + (n - 4)         # the diagonal, and distance 4 (the band's edge)
    assert m.full_kv_num_blocks.sum().item() == 3 * n - 6      # distances 1-3, wholly inside the band


@pytest.mark.parametrize("T,window", [(100, 1), (100, 64), (300, 128), (300, 200), (300, 512)])
@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex on CPU says it is slow: it is the check here
def test_flex_window_matches_reference(T, window, gen, qkv):
    """The flex window route (uncompiled, CPU, float64) against the chunked reference: the tile lists
    and their padding at every kind of tile (diagonal, full, edge)."""
    from nsa.ops.flex import sliding_window_attention_flex

    q, k, v = qkv(2, T, T, 2, 2, 16, 8, dtype=torch.float64, generator=gen)
    out = sliding_window_attention_flex(q, k, v, window=window, compiled=False)
    torch.testing.assert_close(out, ops.sliding_window_attention(q, k, v, window=window), rtol=1e-10, atol=1e-12)
