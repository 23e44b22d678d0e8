"""`NSAConfig`: the shape of one NSA layer, validated when built."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """One NSA attention layer (names follow paper §3; spec letters in comments).

    Queries have ``groups * heads_per_group`` heads; each of the ``groups`` KV groups is shared by
    ``heads_per_group`` query heads (GQA) and reads the same selected blocks.
    """

    dim: int
    groups: int = 1  # G: KV groups
    heads_per_group: int = 1  # h: query heads per group
    d_k: int = 64  # query/key head dim
    d_v: int = 64  # value head dim
    block_len: int = 32  # l: compression block length
    block_stride: int = 16  # d: compression stride
    sel_block_len: int = 64  # l_sel: selection block length
    n_sel: int = 16  # n: selected blocks, forced ones included
    window: int = 512  # w: sliding window
    rope_theta: float = 10000.0
    compress: str = "linear"  # phi: "linear" over the flattened block, or "mean" pooling
    gate_hidden: int = 0  # gate MLP hidden width; 0 = a single linear layer

    def __post_init__(self):
        def need(ok: bool, field: str, accepted: str):
            if not ok:
                raise ValueError(
                    f"NSAConfig.{field}={getattr(self, field)!r} is invalid; accepted: {accepted}"
                )

        for field in ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "block_stride",
                      "sel_block_len", "n_sel", "window"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool), field, "an integer")
        for field in ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "sel_block_len"):
            need(getattr(self, field) >= 1, field, "an integer >= 1")
        need(0 < self.block_stride <= self.block_len, "block_stride", f"0 < block_stride <= block_len ({self.block_len})")
        need(self.block_len % self.block_stride == 0, "block_len",
             f"a multiple of block_stride ({self.block_stride})")
        need(self.sel_block_len % self.block_stride == 0, "sel_block_len",
             f"a multiple of block_stride ({self.block_stride})")
        need(self.n_sel >= 3, "n_sel", "an integer >= 3 (block 0 and two local blocks are forced)")
        need(self.window >= 1, "window", "an integer >= 1")
        need(self.d_k % 2 == 0, "d_k", "an even integer (RoPE rotates pairs)")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, "rope_theta", "a number > 0")
        need(self.compress in ("linear", "mean"), "compress", "'linear' or 'mean'")
        need(isinstance(self.gate_hidden, int) and self.gate_hidden >= 0, "gate_hidden", "an integer >= 0")

    @property
    def num_heads(self) -> int:
        return self.groups * self.heads_per_group

    def num_cmp(self, t: int) -> int:
        """Compressed tokens visible to the query at position ``t`` (spec)."""
        return 0 if t + 1 < self.block_len else (t + 1 - self.block_len) // self.block_stride + 1

    def num_sel_blocks(self, length: int) -> int:
        """Selection blocks covering ``length`` tokens."""
        return -(-length // self.sel_block_len)
