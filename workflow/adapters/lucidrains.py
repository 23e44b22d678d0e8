"""Adapter for lucidrains' ``native-sparse-attention-pytorch`` (PyPI; import name
``native_sparse_attention_pytorch``), its ``SparseAttention`` layer. Protocol: workflow/adapters/README.md.

What the harness gets: the layer built causal (``causal=True``), without its own pre-norm
(``norm=False``: our layer is the attention alone), on the plain PyTorch path
(``use_triton_kernel=False``; its Triton kernel is a CUDA-only option we do not switch on).
Decode threads its own KV cache (``layer(x_t, cache=..., return_cache=True)``); that cache grows
by concatenation, so decode has no static shapes (no CUDA graph) and there is no compile hook.

Model fields (config key ``model``) and how they map:
- ``dim`` -> ``dim``; ``groups`` (G) -> ``kv_heads``; ``groups * heads_per_group`` -> ``heads``.
- ``d_k``, ``d_v`` -> ``dim_head``: one head size for queries, keys and values, so ``d_k != d_v``
  is unsupported.
- ``block_len`` (l), ``block_stride`` (d) -> ``compress_block_size=l``,
  ``compress_block_sliding_stride=d`` (releases from 0.2.0). Releases before 0.2.0 spell the same
  windows as ``compress_block_size=d`` plus ``compress_block_overlap_len=l-d``, which they accept
  only for ``l - d <= d``; releases with neither take only ``l == d``.
- ``sel_block_len`` (l') -> ``selection_block_size``; it must be a multiple of d (its assertion).
- ``n_sel`` -> ``num_selected_blocks = n_sel - 1``: see "selection" below.
- ``window`` (w) -> ``sliding_window_size = w - 1``: its window (local-attention with
  ``exact_windowsize``) reads keys ``[t - size, t]``, i.e. size + 1 keys; so ``w = 1`` is unsupported.
Any other field raises ``Unsupported``.

Where its semantics differ from the paper as our spec fixes it (the paper, arXiv 2502.11089, §3):
- One key/value projection shared by all three branches (spec: one per branch). No model field
  says which, so this is recorded here, not refused.
- Compression: compressed token i summarises raw positions ``[(i+1)d - l, (i+1)d)``, left-padded
  with zeros where that starts before 0 (spec: ``[i d, i d + l)``), through an MLP
  (Linear, ReLU, Linear over the flattened block plus a learned intra-block position), and a query
  at t sees it only when ``(i+1)d <= t``, i.e. strictly after the block's last token (spec:
  ``i d + l <= t + 1``). One learned "memory" compressed key/value is always visible, so the
  compressed branch is never empty: before any block completes it returns that memory value
  (spec: zero). Queries in the compressed branch carry no RoPE.
- Selection: block scores are the compressed *logits* (not probabilities), averaged over the
  compressed tokens of a selection block and over the h query heads of a group, then
  softmaxed; the top ``num_selected_blocks`` are taken and blocks whose score is <= 1e-10 (future
  ones) masked. The query's own block is always attended on top of those (causally masked) and
  is excluded from the top-k; block 0 and the previous block are *not* forced. So n_sel (which in
  the spec counts the forced blocks) maps to ``n_sel - 1`` scored blocks plus the current one:
  the same number of blocks read per query, chosen differently.
- Gates: ``sigmoid(Linear(x))``, one per head per branch, as in the spec; their init favours the
  window branch (bias -2, -2, 2) unless the harness re-initialises parameters.
- Decode: before the first compressed token exists, its decode path attends to no compressed
  key at all (output 0) whereas its forward attends to the memory key (output = memory value),
  so decode == forward holds there only while that memory value is zero (its initialisation).

Found with this adapter: in bfloat16/float16 its decode raises ("expected m1 and m2 to have the same
dtype") as soon as selection has candidates, when einx >= 0.4 is installed (its ``einx>=0.3.0``
lets pip pick 0.4.x): ``einx.where(mask, sim, <python float>)`` returns float32 there (einx 0.3.0
and ``torch.where`` keep the input dtype), and the next einsum mixes float32 with bfloat16. Its
forward is unaffected. The adapter does not paper over it: the decode stages report the error.

``selected_blocks`` records the top-k of the selection branch by intercepting
``torch.Tensor.topk`` during one forward (the only top-k that layer takes); masked picks are -1.
"""

from __future__ import annotations

ADAPTER_API = 1
NAME = "lucidrains"
PACKAGE = "native_sparse_attention_pytorch"
DISTRIBUTION = "native-sparse-attention-pytorch"
INSTALL = "pip"
# Its own tests import tqdm (its `test` extra; transformer.py needs it): installed beside it.
EXTRA_REQUIREMENTS = ["tqdm"]
CAPABILITIES = {
    "decode": True,  # forward(..., cache=, return_cache=True): a real KV cache, one token per step
    "backward": True,  # plain PyTorch ops throughout
    "cuda_graph": False,  # its cache grows by torch.cat: new shapes every step
    "compile": False,  # no compile hook for decode
    "workspaces": False,
    "block_indices": True,  # via the top-k it takes (see selected_blocks)
    "devices": ["cpu", "cuda"],
    "dtypes": ["float32", "bfloat16", "float16"],
}
MODEL_FIELDS = ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "block_stride", "sel_block_len",
                "n_sel", "window")
# Scores at or below this are the masked (future) blocks its layer also masks.
_MASKED_SCORE = 1e-10


def check_env(variables: dict) -> list[str]:
    """The package reads no environment variable, so none can be wrong for it."""
    return []


def version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _unsupported(field: str, value, why: str):
    from adapter_api import Unsupported

    return Unsupported(f"unsupported: {field}={value!r} ({why})")


def layer_kwargs(model: dict, parameters) -> dict:
    """``SparseAttention`` keyword arguments for ``model``, given the names its constructor takes
    (they changed between releases). Raises ``Unsupported`` for a field it cannot honour."""
    from adapter_api import check_fields

    check_fields(model, MODEL_FIELDS)
    G, h = model["groups"], model["heads_per_group"]
    d_k, d_v = model["d_k"], model["d_v"]
    l, d, l_sel = model["block_len"], model["block_stride"], model["sel_block_len"]
    n_sel, w = model["n_sel"], model["window"]

    if d_k != d_v:
        raise _unsupported("d_v", d_v, f"one head size (dim_head) for queries, keys and values; d_k={d_k}")
    if G > 1 and "kv_heads" not in parameters:
        raise _unsupported("groups", G, "this release has no kv_heads (GQA)")
    if not 0 < d <= l:
        raise _unsupported("block_stride", d, f"needs 0 < block_stride <= block_len={l}")
    if l_sel % d:
        raise _unsupported("sel_block_len", l_sel, f"must be a multiple of block_stride={d}")
    if n_sel < 1:
        raise _unsupported("n_sel", n_sel, "counts the current block, which it always reads: needs n_sel >= 1")
    if w < 2:
        raise _unsupported("window", w, "its window reads sliding_window_size + 1 keys; window=1 would be size 0")

    kwargs = {
        "dim": model["dim"], "dim_head": d_k, "heads": G * h, "sliding_window_size": w - 1,
        "selection_block_size": l_sel, "num_selected_blocks": n_sel - 1, "causal": True, "norm": False,
        "use_triton_kernel": False,
    }
    if "kv_heads" in parameters:
        kwargs["kv_heads"] = G
    if "compress_block_sliding_stride" in parameters:  # releases >= 0.2.0
        kwargs.update(compress_block_size=l, compress_block_sliding_stride=d)
    elif "compress_block_overlap_len" in parameters:  # window d + overlap, stride d
        if l - d > d:
            raise _unsupported("block_len", l, f"this release allows an overlap block_len - block_stride of at most "
                                               f"block_stride={d}")
        kwargs.update(compress_block_size=d, compress_block_overlap_len=l - d)
    elif l != d:
        raise _unsupported("block_stride", d, f"this release compresses non-overlapping blocks: needs block_len={l}")
    else:
        kwargs["compress_block_size"] = l
    return {k: v for k, v in kwargs.items() if k in parameters}


def build_layer(model: dict, *, device: str, dtype: str):
    import inspect

    import torch
    from native_sparse_attention_pytorch import SparseAttention

    parameters = set(inspect.signature(SparseAttention.__init__).parameters)
    layer = SparseAttention(**layer_kwargs(model, parameters))
    return layer.to(device=device, dtype=getattr(torch, dtype))


def forward(layer, x):
    return layer(x)


def new_cache(layer, batch: int, max_len: int):
    """The cache of zero tokens, in the layout its prefill returns, so decoding can start at t = 0:
    ``((k, v), ((ck, cv), (run_k, run_v)))`` with run_k/run_v holding the zero left padding of the
    first overlapping compression window (block_len - block_stride positions)."""
    import torch

    ref = layer.to_qkv.weight
    heads, dh = layer.kv_heads, layer.dim_head
    pad = _compress_overlap(layer)

    def empty(n):
        return torch.zeros(batch, heads, n, dh, device=ref.device, dtype=ref.dtype)

    return ((empty(0), empty(0)), ((empty(0), empty(0)), (empty(pad), empty(pad))))


def _compress_overlap(layer) -> int:
    if hasattr(layer, "compress_block_sliding_stride"):
        return layer.compress_block_size - layer.compress_block_sliding_stride
    return getattr(layer, "compress_block_overlap_len", 0)


def _cached_tokens(cache) -> int:
    return cache[0][0].shape[-2]


def prefill(layer, x, cache):
    """Its forward with ``return_cache=True``; it prefills only an empty cache."""
    if cache is not None and _cached_tokens(cache) > 0:
        raise _unsupported("prefill", f"cache holding {_cached_tokens(cache)} tokens",
                           "its prefill starts a new cache; continue with decode_step")
    y, cache = layer(x, return_cache=True)
    return y, cache


def decode_step(layer, x_t, cache):
    y_t, cache = layer(x_t, cache=cache, return_cache=True)
    return y_t, cache


def routes(layer) -> dict:
    """``{branch: {"route", "reason"}}`` as the report shows them."""
    triton = bool(getattr(layer, "use_triton_kernel", False))
    return {
        "compressed": {"route": "torch einsum", "reason": "the package has one compressed path"},
        "selection": {"route": "triton native_sparse_attend" if triton else "torch gather",
                      "reason": "use_triton_kernel=True" if triton else "use_triton_kernel=False (the adapter's choice)"},
        "window": {"route": "local_attention.LocalAttention", "reason": "no flex mask passed"},
        "decode": {"route": "forward_inference (torch einsum)", "reason": "the package has one decode path"},
    }


def selected_blocks(layer, x):
    """The selection branch's top-k block indices for ``forward(layer, x)``: ``[B, G, T, n_sel - 1]``
    (the always-read current block not included), -1 where the pick was masked (score <= 1e-10),
    or None when the sequence is too short to select anything."""
    import torch

    original = torch.Tensor.topk
    seen = []

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((out[0].detach().clone(), out[1].detach().clone()))
        return out

    torch.Tensor.topk = recording
    try:
        with torch.no_grad():
            layer(x)
    finally:
        torch.Tensor.topk = original
    if not seen:
        return None
    values, indices = seen[-1]
    return torch.where(values > _MASKED_SCORE, indices, torch.full_like(indices, -1))
