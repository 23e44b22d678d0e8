"""Rotary position embedding by absolute position (rotate-half convention)."""

from __future__ import annotations

import numbers

import torch

from . import checks


def rope_inv_freq(d: int, theta: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``theta^(-2i/d)`` for ``i < d/2``, in ``dtype``: each pair's angle per position (the decode
    cache keeps it, for the Triton step that rotates in registers)."""
    return theta ** (-torch.arange(0, d, 2, device=device, dtype=dtype) / d)


def rope_tables(positions: torch.Tensor, d: int, theta: float, dtype: torch.dtype = torch.float32):
    """``cos, sin [T, d/2]`` of the angles ``positions [T]`` x ``theta^(-2i/d)``, in ``dtype``: the one
    place both :func:`apply_rope` and the Triton pass (``triton_elementwise.rope_triton``) take them from."""
    angle = positions.to(dtype)[:, None] * rope_inv_freq(d, theta, positions.device, dtype)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [B, T, heads, d]`` (floating, ``d`` even) by the angles of ``positions [T]`` (any
    integer dtype); returns x's shape and dtype (computed in float32, or float64 for float64)."""
    op = "apply_rope"
    checks.need_tensor(op, "x", x, 4, "[B, T, heads, d]")
    d = x.shape[-1]
    if d % 2:
        checks.fail(op, "x.shape", list(x.shape), "an even last dim d (RoPE rotates pairs)")
    if positions is None:
        checks.fail(op, "positions", None, "an integer tensor [T]")
    positions = checks.need_positions(op, positions, x.shape[1], x.device)
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not theta > 0:
        checks.fail(op, "theta", theta, "a number > 0")
    acc = torch.promote_types(x.dtype, torch.float32)
    cos, sin = (t[:, None, :] for t in rope_tables(positions, d, theta, acc))  # [T, 1, d/2]
    x1, x2 = x[..., : d // 2].to(acc), x[..., d // 2:].to(acc)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
