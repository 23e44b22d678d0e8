"""Numerics shared by every branch: masked softmax and the precision policy of the two matmuls.

Policy: float32/float64 inputs are computed in their own precision. float16/bfloat16 inputs go
through the matmul units in their own dtype (float32 accumulation inside), the softmax runs in
float32, and probabilities are cast back to the input dtype for the value matmul, as
FlashAttention does. Every route and the decode step share this policy, so they agree.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def scores_einsum(equation: str, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``einsum(q, k)`` returned in the accumulation dtype (float32, or float64)."""
    if q.dtype in _HALF:
        return torch.einsum(equation, q, k.to(q.dtype)).float()
    acc = acc_dtype(q.dtype)
    return torch.einsum(equation, q.to(acc), k.to(acc))


def values_einsum(equation: str, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``einsum(p, v)`` in ``v``'s dtype (probabilities cast down for half inputs)."""
    if v.dtype in _HALF:
        return torch.einsum(equation, p.to(v.dtype), v)
    return torch.einsum(equation, p, v.to(p.dtype)).to(v.dtype)


def masked_softmax(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``keep``; rows with nothing kept give zeros, never NaN."""
    if s.shape[-1] == 0:  # no keys at all (e.g. no compressed token yet): nothing to normalise
        return s
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def gated_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """The layer's output before its projection (nsa-spec, "Gates and output"): the branches' outputs
    ``[B, T, H, d_v]`` weighted by their gates ``[B, T, H, 3]`` (cmp, slc, win) and summed, in the
    inputs' dtype (eager elementwise ops; ``triton_elementwise.gated_combine_triton`` is the one-pass
    form)."""
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
