"""Selection and window attention as block-sparse FlexAttention kernels (GPU prefill/training).

The per-token block choice becomes a ``BlockMask``: for each tile of ``q_block`` queries, the
union of the selection blocks its queries chose; inside a tile, ``mask_mod`` keeps exactly each
query's own blocks and ``key <= t``. Forward and backward are compiled Triton kernels, and only
selected tiles are computed, so the cost follows the selected tokens rather than ``T^2``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def _flex():
    # Each layer shape (and each mask's constants) compiles once. Past dynamo's default limit of 8
    # compiles a function silently runs eagerly, and eager flex materialises the full T x S mask
    # (tens of GB at T=8192), so allow more shapes per process than a model normally has.
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def selection_attention_flex(q, k, v, block_idx, *, sel_block_len: int, scale=None, q_block: int = 128,
                             kv_block: int = 128, compiled=True):
    """Same contract as :func:`nsa.ops.selection_attention` for prefill (``positions = arange(T)``), no checks.

    ``block_idx`` of any integer dtype (-1 = empty). ``kv_block``: keys per flex tile, a multiple or
    a divisor of ``sel_block_len``. 128 by default because flex's backward on Hopper tiles keys by
    128 for head dims 64-128 and finds no kernel when the mask's tiles are 64 keys
    (``NoValidChoicesError``); with 64-key selection blocks a tile then holds two blocks, and
    ``mask_mod`` still keeps exactly each query's own. Internal: reached through :mod:`nsa.routes`.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, T, H, _ = q.shape
    S, G = k.shape[1], k.shape[2]
    h = H // G
    nb = -(-S // sel_block_len)
    t_pad = -(-T // q_block) * q_block
    s_pad = -(-(nb * sel_block_len) // kv_block) * kv_block  # whole key tiles, whole selection blocks
    nb_pad, tiles = s_pad // sel_block_len, s_pad // kv_block
    # sel[b, g, t, j]: query t of group g selected block j.
    idx = block_idx.long().permute(0, 2, 1, 3)
    sel = torch.zeros(B, G, t_pad, nb_pad + 1, dtype=torch.bool, device=q.device)
    sel[:, :, :T].scatter_(-1, torch.where((idx >= 0) & (idx < nb), idx, nb_pad), True)  # no keys: scratch column
    sel = sel[..., :nb_pad].contiguous()
    if kv_block >= sel_block_len:  # a tile holds kv_block / sel_block_len selection blocks
        per_tile = sel.view(B, G, t_pad, tiles, kv_block // sel_block_len).any(dim=-1)
    else:  # a selection block spans sel_block_len / kv_block tiles
        per_tile = sel.repeat_interleave(sel_block_len // kv_block, dim=-1)
    union = per_tile.view(B, G, t_pad // q_block, q_block, tiles).any(dim=3)  # [B, G, q tiles, key tiles]
    kv_num = union.sum(-1, dtype=torch.int32).repeat_interleave(h, dim=1)
    kv_idx = torch.argsort((~union).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    kv_idx = kv_idx.repeat_interleave(h, dim=1)

    def mask_mod(b, head, q_idx, kv_idx_):
        return sel[b, head // h, q_idx, kv_idx_ // sel_block_len] & (kv_idx_ <= q_idx)

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(t_pad, s_pad))
    qp = F.pad(q, (0, 0, 0, 0, 0, t_pad - T)).transpose(1, 2)
    kp = F.pad(k, (0, 0, 0, 0, 0, s_pad - S)).transpose(1, 2)
    vp = F.pad(v, (0, 0, 0, 0, 0, s_pad - S)).transpose(1, 2)
    fn = _flex() if compiled else flex_attention
    o = fn(qp, kp, vp, block_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)[:, :T]


@functools.lru_cache(maxsize=16)
def _window_mask(length: int, window: int, device: torch.device, block: int = 128):
    """The causal band ``t - window < s <= t`` over ``length`` queries and keys as a ``BlockMask``,
    built from its tile lists. ``create_block_mask`` evaluates ``mask_mod`` on the dense
    ``length x length`` grid first (int64: 72 GiB at T=96K, 128 GiB at 128K on the H100, an
    out-of-memory that stopped 128K training); here only the grid of tiles is built.

    Query tile i meets key tile j = i - d for 0 <= d <= (window + block - 2) // block; the tiles with
    1 <= d <= (window - block) // block lie wholly inside the band ("full": no mask evaluated), the
    others (the diagonal, the band's far edge) keep ``mask_mod``. The tile grids are (T / block)^2
    bytes: 1 MiB at 128K.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if length % block:
        raise ValueError(f"length {length} is not a multiple of the tile {block}")

    def mask_mod(b, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    n = length // block
    reach, full_reach = (window + block - 2) // block, max(0, (window - block) // block)
    d = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]  # i - j

    def tiles(grid):
        # Laid out as create_block_mask lays them (each row's tiles in ascending order, then the
        # others): the same tensors, without the dense grid of positions.
        num = grid.sum(-1, dtype=torch.int32)
        idx = torch.argsort(grid.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    kv_num, kv_idx = tiles((d == 0) | ((d > full_reach) & (d <= reach)))
    full_num, full_idx = tiles((d >= 1) & (d <= full_reach))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


def sliding_window_attention_flex(q, k, v, *, window: int, scale=None, compiled=True):
    """As :func:`nsa.ops.sliding_window_attention` for prefill (positions ``0..T-1``, ``S == T``), no
    checks; only tiles touching the band run. Internal: reached through :mod:`nsa.routes`.
    ``compiled=False`` runs flex eagerly (CPU tests at small T; it materialises the mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    T = q.shape[1]
    t_pad = -(-T // 128) * 128
    mask = _window_mask(t_pad, window, q.device)
    pad = (0, 0, 0, 0, 0, t_pad - T)
    fn = _flex() if compiled else flex_attention
    o = fn(F.pad(q, pad).transpose(1, 2), F.pad(k, pad).transpose(1, 2), F.pad(v, pad).transpose(1, 2),
           block_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)[:, :T]
