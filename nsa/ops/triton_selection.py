"""Selection attention forward as one Triton kernel: a program per (query, group), as in the paper.

Each program loads the ``h`` queries of one group at one position once, walks that group's selected
blocks (``n`` of ``l_sel`` keys each) with an online softmax, and writes ``h`` outputs: the keys it
reads are exactly the selected ones, so the work follows ``T * n * l_sel`` rather than ``T^2``.
Forward only (inference and benchmarks); under autograd the module takes the FlexAttention route.
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

    @triton.jit
    def _selection_fwd(Q, K, V, IDX, O,
                       sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sib, sit, sig, sob, sot, soh,
                       S, scale,
                       G: tl.constexpr, HPG: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr,
                       DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr,
                       N: tl.constexpr):
        t = tl.program_id(0)
        b = tl.program_id(1) // G
        g = tl.program_id(1) % G
        offs_h = tl.arange(0, HP)
        offs_dk = tl.arange(0, DKP)
        offs_dv = tl.arange(0, DVP)
        offs_s = tl.arange(0, BS)
        hmask = offs_h < HPG
        q = tl.load(Q + b * sqb + t * sqt + (g * HPG + offs_h)[:, None] * sqh + offs_dk[None, :],
                    mask=hmask[:, None] & (offs_dk[None, :] < DK), other=0.0)
        m_i = tl.full([HP], float("-inf"), tl.float32)
        l_i = tl.zeros([HP], tl.float32)
        acc = tl.zeros([HP, DVP], tl.float32)
        for i in range(N):
            blk = tl.load(IDX + b * sib + t * sit + g * sig + i)
            if blk >= 0:
                kpos = blk * BS + offs_s
                kmask = (kpos <= t) & (kpos < S)
                k = tl.load(K + b * skb + kpos[:, None] * sks + g * skg + offs_dk[None, :],
                            mask=kmask[:, None] & (offs_dk[None, :] < DK), other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale
                s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + b * svb + kpos[:, None] * svs + g * svg + offs_dv[None, :],
                            mask=kmask[:, None] & (offs_dv[None, :] < DV), other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + t * sot + (g * HPG + offs_h)[:, None] * soh + offs_dv[None, :],
                 o.to(O.dtype.element_ty), mask=hmask[:, None] & (offs_dv[None, :] < DV))


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def selection_attention_triton(q, k, v, block_idx, *, sel_block_len: int, scale=None):
    """Same contract as :func:`nsa.ops.selection_attention` for prefill (``positions = arange(T)``), no
    checks; ``block_idx`` of any integer dtype. Internal: reached through :mod:`nsa.routes`."""
    from .selection import canonical_blocks

    B, T, H, Dk = q.shape
    S, G = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    h = H // G
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    idx = canonical_blocks(block_idx).to(torch.int32).contiguous()
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=q.dtype)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    p2 = triton.next_power_of_2
    _selection_fwd[(T, B * G)](
        q, k, v, idx, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        o.stride(0), o.stride(1), o.stride(2), S, scale,
        G=G, HPG=h, HP=max(16, p2(h)), DK=Dk, DKP=max(16, p2(Dk)), DV=Dv, DVP=max(16, p2(Dv)),
        BS=sel_block_len, N=idx.shape[-1], num_warps=4)
    return o
