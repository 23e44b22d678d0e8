"""Sliding-window branch: the query at ``t`` attends to keys ``[max(0, t - w + 1), t]``."""

from __future__ import annotations

import math

import torch

from . import checks
from .common import masked_softmax, scores_einsum, values_einsum


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             positions: torch.Tensor | None = None, scale: float | None = None, chunk: int = 0,
                             validate: bool | None = None) -> torch.Tensor:
    """Window attention: ``q [B, T, H, d_k]``, ``k [B, S, G, d_k]``, ``v [B, S, G, d_v]`` -> ``[B, T, H, d_v]``.

    One floating dtype for q, k, v (the result has it); ``H = G * h``; ``window >= 1``;
    ``positions [T]`` of any integer dtype (default ``arange(T)``): the query at ``positions[i]``
    attends to keys ``[max(0, t - w + 1), t]`` that exist (``< S``). Queries are processed in chunks of
    ``chunk`` positions (0 = automatic). With the default positions and ``S == T`` a chunk reads only
    the ``c + w - 1`` keys any of its queries can see, so memory is ``O(T (c + w))``; otherwise each
    chunk masks all ``S`` keys (``O(c S)``). A row whose window holds no key (a position past
    ``S + w - 1``) gives zeros; no row gives NaN. ``validate``: see :func:`nsa.ops.checks.check_values`.
    """
    op = "sliding_window_attention"
    h = checks.need_attention_inputs(op, q, k, v)
    window = checks.need_int(op, "window", window)
    chunk = checks.need_int(op, "chunk", chunk, minimum=0)
    scale = checks.need_scale(op, scale)
    B, T, H, Dk = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[3]
    positions = checks.need_positions(op, positions, T, q.device)
    checks.need_nonnegative_positions(op, positions, validate)
    if T == 0:
        return q.new_zeros(B, 0, H, Dv)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    if positions is None and S == T:
        return _banded(q, k, v, window, scale, chunk or max(1, min(T, 1024 if q.is_cuda else 256)))
    positions = torch.arange(T, device=q.device) if positions is None else positions
    chunk = chunk or max(1, min(T, (1 << 24) // max(1, B * H * S)))
    tk = torch.arange(S, device=q.device)[None, :]
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        tq = positions[t0:t1, None]
        keep = (tk <= tq) & (tk > tq - window)  # [Tc, S]
        s = scores_einsum("btghd,bsgd->bgths", q[:, t0:t1].reshape(B, t1 - t0, G, h, Dk), k) * scale
        o = values_einsum("bgths,bsgd->btghd", masked_softmax(s, keep[:, None, :]), v)
        outs.append(o.reshape(B, t1 - t0, H, Dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def ring_window_attention(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                          position: torch.Tensor) -> torch.Tensor:
    """The decode step's window branch: one query per sequence ``q [B, 1, H, d_k]`` at ``position``
    (``[1]`` integer tensor, on the device: no host synchronisation) over the ring of the last ``W``
    keys and values ``[B, W, G, d]``, token ``t`` in slot ``t % W`` (:class:`nsa.NSACache`'s
    ``k_win``/``v_win``); slots past ``position`` hold no token yet. With ``W = min(w, max_len)`` it is
    :func:`sliding_window_attention` of that query over the unrolled keys (the test compares them).
    Reached through the layer with its own tensors: no checks."""
    B, _, H, Dk = q.shape
    W, G = k_ring.shape[1], k_ring.shape[2]
    s = scores_einsum("bghd,bwgd->bghw", q.reshape(B, G, H // G, Dk), k_ring) / math.sqrt(Dk)
    keep = torch.arange(W, device=q.device) <= position
    o = values_einsum("bghw,bwgd->bghd", masked_softmax(s, keep), v_ring)
    return o.reshape(B, 1, H, -1)


def _banded(q, k, v, window, scale, chunk):
    """Positions ``0..T-1`` over ``T`` keys: each chunk reads only the band its queries can see."""
    B, T, H, Dk = q.shape
    G, Dv = k.shape[2], v.shape[3]
    h = H // G
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        k0 = max(0, t0 - window + 1)
        qc = q[:, t0:t1].reshape(B, t1 - t0, G, h, Dk)
        s = scores_einsum("btghd,bsgd->bgths", qc, k[:, k0:t1]) * scale
        tq = torch.arange(t0, t1, device=q.device)[:, None]
        tk = torch.arange(k0, t1, device=q.device)[None, :]
        keep = (tk <= tq) & (tk > tq - window)  # [Tc, Sc]
        p = masked_softmax(s, keep[:, None, :])
        o = values_einsum("bgths,bsgd->btghd", p, v[:, k0:t1])
        outs.append(o.reshape(B, t1 - t0, H, Dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def sliding_window_attention_fa2(q, k, v, *, window: int, varlen_fn):
    """Window attention through a FlashAttention-2 varlen kernel with a ``(w - 1, 0)`` window.

    The batch is packed into one varlen sequence list (``cu_seqlens = [0, T, 2T, ...]``), so one kernel
    call serves every sequence with no mask tensor. ``varlen_fn(q, k, v, cu, max_len, window)`` takes
    ``[B*T, heads, d]`` tensors with GQA. Prefill only (positions ``0..T-1``, ``S == T``).
    """
    B, T, H, _ = q.shape
    cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
    o = varlen_fn(q.reshape(B * T, H, -1), k.reshape(B * T, k.shape[2], -1), v.reshape(B * T, v.shape[2], -1),
                  cu, T, window)
    return o.reshape(B, T, H, -1)
