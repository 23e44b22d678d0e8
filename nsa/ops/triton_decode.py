"""The decode step's attention in Triton: one query per sequence, at the device position ``pos``.

The torch step (:meth:`nsa.NSAAttention._decode` on its reference route) runs the compressed branch
as a masked matmul over every cache slot, scores the selection with an ``[N, nb]`` overlap matmul,
sorts every row, gathers the selected tokens and attends the window ring: its cost follows the
cache's length and the number of small kernels, not what NSA reads. Here the kernels read the
caches in place (static shapes, position read on the device, no host synchronisation: the step stays
CUDA-graph capturable), each group kernel's program owning one GQA group so a loaded key tile serves
all ``h`` heads of it:

1. ``_dec_cmp`` (splits x B*G): flash-decoding over the visible compressed tokens, ``SPLIT`` tokens
   per program (at most 16 splits); a partial ``(max, sum, acc)`` per head. Up to
   :func:`single_pass_tiles` tiles of the cache, one split, which writes the branch's output itself.
2. ``_dec_cmp_reduce`` (B*G x h, only with several splits): a head's splits merged, a chunk of
   partials per load: the branch's output and log-sum-exp.
3. ``_dec_scores`` (tiles x B*G): the selection scores as prefill makes them
   (:mod:`nsa.ops.triton_scoring`): probabilities recomputed from the log-sum-exp, heads summed,
   tiles of ``16 * l_sel / d`` tokens mapped onto their 16 blocks by overlap weights computed from
   indices. A tile's tail in the next tile's blocks is carried in registers; the first tile of a
   program recomputes the tail of the tile before it, so every score is written once, without atomics.
4. ``_topn`` of :mod:`nsa.ops.triton_scoring`, one row per program, the position read from the device.
5. ``_dec_sparse`` (n_sel + window tiles, B*G): one selected block, or one ``l_sel``-slot tile of the
   window ring, per program; a partial per head.
6. ``_dec_combine`` (B*G x h): a head's selection and window partials merged, and the branches gated:
   ``g_cmp o_cmp + g_slc o_slc + g_win o_win`` in float32, stored in the queries' dtype.

At short contexts (one pass of the compressed branch, at most :func:`front_blocks` blocks) 1, 3
and 4 are one kernel, ``_dec_front`` (B*G): the compressed pass, a second pass over the same keys
for the block scores, the top-n by rank. Three launches a step in all. Before them, the token's
RoPE, gates, cache appends and phi are one kernel of :mod:`nsa.ops.triton_decode_token`.

Partials and scores are float32 scratch of a few KB per group. The plain reference is the torch
step itself; the tests compare the two under Triton's interpreter (CPU) and on a GPU.
"""

from __future__ import annotations

import math

import torch

from . import checks
from .triton_attention import _interpreting, _last_dim_contiguous, _on, _pad, _prec, sm_count, triton
from .triton_scoring import _topn
from .triton_scoring import supported as _scoring_supported

if triton is not None:
    import triton.language as tl

    from .triton_attention import _softmax_step, _tile
    from .triton_scoring import _keys, _overlap, _ranked, _store_chosen

    @triton.jit
    def _group(Q, sqb, sqh, G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr,
               DKP: tl.constexpr):
        """A (…, batch x group) program's batch x group index, batch, group, head rows (padded to
        ``HP``), their mask, and its queries ``[HP, DKP]``."""
        bg = tl.program_id(1)
        b, g, offs_h = (bg // G).to(tl.int64), bg % G, tl.arange(0, HP)
        hmask = offs_h < HPG
        return bg, b, g, offs_h, hmask, _tile(Q, b * sqb, g * HPG + offs_h, sqh, 0, DK, DKP, hmask)

    @triton.jit
    def _num_visible(POS, N, L: tl.constexpr, D: tl.constexpr):
        """The position, and how many compressed tokens it sees (token ``j`` once ``j*d + l - 1 <= pos``)."""
        pos = tl.load(POS)
        return pos, tl.minimum(tl.maximum(pos - L + 1 + D, 0) // D, N)

    @triton.jit
    def _store_partial(PM, PL, PACC, part, offs_h, m_i, l_i, acc, HP: tl.constexpr, DVP: tl.constexpr):
        row = part * HP + offs_h
        tl.store(PM + row, m_i)
        tl.store(PL + row, l_i)
        tl.store(PACC + row[:, None] * DVP + tl.arange(0, DVP)[None, :], acc)

    @triton.jit
    def _finish(m, l_sum):
        """A softmax's divisor (1 where nothing was seen) and log-sum-exp (log2 units, ``-inf`` there)."""
        has = l_sum > 0
        div = tl.where(has, l_sum, 1.0)
        return div, tl.where(has, m + tl.log2(div), float("-inf"))

    @triton.jit
    def _store_cmp(OC, LSE2, bg, offs_h, m, l_sum, acc, HP: tl.constexpr, DVP: tl.constexpr):
        """The compressed branch's output ``[HP, DVP]`` and log-sum-exp (log2 units) of a group; returns
        the latter."""
        row = bg * HP + offs_h
        div, lse2 = _finish(m, l_sum)
        tl.store(OC + row[:, None] * DVP + tl.arange(0, DVP)[None, :], acc / div[:, None])
        tl.store(LSE2 + row, lse2)
        return lse2

    @triton.jit
    def _merge_chunk(PM, PL, PACC, first, c, h, m, l_sum, acc, COUNT: tl.constexpr, HP: tl.constexpr,
                     DVP: tl.constexpr, PC: tl.constexpr):
        part = c + tl.arange(0, PC)
        pmask = part < COUNT
        row = (first + part) * HP + h  # [PC]: head h's row of each partial
        pm = tl.load(PM + row, mask=pmask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(pm, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)  # 0 while nothing was merged (m = -inf)
        w = tl.exp2(pm - m_safe)  # an empty or masked partial (max -inf) weighs 0
        l_sum = l_sum * alpha + tl.sum(tl.load(PL + row, mask=pmask, other=0.0) * w, 0)
        pacc = tl.load(PACC + row[:, None] * DVP + tl.arange(0, DVP)[None, :], mask=pmask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(pacc * w[:, None], 0)
        return m_new, l_sum, acc

    @triton.jit
    def _merge(PM, PL, PACC, first, h, COUNT: tl.constexpr, HP: tl.constexpr, DVP: tl.constexpr, PC: tl.constexpr,
               UNROLL: tl.constexpr):
        """Head ``h``'s rows of partials ``first .. first + COUNT - 1`` merged: ``(max, sum, acc [DVP])``
        (log2 units). A program per head: a program per group merged its heads' rows in turn through
        ``[PC, heads, DVP]`` tiles, one or two programs at the seed layer (the gated merge of 24 partials
        took 6.3-6.5 us of a 43 us step on the H100). ``PC`` partials per iteration, loaded as one tile
        and merged online; ``UNROLL`` (where every partial fits in registers at once,
        :func:`merge_launch`): the chunks unrolled, so every load can issue before any is waited on."""
        m = tl.full([], float("-inf"), tl.float32)
        l_sum = tl.zeros([], tl.float32)
        acc = tl.zeros([DVP], tl.float32)
        if UNROLL:
            for c in tl.static_range(0, COUNT, PC):
                m, l_sum, acc = _merge_chunk(PM, PL, PACC, first, c, h, m, l_sum, acc, COUNT, HP, DVP, PC)
        else:
            for c in range(0, COUNT, PC):
                m, l_sum, acc = _merge_chunk(PM, PL, PACC, first, c, h, m, l_sum, acc, COUNT, HP, DVP, PC)
        return m, l_sum, acc

    @triton.jit
    def _cmp_pass(q, K, V, b, g, skb, sks, skg, svb, svs, svg, lo, hi, qk_scale, HP: tl.constexpr,
                  DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr):
        """Online softmax of a group's queries over compressed tokens ``lo .. hi - 1``: ``(max, sum, acc)``."""
        m_i = tl.full([HP], float("-inf"), tl.float32)
        l_i = tl.zeros([HP], tl.float32)
        acc = tl.zeros([HP, DVP], tl.float32)
        for j0 in range(lo, hi, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            n64 = offs_n.to(tl.int64)
            k = _tile(K, b * skb, n64, sks, g * skg, DK, DKP, nmask)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
            s = tl.where(nmask[None, :], s, float("-inf"))
            v = _tile(V, b * svb, n64, svs, g * svg, DV, DVP, nmask)
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, v, PREC)
        return m_i, l_i, acc

    @triton.jit
    def _dec_cmp(Q, K, V, POS, PM, PL, PACC, OC, LSE2, sqb, sqh, skb, sks, skg, svb, svs, svg, N, SPLIT, qk_scale,
                 G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                 DV: tl.constexpr, DVP: tl.constexpr, L: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr, FINAL: tl.constexpr):
        bg, b, g, offs_h, hmask, q = _group(Q, sqb, sqh, G, HPG, HP, DK, DKP)
        _, n_vis = _num_visible(POS, N, L, D)
        lo = tl.program_id(0) * SPLIT
        m_i, l_i, acc = _cmp_pass(q, K, V, b, g, skb, sks, skg, svb, svs, svg, lo, tl.minimum(lo + SPLIT, n_vis),
                                  qk_scale, HP, DK, DKP, DV, DVP, BLOCK_N, PREC)
        if FINAL:  # one split: the branch's output and log-sum-exp, no reduce kernel
            _store_cmp(OC, LSE2, bg, offs_h, m_i, l_i, acc, HP, DVP)
        else:
            _store_partial(PM, PL, PACC, bg * tl.num_programs(0) + tl.program_id(0), offs_h, m_i, l_i, acc, HP, DVP)

    @triton.jit
    def _dec_cmp_reduce(PM, PL, PACC, OC, LSE2, NSPLIT: tl.constexpr, HP: tl.constexpr, DVP: tl.constexpr,
                        PC: tl.constexpr, UNROLL: tl.constexpr):
        bg, h = tl.program_id(0), tl.program_id(1)
        m, l_sum, acc = _merge(PM, PL, PACC, bg * NSPLIT, h, NSPLIT, HP, DVP, PC, UNROLL)
        row = bg * HP + h  # head h's row of _store_cmp's layout
        div, lse2 = _finish(m, l_sum)
        tl.store(OC + row * DVP + tl.arange(0, DVP), acc / div)
        tl.store(LSE2 + row, lse2)

    @triton.jit
    def _tile_probs(q, K, b, g, skb, sks, skg, lse2, hmask, j0, n_vis, qk_scale, DK: tl.constexpr,
                    DKP: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """Tokens ``j0 ..`` of a tile, and their compressed probabilities summed over the group's heads."""
        offs_n = j0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_vis
        k = _tile(K, b * skb, offs_n.to(tl.int64), sks, g * skg, DK, DKP, nmask)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        vis = hmask[:, None] & nmask[None, :]
        p = tl.where(vis, tl.exp2(s - tl.where(vis, lse2[:, None], s)), 0.0)
        return offs_n, tl.sum(p, 0)

    @triton.jit
    def _dec_scores(Q, K, POS, LSE2, SC, sqb, sqh, skb, sks, skg, N, NB, TILES, qk_scale,
                    G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                    L: tl.constexpr, D: tl.constexpr, SEL: tl.constexpr, NBT: tl.constexpr, BLOCK_N: tl.constexpr,
                    PREC: tl.constexpr):
        bg, b, g, offs_h, hmask, q = _group(Q, sqb, sqh, G, HPG, HP, DK, DKP)
        _, n_vis = _num_visible(POS, N, L, D)
        lse2 = tl.load(LSE2 + bg * HP + offs_h)
        offs_b = tl.arange(0, NBT)
        first = tl.program_id(0) * TILES
        carry = tl.zeros([NBT], tl.float32)
        if first > 0:  # the tail of the tile before this program's first
            offs_n, summed = _tile_probs(q, K, b, g, skb, sks, skg, lse2, hmask, (first - 1) * BLOCK_N, n_vis,
                                         qk_scale, DK, DKP, BLOCK_N, PREC)
            carry = tl.sum(summed[:, None] * _overlap(offs_n, first * NBT + offs_b, L, D, SEL), 0)
        for tile in range(first, first + TILES):
            offs_n, summed = _tile_probs(q, K, b, g, skb, sks, skg, lse2, hmask, tile * BLOCK_N, n_vis, qk_scale,
                                         DK, DKP, BLOCK_N, PREC)
            blk = tile * NBT + offs_b
            own = tl.sum(summed[:, None] * _overlap(offs_n, blk, L, D, SEL), 0) + carry
            tl.store(SC + bg * NB + blk, own, mask=blk < NB)
            carry = tl.sum(summed[:, None] * _overlap(offs_n, blk + NBT, L, D, SEL), 0)
        # The last tile's tail falls on blocks >= NB (the grid covers every block): nothing to store.

    @triton.jit
    def _dec_sparse(Q, KS, VS, KW, VW, IDX, POS, PM, PL, PACC,
                    sqb, sqh, sksb, skss, sksg, svsb, svss, svsg, skwb, skws, skwg, svwb, svws, svwg, sib, sig,
                    S, W, qk_scale,
                    G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                    DV: tl.constexpr, DVP: tl.constexpr, SEL: tl.constexpr, NSEL: tl.constexpr,
                    PREC: tl.constexpr):
        # Program i < NSEL: the i-th selected block (keys blk*SEL.., those <= pos and < S); program
        # i >= NSEL: window-ring slots (i - NSEL)*SEL.. (those < W and <= pos: the ring's used slots).
        bg, b, g, offs_h, hmask, q = _group(Q, sqb, sqh, G, HPG, HP, DK, DKP)
        pos = tl.load(POS)
        i = tl.program_id(0)
        offs = tl.arange(0, SEL)
        slot = (i - NSEL) * SEL + offs  # negative on the selection's programs
        blk = tl.load(IDX + b * sib + g * sig + tl.minimum(i, NSEL - 1))
        kpos = blk * SEL + offs  # negative for an empty slot (-1)
        # Vector comparisons only: the interpreter's `&` of a vector and a scalar mask gives int32.
        smask = (slot < 0) & (kpos >= 0) & (kpos <= pos) & (kpos < S)
        wmask = (slot >= 0) & (slot < W) & (slot <= pos)
        slot = tl.maximum(slot, 0).to(tl.int64)
        # Masked loads read nothing: a program fetches either its block or its ring tile.
        k = (_tile(KS, b * sksb, kpos, skss, g * sksg, DK, DKP, smask)
             + _tile(KW, b * skwb, slot, skws, g * skwg, DK, DKP, wmask))
        v = (_tile(VS, b * svsb, kpos, svss, g * svsg, DV, DVP, smask)
             + _tile(VW, b * svwb, slot, svws, g * svwg, DV, DVP, wmask))
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where((smask | wmask)[None, :], s, float("-inf"))
        m_i = tl.max(s, 1)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.exp2(s - m_safe[:, None])
        acc = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        _store_partial(PM, PL, PACC, bg * tl.num_programs(0) + i, offs_h, m_i, tl.sum(p, 1), acc, HP, DVP)

    @triton.jit
    def _dec_front(Q, K, V, POS, OC, LSE2, IDX, sqb, sqh, skb, sks, skg, svb, svs, svg, sib, sig, N, NB, qk_scale,
                   G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                   DV: tl.constexpr, DVP: tl.constexpr, L: tl.constexpr, D: tl.constexpr, SEL: tl.constexpr,
                   NSEL: tl.constexpr, NSP: tl.constexpr, NBP: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr):
        # Short contexts: kernels 1, 3 and 4 as one program per group. The compressed branch in one
        # pass, then the same tiles again for the scores of every block (held in registers, no
        # carry), then the top-n by rank (_ranked). The scores in the first pass instead (per-head
        # sums rescaled with the running max, a [heads, tokens] x [tokens, blocks] float32 dot per
        # tile, 8 warps) was slower on the H100: seed layer, 2K, B=1, 9.7 against 7.2 us in graph
        # replays, the step 0.0388 against 0.0366 ms.
        bg, b, g, offs_h, hmask, q = _group(Q, sqb, sqh, G, HPG, HP, DK, DKP)
        pos, n_vis = _num_visible(POS, N, L, D)
        m_i, l_i, acc = _cmp_pass(q, K, V, b, g, skb, sks, skg, svb, svs, svg, 0, n_vis, qk_scale, HP, DK, DKP, DV,
                                  DVP, BLOCK_N, PREC)
        lse2 = _store_cmp(OC, LSE2, bg, offs_h, m_i, l_i, acc, HP, DVP)
        j = tl.arange(0, NBP)
        sc = tl.zeros([NBP], tl.float32)
        for j0 in range(0, n_vis, BLOCK_N):
            offs_n, summed = _tile_probs(q, K, b, g, skb, sks, skg, lse2, hmask, j0, n_vis, qk_scale, DK, DKP,
                                         BLOCK_N, PREC)
            sc += tl.sum(summed[:, None] * _overlap(offs_n, j, L, D, SEL), 0)
        chosen = _ranked(_keys(tl.reshape(sc, [1, NBP]), j, pos // SEL, NB), NBP, NSEL)
        _store_chosen(IDX, tl.zeros([1], tl.int64) + b * sib + g * sig, chosen, j, tl.full([1], 1, tl.int1), 1,
                      NSEL, NSP)

    @triton.jit
    def _dec_combine(PM, PL, PACC, OC, GATES, O, sgb, sgh, sob, soh,
                     G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                     NSEL: tl.constexpr, NPART: tl.constexpr, PC: tl.constexpr, UNROLL: tl.constexpr):
        bg, h = tl.program_id(0), tl.program_id(1)
        b, head = (bg // G).to(tl.int64), (bg % G) * HPG + h
        offs_d = tl.arange(0, DVP)
        # Every load first, none waiting on another (see _merge).
        o_cmp = tl.load(OC + (bg * HP + h) * DVP + offs_d)
        gate = GATES + b * sgb + head * sgh
        g_cmp = tl.load(gate).to(tl.float32)
        g_slc = tl.load(gate + 1).to(tl.float32)
        g_win = tl.load(gate + 2).to(tl.float32)
        _, l_slc, acc_slc = _merge(PM, PL, PACC, bg * NPART, h, NSEL, HP, DVP, PC, UNROLL)
        _, l_win, acc_win = _merge(PM, PL, PACC, bg * NPART + NSEL, h, NPART - NSEL, HP, DVP, PC, UNROLL)
        o = (g_cmp * o_cmp + g_slc * (acc_slc / tl.where(l_slc > 0, l_slc, 1.0))
             + g_win * (acc_win / tl.where(l_win > 0, l_win, 1.0)))
        tl.store(O + b * sob + head * soh + offs_d, o.to(O.dtype.element_ty), mask=offs_d < DV)


def supported(heads: int, groups: int, d_k: int, d_v: int, block_len: int, block_stride: int,
              sel_block_len: int) -> str | None:
    """Why these kernels cannot run this layer's decode step, or None when they can (the route table asks)."""
    why = _scoring_supported(heads, groups, d_k, block_len, block_stride, sel_block_len)
    if why is not None:
        return why
    if sel_block_len < 16 or sel_block_len & (sel_block_len - 1):
        return f"sel_block_len={sel_block_len} (a power of two >= 16: one block is one tile of keys)"
    if d_v > 256:
        return f"d_v={d_v} (up to 256)"
    return None


def kernel_warps(dkp: int) -> dict:
    """Warps per group kernel for ``d_k`` padded to ``dkp``, from sm_90 builds
    (``test_decode_kernels_build_for_sm90_without_spilling``): at 4 warps the selected-block kernel
    spills at d_k >= 128 (192 bytes at 128, 696 at 192), at 8 none does. The merges (one program per
    head) take :func:`merge_launch`'s."""
    return {"cmp": 4, "front": 8 if dkp > 128 else 4, "scores": 4, "sparse": 8 if dkp > 64 else 4}


def merge_launch(counts: tuple[int, ...], dvp: int, device: torch.device) -> dict:
    """A merge kernel's launch options (one program per head, :func:`_merge`), its merges of
    ``counts`` partials of ``dvp`` values each: ``num_warps`` for about 32 float32 values per thread
    (1 to 4: the seed layer's gated merge, 24 x 32 values, one warp); ``PC``, partials loaded at once,
    a ``[PC, dvp]`` tile of about 64 values per thread and no more than the largest merge (the
    interpreter: 4, so tests merge across chunks); ``UNROLL`` where all partials fit at about 96
    values per thread."""
    parts = sum(counts)
    warps = min(4, max(1, triton.next_power_of_2(parts) * dvp // (32 * 32)))
    pc = 4 if device.type != "cuda" else max(1, min(triton.next_power_of_2(max(counts)), 64 * 32 * warps // dvp))
    return {"num_warps": warps, "PC": pc, "UNROLL": parts * dvp <= 96 * 32 * warps}


def front_blocks(device: torch.device) -> int:
    """Selection blocks (padded to a power of two) up to which a one-pass compressed branch also
    scores and picks them in the same program (:func:`_dec_front`): its top-n compares every pair
    of blocks, ``[64, 64]`` on 4 warps at most."""
    return 64


def max_splits(device: torch.device) -> int:
    """Splits of the compressed branch at most. The reduce walks them in chunks and its latency grows
    with the chunk count: the seed layer at 64K context, 64 splits in 4 chunks, took 14 us on an H200,
    more than the split kernel itself. The interpreter: 4, so tests walk several tiles per split."""
    return 16 if device.type == "cuda" else 4


def single_pass_tiles(device: torch.device) -> int:
    """Tiles of compressed tokens (64 each) up to which one program per group walks them all and
    writes the branch's output itself, without partials and the reduce kernel. From the H100
    profile of the seed layer's step at 2K context (2 tiles, 2 splits): split kernel 2.3 us, reduce
    4.1 us, of a 52 us step; one program's extra tiles cost well under a microsecond each (an
    estimate: the single pass has not been timed on its own). The interpreter: 3, so the tests'
    caches take both paths (36 and 48 slots: one pass; 149: splits)."""
    return 8 if device.type == "cuda" else 3


def _tiles_per_program(tiles: int, B: int, G: int, device: torch.device) -> int:
    """Tiles each program of a split kernel walks: about two programs per SM, at least one tile
    each (the interpreter: one tile, so tests cross programs)."""
    return 1 if device.type != "cuda" else max(1, tiles * B * G // (2 * sm_count(device)))


def _compressed_and_selection(q, k_cmp, v_cmp, pos, o_cmp, lse2, idx, tiles, block_n, block_len, block_stride,
                              sel_block_len, n_sel, num_blocks, nbp, qk_scale, common, warps):
    """Kernels 1-4 apart (longer contexts): the compressed branch in splits (and their reduce where
    there are several), the scores in tiles, the top-n."""
    B, G, N = q.shape[0], k_cmp.shape[2], k_cmp.shape[1]
    h, hp, dvp, dev = common["HPG"], common["HP"], _pad(v_cmp.shape[-1]), q.device
    f32 = {"device": dev, "dtype": torch.float32}
    if tiles <= single_pass_tiles(dev):
        per = tiles
    else:
        per = max(_tiles_per_program(tiles, B, G, dev), triton.cdiv(tiles, max_splits(dev)))
    split, nsplit = per * block_n, triton.cdiv(tiles, per)
    parts = B * G * nsplit * hp if nsplit > 1 else 1  # one split: no partials
    pm, pl, pacc = torch.empty(parts, **f32), torch.empty(parts, **f32), torch.empty(parts * dvp, **f32)
    _dec_cmp[(nsplit, B * G)](q, k_cmp, v_cmp, pos, pm, pl, pacc, o_cmp, lse2, q.stride(0), q.stride(2),
                              *k_cmp.stride()[:3], *v_cmp.stride()[:3], N, split, qk_scale, **common,
                              DV=v_cmp.shape[-1], DVP=dvp, L=block_len, D=block_stride, BLOCK_N=block_n,
                              FINAL=nsplit == 1, num_warps=warps["cmp"])
    if nsplit > 1:
        _dec_cmp_reduce[(B * G, h)](pm, pl, pacc, o_cmp, lse2, NSPLIT=nsplit, HP=hp, DVP=dvp,
                                    **merge_launch((nsplit,), dvp, dev))
    nbt = 16
    tile_n = nbt * sel_block_len // block_stride
    n_tiles = max(triton.cdiv(N, tile_n), triton.cdiv(num_blocks, nbt))
    per = _tiles_per_program(n_tiles, B, G, dev)
    scores = torch.empty(B, G, num_blocks, **f32)
    _dec_scores[(triton.cdiv(n_tiles, per), B * G)](
        q, k_cmp, pos, lse2, scores, q.stride(0), q.stride(2), *k_cmp.stride()[:3], N, num_blocks, per, qk_scale,
        **common, L=block_len, D=block_stride, SEL=sel_block_len, NBT=nbt, BLOCK_N=tile_n, num_warps=warps["scores"])
    # One row (b, g) per program: measured on an H200 (1024 blocks, 50 launches in a CUDA graph),
    # 6.8 us against 13.5 with prefill's four rows per program; 4 warps beat 1, 2 and 8 there. Up to
    # 256 blocks one warp: its n_sel rounds of reductions then need no shared memory or barriers (the
    # seed layer at 2K context, 34 blocks at 4 warps: 4.8 us of a 45 us step on the H100). ``nbp``:
    # the blocks padded to a power of two (>= 16).
    _topn[(B * G,)](
        scores, idx, pos, G * num_blocks, 0, num_blocks, *idx.stride()[:3], B * G, 1, 0, num_blocks,
        G=G, SEL=sel_block_len, NSEL=n_sel, NSP=triton.next_power_of_2(n_sel), NBP=nbp, BLOCK_R=1, POS_PTR=True,
        num_warps=1 if nbp <= 256 else 4)


def _decode_attention(q: torch.Tensor, q_rope: torch.Tensor, gates: torch.Tensor, k_cmp: torch.Tensor,
                      v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor,
                      v_win: torch.Tensor, pos: torch.Tensor, block_len: int, block_stride: int, sel_block_len: int,
                      n_sel: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, H, Dk = q.shape
    N, G, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    S, W = k_slc.shape[1], k_win.shape[1]
    h = H // G
    hp = max(16, triton.next_power_of_2(h))
    dkp, dvp = _pad(Dk), _pad(Dv)
    q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = _last_dim_contiguous(
        q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)
    qk_scale = 1.0 / math.sqrt(Dk) * 1.4426950408889634
    dev = q.device
    f32 = {"device": dev, "dtype": torch.float32}
    common = dict(G=G, HPG=h, HP=hp, DK=Dk, DKP=dkp, PREC=_prec(q.dtype))
    warps = kernel_warps(dkp)
    # 1-4: compressed branch, selection scores, top-n blocks
    block_n = 64 if dev.type == "cuda" else 16
    tiles = triton.cdiv(max(N, 1), block_n)
    o_cmp, lse2 = torch.empty(B * G * hp * dvp, **f32), torch.empty(B * G * hp, **f32)
    idx = torch.empty(B, 1, G, n_sel, device=dev, dtype=torch.long)
    nbp = triton.next_power_of_2(max(num_blocks, 16))
    if tiles <= single_pass_tiles(dev) and nbp <= front_blocks(dev):
        _dec_front[(1, B * G)](q, k_cmp, v_cmp, pos, o_cmp, lse2, idx, q.stride(0), q.stride(2), *k_cmp.stride()[:3],
                               *v_cmp.stride()[:3], idx.stride(0), idx.stride(2), N, num_blocks, qk_scale, **common,
                               DV=Dv, DVP=dvp, L=block_len, D=block_stride, SEL=sel_block_len, NSEL=n_sel,
                               NSP=triton.next_power_of_2(n_sel), NBP=nbp, BLOCK_N=block_n, num_warps=warps["front"])
    else:
        _compressed_and_selection(q, k_cmp, v_cmp, pos, o_cmp, lse2, idx, tiles, block_n, block_len, block_stride,
                                  sel_block_len, n_sel, num_blocks, nbp, qk_scale, common, warps)
    # 5-6: selected blocks and window ring, then the gated sum of the three branches
    nparts = n_sel + triton.cdiv(W, sel_block_len)
    pm, pl = torch.empty(B * G * nparts * hp, **f32), torch.empty(B * G * nparts * hp, **f32)
    pacc = torch.empty(B * G * nparts * hp * dvp, **f32)
    _dec_sparse[(nparts, B * G)](
        q_rope, k_slc, v_slc, k_win, v_win, idx, pos, pm, pl, pacc, q_rope.stride(0), q_rope.stride(2),
        *k_slc.stride()[:3], *v_slc.stride()[:3], *k_win.stride()[:3], *v_win.stride()[:3], idx.stride(0),
        idx.stride(2), S, W, qk_scale, **common, DV=Dv, DVP=dvp, SEL=sel_block_len, NSEL=n_sel,
        num_warps=warps["sparse"])
    o = torch.empty(B, 1, H, Dv, device=dev, dtype=q.dtype)
    _dec_combine[(B * G, h)](pm, pl, pacc, o_cmp, gates, o, gates.stride(0), gates.stride(2), o.stride(0), o.stride(2),
                             G=G, HPG=h, HP=hp, DV=Dv, DVP=dvp, NSEL=n_sel, NPART=nparts,
                             **merge_launch((n_sel, nparts - n_sel), dvp, dev))
    return o, idx


@torch.library.custom_op("nsa::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, q_rope: torch.Tensor, gates: torch.Tensor, k_cmp: torch.Tensor,
                         v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor,
                         v_win: torch.Tensor, pos: torch.Tensor, block_len: int, block_stride: int,
                         sel_block_len: int, n_sel: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A custom op: torch.compile (compile_decode) keeps it as one opaque call instead of tracing the
    # launches; the op itself holds no host synchronisation, so CUDA graphs capture it.
    with _on(q.device):
        return _decode_attention(q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, pos, block_len,
                                 block_stride, sel_block_len, n_sel, num_blocks)


@_decode_attention_op.register_fake
def _(q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, pos, block_len, block_stride, sel_block_len,
      n_sel, num_blocks):
    B, _, H, _ = q.shape
    return (q.new_empty(B, 1, H, v_cmp.shape[-1]),
            q.new_empty(B, 1, k_cmp.shape[2], n_sel, dtype=torch.long))


def decode_attention(q: torch.Tensor, q_rope: torch.Tensor, gates: torch.Tensor, k_cmp: torch.Tensor,
                     v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor,
                     v_win: torch.Tensor, pos: torch.Tensor, *, block_len: int, block_stride: int, sel_block_len: int,
                     n_sel: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's gated attention ``[B, 1, H, d_v]`` (before the output projection) and its
    selected blocks ``[B, 1, G, n_sel]`` (int64, ascending, ``-1`` empty), for queries at ``pos``.

    ``q`` (compressed branch) and ``q_rope`` (selection, window) ``[B, 1, H, d_k]``; ``gates
    [B, 1, H, 3]`` (cmp, slc, win); the caches as :class:`nsa.attention.NSACache` holds them after this
    step's token was written: ``k_cmp/v_cmp [B, N, G, d]`` (slots ``0..N-1``), ``k_slc/v_slc
    [B, S, G, d]``, the window ring ``k_win/v_win [B, W, G, d]``; ``pos [1]`` int64 on the device.
    ``num_blocks`` selection blocks (``ceil(S / l_sel)``) are scored. No checks beyond the device:
    reached through :mod:`nsa.routes` with the layer's own tensors.
    """
    if triton is None:
        raise RuntimeError("decode_attention: Triton is not installed (pip install triton)")
    if q.device.type != "cuda" and not _interpreting():
        checks.fail("decode_attention", "q.device", str(q.device), "a CUDA device (CPU tensors only under "
                    "TRITON_INTERPRET=1, set before Triton is first imported)")
    return _decode_attention_op(q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, pos, block_len,
                                block_stride, sel_block_len, n_sel, num_blocks)
