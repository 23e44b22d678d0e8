"""Selection internals across many shapes: v1 (reference) == v2 (vectorised) ranges, packed ==
gather selection outputs, and the same selected blocks from the vectorised and reference routes.

Exact equality for integer outputs (blocks, ranges) and for packed outputs built from v1 vs v2
ranges (same ranges, same kernel: same bits); packed vs gather float32 ``atol = rtol = 1e-5``.
"""

from __future__ import annotations

import random

import pytest
import torch

from nsa import ops
from nsa.ops import naive

pytestmark = pytest.mark.selection_v2

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _shape_cases():
    """(B, T, G, h, n_sel, l_sel): hand-picked edges first, then random shapes."""
    edges = [
        (1, 1, 1, 1, 3, 4),     # a single token
        (2, 3, 2, 2, 3, 8),     # T < l_sel
        (1, 7, 1, 3, 4, 8),     # T < l_sel, n_sel > number of blocks
        (2, 8, 2, 1, 3, 8),     # T == l_sel
        (1, 9, 3, 1, 3, 8),     # T == l_sel + 1
        (2, 16, 1, 2, 3, 8),    # T == 2 * l_sel
        (1, 31, 2, 2, 5, 4),    # T prime
        (2, 37, 1, 1, 16, 3),   # n_sel far above the block count
        (1, 41, 2, 3, 3, 5),    # odd l_sel, T prime
        (1, 64, 1, 1, 3, 1),    # l_sel = 1: every token its own block
        (2, 50, 2, 2, 4, 7),
        (1, 23, 4, 1, 6, 2),
    ]
    rng = random.Random(20250211)
    randoms = []
    while len(randoms) < 36:
        l_sel = rng.choice([1, 2, 3, 4, 5, 6, 8, 12, 16])
        T = rng.randint(1, 70)
        case = (rng.randint(1, 2), T, rng.randint(1, 3), rng.randint(1, 3), rng.randint(3, 8), l_sel)
        if case not in edges and case not in randoms:
            randoms.append(case)
    return edges + randoms


SHAPES = _shape_cases()


def _ids(case):
    return "B{}-T{}-G{}-h{}-n{}-l{}".format(*case)


@pytest.mark.parametrize("case", SHAPES, ids=[_ids(c) for c in SHAPES])
def test_routes_agree_on_random_scores(case, gen, qkv):
    B, T, G, h, n_sel, l_sel = case
    nb = -(-T // l_sel)
    # Scores with some exact ties (rounded), so the tie-break matters in both routes.
    scores = (torch.rand(B, T, G, nb, generator=gen) * 8).round() / 8
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    assert torch.equal(idx, naive.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)), "selected blocks differ between routes"

    s1, e1 = ops.selection_ranges(idx, sel_block_len=l_sel, version=1)
    s2, e2 = ops.selection_ranges(idx, sel_block_len=l_sel, version=2)
    assert torch.equal(s1, s2) and torch.equal(e1, e2), "v1 and v2 ranges differ"

    q, k, v = qkv(B, T, T, G, h, 4, 6, generator=gen)
    packed_v2 = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=True, ranges_v2=True)
    packed_v1 = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=True, ranges_v2=False)
    gather = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=False)
    assert torch.equal(packed_v1, packed_v2)
    torch.testing.assert_close(packed_v2, gather, **TOL)
    assert torch.isfinite(packed_v2).all()


def _holey_block_idx(B, T, G, n, l_sel, gen, *, holes_inside: bool, future: bool = False):
    """Hand-made ``block_idx``: an ascending subset of the candidate blocks, -1 in empty slots.

    ``holes_inside`` scatters the -1 slots among the blocks ("holes"); otherwise they come last.
    ``future`` lets the subset include blocks that start after ``t`` (the ranges must drop them).
    """
    idx = torch.full((B, T, G, n), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            top = t // l_sel + (3 if future else 1)
            for g in range(G):
                m = int(torch.randint(0, min(n, top) + 1, (), generator=gen))
                blocks = sorted(torch.randperm(top, generator=gen)[:m].tolist())
                slots = sorted(torch.randperm(n, generator=gen)[:m].tolist()) if holes_inside else list(range(m))
                for s, j in zip(slots, blocks):
                    idx[b, t, g, s] = j
    return idx


HOLE_CASES = [(1, 12, 1, 2, 4, 3), (2, 20, 2, 1, 5, 4), (1, 33, 2, 2, 6, 5), (2, 9, 1, 3, 4, 8),
              (1, 40, 3, 1, 8, 2), (1, 17, 1, 1, 3, 16)]


@pytest.mark.parametrize("holes_inside", [False, True], ids=["holes-last", "holes-inside"])
@pytest.mark.parametrize("case", HOLE_CASES, ids=[_ids(c) for c in HOLE_CASES])
def test_ranges_v1_v2_on_hand_made_blocks(case, holes_inside, gen):
    B, T, G, _h, n, l_sel = case
    idx = _holey_block_idx(B, T, G, n, l_sel, gen, holes_inside=holes_inside, future=True)
    s1, e1 = ops.selection_ranges(idx, sel_block_len=l_sel, version=1)
    s2, e2 = ops.selection_ranges(idx, sel_block_len=l_sel, version=2)
    assert torch.equal(s1, s2) and torch.equal(e1, e2), "v1 and v2 ranges differ on hand-made block_idx"


@pytest.mark.parametrize("holes_inside", [False, True], ids=["holes-last", "holes-inside"])
@pytest.mark.parametrize("case", HOLE_CASES[:4], ids=[_ids(c) for c in HOLE_CASES[:4]])
def test_packed_gather_naive_on_hand_made_blocks(case, holes_inside, gen, qkv):
    B, T, G, h, n, l_sel = case
    idx = _holey_block_idx(B, T, G, n, l_sel, gen, holes_inside=holes_inside, future=True)
    q, k, v = qkv(B, T, T, G, h, 4, 4, generator=gen)
    ref = naive.selection_attention(q, k, v, idx, sel_block_len=l_sel)
    for packed in (True, False):
        for v2 in (True, False):
            got = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=packed, ranges_v2=v2)
            torch.testing.assert_close(got, ref, **TOL, msg=lambda m, p=packed, r=v2: f"packed={p} v2={r}: {m}")
    # A row whose blocks are all empty (only -1 or only future blocks) reads nothing: exactly zero.
    empty = ((idx < 0) | (idx * l_sel > torch.arange(T)[:, None, None])).all(-1)  # [B, T, G]
    o = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel).reshape(B, T, G, h, -1)
    assert torch.all(o[empty] == 0)


@pytest.mark.parametrize("cfg_kw,T", [
    ({"sel_block_len": 8, "n_sel": 3}, 5),
    ({"sel_block_len": 8, "n_sel": 3}, 8),
    ({"sel_block_len": 4, "n_sel": 4, "groups": 1, "heads_per_group": 3}, 29),
    ({"sel_block_len": 12, "n_sel": 3, "groups": 3, "heads_per_group": 1}, 37),
])
def test_module_selection_routes_agree(cfg_kw, T, make_cfg, override):
    import nsa

    attn = nsa.NSAAttention(make_cfg(**cfg_kw))
    x = torch.randn(2, T, attn.cfg.dim)
    with torch.no_grad():
        with override(use_sel_pack=True, sel_ranges_v2=True):
            y_v2 = attn(x)
        with override(use_sel_pack=True, sel_ranges_v2=False):
            y_v1 = attn(x)
        with override(use_sel_pack=False):
            y_gather = attn(x)
        with override(prefill_batched=False):
            y_ref = attn(x)
    assert torch.equal(y_v1, y_v2)
    torch.testing.assert_close(y_gather, y_v2, **TOL)
    torch.testing.assert_close(y_v2, y_ref, **TOL)


@pytest.mark.parametrize("case", HOLE_CASES, ids=[_ids(c) for c in HOLE_CASES])
def test_any_order_and_repeats(case, gen, qkv):
    """Hand-made lists in any order, with repeated blocks and -1 anywhere: every route reads each
    selected block once, as the sorted, deduplicated list would."""
    B, T, G, h, n, l_sel = case
    idx = _holey_block_idx(B, T, G, n, l_sel, gen, holes_inside=True, future=True)
    # repeat some blocks into -1 slots, then shuffle each list
    filler = idx.gather(-1, torch.randint(0, n, idx.shape, generator=gen))
    idx = torch.where((idx < 0) & (torch.rand(idx.shape, generator=gen) < 0.5), filler, idx)
    idx = idx.gather(-1, torch.argsort(torch.rand(idx.shape, generator=gen), dim=-1))
    canon = torch.full_like(idx, -1)
    for pos in torch.cartesian_prod(*(torch.arange(s) for s in idx.shape[:-1])).reshape(-1, 3).tolist():
        blocks = sorted({j for j in idx[tuple(pos)].tolist() if j >= 0})
        canon[tuple(pos)][: len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    for v in (1, 2):
        got, want = ops.selection_ranges(idx, sel_block_len=l_sel, version=v), ops.selection_ranges(canon, sel_block_len=l_sel, version=v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    q, k, v = qkv(B, T, T, G, h, 4, 4, generator=gen)
    ref = naive.selection_attention(q, k, v, canon, sel_block_len=l_sel)
    torch.testing.assert_close(naive.selection_attention(q, k, v, idx, sel_block_len=l_sel), ref, **TOL)
    for packed in (True, False):
        torch.testing.assert_close(ops.selection_attention(q, k, v, idx, sel_block_len=l_sel, packed=packed), ref, **TOL)
