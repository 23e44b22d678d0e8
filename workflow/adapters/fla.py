"""Adapter for the NSA of flash-linear-attention (``fla``; PyPI ``fla-core`` /
``flash-linear-attention``, github.com/fla-org/flash-linear-attention): its op
``fla.ops.nsa.parallel_nsa``. Protocol: workflow/adapters/README.md.

fla-core ships the op only, no NSA layer, so the layer here is adapter glue written for this
workflow: q/k/v projections (one key/value projection for all branches, as the op takes one k and
one v), one sigmoid gate per head per branch from a linear map of x, rotary embeddings on q and k by
absolute position (rotate-half, base 10000; what fla's own model layer does before the op), the op,
and an output projection. Decode keeps the rotated keys and values of every token in a cache
sized ``max_len`` and calls the op with one query against all cached keys (the op's cached
inference, fla >= 0.5.2): there is no compressed-key cache, each step mean-pools the cached keys
again, as fla's own layer does.

What the op can do, read in fla/ops/nsa/parallel.py (fla-core 0.6.0) and checked by ``build_layer``
before fla is imported, each violation an ``Unsupported`` naming the field:
- CUDA only (Triton kernels; the window branch is ``flash_attn.flash_attn_func``), float16 or bfloat16
  only (flash-attn's dtypes); flash-attn must be importable for any window.
- ``heads_per_group`` (HQ/H) a power of 2 and >= 16: ``parallel_nsa`` asserts it (a Triton tile).
- ``block_len == block_stride == sel_block_len``: one ``block_size``; compression mean-pools
  non-overlapping blocks of that size, and selection uses the same blocks.
- ``block_len`` a power of 2, >= 16 (Triton ``arange``/``dot`` tiles) and >= 2 * next_pow2(n_sel)
  (``parallel_nsa_topk`` asserts ``BC >= 2 * S``).
- ``d_k == d_v`` (flash-attn's window takes one head size), ``16 <= d_k <= 256`` (kernel tiles).
- ``window >= 1`` (0 switches the branch off in the op).

Semantics compared with our spec (the paper, arXiv 2502.11089, §3):
- Compression is mean pooling, with no learned map and no intra-block position (the spec's
  default is a learned linear map; mean pooling is its named alternative), of *rotated* keys.
- Compressed token i covers ``[i l, (i+1) l)`` and is visible once complete, as in the spec; with no
  complete block the compressed branch outputs 0, as in the spec.
- Selection: the probabilities of the compressed attention summed over the group's heads (the
  spec's p_slc with l' = l = d), block 0 and the two most recent blocks forced, and ``n_sel``
  counts them, as in the spec. The op's ``block_counts`` is given as a tensor when ``n_sel`` is not a
  power of two (an int there is rounded up to the next power of two blocks read).
- Shared K/V across branches (the spec has one per branch): no model field says which, recorded here.
- Window: keys ``[t - w + 1, t]`` (flash-attn ``window_size=(w - 1, 0)``), as in the spec.
"""

from __future__ import annotations

ADAPTER_API = 1
NAME = "fla"
PACKAGE = "fla"
INSTALL = "pip"
CAPABILITIES = {
    "decode": True,  # the op's cached inference (one query, all keys); fla >= 0.5.2, else Unsupported
    "backward": True,  # autograd Functions for the compressed and selected branches; flash-attn for the window
    "cuda_graph": False,  # the cache is read through a host-side length, and tensor block counts sync
    "compile": False,
    "workspaces": False,
    "block_indices": True,  # what parallel_nsa_topk returns
    "devices": ["cuda"],
    "dtypes": ["bfloat16", "float16"],
}
MODEL_FIELDS = ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "block_stride", "sel_block_len",
                "n_sel", "window")
ROPE_BASE = 10000.0

# fla's variables (fla-core 0.6.0) that it compares with "1": any other value silently means "off".
_FLAGS = ("FLA_USE_FAST_OPS", "FLA_CI_ENV", "FLA_CACHE_RESULTS", "FLA_DISABLE_TENSOR_CACHE", "FLA_USE_TMA",
          "FLA_DISABLE_BACKEND_DISPATCH")
_INTS = ("FLA_TENSOR_CACHE_SIZE", "FLA_INTRACARD_MAX_SPLITS")


def check_env(variables: dict) -> list[str]:
    """fla reads FLA_* variables in many places and builds some names at run time (FLA_<BACKEND>),
    so unknown names are not refused; the values of the flags and counts it parses are checked."""
    problems = []
    for name, value in variables.items():
        if name in _FLAGS and value not in ("0", "1"):
            problems.append(f"{name}={value!r} is invalid; accepted: 0 or 1 (fla compares it with '1')")
        elif name in _INTS and not value.isdigit():
            problems.append(f"{name}={value!r} is invalid; accepted: an integer >= 0")
    return problems


def version() -> str | None:
    import fla

    return getattr(fla, "__version__", None)


def _unsupported(field: str, value, why: str):
    from adapter_api import Unsupported

    return Unsupported(f"unsupported: {field}={value!r} ({why})")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_model(model: dict, device: str, dtype: str) -> None:
    """Raise ``Unsupported`` for the first thing fla's NSA cannot do (standard library only, no fla)."""
    from adapter_api import check_fields

    check_fields(model, MODEL_FIELDS)
    if not str(device).startswith("cuda"):
        raise _unsupported("device", device, "not supported by this implementation: fla's NSA is Triton kernels "
                                             "and flash-attn, CUDA only")
    if dtype not in CAPABILITIES["dtypes"]:
        raise _unsupported("dtype", dtype, "flash-attn, which computes the window branch, takes float16 or bfloat16")
    h, l, n_sel = model["heads_per_group"], model["block_len"], model["n_sel"]
    if h < 16 or not _power_of_two(h):
        raise _unsupported("heads_per_group", h, "parallel_nsa needs query heads per key/value head to be a power of "
                                                 "2 and >= 16 (a Triton tile dimension)")
    if model["block_stride"] != l:
        raise _unsupported("block_stride", model["block_stride"], f"compression mean-pools non-overlapping blocks: "
                                                                  f"needs block_stride == block_len={l}")
    if model["sel_block_len"] != l:
        raise _unsupported("sel_block_len", model["sel_block_len"], f"one block_size for compression and "
                                                                    f"selection: needs sel_block_len == block_len={l}")
    if l < 16 or not _power_of_two(l):
        raise _unsupported("block_len", l, "the block is a Triton tile: a power of 2, >= 16")
    if n_sel < 1:
        raise _unsupported("n_sel", n_sel, "needs n_sel >= 1")
    if l < 2 * _next_power_of_two(n_sel):
        raise _unsupported("n_sel", n_sel, f"parallel_nsa_topk needs block_len >= 2 * next_pow2(n_sel) = "
                                           f"{2 * _next_power_of_two(n_sel)}; block_len={l}")
    if model["d_k"] != model["d_v"]:
        raise _unsupported("d_v", model["d_v"], f"flash-attn's window branch takes one head size for q, k and v; "
                                                f"d_k={model['d_k']}")
    if not 16 <= model["d_k"] <= 256:
        raise _unsupported("d_k", model["d_k"], "the kernels tile the head dimension: 16 <= d_k <= 256")
    if model["d_k"] % 2:
        raise _unsupported("d_k", model["d_k"], "rotary embeddings need an even head size")
    if model["window"] < 1:
        raise _unsupported("window", model["window"], "window_size=0 switches the window branch off")


def _ops():
    import fla.ops.nsa.parallel as parallel

    return parallel


def _layer_class():
    import torch
    from torch import nn

    class FlaNSA(nn.Module):
        """Projections around ``fla.ops.nsa.parallel_nsa`` (adapter glue, see the module docstring)."""

        def __init__(self, model: dict):
            super().__init__()
            self.model = dict(model)
            G, h, d_k, d_v, dim = (model[k] for k in ("groups", "heads_per_group", "d_k", "d_v", "dim"))
            self.G, self.H, self.d_k, self.d_v = G, G * h, d_k, d_v
            self.q_proj = nn.Linear(dim, self.H * d_k, bias=False)
            self.k_proj = nn.Linear(dim, G * d_k, bias=False)
            self.v_proj = nn.Linear(dim, G * d_v, bias=False)
            self.g_proj = nn.Linear(dim, self.H * 3, bias=False)
            self.o_proj = nn.Linear(self.H * d_v, dim, bias=False)
            inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, d_k, 2, dtype=torch.float32) / d_k)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def rotate(self, t, start: int):
            """Rotary embedding (rotate-half) of ``t [B, T, heads, d]`` at positions start..start+T-1."""
            pos = torch.arange(start, start + t.shape[1], device=t.device, dtype=torch.float32)
            angles = torch.outer(pos, self.inv_freq.to(t.device))
            cos = torch.cat((angles.cos(), angles.cos()), -1)[None, :, None, :]
            sin = torch.cat((angles.sin(), angles.sin()), -1)[None, :, None, :]
            t32 = t.float()
            half = t32.shape[-1] // 2
            rotated = torch.cat((-t32[..., half:], t32[..., :half]), -1)
            return (t32 * cos + rotated * sin).to(t.dtype)

        def project(self, x, start: int):
            B, T, _ = x.shape
            q = self.rotate(self.q_proj(x).view(B, T, self.H, self.d_k), start)
            k = self.rotate(self.k_proj(x).view(B, T, self.G, self.d_k), start)
            v = self.v_proj(x).view(B, T, self.G, self.d_v)
            g = torch.sigmoid(self.g_proj(x).view(B, T, self.H, 3))
            return q, k, v, g

        def block_counts(self, q):
            n_sel = self.model["n_sel"]
            if _power_of_two(n_sel):
                return n_sel
            # an int is rounded up to a power of two blocks read; a tensor is read per query as is
            return torch.full((q.shape[0], q.shape[1], self.G), n_sel, dtype=torch.long, device=q.device)

        def attend(self, q, k, v, g):
            g_cmp, g_slc, g_swa = g.unbind(-1)
            o = _ops().parallel_nsa(q=q, k=k, v=v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa,
                                    block_counts=self.block_counts(q), block_size=self.model["block_len"],
                                    window_size=self.model["window"])
            return self.o_proj(o.reshape(q.shape[0], q.shape[1], self.H * self.d_v))

        def forward(self, x):
            q, k, v, g = self.project(x, 0)
            return self.attend(q, k, v, g)

    return FlaNSA


def build_layer(model: dict, *, device: str, dtype: str):
    import torch

    check_model(model, device, dtype)
    ops = _ops()
    if getattr(ops, "flash_attn_func", True) is None:
        raise _unsupported("window", model["window"], "fla computes the window branch with "
                                                      "flash_attn.flash_attn_func, and flash-attn is not installed")
    layer = _layer_class()(model)
    return layer.to(device=device, dtype=getattr(torch, dtype))


def forward(layer, x):
    return layer(x)


def _has_cached_inference() -> bool:
    import inspect

    return "Q_OFFSET" in inspect.getsource(_ops())


def new_cache(layer, batch: int, max_len: int):
    import torch

    if not _has_cached_inference():
        raise _unsupported("decode", True, "this fla's parallel_nsa needs as many queries as keys; cached inference "
                                           "came with fla 0.5.2")
    ref = layer.k_proj.weight
    return {"k": torch.zeros(batch, max_len, layer.G, layer.d_k, device=ref.device, dtype=ref.dtype),
            "v": torch.zeros(batch, max_len, layer.G, layer.d_v, device=ref.device, dtype=ref.dtype),
            "len": 0}


def prefill(layer, x, cache):
    if cache["len"]:
        raise _unsupported("prefill", f"cache holding {cache['len']} tokens", "prefill starts a new cache")
    T = x.shape[1]
    q, k, v, g = layer.project(x, 0)
    cache["k"][:, :T] = k
    cache["v"][:, :T] = v
    cache["len"] = T
    return layer.attend(q, k, v, g), cache


def decode_step(layer, x_t, cache):
    t = cache["len"]
    q, k, v, g = layer.project(x_t, t)
    cache["k"][:, t:t + 1] = k
    cache["v"][:, t:t + 1] = v
    cache["len"] = t + 1
    return layer.attend(q, cache["k"][:, :t + 1], cache["v"][:, :t + 1], g), cache


def routes(layer) -> dict:
    """``{branch: {"route", "reason"}}`` as the report shows them."""
    n_sel = layer.model["n_sel"]
    return {
        "compressed": {"route": "fla parallel_nsa_compression (Triton)", "reason": "mean-pooled blocks of block_len"},
        "selection": {"route": "fla ParallelNSAFunction (Triton), blocks from parallel_nsa_topk",
                      "reason": "block_counts " + ("int" if _power_of_two(n_sel) else "tensor (n_sel not a power of 2)")},
        "window": {"route": "flash_attn.flash_attn_func", "reason": "the op's only window path"},
    }


def selected_blocks(layer, x):
    """``parallel_nsa_topk``'s block indices for ``forward(layer, x)``: ``[B, T, G, n_sel]``, -1 where
    fewer blocks exist. Recorded by wrapping that name in fla.ops.nsa.parallel for one forward."""
    import torch

    from adapter_api import recording

    with recording(_ops(), "parallel_nsa_topk") as seen, torch.no_grad():
        layer(x)
    return seen[-1][..., :layer.model["n_sel"]] if seen else None
