"""Window and compressed attention as one flash-attention kernel family in Triton, forward and backward.

Both branches are attention over keys that sit at known positions: key ``j`` lies at
``kpos = j * key_stride + key_offset`` and the query at ``t`` sees it iff ``kpos <= t`` and
``t - kpos < window``. The sliding-window branch is ``key_stride=1, key_offset=0, window=w``; the
compressed branch is ``key_stride=d, key_offset=l-1`` with no window (token ``j`` covers raw positions
``[j*d, j*d + l)``, so it is visible once ``j*d + l - 1 <= t``). A query with no visible key gives zeros.

Layout (paper §3.4, "group-centric"): a program owns one GQA group and ``BLOCK_M`` rows of the
flattened ``(t, head of the group)`` space, so every key/value tile it loads serves all ``h`` heads.
It walks only the key tiles its rows can see: ``O(rows + w)`` keys for the window, ``O(t / d)`` for the
compressed branch, so the cost is ``O(T w)`` and ``O(T N)``, never ``O(T S)``. The backward pass is
flash-attention 2: ``P`` recomputed from the saved log-sum-exp, ``D = rowsum(dO * O)``, one kernel
for ``dK, dV`` (a program per key tile and group, summing the group's heads) and one for ``dQ``.
Memory beyond inputs and outputs is the float32 LSE and ``D`` (``[B, T, H]`` each).

CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported):
the tests check the kernels that way at small shapes, in a subprocess.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from . import checks

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton; these ops then raise a clear error
    triton = None

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

if triton is not None:

    @triton.jit
    def _row_tile(r0, g, T, HPG: tl.constexpr, BLOCK_M: tl.constexpr):
        """Rows ``r0 ..`` of the flattened (t, head of group g) space: position, head, in-range mask."""
        rows = r0 + tl.arange(0, BLOCK_M)
        t = rows // HPG
        return t, g * HPG + rows % HPG, t < T

    @triton.jit
    def _group_rows(Q, sqb, sqt, sqh, T, G: tl.constexpr, HPG: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                    BLOCK_M: tl.constexpr):
        """A row-tile program (axis 0: tiles of ``BLOCK_M`` rows, axis 1: batch x group): its first row,
        batch, group, rows' positions (also as int64), heads, in-range mask, and query tile."""
        r0 = tl.program_id(0) * BLOCK_M
        b = (tl.program_id(1) // G).to(tl.int64)
        g = tl.program_id(1) % G
        t, head, rmask = _row_tile(r0, g, T, HPG, BLOCK_M)
        t64 = t.to(tl.int64)
        return r0, b, g, t, t64, head, rmask, _tile(Q, b * sqb, t64, sqt, head[:, None] * sqh, DK, DKP, rmask)

    @triton.jit
    def _tile(P, base, idx, stride, col, D: tl.constexpr, DP: tl.constexpr, mask):
        """``[len(idx), DP]`` tile of rows ``idx`` (int64) of width ``D``, zero-padded; ``col``: head offset."""
        offs = tl.arange(0, DP)
        return tl.load(P + base + idx[:, None] * stride + col + offs[None, :],
                       mask=mask[:, None] & (offs[None, :] < D), other=0.0)

    @triton.jit
    def _store_tile(P, base, idx, stride, col, x, D: tl.constexpr, DP: tl.constexpr, mask):
        offs = tl.arange(0, DP)
        tl.store(P + base + idx[:, None] * stride + col + offs[None, :], x.to(P.dtype.element_ty),
                 mask=mask[:, None] & (offs[None, :] < D))

    @triton.jit
    def _key_range(r0, T, S, key_stride, key_offset, window, HPG: tl.constexpr, BLOCK_M: tl.constexpr,
                   WINDOWED: tl.constexpr):
        """Keys some row of the tile can see: ``j_lo <= j < j_hi`` (operands kept >= 0: Triton's
        integer division truncates, the interpreter's floors)."""
        t_hi = tl.minimum((r0 + BLOCK_M - 1) // HPG, T - 1)
        j_hi = tl.minimum(tl.maximum(t_hi - key_offset + key_stride, 0) // key_stride, S)
        j_lo = j_hi * 0
        if WINDOWED:
            j_lo = (tl.maximum(r0 // HPG - window - key_offset + 1, 0) + key_stride - 1) // key_stride
        return j_lo, j_hi

    @triton.jit
    def _visible(t, offs_n, j_end, key_stride, key_offset, window, WINDOWED: tl.constexpr):
        """``[rows, keys]``: key ``j`` (``< j_end``) at ``j*key_stride + key_offset`` is visible from ``t``."""
        kpos = offs_n * key_stride + key_offset
        vis = (offs_n < j_end)[None, :] & (kpos[None, :] <= t[:, None])
        if WINDOWED:
            vis = vis & (t[:, None] - kpos[None, :] < window)
        return vis

    @triton.jit
    def _softmax_step(m_i, l_i, acc, s, v, PREC: tl.constexpr):
        """One key tile of an online softmax: scores ``s [rows, keys]`` in log2 units (``-inf`` where
        masked), values ``v [keys, d]``; returns the running max, sum and output accumulator."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)

    @triton.jit
    def _fwd(Q, K, V, O, LSE,
             sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sob, sot, soh, slb, slt,
             T, S, key_stride, key_offset, window, qk_scale,
             G: tl.constexpr, HPG: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr,
             DVP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr,
             PREC: tl.constexpr):
        r0, b, g, t, t64, head, rmask, q = _group_rows(Q, sqb, sqt, sqh, T, G, HPG, DK, DKP, BLOCK_M)
        j_lo, j_hi = _key_range(r0, T, S, key_stride, key_offset, window, HPG, BLOCK_M, WINDOWED)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DVP], tl.float32)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            n64 = offs_n.to(tl.int64)
            k = _tile(K, b * skb, n64, sks, g * skg, DK, DKP, offs_n < j_hi)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
            s = tl.where(_visible(t, offs_n, j_hi, key_stride, key_offset, window, WINDOWED), s, float("-inf"))
            v = _tile(V, b * svb, n64, svs, g * svg, DV, DVP, offs_n < j_hi)
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, v, PREC)
        has = l_i > 0
        _store_tile(O, b * sob, t64, sot, head[:, None] * soh, acc / tl.where(has, l_i, 1.0)[:, None], DV, DVP, rmask)
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * slb + t64 * slt + head, lse, mask=rmask)

    @triton.jit
    def _bwd_delta(O, DO, DELTA, sob, sot, soh, sdb, sdt, sdh, T,
                   H: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BLOCK_M: tl.constexpr):
        # DELTA[b, t, head] = sum_d dO * O, rows of the flattened (t, head) space, float32.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = tl.program_id(1).to(tl.int64)
        t = (rows // H).to(tl.int64)
        head = rows % H
        rmask = rows < T * H
        o = _tile(O, b * sob, t, sot, head[:, None] * soh, DV, DVP, rmask)
        do = _tile(DO, b * sdb, t, sdt, head[:, None] * sdh, DV, DVP, rmask)
        tl.store(DELTA + b * T * H + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rmask)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK_, DV_,
                  sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sdb, sdt, sdh, slb, slt,
                  sgkb, sgks, sgkg, sgvb, sgvs, sgvg,
                  T, S, key_stride, key_offset, window, qk_scale, scale, seg_rows,
                  G: tl.constexpr, HPG: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr,
                  DVP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr,
                  PREC: tl.constexpr, ATOMIC: tl.constexpr):
        # One program per (key tile, group, segment of seg_rows query rows): dK, dV summed over the
        # segment's rows (all h heads) that see the tile. ATOMIC: segments add into float32 dK/dV.
        j0 = tl.program_id(0) * BLOCK_N
        b = (tl.program_id(1) // G).to(tl.int64)
        g = tl.program_id(1) % G
        offs_n = j0 + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        k = _tile(K, b * skb, n64, sks, g * skg, DK, DKP, offs_n < S)
        v = _tile(V, b * svb, n64, svs, g * svg, DV, DVP, offs_n < S)
        dk = tl.zeros([BLOCK_N, DKP], tl.float32)
        dv = tl.zeros([BLOCK_N, DVP], tl.float32)
        # Queries that can see some key of the tile: first key's position <= t < last key's + window.
        t_start = tl.minimum(j0 * key_stride + key_offset, T)
        t_end = t_start * 0 + T
        if WINDOWED:
            t_end = tl.minimum((tl.minimum(j0 + BLOCK_N, S) - 1) * key_stride + key_offset + window, T)
        row_lo = tl.maximum(t_start * HPG, tl.program_id(2) * seg_rows)
        row_hi = tl.minimum(t_end * HPG, (tl.program_id(2) + 1) * seg_rows)
        for r0 in range(row_lo, row_hi, BLOCK_M):
            t, head, rmask = _row_tile(r0, g, t_end, HPG, BLOCK_M)
            rmask = rmask & (r0 + tl.arange(0, BLOCK_M) < row_hi)  # the next segment's rows are its own
            t64 = t.to(tl.int64)
            q = _tile(Q, b * sqb, t64, sqt, head[:, None] * sqh, DK, DKP, rmask)
            do = _tile(DO, b * sdb, t64, sdt, head[:, None] * sdh, DV, DVP, rmask)
            lse = tl.load(LSE + b * slb + t64 * slt + head, mask=rmask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + b * slb + t64 * slt + head, mask=rmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            vis = rmask[:, None] & _visible(t, offs_n, S, key_stride, key_offset, window, WINDOWED)
            # A row that sees no key has lse = -inf and no visible entry: the where keeps it at zero.
            p = tl.where(vis, tl.exp2(s - tl.where(vis, lse[:, None], s)), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if ATOMIC:
            if row_lo < row_hi:
                offs_dk = tl.arange(0, DKP)
                offs_dv = tl.arange(0, DVP)
                tl.atomic_add(DK_ + b * sgkb + n64[:, None] * sgks + g * sgkg + offs_dk[None, :], dk * scale,
                              mask=(offs_n < S)[:, None] & (offs_dk[None, :] < DK))
                tl.atomic_add(DV_ + b * sgvb + n64[:, None] * sgvs + g * sgvg + offs_dv[None, :], dv,
                              mask=(offs_n < S)[:, None] & (offs_dv[None, :] < DV))
        else:
            _store_tile(DK_, b * sgkb, n64, sgks, g * sgkg, dk * scale, DK, DKP, offs_n < S)
            _store_tile(DV_, b * sgvb, n64, sgvs, g * sgvg, dv, DV, DVP, offs_n < S)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                sqb, sqt, sqh, skb, sks, skg, svb, svs, svg, sdb, sdt, sdh, slb, slt, sgb, sgt, sgh,
                T, S, key_stride, key_offset, window, qk_scale, scale,
                G: tl.constexpr, HPG: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr,
                DVP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr,
                PREC: tl.constexpr):
        # The forward's tiling: the rows of one group, over the key tiles they can see.
        r0, b, g, t, t64, head, rmask, q = _group_rows(Q, sqb, sqt, sqh, T, G, HPG, DK, DKP, BLOCK_M)
        do = _tile(DO, b * sdb, t64, sdt, head[:, None] * sdh, DV, DVP, rmask)
        lse = tl.load(LSE + b * slb + t64 * slt + head, mask=rmask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * slb + t64 * slt + head, mask=rmask, other=0.0)
        j_lo, j_hi = _key_range(r0, T, S, key_stride, key_offset, window, HPG, BLOCK_M, WINDOWED)
        dq = tl.zeros([BLOCK_M, DKP], tl.float32)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            n64 = offs_n.to(tl.int64)
            k = _tile(K, b * skb, n64, sks, g * skg, DK, DKP, offs_n < j_hi)
            v = _tile(V, b * svb, n64, svs, g * svg, DV, DVP, offs_n < j_hi)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            vis = rmask[:, None] & _visible(t, offs_n, j_hi, key_stride, key_offset, window, WINDOWED)
            p = tl.where(vis, tl.exp2(s - tl.where(vis, lse[:, None], s)), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        _store_tile(DQ, b * sgb, t64, sgt, head[:, None] * sgh, dq * scale, DK, DKP, rmask)


# --- launching -----------------------------------------------------------------------------------


def available() -> bool:
    """Triton importable and a CUDA device present (what a GPU route needs)."""
    return triton is not None and torch.cuda.is_available()


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET=1`` must be set before
    Triton is first imported (its own library functions are decorated then)."""
    return type(_fwd).__name__ == "InterpretedFunction"


def _tile_options(device: torch.device, dtype: torch.dtype, dkp: int, dvp: int, windowed: bool) -> list[dict]:
    """Launch options per kernel, best first: ``{"fwd" | "dkdv" | "dq": (BLOCK_M rows, BLOCK_N keys,
    warps, stages)}``; a launch that runs out of shared memory or registers takes the next option.
    Interpreter: small tiles, so tests at a few dozen tokens cross tile edges, but not so small that
    its per-operation overhead dominates."""
    if device.type != "cuda":
        return [dict(fwd=(32, 16, 4, 1), dkdv=(32, 16, 4, 1), dq=(32, 16, 4, 1))]
    if max(dkp, dvp) > 128:  # d_k = 192 pads to 256: tiles from sm_90 builds (registers, spills)
        first = dict(fwd=(64, 64, 8, 2), dkdv=(32, 32, 8, 2), dq=(32, 32, 8, 2))
    elif windowed:
        # Timed on the H100 at T=64K, 16 heads per group, d=128 (tools/tile_sweep.py, interleaved,
        # docs/perf-notes.md, ninth session): 4 warps beat 8 in every kernel, although ptxas reports
        # 0.7-2.5 KB of spill at 4; the backward went from 22.9 to 12.8 ms, the forward 4.32 -> 3.76.
        first = dict(fwd=(64, 64, 4, 3), dkdv=(64, 64, 4, 2), dq=(128, 32, 4, 2))
    else:
        # Same sweeps, compressed branch: backward 86.2 -> 48.1 ms; forward 13.1 -> 11.3-11.5 ms
        # (128 x 128 tiles at 8 warps were fastest in both sweeps).
        first = dict(fwd=(128, 128, 8, 3), dkdv=(64, 64, 4, 2), dq=(128, 32, 4, 2))
    smaller = [dict(fwd=(64, 32, 4, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1)),
               dict(fwd=(32, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1))]
    # float32 (the accuracy path) holds twice the bytes per tile: the large tiles spill kilobytes.
    return smaller if dtype == torch.float32 else [first, *smaller]


_chosen: dict = {}  # (kernel name, device, dtype, dkp, dvp, windowed) -> index into _tile_options that launched


def _launch(kernel, name: str, grid_of, args, meta, device, dtype, dkp, dvp):
    """Launch ``kernel`` with the first of its tile options that fits this device (cached per shape class)."""
    options = _tile_options(device, dtype, dkp, dvp, meta["WINDOWED"])
    key = (name, str(device), dtype, dkp, dvp, meta["WINDOWED"])
    start = _chosen.get(key, 0)
    for i in range(start, len(options)):
        bm, bn, warps, stages = options[i][name]
        try:
            kernel[grid_of(bm, bn)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        except triton.runtime.errors.OutOfResources:
            if i == len(options) - 1:
                raise
            continue
        _chosen[key] = i
        return


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 dots (no TF32): they are the accuracy reference on GPU.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _last_dim_contiguous(*xs):
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def _forward(q, k, v, key_stride, key_offset, window, scale):
    B, T, H, Dk = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[3]
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if T == 0 or B == 0:
        return o, lse
    dkp, dvp, h = _pad(Dk), _pad(Dv), H // G
    args = (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *lse.stride()[:2],
            T, S, key_stride, key_offset, window or 0, scale * _LOG2E)
    meta = dict(G=G, HPG=h, DK=Dk, DKP=dkp, DV=Dv, DVP=dvp, WINDOWED=window is not None, PREC=_prec(q.dtype))
    _launch(_fwd, "fwd", lambda bm, bn: (triton.cdiv(T * h, bm), B * G), args, meta,
            q.device, q.dtype, dkp, dvp)
    return o, lse


def dkdv_segments(T: int, h: int, S: int, B: int, G: int, windowed: bool, device: torch.device) -> int:
    """Segments of query rows the dK/dV kernel splits each key tile's rows into. The compressed
    branch has few key tiles (T/d keys: at T=8192, 4 groups and tiles of 64, 32 programs for an
    H100's 132 SMs), each summing over up to T*h rows, so its rows are split until there are about
    four programs per SM; the segments add atomically. A window tile's rows are already few: one.
    Under the interpreter three, so tests cross segments."""
    if windowed:
        return 1
    rows = T * h
    if device.type != "cuda":
        return max(1, min(3, rows // 32))
    key_programs = triton.cdiv(S, 64) * B * G
    return max(1, min(triton.cdiv(4 * sm_count(device), key_programs), rows // 1024))


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grids are sized to fill them)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _backward(do, q, k, v, o, lse, key_stride, key_offset, window, scale):
    B, T, H, Dk = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[3]
    dkp, dvp, h = _pad(Dk), _pad(Dv), H // G
    dq = torch.empty(B, T, H, Dk, device=q.device, dtype=q.dtype)
    nseg = dkdv_segments(T, h, S, B, G, window is not None, q.device)
    # Segments add into zeroed float32 buffers; a single segment stores in the inputs' dtype.
    alloc, acc = (torch.zeros, torch.float32) if nseg > 1 else (torch.empty, k.dtype)
    dk, dv = alloc(k.shape, dtype=acc, device=k.device), alloc(v.shape, dtype=acc, device=k.device)
    if T == 0 or S == 0 or B == 0:
        return dq.zero_(), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    (do,) = _last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    rows = 64
    _bwd_delta[(triton.cdiv(T * H, rows), B)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], T, H=H, DV=Dv, DVP=dvp, BLOCK_M=rows)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride()[:2])
    tail = (T, S, key_stride, key_offset, window or 0, scale * _LOG2E, scale)
    meta = dict(G=G, HPG=h, DK=Dk, DKP=dkp, DV=Dv, DVP=dvp, WINDOWED=window is not None, PREC=_prec(q.dtype))
    _launch(_bwd_dkdv, "dkdv", lambda bm, bn: (triton.cdiv(S, bn), B * G, nseg),
            (q, k, v, do, lse, delta, dk, dv, *common, *dk.stride()[:3], *dv.stride()[:3], *tail,
             triton.cdiv(T * h, nseg)), dict(meta, ATOMIC=nseg > 1), q.device, q.dtype, dkp, dvp)
    _launch(_bwd_dq, "dq", lambda bm, bn: (triton.cdiv(T * h, bm), B * G),
            (q, k, v, do, lse, delta, dq, *common, *dq.stride()[:3], *tail), meta, q.device, q.dtype, dkp, dvp)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _on(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _PositionedKeyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_stride, key_offset, window, scale):
        with _on(q.device):
            o, lse = _forward(q, k, v, key_stride, key_offset, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (key_stride, key_offset, window, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        with _on(q.device):
            dq, dk, dv = _backward(do, q, k, v, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


# --- public entries ------------------------------------------------------------------------------


def positioned_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_stride: int = 1,
                             key_offset: int = 0, window: int | None = None, scale: float | None = None,
                             return_lse: bool = False):
    """Attention where query ``t`` sees key ``j`` iff ``kpos = j*key_stride + key_offset <= t`` and
    ``t - kpos < window`` (``window=None``: no lower bound); query positions are ``0..T-1``.

    ``q [B, T, H, d_k]``, ``k [B, S, G, d_k]``, ``v [B, S, G, d_v]`` (``H = G*h``, one floating dtype,
    CUDA, or CPU through Triton's interpreter) -> ``o [B, T, H, d_v]`` in q's dtype, zeros where no key
    is visible; with ``return_lse`` also ``lse [B, T, H]`` float32 (the natural log of the softmax
    denominator of the scaled scores, ``-inf`` where no key is visible). Differentiable in q, k, v.
    """
    return _attention("positioned_key_attention", q, k, v, key_stride, key_offset, window, scale, return_lse)


def _attention(op, q, k, v, key_stride, key_offset, window, scale, return_lse):
    if triton is None:
        raise RuntimeError(f"{op}: Triton is not installed (pip install triton)")
    checks.need_attention_inputs(op, q, k, v)
    key_stride = checks.need_int(op, "key_stride", key_stride)
    key_offset = checks.need_int(op, "key_offset", key_offset, minimum=0)
    if window is not None:
        window = checks.need_int(op, "window", window)
    scale = checks.need_scale(op, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        checks.fail(op, "q.dtype", q.dtype, "float16, bfloat16 or float32")
    if q.device.type != "cuda" and not _interpreting():
        checks.fail(op, "q.device", str(q.device), "a CUDA device (CPU tensors only under TRITON_INTERPRET=1, "
                    "set before Triton is first imported)")
    q, k, v = _last_dim_contiguous(q, k, v)
    o, lse = _PositionedKeyAttention.apply(q, k, v, key_stride, key_offset, window, scale)
    return (o, lse) if return_lse else o


def triton_window_attention(q, k, v, *, window: int, scale: float | None = None, return_lse: bool = False):
    """As :func:`nsa.ops.sliding_window_attention` for prefill (positions ``0..T-1``, ``S == T``):
    query ``t`` attends keys ``[max(0, t - w + 1), t]``. Forward and backward in Triton."""
    window = checks.need_int("triton_window_attention", "window", window)
    return _attention("triton_window_attention", q, k, v, 1, 0, window, scale, return_lse)


def triton_compressed_attention(q, k_cmp, v_cmp, *, block_len: int, block_stride: int, scale: float | None = None,
                                return_lse: bool = False):
    """The output of :func:`nsa.ops.compressed_attention` for prefill (positions ``0..T-1``): query
    ``t`` attends compressed token ``j`` iff ``j*d + l - 1 <= t``; zeros before the first whole block.
    ``return_lse`` adds the float32 log-sum-exp ``[B, T, H]`` (for scoring the selection from it)."""
    op = "triton_compressed_attention"
    block_len, block_stride = checks.need_compression(op, block_len, block_stride)
    return _attention(op, q, k_cmp, v_cmp, block_stride, block_len - 1, None, scale, return_lse)
