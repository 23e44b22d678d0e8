"""Sliding-window branch: the query at ``t`` attends to keys ``[max(0, t - w + 1), t]``."""

from __future__ import annotations

import math

import torch

from .common import masked_softmax, scores_einsum, values_einsum


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             scale: float | None = None, chunk: int = 0) -> torch.Tensor:
    """Prefill window attention: ``q [B, T, H, d_k]``, ``k [B, T, G, d_k]``, ``v [B, T, G, d_v]``.

    Queries are processed in chunks of ``c`` positions; a chunk reads the ``c + w - 1`` keys that any
    of its queries can see, so memory is ``O(T (c + w))`` instead of ``O(T^2)``. Every row has at least
    its own key, so no row is empty and no NaN can appear.
    """
    B, T, H, Dk = q.shape
    G = k.shape[2]
    h = H // G
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    chunk = chunk or max(1, min(T, 1024 if q.is_cuda else 256))
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
        outs.append(o.reshape(B, t1 - t0, H, -1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def sliding_window_attention_fa2(q, k, v, window, varlen_fn):
    """Window attention through a FlashAttention-2 varlen kernel with a ``(w - 1, 0)`` window.

    The batch is packed into one varlen sequence list (``cu_seqlens = [0, T, 2T, ...]``), so one kernel
    call serves every sequence with no mask tensor. ``varlen_fn(q, k, v, cu, max_len, window)`` takes
    ``[B*T, heads, d]`` tensors with GQA.
    """
    B, T, H, _ = q.shape
    cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
    o = varlen_fn(q.reshape(B * T, H, -1), k.reshape(B * T, k.shape[2], -1), v.reshape(B * T, v.shape[2], -1),
                  cu, T, window)
    return o.reshape(B, T, H, -1)

