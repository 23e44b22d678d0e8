"""Plain references for every NSA op: one query at a time, straight from the spec.

These are slow on purpose. They are the spec in code; the vectorised ops in this package are tested
against them on random inputs, and the sequential prefill route (``NSA_PREFILL_BATCHED=0``) uses them.

Shapes (all ops): queries ``q [B, T, H, d_k]`` with ``H = G * h``; keys ``k [B, S, G, d_k]``;
values ``v [B, S, G, d_v]``; ``positions [T]`` the absolute position of each query.
"""

from __future__ import annotations

import math

import torch


def num_cmp(t: int, *, block_len: int, block_stride: int) -> int:
    return 0 if t + 1 < block_len else (t + 1 - block_len) // block_stride + 1


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation type: float32, or float64 when the input is float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query vector; zero output when there are no keys."""
    if k.shape[0] == 0:
        return q.new_zeros(v.shape[-1])
    p = torch.softmax((_acc(k) @ _acc(q)) * scale, dim=0)
    return (p @ _acc(v)).to(q.dtype)


def compress_tokens(x, weight, bias, pos_emb, *, block_len: int, block_stride: int, mode: str = "linear"):
    """phi: ``x [B, S, G, d] -> [B, N, G, d_out]``, token ``i`` from positions ``[i*d, i*d + l)``."""
    B, S, G, D = x.shape
    n = num_cmp(S - 1, block_len=block_len, block_stride=block_stride) if S > 0 else 0
    out = []
    for i in range(n):
        block = x[:, i * block_stride: i * block_stride + block_len] + pos_emb[:, None, :]  # [B, l, G, D]
        if mode == "mean":
            out.append(block.mean(dim=1))
        else:
            flat = block.permute(0, 2, 1, 3).reshape(B, G, block_len * D)
            y = flat @ weight
            out.append(y + bias if bias is not None else y)
    d_out = D if mode == "mean" else weight.shape[1]
    if not out:
        return x.new_zeros(B, 0, G, d_out)
    return torch.stack(out, dim=1)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, block_stride, positions=None, scale=None):
    """Returns ``(o [B, T, H, d_v], p [B, T, H, N] float32)``; ``p`` are the attention probabilities."""
    B, T, H, Dk = q.shape
    G = k_cmp.shape[2]
    h = H // G
    N = k_cmp.shape[1]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    positions = torch.arange(T) if positions is None else positions
    o = q.new_zeros(B, T, H, v_cmp.shape[-1])
    p = torch.zeros(B, T, H, N, dtype=torch.promote_types(q.dtype, torch.float32))
    for b in range(B):
        for ti in range(T):
            n = min(num_cmp(int(positions[ti]), block_len=block_len, block_stride=block_stride), N)
            for head in range(H):
                g = head // h
                if n == 0:
                    continue
                s = (_acc(k_cmp[b, :n, g]) @ _acc(q[b, ti, head])) * scale
                prob = torch.softmax(s, dim=0)
                p[b, ti, head, :n] = prob
                o[b, ti, head] = (prob @ _acc(v_cmp[b, :n, g])).to(q.dtype)
    return o, p


def selection_scores(p_cmp, *, groups, block_len, block_stride, sel_block_len, num_blocks=None):
    """``p_cmp [B, T, H, N] -> [B, T, G, num_blocks]``: overlap-weighted, summed over a group's heads.

    ``num_blocks`` defaults to the blocks covering positions ``0..T-1``.
    """
    B, T, H, N = p_cmp.shape
    num_blocks = -(-T // sel_block_len) if num_blocks is None else num_blocks
    h = H // groups
    out = torch.zeros(B, T, groups, num_blocks, dtype=torch.promote_types(p_cmp.dtype, torch.float32))
    for i in range(N):
        c0, c1 = i * block_stride, i * block_stride + block_len
        for j in range(num_blocks):
            s0, s1 = j * sel_block_len, (j + 1) * sel_block_len
            overlap = max(0, min(c1, s1) - max(c0, s0))
            if overlap:
                w = _acc(p_cmp[..., i]).reshape(B, T, groups, h).sum(-1) * (overlap / block_len)
                out[..., j] += w
    return out


def _rank(score: float, big: float) -> float:
    """A score as a sort key: NaN ranks lowest, infinities tie with the largest finite values."""
    return -big if math.isnan(score) else min(max(score, -big), big)


def select_blocks(scores, *, sel_block_len, n_sel, positions=None):
    """``scores [B, T, G, nb] -> block_idx [B, T, G, n_sel]``: ascending block indices, -1 = empty.

    Forced blocks (0, current, previous) are kept whatever their scores, NaN included.
    """
    B, T, G, nb = scores.shape
    big = torch.finfo(scores.dtype).max
    positions = torch.arange(T) if positions is None else positions
    out = torch.full((B, T, G, n_sel), -1, dtype=torch.long)
    for b in range(B):
        for ti in range(T):
            cur = int(positions[ti]) // sel_block_len
            for g in range(G):
                forced = sorted({j for j in (0, cur - 1, cur) if 0 <= j < nb and j <= cur})
                others = [j for j in range(min(cur + 1, nb)) if j not in forced]
                others.sort(key=lambda j: (-_rank(float(scores[b, ti, g, j].detach()), big), j))
                chosen = sorted(forced + others[: max(0, n_sel - len(forced))])[:n_sel]
                out[b, ti, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


def selection_ranges(block_idx, *, sel_block_len, positions=None):
    """Selected blocks as sorted, merged ``[start, end)`` ranges clipped to ``t + 1``.

    Returns ``(starts, ends)`` each ``[B, T, G, n]``; unused slots hold ``0, 0``.
    """
    B, T, G, n = block_idx.shape
    positions = torch.arange(T) if positions is None else positions
    starts = torch.zeros(B, T, G, n, dtype=torch.long)
    ends = torch.zeros(B, T, G, n, dtype=torch.long)
    for b in range(B):
        for ti in range(T):
            limit = int(positions[ti]) + 1
            for g in range(G):
                ranges: list[list[int]] = []
                for j in sorted({int(x) for x in block_idx[b, ti, g] if x >= 0}):
                    s, e = j * sel_block_len, min((j + 1) * sel_block_len, limit)
                    if s >= e:
                        continue
                    if ranges and ranges[-1][1] == s:
                        ranges[-1][1] = e
                    else:
                        ranges.append([s, e])
                for r, (s, e) in enumerate(ranges):
                    starts[b, ti, g, r], ends[b, ti, g, r] = s, e
    return starts, ends


def selection_attention(q, k, v, block_idx, *, sel_block_len, positions=None, scale=None):
    """Attention of each query over the tokens of its group's selected blocks, causally masked."""
    B, T, H, Dk = q.shape
    S, G = k.shape[1], k.shape[2]
    h = H // G
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    positions = torch.arange(T) if positions is None else positions
    o = q.new_zeros(B, T, H, v.shape[-1])
    for b in range(B):
        for ti in range(T):
            t = int(positions[ti])
            for head in range(H):
                g = head // h
                keys = sorted({tok for j in block_idx[b, ti, g].tolist() if j >= 0
                               for tok in range(j * sel_block_len, (j + 1) * sel_block_len) if tok <= t and tok < S})
                idx = torch.tensor(keys, dtype=torch.long)
                o[b, ti, head] = _attend(q[b, ti, head], k[b, idx, g], v[b, idx, g], scale)
    return o


def sliding_window_attention(q, k, v, *, window, positions=None, scale=None):
    """Attention of the query at ``t`` over keys ``[max(0, t - w + 1), t]``."""
    B, T, H, Dk = q.shape
    G = k.shape[2]
    h = H // G
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    positions = torch.arange(T) if positions is None else positions
    o = q.new_zeros(B, T, H, v.shape[-1])
    for b in range(B):
        for ti in range(T):
            t = int(positions[ti])
            lo = max(0, t - window + 1)
            for head in range(H):
                g = head // h
                o[b, ti, head] = _attend(q[b, ti, head], k[b, lo: t + 1, g], v[b, lo: t + 1, g], scale)
    return o
