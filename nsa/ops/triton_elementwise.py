"""The layer's two memory-bound elementwise steps as single Triton passes, forward and backward.

- :func:`rope_triton`: what :func:`nsa.ops.apply_rope` computes (rotate-half RoPE, in float32, the
  result in the input's dtype), from the same float32 cos/sin tables. Eager PyTorch makes about ten
  passes over float32 copies of the input (casts, four products, two sums, a concatenation); this
  reads the input once and writes the result once. Its backward is the rotation by the opposite
  angle, the same kernel with the sine negated.
- :func:`gated_combine_triton`: ``g0 * o_cmp + g1 * o_slc + g2 * o_win`` (gates ``[B, T, H, 3]``,
  outputs ``[B, T, H, d_v]``), summed in float32 in one pass; the backward gives the three outputs'
  gradients and the gates' (the row sums of ``dO * o``) in one more. Its reference:
  :func:`nsa.ops.common.gated_combine`.

Plain PyTorch has no fused form of either (``torch.compile`` would give one, but the training route
runs eager autograd); the references they must agree with are ``apply_rope`` and ``gated_combine``.
CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported).
"""

from __future__ import annotations

import torch

from .rope import rope_tables
from .triton_attention import _on, _pad, available, triton  # noqa: F401 - available: the routes' check

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rotate(X, OUT, mask, cos, sin, HALF: tl.constexpr):
        """Rotate-half RoPE of the pairs ``(i, i + HALF)`` whose first halves are at the pointers ``X``,
        in float32, into ``OUT`` (its dtype): the prefill pass's and the decode token kernel's."""
        x1 = tl.load(X, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope(X, COS, SIN, Y, sxb, sxt, sxh, syb, syt, syh, T, NH, sign,
              HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program: BLOCK_T positions x BLOCK_H heads of one batch row, both halves of d.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        b = tl.program_id(2).to(tl.int64)
        i = tl.arange(0, HALFP)
        t64 = t.to(tl.int64)
        mask = (t < T)[:, None, None] & (h < NH)[None, :, None] & (i < HALF)[None, None, :]
        tab = t64[:, None, None] * HALF + i[None, None, :]
        cos = tl.load(COS + tab, mask=mask, other=0.0)
        sin = tl.load(SIN + tab, mask=mask, other=0.0) * sign
        x_off = b * sxb + t64[:, None, None] * sxt + h[None, :, None] * sxh + i[None, None, :]
        y_off = b * syb + t64[:, None, None] * syt + h[None, :, None] * syh + i[None, None, :]
        _rotate(X + x_off, Y + y_off, mask, cos, sin, HALF)

    @triton.jit
    def _combine_fwd(G_, A, B_, C, O, R, D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
        # Rows of the flattened (b, t, head) space; every tensor contiguous.
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        c = tl.arange(0, DP)
        rmask = r < R
        mask = rmask[:, None] & (c < D)[None, :]
        off = r[:, None] * D + c[None, :]
        g0 = tl.load(G_ + r * 3, mask=rmask, other=0.0).to(tl.float32)
        g1 = tl.load(G_ + r * 3 + 1, mask=rmask, other=0.0).to(tl.float32)
        g2 = tl.load(G_ + r * 3 + 2, mask=rmask, other=0.0).to(tl.float32)
        acc = g0[:, None] * tl.load(A + off, mask=mask, other=0.0).to(tl.float32)
        acc += g1[:, None] * tl.load(B_ + off, mask=mask, other=0.0).to(tl.float32)
        acc += g2[:, None] * tl.load(C + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(O + off, acc.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_term(G_, X, DX, DG, do, r, off, rmask, mask, j: tl.constexpr):
        # One term g_j * x: dx = g_j * dO, dg_j = sum over d of dO * x.
        g = tl.load(G_ + r * 3 + j, mask=rmask, other=0.0).to(tl.float32)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, (g[:, None] * do).to(DX.dtype.element_ty), mask=mask)
        tl.store(DG + r * 3 + j, tl.sum(do * x, 1).to(DG.dtype.element_ty), mask=rmask)

    @triton.jit
    def _combine_bwd(G_, A, B_, C, DO, DG, DA, DB, DC, R, D: tl.constexpr, DP: tl.constexpr,
                     BLOCK_R: tl.constexpr):
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        c = tl.arange(0, DP)
        rmask = r < R
        mask = rmask[:, None] & (c < D)[None, :]
        off = r[:, None] * D + c[None, :]
        do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
        _combine_bwd_term(G_, A, DA, DG, do, r, off, rmask, mask, 0)
        _combine_bwd_term(G_, B_, DB, DG, do, r, off, rmask, mask, 1)
        _combine_bwd_term(G_, C, DC, DG, do, r, off, rmask, mask, 2)


def _interpreted() -> bool:
    return type(_rope).__name__ == "InterpretedFunction"


def _rope_launch(x, cos, sin, sign):
    B, T, NH, d = x.shape
    y = torch.empty(B, T, NH, d, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    half = d // 2
    block_t, block_h = (4, 4) if x.device.type != "cuda" else (4, 16)
    grid = (triton.cdiv(T, block_t), triton.cdiv(NH, block_h), B)
    with _on(x.device):
        _rope[grid](x, cos, sin, y, *x.stride()[:3], *y.stride()[:3], T, NH, float(sign), HALF=half,
                    HALFP=triton.next_power_of_2(half), BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        return _rope_launch(dy, cos, sin, -1.0), None, None


def rope_triton(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0) -> torch.Tensor:
    """:func:`nsa.ops.apply_rope` for ``x [B, T, heads, d]`` (float16, bfloat16 or float32; any
    strides with a contiguous last dim, e.g. a slice of the fused projection) in one Triton pass;
    differentiable in ``x``. No checks: reached through :mod:`nsa.routes`."""
    cos, sin = (t.contiguous() for t in rope_tables(positions, x.shape[-1], theta))  # float32, as apply_rope
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _Rope.apply(x, cos, sin)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, a, b, c):
        shape = a.shape
        gates, a, b, c = (t.contiguous() for t in (gates, a, b, c))
        out = torch.empty_like(a)
        rows, d = a.numel() // shape[-1], shape[-1]
        if rows:
            with _on(a.device):
                _combine_fwd[(triton.cdiv(rows, _rows(a)),)](gates, a, b, c, out, rows, D=d, DP=_pad(d),
                                                             BLOCK_R=_rows(a), num_warps=8)
        ctx.save_for_backward(gates, a, b, c)
        return out

    @staticmethod
    def backward(ctx, do):
        gates, a, b, c = ctx.saved_tensors
        do = do.contiguous()
        dg, da, db, dc = (torch.empty_like(t) for t in (gates, a, b, c))
        rows, d = a.numel() // a.shape[-1], a.shape[-1]
        if rows:
            with _on(a.device):
                _combine_bwd[(triton.cdiv(rows, _rows(a)),)](gates, a, b, c, do, dg, da, db, dc, rows, D=d,
                                                             DP=_pad(d), BLOCK_R=_rows(a), num_warps=8)
        return dg, da, db, dc


def _rows(a: torch.Tensor) -> int:
    # 32 rows of d_v <= 128 per program at 8 warps on a GPU: no spill in sm_90 builds (the backward
    # at 4 warps spills 296 bytes); 8 under the interpreter, so tests at a few dozen rows cross edges.
    return 32 if a.device.type == "cuda" else 8


def gated_combine_triton(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                         o_win: torch.Tensor) -> torch.Tensor:
    """``gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win`` for gates
    ``[B, T, H, 3]`` and outputs ``[B, T, H, d_v]`` of one dtype, summed in float32, in one Triton
    pass; differentiable in all four. No checks: reached through :mod:`nsa.routes`."""
    return _Combine.apply(gates, o_cmp, o_slc, o_win)
