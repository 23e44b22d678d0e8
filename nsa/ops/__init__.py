"""Functional NSA ops. Each has a plain reference of the same name in :mod:`nsa.ops.naive`.

Shapes: queries ``q [B, T, H, d_k]`` with ``H = G * h`` (GQA); keys ``[B, S, G, d_k]``; values
``[B, S, G, d_v]``; ``positions [T]`` absolute query positions (default ``arange(T)``).

Contract (docs/api.md): tensors are positional, everything after them keyword-only, with one name
per concept (``block_len``/``block_stride`` for compression, ``sel_block_len``/``n_sel`` for
selection, ``window``, ``positions``, ``scale``). Bad arguments raise ``ValueError`` naming the
op, the argument, its value and what is accepted; index tensors may have any integer dtype;
``T = 0`` gives empty outputs. No op reads ``nsa.settings()``: :mod:`nsa.routes` makes every
kernel choice and passes it in. Value checks that need tensor contents run only where they cost no
device synchronisation, or on request (``validate=``; see :func:`nsa.ops.checks.check_values`).
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
