"""Rotary position embedding by absolute position (rotate-half convention)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [B, T, heads, d]`` (``d`` even) by the angles of ``positions [T]``."""
    d = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=acc) / d)
    angle = positions.to(acc)[:, None] * inv_freq  # [T, d/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # [T, 1, d/2]
    x1, x2 = x[..., : d // 2].to(acc), x[..., d // 2:].to(acc)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
