"""Selection attention in Triton, forward and backward: the paper's group-centric design (§3.4).

Forward: a program per (query, group) loads the ``h`` queries of that group at one position once,
walks the group's selected blocks (``n`` of ``l_sel`` keys each) with an online softmax and writes
``h`` outputs and their log-sum-exp: the keys it reads are exactly the selected ones, so the work
follows ``T * n * l_sel`` rather than ``T^2``.

Backward (flash-attention 2 style, ``P`` recomputed from the saved log-sum-exp, ``D = rowsum(dO*O)``):
- ``dQ``: the forward's layout, a program per (query, group) over its selected blocks;
- ``dK, dV``: the selection inverted. The (query, group, block) triples are sorted by block into
  per-block query lists (``torch.sort``, ``searchsorted``: no host synchronisation); a program owns one key block
  of one group and up to ``SEG`` queries of its list, loads the block's keys and values once, and
  walks those queries ``BQ`` at a time with all ``h`` heads. Block 0 is in every query's list, so
  long lists are split into segments that add into float32 accumulators atomically (the sums of a
  block's segments therefore carry no fixed order: gradients agree to rounding, not bit for bit).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton; the route table never picks this then
    triton = None

if triton is not None:
    from .triton_attention import _bwd_delta, _on, _softmax_step, _store_tile, _tile

    @triton.jit
    def _query_group(G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr):
        """A (query, group) program's position ``t``, batch ``b``, group ``g``, and its group's heads
        (padded to ``HP``) with their mask."""
        g = tl.program_id(1) % G
        offs_h = tl.arange(0, HP)
        return tl.program_id(0).to(tl.int64), (tl.program_id(1) // G).to(tl.int64), g, offs_h, offs_h < HPG

    @triton.jit
    def _block_kv(K, V, blk, t, b, g, skb, sks, skg, svb, svs, svg, S, DK: tl.constexpr, DKP: tl.constexpr,
                  DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr):
        """Selected block ``blk``'s keys and values for the query at ``t``, and which of them it sees
        (none of an empty slot's: masked, not branched around, so the loop over slots has no branch
        and Triton can pipeline its loads, ``num_stages``)."""
        kpos = blk * BS + tl.arange(0, BS)
        kmask = (kpos >= 0) & (kpos <= t) & (kpos < S)  # an empty slot (-1) reads nothing
        return kmask, _tile(K, b * skb, kpos, sks, g * skg, DK, DKP, kmask), _tile(V, b * svb, kpos, svs, g * svg,
                                                                                   DV, DVP, kmask)

    @triton.jit
    def _selection_fwd(Q, K, V, IDX, O, LSE,
                       sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sib, sit, sig, sob, sot, soh, slb, slt,
                       S, scale,
                       G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr,
                       DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr,
                       N: tl.constexpr):
        t, b, g, offs_h, hmask = _query_group(G, HPG, HP)
        q = _tile(Q, b * sqb + t * sqt, g * HPG + offs_h, sqh, 0, DK, DKP, hmask)
        m_i = tl.full([HP], float("-inf"), tl.float32)
        l_i = tl.zeros([HP], tl.float32)
        acc = tl.zeros([HP, DVP], tl.float32)
        for i in range(N):
            blk = tl.load(IDX + b * sib + t * sit + g * sig + i)
            kmask, k, v = _block_kv(K, V, blk, t, b, g, skb, sks, skg, svb, svs, svg, S, DK, DKP, DV, DVP, BS)
            s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)  # log2 units
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, v, "tf32")
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        _store_tile(O, b * sob + t * sot, g * HPG + offs_h, soh, 0, o, DV, DVP, hmask)
        has = l_i > 0
        # natural log, as the backward kernels read it
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * slb + t * slt + g * HPG + offs_h, lse, mask=hmask)

    @triton.jit
    def _selection_bwd_dq(Q, K, V, IDX, DO, LSE, DELTA, DQ,
                          sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sib, sit, sig, sdb, sdt, sdh, slb, slt,
                          sgb, sgt, sgh, S, scale,
                          G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr,
                          DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr,
                          N: tl.constexpr):
        t, b, g, offs_h, hmask = _query_group(G, HPG, HP)
        heads = g * HPG + offs_h
        q = _tile(Q, b * sqb + t * sqt, heads, sqh, 0, DK, DKP, hmask)
        do = _tile(DO, b * sdb + t * sdt, heads, sdh, 0, DV, DVP, hmask)
        lse = tl.load(LSE + b * slb + t * slt + heads, mask=hmask, other=0.0)
        delta = tl.load(DELTA + b * slb + t * slt + heads, mask=hmask, other=0.0)
        dq = tl.zeros([HP, DKP], tl.float32)
        for i in range(N):
            blk = tl.load(IDX + b * sib + t * sit + g * sig + i)
            kmask, k, v = _block_kv(K, V, blk, t, b, g, skb, sks, skg, svb, svs, svg, S, DK, DKP, DV, DVP, BS)
            vis = hmask[:, None] & kmask[None, :]
            s = tl.dot(q, tl.trans(k)) * scale
            p = tl.where(vis, tl.exp(s - tl.where(vis, lse[:, None], s)), 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        _store_tile(DQ, b * sgb + t * sgt, heads, sgh, 0, dq * scale, DK, DKP, hmask)

    @triton.jit
    def _selection_bwd_dkdv(Q, K, V, DO, LSE, DELTA, QT, OFFS, DK_, DV_,
                            sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sdb, sdt, sdh, slb, slt,
                            sgkb, sgks, sgkg, sgvb, sgvs, sgvg, S, NB, scale,
                            G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr,
                            DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr,
                            BQ: tl.constexpr, SEG: tl.constexpr):
        key = tl.program_id(0)  # ((b * G) + g) * NB + block
        start = tl.load(OFFS + key) + tl.program_id(1) * SEG
        stop = tl.minimum(tl.load(OFFS + key + 1), start + SEG)
        if start < stop:
            blk = key % NB
            g = (key // NB) % G
            b = (key // NB // G).to(tl.int64)
            offs_s = tl.arange(0, BS)
            offs_dk = tl.arange(0, DKP)
            offs_dv = tl.arange(0, DVP)
            kpos = (blk * BS + offs_s).to(tl.int64)
            kmask = kpos < S
            k = _tile(K, b * skb, kpos, sks, g * skg, DK, DKP, kmask)
            v = _tile(V, b * svb, kpos, svs, g * svg, DV, DVP, kmask)
            dk = tl.zeros([BS, DKP], tl.float32)
            dv = tl.zeros([BS, DVP], tl.float32)
            rows = tl.arange(0, BQ * HP)  # BQ queries of the list x the group's heads (padded), query-major
            heads = g * HPG + rows % HP
            for e0 in range(start, stop, BQ):
                e = e0 + rows // HP
                emask = (e < stop) & (rows % HP < HPG)
                t = tl.load(QT + e, mask=emask, other=0)
                q = _tile(Q, b * sqb, t, sqt, heads[:, None] * sqh, DK, DKP, emask)
                do = _tile(DO, b * sdb, t, sdt, heads[:, None] * sdh, DV, DVP, emask)
                lse = tl.load(LSE + b * slb + t * slt + heads, mask=emask, other=0.0)
                delta = tl.load(DELTA + b * slb + t * slt + heads, mask=emask, other=0.0)
                vis = emask[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
                s = tl.dot(q, tl.trans(k)) * scale
                p = tl.where(vis, tl.exp(s - tl.where(vis, lse[:, None], s)), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            tl.atomic_add(DK_ + b * sgkb + kpos[:, None] * sgks + g * sgkg + offs_dk[None, :], dk * scale,
                          mask=kmask[:, None] & (offs_dk[None, :] < DK))
            tl.atomic_add(DV_ + b * sgvb + kpos[:, None] * sgvs + g * sgvg + offs_dv[None, :], dv,
                          mask=kmask[:, None] & (offs_dv[None, :] < DV))


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def _pads(h: int, dk: int, dv: int) -> dict:
    p2 = triton.next_power_of_2
    return dict(HPG=h, DK=dk, DKP=max(16, p2(dk)), DV=dv, DVP=max(16, p2(dv)))


def _forward(q, k, v, idx, sel_block_len, scale):
    B, T, H, Dk = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[-1]
    h = H // G
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if B * T == 0:
        return o, lse
    pads, hp = _pads(h, Dk, Dv), triton.next_power_of_2(h)
    _selection_fwd[(T, B * G)](
        q, k, v, idx, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3],
        *o.stride()[:3], *lse.stride()[:2], S, scale,
        G=G, HP=max(16, hp), **pads, BS=sel_block_len, N=idx.shape[-1],
        **_launch(kernel_options(hp, pads["DKP"], q.device), "fwd"))
    return o, lse


def query_lists(idx: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection inverted: ``(qt, offsets)`` with ``qt[offsets[key]:offsets[key + 1]]`` the
    positions (ascending) of the queries whose selection holds block ``key = (b * G + g) * num_blocks + j``.
    ``idx [B, T, G, n]`` canonical (unique blocks per row, ``-1`` empty); blocks ``>= num_blocks`` hold
    no key and are left out. Sorting on the device: no host synchronisation."""
    B, T, G, n = idx.shape
    bg = (torch.arange(B, device=idx.device)[:, None, None, None] * G
          + torch.arange(G, device=idx.device)[None, None, :, None])
    none = B * G * num_blocks
    key = torch.where((idx >= 0) & (idx < num_blocks), bg * num_blocks + idx, torch.full_like(idx, none)).flatten()
    key, order = torch.sort(key, stable=True)
    qt = torch.arange(T, device=idx.device)[None, :, None, None].expand(B, T, G, n).flatten()[order].contiguous()
    # Where each key's run starts in the sorted keys (bincount would read its maximum on the host).
    offsets = torch.searchsorted(key, torch.arange(none + 2, device=idx.device, dtype=key.dtype))
    return qt, offsets


def kernel_options(hp: int, dkp: int, device: torch.device) -> dict:
    """Launch options for ``hp`` heads (padded to a power of two) and ``d_k`` padded to ``dkp``.

    The forward and dQ kernels spill nothing at 4 warps in sm_90 builds (dQ at d_k=192: 8 warps).
    Their loops over the selected blocks have no branch, so Triton pipelines the gathered loads:
    timed on the H100 at T=64K, 16 heads per group, d=128 (tools/tile_sweep.py, interleaved, eleventh
    session), the forward took 17.4 ms at 2 stages against 22.5 at one (18.2 at 3; 8 warps 22.2-28.1),
    dQ with dK/dV (the backward) 36.9 ms at 3 stages against 44.6 at one (37.6 at 2; 8 warps 41.2).
    The dK/dV kernel, d_k <= 128: 64 rows of queries x heads per step at 4 warps, one stage, timed
    fastest on the H100 at T=64K with 16 heads per group (backward 62.7 -> 45.1 ms against 32 rows
    at 8 warps; tools/tile_sweep.py, docs/perf-notes.md, ninth session); at d_k=192, 16 rows at 8
    warps still spill about 330 bytes. Lists are cut into segments of 1024 queries on a GPU, so
    block 0 (in every list) spreads over many programs; 32 under the interpreter, so tests cross
    segments.
    """
    small = dkp <= 128
    return {"fwd_warps": 4, "fwd_stages": 2, "dq_warps": 4 if small else 8, "dq_stages": 3,
            "dkdv_queries": max(1, (64 if small else 16) // hp),
            "dkdv_warps": 4 if small else 8, "dkdv_stages": 1, "segment": 1024 if device.type == "cuda" else 32}


def _launch(opt: dict, kernel: str) -> dict:
    return {"num_warps": opt[f"{kernel}_warps"], "num_stages": opt[f"{kernel}_stages"]}


def _backward(do, q, k, v, idx, o, lse, sel_block_len, scale):
    B, T, H, Dk = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[-1]
    h = H // G
    dq = torch.empty(B, T, H, Dk, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, S, G, Dk, device=q.device, dtype=torch.float32)
    dv = torch.zeros(B, S, G, Dv, device=q.device, dtype=torch.float32)
    if B * T == 0 or S == 0:
        return dq.zero_(), dk.to(k.dtype), dv.to(v.dtype)
    do = do if do.stride(-1) == 1 else do.contiguous()
    pads = _pads(h, Dk, Dv)
    hp = triton.next_power_of_2(h)
    opt = kernel_options(hp, pads["DKP"], q.device)
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(T * H, 64), B)](o, do, delta, *o.stride()[:3], *do.stride()[:3], T, H=H, DV=Dv,
                                            DVP=pads["DVP"], BLOCK_M=64)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    _selection_bwd_dq[(T, B * G)](
        q, k, v, idx, do, lse, delta, dq, *common, *idx.stride()[:3], *do.stride()[:3], *lse.stride()[:2],
        *dq.stride()[:3], S, scale, G=G, HP=max(16, hp), **pads, BS=sel_block_len,
        N=idx.shape[-1], **_launch(opt, "dq"))
    nb = -(-S // sel_block_len)
    qt, offsets = query_lists(idx, nb)
    seg = opt["segment"]
    _selection_bwd_dkdv[(B * G * nb, triton.cdiv(T, seg))](
        q, k, v, do, lse, delta, qt, offsets, dk, dv, *common, *do.stride()[:3], *lse.stride()[:2],
        *dk.stride()[:3], *dv.stride()[:3], S, nb, scale, G=G, HP=hp, **pads, BS=sel_block_len,
        BQ=opt["dkdv_queries"], SEG=seg, num_warps=opt["dkdv_warps"], num_stages=opt["dkdv_stages"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, sel_block_len, scale):
        with _on(q.device):
            o, lse = _forward(q, k, v, idx, sel_block_len, scale)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.args = (sel_block_len, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        with _on(q.device):
            dq, dk, dv = _backward(do, q, k, v, idx, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None


def selection_attention_triton(q, k, v, block_idx, *, sel_block_len: int, scale=None):
    """Same contract as :func:`nsa.ops.selection_attention` for prefill (``positions = arange(T)``), no
    checks; ``block_idx`` of any integer dtype; differentiable in q, k and v. Internal: reached
    through :mod:`nsa.routes`."""
    from .selection import canonical_blocks

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    idx = canonical_blocks(block_idx).to(torch.int32).contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _SelectionAttention.apply(q, k, v, idx, sel_block_len, scale)
