"""Torch code the harness owns (worker side): the dense reference layer, a TinyLM built around any
implementation's layer, synthetic data, and weight initialisation by parameter name.

The dense layer is the *reference workload*: identical code in every commit's environment, so its
spread between worker processes is part of the run's noise floor, and its TinyLM is the dense twin that
training throughput is compared with. It follows the adapter protocol itself (``DENSE`` below),
so the harness times it exactly as it times an implementation.
"""

from __future__ import annotations

import math
import types
import zlib

import torch
import torch.nn.functional as F
from torch import nn


class DenseAttention(nn.Module):
    """Causal GQA softmax attention with the model dict's sizes (G groups x h heads, d_k, d_v).

    Decode uses a preallocated cache and a device-side position, so its step is CUDA-graph
    capturable like a deployed dense decode step.
    """

    def __init__(self, model: dict):
        super().__init__()
        self.G, self.h, self.dk, self.dv = model["groups"], model["heads_per_group"], model["d_k"], model["d_v"]
        H = self.G * self.h
        self.q = nn.Linear(model["dim"], H * self.dk, bias=False)
        self.kv = nn.Linear(model["dim"], self.G * (self.dk + self.dv), bias=False)
        self.out = nn.Linear(H * self.dv, model["dim"], bias=False)

    def _qkv(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.G * self.h, self.dk)
        k, v = self.kv(x).split([self.G * self.dk, self.G * self.dv], dim=-1)
        return q, k.view(B, T, self.G, self.dk), v.view(B, T, self.G, self.dv)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(self.h, 1),
                                           v.transpose(1, 2).repeat_interleave(self.h, 1), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int) -> dict:
        w = self.q.weight
        return {"k": torch.zeros(batch, max_len, self.G, self.dk, device=w.device, dtype=w.dtype),
                "v": torch.zeros(batch, max_len, self.G, self.dv, device=w.device, dtype=w.dtype),
                "pos": torch.zeros(1, dtype=torch.long, device=w.device)}

    def prefill(self, x, cache):
        T = x.shape[1]
        _, k, v = self._qkv(x)
        with torch.no_grad():
            cache["k"][:, :T], cache["v"][:, :T] = k, v
            cache["pos"].fill_(T)
        return self(x)

    def decode_step(self, x_t, cache):
        B = x_t.shape[0]
        q, k, v = self._qkv(x_t)
        pos = cache["pos"]
        cache["k"].index_copy_(1, pos, k)
        cache["v"].index_copy_(1, pos, v)
        q = q.view(B, self.G, self.h, self.dk)
        s = torch.einsum("bghd,btgd->bght", q, cache["k"]) / math.sqrt(self.dk)
        keep = torch.arange(cache["k"].shape[1], device=pos.device) <= pos
        p = torch.softmax(s.float().masked_fill(~keep, float("-inf")), dim=-1).to(v.dtype)
        o = torch.einsum("bght,btgd->bghd", p, cache["v"]).reshape(B, 1, -1)
        cache["pos"].add_(1)
        return self.out(o)


def _dense_build(model, *, device, dtype):
    return DenseAttention(model).to(device=device, dtype=getattr(torch, dtype))


def _dense_prefill(layer, x, cache):
    return layer.prefill(x, cache), cache


def _dense_decode(layer, x_t, cache):
    return layer.decode_step(x_t, cache), cache


def _dense_prepare(layer):
    layer.decode_step = torch.compile(layer.decode_step, dynamic=False)


# The dense layer as an adapter (same protocol as workflow/adapters/*.py).
DENSE = types.SimpleNamespace(
    ADAPTER_API=1, NAME="dense",
    CAPABILITIES={"decode": True, "backward": True, "cuda_graph": True, "compile": True, "devices": ["cpu", "cuda"]},
    build_layer=_dense_build, forward=lambda layer, x: layer(x), new_cache=lambda layer, b, n: layer.new_cache(b, n),
    prefill=_dense_prefill, decode_step=_dense_decode, prepare_decode=_dense_prepare,
)


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, attn_forward, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self._attn_forward = attn_forward  # the adapter's forward(layer, x)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self._attn_forward(self.attn, self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks around the adapter's layer, tied output head."""

    def __init__(self, adapter, model: dict, vocab: int, layers: int, device: str):
        super().__init__()
        dim = model["dim"]
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: unit rows would start the loss far above ln(vocab)
        # Layers are built in float32 (master weights); half precision comes from autocast.
        self.blocks = nn.ModuleList(
            Block(dim, adapter.build_layer(model, device=device, dtype="float32"), adapter.forward)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()

    def loss(self, tokens):
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


class AdamW:
    """``torch.optim.AdamW`` with its defaults (betas 0.9/0.999, eps 1e-8, weight decay 1e-2), the
    single-tensor update written out. Why not torch's: constructing any ``torch.optim`` optimizer
    imports ``torch._dynamo``, 1.35 s of a CPU training worker's 2.1 s set-up, and a default run
    starts 35 workers on 2 cores. ``tests/test_tinylm.py`` checks it against ``torch.optim.AdamW``."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.steps)
        bias_correction2_sqrt = (1 - beta2 ** self.steps) ** 0.5
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(self.eps), value=-step_size)


# nsa.models has its own copy for the library's benchmarks; this one is the harness's, because the
# harness must train every implementation the same way and import nothing from the code under test.
def synthetic_batches(vocab: int, batch: int, seq_len: int, *, seed: int = 0, device="cpu", ngrams: int = 64,
                      ngram_len: int = 8):
    """Endless ``[batch, seq_len]`` batches of a fixed set of random n-grams in random order: a model
    that learns them drives the loss from ln(vocab) towards ln(ngrams) / ngram_len."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (ngrams, ngram_len), generator=g)
    per_seq = -(-seq_len // ngram_len)
    while True:
        pick = torch.randint(0, ngrams, (batch, per_seq), generator=g)
        yield table[pick].reshape(batch, -1)[:, :seq_len].to(device)


def init_by_name(module: nn.Module, seed: int) -> None:
    """Every parameter drawn from a generator seeded by (seed, its name), scaled by its width, so
    two commits that create parameters in a different order still get identical weights."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            scale = 1.0 / math.sqrt(max(p.shape)) if p.dim() >= 2 else 0.02
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def copy_state_(dst, src) -> None:
    """Put ``src``'s tensors into ``dst``'s in place, through objects, dicts, lists and tuples
    (a captured CUDA graph keeps ``dst``'s tensors; whatever the cache type of the implementation)."""
    if torch.is_tensor(dst):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for key in dst:
            copy_state_(dst[key], src[key])
    elif isinstance(dst, (list, tuple)):
        for a, b in zip(dst, src):
            copy_state_(a, b)
    elif hasattr(dst, "__dict__"):
        for key, value in vars(dst).items():
            other = getattr(src, key)
            if torch.is_tensor(value) or isinstance(value, (dict, list, tuple)) or hasattr(value, "__dict__"):
                if not isinstance(value, nn.Module):
                    copy_state_(value, other)
            else:
                setattr(dst, key, other)
