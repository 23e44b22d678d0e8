"""Selection branch: scores -> blocks -> ranges -> attention over the selected tokens.

Everything here is vectorised and free of host synchronisation: shapes come from the inputs and the
config, positions are device tensors, so the same code serves prefill, decode and CUDA graphs.
"""

from __future__ import annotations

import functools
import math

import torch

from . import checks, workspace
from .common import masked_softmax, scores_einsum, values_einsum
from .compressed import compressed_attention


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


def _need_sel_block_len(op: str, sel_block_len) -> int:
    return checks.need_int(op, "sel_block_len", sel_block_len)


def selection_scores(p_cmp: torch.Tensor, *, groups: int, block_len: int, block_stride: int, sel_block_len: int,
                     num_blocks: int | None = None, overlap: torch.Tensor | None = None) -> torch.Tensor:
    """``p_cmp [B, T, H, N] -> scores [B, T, G, num_blocks]``: overlap-weighted, summed over each group's heads.

    ``p_cmp`` are :func:`compressed_attention` probabilities (float32, or float64); the scores keep
    their dtype. ``num_blocks`` defaults to the blocks covering positions ``0..T-1``
    (``ceil(T / sel_block_len)``). ``overlap [N, num_blocks]`` may pass a precomputed
    :func:`overlap_matrix` in ``p_cmp``'s dtype (decode caches keep one): building the weights in the
    computation dtype is what makes decode and prefill pick the same blocks on near ties.
    """
    op = "selection_scores"
    checks.need_tensor(op, "p_cmp", p_cmp, 4, "[B, T, H, N]")
    block_len, block_stride = checks.need_compression(op, block_len, block_stride)
    sel_block_len = _need_sel_block_len(op, sel_block_len)
    if sel_block_len % block_stride:
        checks.fail(op, "sel_block_len", sel_block_len, f"a multiple of block_stride ({block_stride})")
    groups = checks.need_int(op, "groups", groups)
    B, T, H, N = p_cmp.shape
    h = checks.need_groups(op, H, groups, "p_cmp", "groups")
    if num_blocks is None:
        num_blocks = -(-T // sel_block_len)
    num_blocks = checks.need_int(op, "num_blocks", num_blocks, minimum=0)
    if overlap is None:
        overlap = overlap_matrix(N, num_blocks, block_len, block_stride, sel_block_len, p_cmp.device, p_cmp.dtype)
    else:
        checks.need_tensor(op, "overlap", overlap, 2, "[N, num_blocks]")
        if tuple(overlap.shape) != (N, num_blocks):
            checks.fail(op, "overlap.shape", list(overlap.shape), f"[N, num_blocks] = [{N}, {num_blocks}]")
        if overlap.dtype != p_cmp.dtype:
            checks.fail(op, "overlap.dtype", overlap.dtype,
                        f"p_cmp's dtype ({p_cmp.dtype}): weights rounded to another precision move near ties")
    per_group = p_cmp.reshape(B, T, groups, h, N).sum(dim=3)
    return per_group @ overlap


def select_blocks(scores: torch.Tensor, *, sel_block_len: int, n_sel: int, positions: torch.Tensor | None = None,
                  validate: bool | None = None) -> torch.Tensor:
    """Top-n blocks per ``(b, t, g)``: ``scores [B, T, G, nb]`` (floating) ``-> block_idx [B, T, G, n_sel]`` int64.

    Candidates are blocks starting at or before ``t = positions[i]`` (default ``arange(T)``); block 0
    and the two most recent blocks are forced whatever the scores (NaN and infinities included);
    the remaining slots go to the highest scores (NaN ranks lowest), ties to the lower index. The
    result is sorted ascending with ``-1`` in empty slots (fewer candidates than slots). ``nb`` must
    cover the block of every position. ``validate``: see :func:`nsa.ops.checks.check_values`.
    """
    op = "select_blocks"
    checks.need_tensor(op, "scores", scores, 4, "[B, T, G, nb]")
    sel_block_len = _need_sel_block_len(op, sel_block_len)
    n_sel = checks.need_int(op, "n_sel", n_sel, minimum=3)  # room for block 0 and the two local blocks
    B, T, G, nb = scores.shape
    device = scores.device
    positions = checks.need_positions(op, positions, T, device)
    if positions is None:
        if T and nb < -(-T // sel_block_len):
            checks.fail(op, "scores.shape", list(scores.shape),
                        f"nb >= {-(-T // sel_block_len)} blocks, to hold the block of position {T - 1}")
        positions = torch.arange(T, device=device)
    elif T and checks.check_values(validate, positions):
        low, high = int(positions.min()), int(positions.max())
        if low < 0:
            checks.fail(op, "positions", f"tensor with min {low}", "positions >= 0")
        if high // sel_block_len >= nb:
            checks.fail(op, "scores.shape", list(scores.shape),
                        f"nb > {high // sel_block_len} blocks, to hold the block of position {high}")
    j = torch.arange(nb, device=device)
    current = (positions // sel_block_len)[:, None, None]  # [T, 1, 1] against [B, T, G, nb]
    candidate = j <= current  # [T, 1, nb]
    forced = (j == 0) | (j == current) | (j == current - 1)
    # Sort keys: forced +inf, other candidates their finite-clamped score (NaN as the lowest finite
    # value), non-candidates -inf. Clamping keeps every score strictly between the two classes, so
    # no score value can push out a forced block or let a future block in.
    big = torch.finfo(scores.dtype).max
    key = torch.nan_to_num(scores.detach(), nan=-big, posinf=big, neginf=-big)
    key = torch.where(candidate, key, torch.full_like(key, float("-inf")))
    key = torch.where(forced & candidate, torch.full_like(key, float("inf")), key)
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


def select_from_compressed(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, groups: int, block_len: int,
                           block_stride: int, sel_block_len: int, n_sel: int, num_blocks: int | None = None,
                           chunk_rows: int | None = None) -> torch.Tensor:
    """The selected blocks ``[B, T, G, n_sel]`` of every query, a chunk of queries at a time.

    Equals ``select_blocks(selection_scores(compressed_attention(q, k_cmp, v_cmp)[1]))`` (same ops,
    row by row) without holding the ``[B, T, H, N]`` probabilities, which grow as ``T^2`` (64 GB
    in float32 at T=64K with 64 heads): only one chunk's exist at a time. Indices carry no gradient,
    so this runs without autograd; the branch's output comes from its own route. ``chunk_rows``
    defaults to what keeps one chunk's float32 probabilities near 2**26 elements on a GPU.
    """
    B, T, H, _ = q.shape
    N = k_cmp.shape[1]
    if num_blocks is None:
        num_blocks = -(-T // sel_block_len)
    if chunk_rows is None:
        budget = 1 << 26 if q.device.type == "cuda" else 1 << 22
        chunk_rows = max(1, budget // max(1, B * H * N))
    chunk_rows = checks.need_int("select_from_compressed", "chunk_rows", chunk_rows, minimum=1)
    cmp = {"block_len": block_len, "block_stride": block_stride}
    with torch.no_grad():
        overlap = None
        out = []
        for start in range(0, T, chunk_rows):
            positions = torch.arange(start, min(T, start + chunk_rows), device=q.device)
            _, p = compressed_attention(q[:, start:start + chunk_rows], k_cmp, v_cmp, **cmp, positions=positions,
                                        with_output=False)
            if overlap is None:
                overlap = overlap_matrix(N, num_blocks, block_len, block_stride, sel_block_len, p.device, p.dtype)
            scores = selection_scores(p, groups=groups, **cmp, sel_block_len=sel_block_len, num_blocks=num_blocks,
                                      overlap=overlap)
            out.append(select_blocks(scores, sel_block_len=sel_block_len, n_sel=n_sel, positions=positions))
        return torch.cat(out, dim=1) if out else q.new_zeros(B, 0, groups, n_sel, dtype=torch.long)


def canonical_blocks(block_idx: torch.Tensor) -> torch.Tensor:
    """Block lists in the form every route expects: int64, ascending, each block once, ``-1`` slots last.

    ``select_blocks`` already returns this; hand-made lists may hold holes, repeats or any order.
    """
    block_idx = block_idx.long()
    big = torch.iinfo(block_idx.dtype).max
    b = torch.sort(torch.where(block_idx >= 0, block_idx, torch.full_like(block_idx, big)), dim=-1).values
    repeat = torch.cat([torch.zeros_like(b[..., :1], dtype=torch.bool), b[..., 1:] == b[..., :-1]], dim=-1)
    b = torch.sort(torch.where(repeat, torch.full_like(b, big), b), dim=-1).values
    return torch.where(b == big, torch.full_like(b, -1), b)


def _need_block_idx(op: str, block_idx, B: int, T: int, G: int | None, device: torch.device) -> torch.Tensor:
    """``block_idx [B, T, G, n]``, ``n >= 1``, on ``device``; returned as int64."""
    block_idx = checks.need_index(op, "block_idx", block_idx, (B, T, G, None), "[B, T, G, n]: selected blocks, -1 = empty")
    if block_idx.shape[-1] < 1:
        checks.fail(op, "block_idx.shape", list(block_idx.shape), "[B, T, G, n] with n >= 1 slots")
    if block_idx.device != device:
        checks.fail(op, "block_idx.device", str(block_idx.device), f"the queries' device ({device})")
    return block_idx


def _check_block_values(op: str, block_idx: torch.Tensor, validate: bool | None) -> None:
    """Only ``-1`` marks an empty slot: any other negative value is a mistake (an int8 index that
    wrapped, say) that would otherwise silently select nothing. Blocks past the keys or past ``t``
    are legal and select nothing."""
    # Reading values on the host synchronises a GPU; see checks.check_values for when this runs.
    if block_idx.numel() == 0 or not checks.check_values(validate, block_idx):
        return
    low = int(block_idx.min())
    if low < -1:
        checks.fail(op, "block_idx", f"tensor with min {low}", "-1 (empty slot) or a block index >= 0")


def selection_ranges(block_idx: torch.Tensor, *, sel_block_len: int, positions: torch.Tensor | None = None,
                     version: int = 2, canonical: bool = False,
                     validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected blocks as sorted, merged ``[start, end)`` token ranges clipped to ``t + 1``.

    ``block_idx [B, T, G, n]`` of any integer dtype (any order; -1 = empty) and ``positions [T]``
    (default ``arange(T)``) -> ``(starts, ends)``, each ``[B, T, G, n]`` int64, merged ranges first,
    unused slots ``0, 0``. ``version=1`` is the plain reference builder (a host loop), 2 the
    vectorised one. ``canonical=True`` promises the list is already in :func:`canonical_blocks` form.
    ``validate``: see :func:`nsa.ops.checks.check_values`.
    """
    op = "selection_ranges"
    sel_block_len = _need_sel_block_len(op, sel_block_len)
    if version not in (1, 2):
        checks.fail(op, "version", version, "1 (reference) or 2 (vectorised)")
    if not isinstance(block_idx, torch.Tensor) or block_idx.dim() != 4:
        checks.need_index(op, "block_idx", block_idx, (None,) * 4, "[B, T, G, n]")
    B, T, G, n = block_idx.shape
    block_idx = _need_block_idx(op, block_idx, B, T, G, block_idx.device)
    positions = checks.need_positions(op, positions, T, block_idx.device)
    checks.need_nonnegative_positions(op, positions, validate)
    _check_block_values(op, block_idx, validate)
    block_idx = block_idx.long() if canonical else canonical_blocks(block_idx)
    return _ranges(block_idx, sel_block_len, positions, version)


def _ranges(block_idx: torch.Tensor, sel_block_len: int, positions: torch.Tensor | None,
            version: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selection_ranges` for checked, canonical int64 block lists (no checks: hot path)."""
    if version == 1:
        from . import naive

        pos = None if positions is None else positions.cpu()
        s, e = naive.selection_ranges(block_idx.cpu(), sel_block_len=sel_block_len, positions=pos)
        return s.to(block_idx.device), e.to(block_idx.device)
    B, T, G, n = block_idx.shape
    if positions is None:
        positions = torch.arange(T, device=block_idx.device)
    limit = (positions.long() + 1)[:, None, None]  # [T, 1, 1]
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


def _token_index_from_blocks(block_idx, sel_block_len, positions, num_keys):
    """Per ``(b, t, g)``: key positions of the (canonical) selected blocks and which are valid."""
    offs = torch.arange(sel_block_len, device=block_idx.device)
    tok = (block_idx.clamp_min(0)[..., None] * sel_block_len + offs).flatten(-2)  # [B, T, G, n*bs]
    valid = (block_idx >= 0).repeat_interleave(sel_block_len, dim=-1)
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


def _gather_rows(x, b_idx, tok, g_idx, ws_tag, width_rows, keys_per_row, reserve):
    """Gather ``x [B, S, G, d]`` at ``(b, tok, g)``; into the workspace when autograd is off."""
    B, S, G, D = x.shape
    flat = ((b_idx * S + tok) * G + g_idx).reshape(-1)
    src = x.reshape(B * S * G, D)
    if ws_tag is not None and not (torch.is_grad_enabled() and x.requires_grad):
        out = workspace.SEL_PACK.buffer(ws_tag, width_rows, keys_per_row, D, x.dtype, x.device, reserve=reserve)
        out = out.view(flat.numel(), D)
        torch.index_select(src, 0, flat, out=out)
        return out.view(width_rows, keys_per_row, D)
    return src.index_select(0, flat).view(width_rows, keys_per_row, D)


def _chunk_len(T: int, per_token_elems: int, device: torch.device) -> int:
    # Fewer, larger chunks on a GPU: each chunk costs ~40 kernel launches, so small chunks make a
    # long prefill launch-bound. 2**28 gathered elements is ~0.5 GB in bf16 plus its float32 scores.
    budget = 1 << 28 if device.type == "cuda" else 1 << 24
    return max(1, min(T, budget // max(1, per_token_elems)))


def _need_reserve(op: str, reserve) -> tuple[int, int]:
    if not (isinstance(reserve, (tuple, list)) and len(reserve) == 2):
        checks.fail(op, "workspace_reserve", reserve, "a pair (rows, keys) of integers >= 0")
    return tuple(checks.need_int(op, "workspace_reserve", r, minimum=0) for r in reserve)


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *,
                        sel_block_len: int, positions: torch.Tensor | None = None, scale: float | None = None,
                        packed: bool = True, ranges_v2: bool = True, chunk_rows: int = 0,
                        workspace_reserve: tuple[int, int] = (0, 0), canonical: bool = False,
                        validate: bool | None = None) -> torch.Tensor:
    """Attention over the tokens of each group's selected blocks, causally masked (``key <= t``).

    Shapes: ``q [B, T, H, d_k]``, ``k [B, S, G, d_k]``, ``v [B, S, G, d_v]`` (``H = G * h``, one floating
    dtype), ``block_idx [B, T, G, n]`` of any integer dtype (-1 = empty slot; blocks past ``t`` or
    past the keys select nothing), ``positions [T]`` (default ``arange(T)``). Returns
    ``[B, T, H, d_v]`` in q's dtype; ``T = 0`` gives an empty result.

    How it runs is the caller's choice (the route table in :mod:`nsa.routes` makes it for the module;
    this op reads no settings): ``packed=True``: the blocks become merged ranges (``ranges_v2``: the
    vectorised builder, else the reference) whose tokens are packed to the front of fixed-width rows
    in the packed-selection workspace, pre-sized at first use to ``workspace_reserve = (rows, keys)``;
    ``packed=False``: each block's tokens are gathered in place and masked. ``chunk_rows`` bounds the
    rows (``B * G`` per position) per chunk (0 = automatic). Block lists may hold holes, repeats and
    any order; ``canonical=True`` (``select_blocks`` output) skips normalising them on the hot path.
    ``validate``: see :func:`nsa.ops.checks.check_values` (block_idx >= -1, positions >= 0).
    """
    op = "selection_attention"
    h = checks.need_attention_inputs(op, q, k, v)
    sel_block_len = _need_sel_block_len(op, sel_block_len)
    scale = checks.need_scale(op, scale)
    chunk_rows = checks.need_int(op, "chunk_rows", chunk_rows, minimum=0)
    workspace_reserve = _need_reserve(op, workspace_reserve)
    B, T, H, Dk = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[3]
    block_idx = _need_block_idx(op, block_idx, B, T, G, q.device)
    positions = checks.need_positions(op, positions, T, q.device)
    checks.need_nonnegative_positions(op, positions, validate)
    _check_block_values(op, block_idx, validate)
    if T == 0 or S == 0:  # no queries, or no keys to attend to
        return q.new_zeros(B, T, H, Dv)
    block_idx = block_idx.long() if canonical else canonical_blocks(block_idx)
    n = block_idx.shape[-1]
    # Packed rows hold each query's tokens at the front, and no query sees more than the S keys:
    # rows wider than S would only hold padding (4x at S=256 with 16 blocks of 64).
    width = min(n * sel_block_len, S) if packed else n * sel_block_len
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    positions = torch.arange(T, device=q.device) if positions is None else positions.long()
    if chunk_rows:
        chunk = min(T, max(1, chunk_rows // (B * G)))
    else:
        chunk = _chunk_len(T, B * G * width * (Dk + Dv + 2), q.device)
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        pos, idx = positions[t0:t1], block_idx[:, t0:t1]
        Tc = t1 - t0
        if packed:
            starts, ends = _ranges(idx, sel_block_len, pos, 2 if ranges_v2 else 1)
            # Ranges past the last key (blocks beyond S, or positions >= S) keep only existing keys.
            starts, ends = starts.clamp_max(S), ends.clamp_max(S)
            tok, valid = _token_index_from_ranges(starts, ends, width)
            tag = "rows"
        else:
            tok, valid = _token_index_from_blocks(idx, sel_block_len, pos, S)
            tag = None
        rows = B * Tc * G
        b_idx = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        g_idx = torch.arange(G, device=q.device).view(1, 1, G, 1)
        k_rows = _gather_rows(k, b_idx, tok, g_idx, tag and tag + "_k", rows, width, workspace_reserve)
        v_rows = _gather_rows(v, b_idx, tok, g_idx, tag and tag + "_v", rows, width, workspace_reserve)
        qr = q[:, t0:t1].reshape(rows, h, Dk)
        o = _attend_rows(qr, k_rows, v_rows, valid.reshape(rows, width), scale)
        outs.append(o.reshape(B, Tc, H, Dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
