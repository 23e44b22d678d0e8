"""Selection branch: scores -> blocks -> ranges -> attention over the selected tokens.

Everything here is vectorised and free of host synchronisation: shapes come from the inputs and the
config, positions are device tensors, so the same code serves prefill, decode and CUDA graphs.
"""

from __future__ import annotations

import functools
import math

import torch

from . import workspace
from .common import masked_softmax, scores_einsum, values_einsum


@functools.lru_cache(maxsize=64)
def overlap_matrix(num_cmp_tokens: int, num_blocks: int, block_len: int, block_stride: int,
                   sel_block_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[N, nb]``: shared raw positions of compressed block ``i`` and selection block ``j``, over ``l``.

    Built on the device and cached, so decode steps (and CUDA-graph capture) never copy from the host.
    """
    i = torch.arange(num_cmp_tokens, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    lo = torch.maximum(i * block_stride, j * sel_block_len)
    hi = torch.minimum(i * block_stride + block_len, (j + 1) * sel_block_len)
    return ((hi - lo).clamp_min(0).to(torch.float64) / block_len).to(dtype)


def selection_scores(p_cmp: torch.Tensor, groups: int, block_len: int, block_stride: int,
                     sel_block_len: int, num_blocks: int, overlap: torch.Tensor | None = None) -> torch.Tensor:
    """``p_cmp [B, T, H, N] -> [B, T, G, nb]``: overlap-weighted, summed over each group's heads.

    ``overlap`` may pass a precomputed :func:`overlap_matrix` (decode caches keep one).
    """
    B, T, H, N = p_cmp.shape
    per_group = p_cmp.reshape(B, T, groups, H // groups, N).sum(dim=3)
    if overlap is None:
        overlap = overlap_matrix(N, num_blocks, block_len, block_stride, sel_block_len, p_cmp.device, p_cmp.dtype)
    return per_group @ overlap.to(per_group.dtype)


def select_blocks(scores: torch.Tensor, sel_block_len: int, n_sel: int,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Top-n blocks per ``(b, t, g)``: ``scores [B, T, G, nb] -> block_idx [B, T, G, n_sel]``.

    Candidates are blocks starting at or before ``t``; block 0 and the two most recent blocks are
    forced; the remaining slots go to the highest scores, ties to the lower index. The result is
    sorted ascending with ``-1`` in empty slots (fewer candidates than slots).
    """
    B, T, G, nb = scores.shape
    device = scores.device
    if positions is None:
        positions = torch.arange(T, device=device)
    j = torch.arange(nb, device=device)
    current = (positions // sel_block_len)[:, None, None]  # [T, 1, 1] against [B, T, G, nb]
    candidate = j <= current  # [T, 1, nb]
    forced = (j == 0) | (j == current) | (j == current - 1)
    key = torch.where(candidate, scores, torch.full_like(scores, float("-inf")))
    key = torch.where(forced & candidate, torch.full_like(scores, float("inf")), key)
    k = min(n_sel, nb)
    # A stable descending sort keeps equal scores in index order: ties go to the lower block.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    chosen_key = torch.gather(key, -1, order)
    order = torch.where(chosen_key > float("-inf"), order, torch.full_like(order, nb))
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == nb, torch.full_like(order, -1), order)
    if k < n_sel:
        order = torch.cat([order, order.new_full((B, T, G, n_sel - k), -1)], dim=-1)
    return order


def canonical_blocks(block_idx: torch.Tensor) -> torch.Tensor:
    """Block lists in the form every route expects: ascending, each block once, ``-1`` slots last.

    ``select_blocks`` already returns this; hand-made lists may hold holes, repeats or any order.
    """
    big = torch.iinfo(block_idx.dtype).max
    b = torch.sort(torch.where(block_idx >= 0, block_idx, torch.full_like(block_idx, big)), dim=-1).values
    repeat = torch.cat([torch.zeros_like(b[..., :1], dtype=torch.bool), b[..., 1:] == b[..., :-1]], dim=-1)
    b = torch.sort(torch.where(repeat, torch.full_like(b, big), b), dim=-1).values
    return torch.where(b == big, torch.full_like(b, -1), b)


def selection_ranges(block_idx: torch.Tensor, sel_block_len: int, positions: torch.Tensor | None = None,
                     version: int = 2, *, canonical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected blocks as sorted, merged ``[start, end)`` ranges clipped to ``t + 1``.

    ``block_idx [B, T, G, n]`` (any order; -1 = empty) -> ``(starts, ends)`` each ``[B, T, G, n]``,
    merged ranges first, unused slots ``0, 0``. ``version=1`` is the plain reference builder.
    ``canonical=True`` promises the list is already in :func:`canonical_blocks` form.
    """
    if not canonical:
        block_idx = canonical_blocks(block_idx)
    if version == 1:
        from . import naive

        pos = None if positions is None else positions.cpu()
        s, e = naive.selection_ranges(block_idx.cpu(), sel_block_len, pos)
        return s.to(block_idx.device), e.to(block_idx.device)
    B, T, G, n = block_idx.shape
    if positions is None:
        positions = torch.arange(T, device=block_idx.device)
    limit = (positions + 1)[:, None, None]  # [T, 1, 1]
    valid = block_idx >= 0
    start = block_idx.clamp_min(0) * sel_block_len
    end = torch.minimum((block_idx.clamp_min(0) + 1) * sel_block_len, limit)
    valid = valid & (end > start)
    prev = torch.cat([block_idx.new_full((B, T, G, 1), -2), block_idx[..., :-1]], dim=-1)
    opens = valid & (block_idx != prev + 1)  # a block not adjacent to the previous one opens a range
    rid = torch.cumsum(opens.long(), dim=-1) - 1  # range id of each block
    rid = torch.where(valid, rid, torch.full_like(rid, n))  # invalid slots go to a scratch column
    starts = torch.zeros(B, T, G, n + 1, dtype=torch.long, device=block_idx.device)
    ends = torch.zeros_like(starts)
    starts.scatter_reduce_(-1, rid, torch.where(opens, start, torch.zeros_like(start)), "amax")
    ends.scatter_reduce_(-1, rid, torch.where(valid, end, torch.zeros_like(end)), "amax")
    return starts[..., :n], ends[..., :n]


def _token_index_from_blocks(block_idx, block_size, positions, num_keys):
    """Per ``(b, t, g)``: key positions of the (canonical) selected blocks and which are valid."""
    offs = torch.arange(block_size, device=block_idx.device)
    tok = (block_idx.clamp_min(0)[..., None] * block_size + offs).flatten(-2)  # [B, T, G, n*bs]
    valid = (block_idx >= 0).repeat_interleave(block_size, dim=-1)
    valid = valid & (tok <= positions[:, None, None]) & (tok < num_keys)
    return tok.clamp_max(num_keys - 1), valid


def _token_index_from_ranges(starts, ends, width):
    """Per ``(b, t, g)``: the tokens of its ranges packed to the front, and how many there are."""
    lengths = ends - starts  # [..., n]
    cum = torch.cumsum(lengths, dim=-1)
    count = cum[..., -1:]
    slot = torch.arange(width, device=starts.device).expand(*starts.shape[:-1], width).contiguous()
    r = torch.searchsorted(cum.contiguous(), slot, right=True).clamp_max(starts.shape[-1] - 1)
    tok = torch.gather(starts, -1, r) + slot - (torch.gather(cum, -1, r) - torch.gather(lengths, -1, r))
    valid = slot < count
    return torch.where(valid, tok, torch.zeros_like(tok)), valid


def _attend_rows(q, k_rows, v_rows, valid, scale):
    """``q [R, h, dk]``, ``k_rows [R, L, dk]``, ``v_rows [R, L, dv]``, ``valid [R, L]`` -> ``[R, h, dv]``."""
    s = scores_einsum("rhd,rld->rhl", q, k_rows) * scale
    p = masked_softmax(s, valid[:, None, :])
    return values_einsum("rhl,rld->rhd", p, v_rows)


def _gather_rows(x, b_idx, tok, g_idx, ws_tag, width_rows, keys_per_row):
    """Gather ``x [B, S, G, d]`` at ``(b, tok, g)``; into the workspace when autograd is off."""
    B, S, G, D = x.shape
    flat = ((b_idx * S + tok) * G + g_idx).reshape(-1)
    src = x.reshape(B * S * G, D)
    if ws_tag is not None and not (torch.is_grad_enabled() and x.requires_grad):
        out = workspace.SEL_PACK.buffer(ws_tag, width_rows, keys_per_row, D, x.dtype, x.device)
        out = out.view(flat.numel(), D)
        torch.index_select(src, 0, flat, out=out)
        return out.view(width_rows, keys_per_row, D)
    return src.index_select(0, flat).view(width_rows, keys_per_row, D)


def _chunk_len(T: int, per_token_elems: int, device: torch.device) -> int:
    # Fewer, larger chunks on a GPU: each chunk costs ~40 kernel launches, so small chunks make a
    # long prefill launch-bound. 2**28 gathered elements is ~0.5 GB in bf16 plus its float32 scores.
    budget = 1 << 28 if device.type == "cuda" else 1 << 24
    return max(1, min(T, budget // max(1, per_token_elems)))


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                        block_size: int, positions: torch.Tensor | None = None, scale: float | None = None,
                        *, packed: bool | None = None, ranges_v2: bool | None = None,
                        chunk_rows: int = 0, canonical: bool = False) -> torch.Tensor:
    """Attention over the tokens of each group's selected blocks, causally masked (``key <= t``).

    Shapes: ``q [B, T, H, d_k]``, ``k [B, S, G, d_k]``, ``v [B, S, G, d_v]``, ``block_idx [B, T, G, n]``
    (-1 = empty slot), ``positions [T]`` (default ``arange(T)``). Returns ``[B, T, H, d_v]``.

    Routes (default from ``nsa.settings()``): packed (``NSA_USE_SEL_PACK=1``): the blocks become merged
    ranges whose tokens are packed to the front of fixed-width rows in the packed-selection workspace,
    so every row goes through one batched attention call whatever its key count; gather (0): each
    block's tokens are gathered in place and masked. Block lists may hold holes, repeats and any
    order; ``canonical=True`` (``select_blocks`` output) skips normalising them on the hot path.
    """
    from ..flags import settings

    if not canonical:
        block_idx = canonical_blocks(block_idx)

    s = settings()
    packed = s.use_sel_pack if packed is None else packed
    ranges_v2 = s.sel_ranges_v2 if ranges_v2 is None else ranges_v2
    B, T, H, Dk = q.shape
    S, G = k.shape[1], k.shape[2]
    h, n = H // G, block_idx.shape[-1]
    width = n * block_size
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    if positions is None:
        positions = torch.arange(T, device=q.device)
    chunk = chunk_rows or s.sel_pack_chunk_rows
    chunk = min(T, max(1, chunk // (B * G))) if chunk else _chunk_len(T, B * G * width * (Dk + v.shape[-1] + 2), q.device)
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        pos, idx = positions[t0:t1], block_idx[:, t0:t1]
        Tc = t1 - t0
        if packed:
            starts, ends = selection_ranges(idx, block_size, pos, version=2 if ranges_v2 else 1, canonical=True)
            tok, valid = _token_index_from_ranges(starts, ends, width)
            tok = tok.clamp_max(S - 1)
            tag = "rows"
        else:
            tok, valid = _token_index_from_blocks(idx, block_size, pos, S)
            tag = None
        rows = B * Tc * G
        b_idx = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        g_idx = torch.arange(G, device=q.device).view(1, 1, G, 1)
        k_rows = _gather_rows(k, b_idx, tok, g_idx, tag and tag + "_k", rows, width)
        v_rows = _gather_rows(v, b_idx, tok, g_idx, tag and tag + "_v", rows, width)
        qr = q[:, t0:t1].reshape(rows, h, Dk)
        o = _attend_rows(qr, k_rows, v_rows, valid.reshape(rows, width), scale)
        outs.append(o.reshape(B, Tc, H, -1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
