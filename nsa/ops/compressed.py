"""Compressed branch: phi (block compression) and attention over compressed tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks, workspace
from .common import masked_softmax, scores_einsum, values_einsum


def num_cmp(positions: torch.Tensor, *, block_len: int, block_stride: int) -> torch.Tensor:
    """Compressed tokens visible at each position: whole blocks in the past (spec).

    ``positions [...]`` of any integer dtype -> the same shape, ``int64``.
    """
    op = "num_cmp"
    block_len, block_stride = checks.need_compression(op, block_len, block_stride)
    positions = checks.need_index(op, "positions", positions, None, "of absolute positions")
    return ((positions + 1 - block_len).div(block_stride, rounding_mode="floor") + 1).clamp_min(0)


def compress_tokens(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    pos_emb: torch.Tensor, *, block_len: int, block_stride: int, mode: str = "linear") -> torch.Tensor:
    """phi: ``x [B, S, G, d] -> [B, N, G, d_out]`` with ``N = num_cmp(S - 1)`` (0 when ``S < l``).

    Token ``i`` summarises positions ``[i*d, i*d + l)`` plus a learned intra-block position embedding
    ``pos_emb [l, d]``; ``weight [l*d, d_out]`` (and ``bias [d_out]`` or None) maps the flattened block
    (``mode="linear"``), or the block is mean-pooled (``mode="mean"``, ``weight``/``bias`` unused,
    ``d_out = d``). Floating dtypes; the result has torch's promoted dtype of the inputs.
    """
    op = "compress_tokens"
    block_len, block_stride = checks.need_compression(op, block_len, block_stride)
    if mode not in ("linear", "mean"):
        checks.fail(op, "mode", mode, "'linear' or 'mean'")
    checks.need_tensor(op, "x", x, 4, "[B, S, G, d]")
    B, S, G, D = x.shape
    checks.need_tensor(op, "pos_emb", pos_emb, 2, "[block_len, d]")
    if tuple(pos_emb.shape) != (block_len, D):
        checks.fail(op, "pos_emb.shape", list(pos_emb.shape), f"[block_len, d] = [{block_len}, {D}]")
    if mode == "linear":
        checks.need_tensor(op, "weight", weight, 2, "[block_len * d, d_out]")
        if weight.shape[0] != block_len * D:
            checks.fail(op, "weight.shape", list(weight.shape), f"[block_len * d, d_out] = [{block_len * D}, d_out]")
        if bias is not None:
            checks.need_tensor(op, "bias", bias, 1, "[d_out]")
            if bias.shape[0] != weight.shape[1]:
                checks.fail(op, "bias.shape", list(bias.shape), f"[d_out] = [{weight.shape[1]}] or None")
    if S < block_len:
        d_out = D if mode == "mean" else weight.shape[1]
        return x.new_zeros(B, 0, G, d_out)
    blocks = x.unfold(1, block_len, block_stride)  # [B, N, G, D, l]
    blocks = blocks.permute(0, 1, 2, 4, 3) + pos_emb  # [B, N, G, l, D]
    if mode == "mean":
        return blocks.mean(dim=3)
    y = blocks.reshape(*blocks.shape[:3], block_len * D) @ weight
    return y + bias if bias is not None else y


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, block_len: int,
                         block_stride: int, positions: torch.Tensor | None = None, scale: float | None = None,
                         with_output: bool = True, validate: bool | None = None,
                         ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention over the visible compressed tokens.

    Shapes: ``q [B, T, H, d_k]``, ``k_cmp [B, N, G, d_k]``, ``v_cmp [B, N, G, d_v]`` (``H = G * h``, one
    floating dtype), ``positions [T]`` of any integer dtype (default ``arange(T)``). Returns
    ``o [B, T, H, d_v]`` in q's dtype (zero where nothing is visible) and the probabilities
    ``p [B, T, H, N]`` in float32 (float64 for float64 inputs), which score selection.
    ``with_output=False`` returns ``(None, p)`` for callers that compute ``o`` another way.
    ``validate``: see :func:`nsa.ops.checks.check_values` (positions must be >= 0).
    """
    op = "compressed_attention"
    block_len, block_stride = checks.need_compression(op, block_len, block_stride)
    h = checks.need_attention_inputs(op, q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
    scale = checks.need_scale(op, scale)
    B, T, H, Dk = q.shape
    N, G, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    positions = checks.need_positions(op, positions, T, q.device)
    checks.need_nonnegative_positions(op, positions, validate)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    if positions is None:
        positions = torch.arange(T, device=q.device)
    s = scores_einsum("btghd,bngd->bgthn", q.reshape(B, T, G, h, Dk), k_cmp) * scale  # [B, G, T, h, N]
    visible = torch.arange(N, device=q.device) < num_cmp(positions, block_len=block_len,
                                                          block_stride=block_stride)[:, None]  # [T, N]
    p = masked_softmax(s, visible[:, None, :])
    o = values_einsum("bgthn,bngd->btghd", p, v_cmp).reshape(B, T, H, Dv) if with_output else None
    return o, p.permute(0, 2, 1, 3, 4).reshape(B, T, H, N)


def compressed_attention_fa2(q, k_cmp, v_cmp, *, block_len: int, block_stride: int, attn_fn,
                             workspace_reserve: tuple[int, int] = (0, 0)):
    """Compressed-branch output through a FlashAttention-2 style causal kernel (prefill only).

    Queries that see the same number of compressed tokens form segments of ``d`` positions; segment
    ``m`` (positions ``l-1 + m*d ...``) sees tokens ``0..m``. Folding each segment's ``d`` positions into
    the head dimension turns the branch into plain causal attention with ``N`` queries over ``N``
    keys, which the kernel runs without any mask tensor. ``attn_fn(q, k, v)`` takes ``[B, heads, N, d]``
    tensors with GQA (``k, v`` have ``G`` heads) and is causal. ``workspace_reserve`` pre-sizes the
    varlen workspace at its first use (the route table passes ``NSA_VARLEN_RESERVE_N/K``).
    """
    B, T, H, Dk = q.shape
    N, G = k_cmp.shape[1], k_cmp.shape[2]
    h = H // G
    d = block_stride
    first = block_len - 1  # first position that sees a compressed token
    if N == 0:
        return q.new_zeros(B, T, H, v_cmp.shape[-1])
    # [B, T', H, Dk] for positions first..first+N*d-1, zero-padded past T.
    tail = q[:, first:]
    tail = F.pad(tail, (0, 0, 0, 0, 0, N * d - tail.shape[1]))
    folded = tail.reshape(B, N, d, G, h, Dk).permute(0, 3, 2, 4, 1, 5)  # [B, G, d, h, N, Dk]
    # The packed, segment-folded query vectors (rows) and key/value vectors (keys), one head each,
    # live in the varlen workspace when autograd is off; under autograd they are fresh tensors.
    qs = pack_varlen(folded, "q", rows=B * N * d * H, keys=None, reserve=workspace_reserve).view(B, G * d * h, N, Dk)
    ks = pack_varlen(k_cmp.transpose(1, 2), "k", rows=None, keys=B * G * N, reserve=workspace_reserve)
    vs = pack_varlen(v_cmp.transpose(1, 2), "v", rows=None, keys=B * G * N, reserve=workspace_reserve)
    o = attn_fn(qs, ks, vs)  # [B, G*d*h, N, Dv]
    o = o.reshape(B, G, d, h, N, -1).permute(0, 4, 2, 1, 3, 5).reshape(B, N * d, H, -1)
    out = torch.cat([o.new_zeros(B, first, H, o.shape[-1]), o], dim=1)
    return out[:, :T]


def pack_varlen(x: torch.Tensor, tag: str, rows: int | None, keys: int | None,
                reserve: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """A contiguous copy of ``x``, written into the varlen workspace when autograd is off.

    ``rows`` counts query vectors and ``keys`` key/value vectors, one head each (what
    ``NSA_VARLEN_RESERVE_N`` / ``NSA_VARLEN_RESERVE_K`` pre-size, passed in as ``reserve``); the width
    is one head's dim.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return x.contiguous()
    width = x.numel() // ((rows or 1) * (keys or 1))
    out = workspace.VARLEN.buffer(tag, rows, keys, width, x.dtype, x.device, reserve=reserve).view(x.shape)
    out.copy_(x)
    return out
