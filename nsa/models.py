"""A small causal LM for training benchmarks, and synthetic data it can learn.

``TinyLM(vocab, dim, layers, cfg)`` stacks pre-norm blocks (attention + MLP). ``attention="dense"``
keeps every parameter and replaces the NSA computation with dense causal attention over the
window branch's keys and values, so the two can be timed side by side with the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attention import NSAAttention
from .config import NSAConfig


class DenseCausalAttention(NSAAttention):
    """Same parameters as :class:`NSAAttention`; dense causal softmax attention instead of NSA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        _, q_rope, _, _, _, _, kw, vw, _ = self._project(x, torch.arange(T, device=x.device))
        h = self.cfg.heads_per_group
        o = F.scaled_dot_product_attention(
            q_rope.transpose(1, 2), kw.transpose(1, 2).repeat_interleave(h, 1),
            vw.transpose(1, 2).repeat_interleave(h, 1), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, dim: int, cfg: NSAConfig, attention: str, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (NSAAttention if attention == "nsa" else DenseCausalAttention)(cfg)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks, final norm, tied output head."""

    def __init__(self, vocab: int, dim: int, layers: int, cfg: NSAConfig, attention: str = "nsa",
                 mlp_ratio: int = 4):
        super().__init__()
        if attention not in ("nsa", "dense"):
            raise ValueError(f"attention={attention!r} is invalid; accepted: 'nsa' or 'dense'")
        for name, value in (("vocab", vocab), ("dim", dim), ("layers", layers)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= 1")
        if cfg.dim != dim:
            raise ValueError(f"cfg.dim={cfg.dim} must equal dim={dim}")
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: unit-variance rows would start the loss far above ln(vocab)
        self.blocks = nn.ModuleList(Block(dim, cfg, attention, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over ``tokens [B, T]``."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def synthetic_batches(vocab: int, batch: int, seq_len: int, *, seed: int = 0, device="cpu",
                      ngrams: int = 64, ngram_len: int = 8) -> Iterator[torch.Tensor]:
    """Endless batches ``[batch, seq_len]`` made of a fixed set of random n-grams in random order.

    Within an n-gram every token after the first is determined by the ones before, so a model that
    learns the n-grams drives the loss from ``ln(vocab)`` towards ``ln(ngrams) / ngram_len``.
    """
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (ngrams, ngram_len), generator=g)
    per_seq = -(-seq_len // ngram_len)
    while True:
        pick = torch.randint(0, ngrams, (batch, per_seq), generator=g)
        yield table[pick].reshape(batch, -1)[:, :seq_len].to(device)
