"""Functional NSA ops. Each has a plain reference of the same name in :mod:`nsa.ops.naive`.

Shapes: queries ``q [B, T, H, d_k]`` with ``H = G * h`` (GQA); keys ``[B, S, G, d_k]``; values
``[B, S, G, d_v]``; ``positions [T]`` absolute query positions (default ``arange(T)``).
"""

from .compressed import compress_tokens, compressed_attention, num_cmp
from .rope import apply_rope
from .selection import select_blocks, selection_attention, selection_ranges, selection_scores
from .window import sliding_window_attention

__all__ = [
    "apply_rope",
    "compress_tokens",
    "compressed_attention",
    "num_cmp",
    "select_blocks",
    "selection_attention",
    "selection_ranges",
    "selection_scores",
    "sliding_window_attention",
]
