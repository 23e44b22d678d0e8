"""Which kernel each branch runs, and why: one function per branch, all routes in view.

Each ``route_*`` function returns a :class:`Route` (a name, a reason and the callable). The module
calls the callable; :func:`backends` reports the names and reasons so a validation report can say
what actually ran. This is the only place that turns settings into kernel choices: the ops in
:mod:`nsa.ops` take every choice (packed or gather, chunking, workspace reserves) as an argument,
and the callables built here pass them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .ops import (compressed, flex, selection, triton_attention, triton_decode, triton_decode_token,
                  triton_elementwise, triton_scoring, triton_selection, window)
from .ops.common import gated_combine
from .ops.rope import apply_rope
from .flags import settings


@dataclasses.dataclass(frozen=True)
class Route:
    name: str
    reason: str
    fn: Callable | None = None  # None only for the compressed branch's matmul route (see route_cmp)
    lse: bool = False  # fn(..., return_lse=True) also gives the softmax's log-sum-exp (for route_select)
    prologue: Callable | None = None  # route_decode: the new token's work before fn (None: the torch ops)


# The selection where the compressed branch's route is the matmul one (Route.fn None): scored from
# the probabilities that route returns.
SELECT_FROM_CMP = Route("from-cmp-probabilities", "the compressed branch's matmul route gives the probabilities")


def route_prefill() -> Route:
    """Batched (vectorised ops) or sequential (the per-token references in ``nsa.ops.naive``)."""
    if settings().prefill_batched:
        return Route("batched", "NSA_PREFILL_BATCHED=1")
    return Route("sequential", "NSA_PREFILL_BATCHED=0: per-token references")


# --- FlashAttention-2 providers ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional extra "fa2"
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """PyTorch's varlen FlashAttention and which keyword arguments this version takes."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def fa2_provider() -> tuple[str, str]:
    """``(provider, reason)``: "flash_attn", "torch" or "none"."""
    if not torch.cuda.is_available():
        return "none", "no CUDA device"
    if torch.cuda.get_device_capability()[0] < 8:
        return "none", "FlashAttention-2 needs compute capability >= 8.0"
    if _flash_attn_func() is not None:
        return "flash_attn", "flash_attn package installed"
    return "torch", "flash_attn not installed; PyTorch's own FlashAttention kernels (SDPA flash, varlen_attn)"


def _fa2_blocker(branch_flag: bool, branch_var: str, device: torch.device, dtype: torch.dtype,
                 d_k: int, d_v: int) -> str | None:
    """Why the FA-2 route cannot be taken, or None when it can."""
    s = settings()
    if not s.use_fa2:
        return "NSA_USE_FA2=0"
    if not branch_flag:
        return f"{branch_var}=0"
    provider, why = fa2_provider()
    if provider == "none":
        return why
    if device.type != "cuda":
        return f"tensors on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (FlashAttention-2 takes float16/bfloat16)"
    if d_k != d_v:
        return f"d_k={d_k} != d_v={d_v} (FlashAttention-2 needs equal head dims)"
    if d_k > 256 or d_k % 8:
        return f"head dim {d_k} (FlashAttention-2 takes multiples of 8 up to 256)"
    return None


def _triton_blocker(device, dtype) -> str | None:
    """Why a Triton GPU route cannot be taken, or None when it can."""
    if not settings().use_triton:
        return "NSA_USE_TRITON=0"
    if torch.device(device).type != "cuda":
        return f"tensors on {torch.device(device).type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the Triton routes take float16/bfloat16)"
    if not triton_attention.available():
        return "Triton not installed, or no CUDA device"
    return None


# --- RoPE and the gated combine (prefill and training) ---------------------------------------------


def _elementwise(device, dtype, triton_route: Route, reference: str, reference_fn) -> Route:
    """The Triton pass under ``NSA_USE_TRITON_ELEMENTWISE=1`` where a Triton route can run, else the
    eager reference, its reason naming what blocked the Triton one."""
    blocker = "NSA_USE_TRITON_ELEMENTWISE=0" if not settings().use_triton_elementwise else _triton_blocker(device, dtype)
    return triton_route if blocker is None else Route("reference", f"{reference} ({blocker})", reference_fn)


def route_rope(device, dtype) -> Route:
    """RoPE of the queries and the selection/window keys in prefill and training."""
    return _elementwise(device, dtype, Route("triton-rope", "NSA_USE_TRITON_ELEMENTWISE=1: one Triton pass, float32 "
                                             "in registers", triton_elementwise.rope_triton),
                        "eager float32 rotate-half", apply_rope)


def route_combine(device, dtype) -> Route:
    """The gated sum of the three branches' outputs in prefill and training."""
    return _elementwise(device, dtype, Route("triton-combine", "NSA_USE_TRITON_ELEMENTWISE=1: one Triton pass, "
                                             "summed in float32", triton_elementwise.gated_combine_triton),
                        "eager elementwise ops", gated_combine)


# --- compressed branch ---------------------------------------------------------------------------


def _cmp_flash_attn(q, k, v):
    # flash_attn takes [B, N, heads, d]
    return _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


def _cmp_sdpa_flash(q, k, v):
    h = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(h, dim=1), v.repeat_interleave(h, dim=1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _varlen_reserve() -> tuple[int, int]:
    s = settings()
    return s.varlen_reserve_n, s.varlen_reserve_k


def route_cmp(device, dtype, d_k, d_v) -> Route:
    """Compressed-branch output. ``fn(q, k_cmp, v_cmp, *, block_len, block_stride)``, or None: the
    output comes with the probabilities from :func:`nsa.ops.compressed_attention` (which always runs,
    since its probabilities score the selection)."""
    blocker = _fa2_blocker(settings().use_fa2_cmp, "NSA_USE_FA2_CMP", torch.device(device), dtype, d_k, d_v)
    if blocker is None:
        provider, _ = fa2_provider()
        attn = _cmp_flash_attn if provider == "flash_attn" else _cmp_sdpa_flash
        name = "fa2-flash_attn" if provider == "flash_attn" else "fa2-torch-sdpa-flash"
        return Route(name, "compressed output through causal FA-2 over stride segments; scores by matmul",
                     functools.partial(compressed.compressed_attention_fa2, attn_fn=attn,
                                       workspace_reserve=_varlen_reserve()))
    if _triton_blocker(device, dtype) is None:
        # Measured on an H200 (bf16, 64 heads in 4 groups, d=128, T=8192): forward 0.47 ms against
        # 1.36 (FA-2 route) and 8.8 (masked matmul); forward + backward 9.5 against 3.6 and 25.8.
        # Memory O(T) where the masked matmul holds [T, heads, N] scores.
        return Route("triton-compressed", f"NSA_USE_TRITON=1: flash-attention Triton kernel over compressed tokens, "
                     f"forward and backward ({blocker})", triton_attention.triton_compressed_attention, lse=True)
    return Route("reference", f"masked matmul softmax ({blocker})", None)


def _select_reference(q, k_cmp, v_cmp, *, lse=None, **kwargs):
    return selection.select_from_compressed(q, k_cmp, v_cmp, **kwargs)


def route_select(device, dtype, heads: int, groups: int, d_k: int, block_len: int, block_stride: int,
                 sel_block_len: int) -> Route:
    """Selected blocks for prefill/training (not the matmul route, whose probabilities score them):
    ``fn(q, k_cmp, v_cmp, *, lse=None, groups, block_len, block_stride, sel_block_len, n_sel,
    num_blocks)`` with positions ``0..T-1``; ``lse`` from a compressed route with ``Route.lse``."""
    blocker = _triton_blocker(device, dtype) or triton_scoring.supported(heads, groups, d_k, block_len, block_stride,
                                                                          sel_block_len)
    if blocker is None:
        return Route("triton-scores", "NSA_USE_TRITON=1: block scores (probabilities recomputed in tiles, heads "
                     "summed, overlap-mapped) and top-n in two Triton kernels per chunk of queries",
                     triton_scoring.select_from_compressed)
    return Route("chunked-matmul", f"compressed probabilities a chunk of queries at a time, overlap matmul, "
                 f"sort ({blocker})", _select_reference)


# --- sliding-window branch -----------------------------------------------------------------------


def _win_flash_attn(q, k, v, *, window):
    return _flash_attn_func()(q, k, v, causal=True, window_size=(window - 1, 0))


def _win_torch_varlen(q, k, v, cu, max_len, window_len, reserve):
    varlen_attn, params = _torch_varlen()
    if "enable_gqa" in params:
        extra = {"enable_gqa": True}
    else:
        # This torch has no GQA in varlen_attn: expand K/V to every query head, in the varlen
        # workspace (packed keys) when autograd is off.
        h = q.shape[1] // k.shape[1]
        extra = {}
        k = k[:, :, None].expand(-1, -1, h, -1).flatten(1, 2)
        v = v[:, :, None].expand(-1, -1, h, -1).flatten(1, 2)
        k = compressed.pack_varlen(k, "k_win", None, k.shape[0] * k.shape[1], reserve)
        v = compressed.pack_varlen(v, "v_win", None, v.shape[0] * v.shape[1], reserve)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(window_len - 1, 0), **extra)


def route_win(device, dtype, d_k, d_v, needs_grad: bool = True) -> Route:
    """Window branch for prefill/training: ``fn(q, k, v, *, window)`` with positions ``0..T-1``;
    ``needs_grad=False``: a forward without autograd (inference prefill)."""
    blocker = _fa2_blocker(settings().use_fa2_win, "NSA_USE_FA2_WIN", torch.device(device), dtype, d_k, d_v)
    if blocker is None:
        provider, _ = fa2_provider()
        if provider == "flash_attn":
            return Route("fa2-flash_attn", "flash_attn_func with window (w-1, 0)", _win_flash_attn)
        varlen_attn, params = _torch_varlen()
        if varlen_attn is not None and "window_size" in params:
            varlen_fn = functools.partial(_win_torch_varlen, reserve=_varlen_reserve())
            return Route("fa2-torch-varlen", "torch varlen_attn with window (w-1, 0)",
                         functools.partial(window.sliding_window_attention_fa2, varlen_fn=varlen_fn))
        blocker = f"torch {torch.__version__} varlen_attn has no window_size"
    flex_blocker = _flex_blocker(device, dtype, d_k, d_v)
    triton_blocker = _triton_blocker(device, dtype)
    if triton_blocker is None:
        # The Triton kernel before flex, with autograd too. H100, issue 8's layer (bf16, 64 heads in 4
        # groups, d=128, w=512), forward + backward with flex's window against Triton's, same run: 8K
        # 17.75 / 17.21 ms, 16K 37.27 / 36.76, 32K 82.72 / 80.60, 64K 236.3 / 235.2, 128K 601.0 /
        # 596.6, in about 9% less memory; and nothing to compile, where flex compiles in every new process.
        # Without autograd (H200, 8K): forward 0.66 ms against flex's 0.73.
        grad = "forward and backward" if needs_grad else "no autograd"
        return Route("triton-window", f"NSA_USE_TRITON=1: flash-attention Triton kernel over the band's tiles, {grad}",
                     triton_attention.triton_window_attention)
    if flex_blocker is None:
        return Route("flex-sliding-window", f"NSA_USE_FLEX=1 on CUDA: FlexAttention over the band's tiles "
                     f"(FA-2 not taken: {blocker}; Triton not taken: {triton_blocker})",
                     flex.sliding_window_attention_flex)
    # The module's own tensors: shapes and dtypes are right by construction, positions are 0..T-1.
    return Route("reference", f"chunked band attention ({blocker})",
                 functools.partial(window.sliding_window_attention, validate=False))


# --- selection branch ----------------------------------------------------------------------------


def _flex_blocker(device, dtype, d_k, d_v) -> str | None:
    """Why the FlexAttention routes cannot be taken, or None when they can."""
    if not settings().use_flex:
        return "NSA_USE_FLEX=0"
    if torch.device(device).type != "cuda":
        return "not on CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        # Its float32 dots may run as TF32; float32 callers get the exact routes.
        return f"dtype {dtype} (flex routes take float16/bfloat16)"
    if min(d_k, d_v) < 16:
        return f"head dims {d_k}/{d_v} (flex needs >= 16)"
    return None


def _slc_packed_or_gather(note: str = "") -> Route:
    """The portable selection routes; ``fn(q, k, v, block_idx, *, sel_block_len, positions=None)``."""
    s = settings()
    # block_idx comes from select_blocks (ascending, unique, -1 last, in range): no normalising and
    # no value checks on the hot path.
    common = {"chunk_rows": s.sel_pack_chunk_rows, "canonical": True, "validate": False}
    if s.use_sel_pack:
        ranges = "v2 vectorised ranges" if s.sel_ranges_v2 else "v1 reference ranges (host loop)"
        return Route("packed", f"NSA_USE_SEL_PACK=1: merged ranges packed into the workspace, {ranges}{note}",
                     functools.partial(selection.selection_attention, packed=True, ranges_v2=s.sel_ranges_v2,
                                       workspace_reserve=(s.sel_pack_reserve_n, s.sel_pack_reserve_l), **common))
    return Route("gather", f"NSA_USE_SEL_PACK=0: per-block gather with a causal mask{note}",
                 functools.partial(selection.selection_attention, packed=False, **common))


def route_slc(device="cpu", dtype=torch.float32, sel_block_len: int = 64, d_k: int = 64, d_v: int = 64,
              needs_grad: bool = True) -> Route:
    """Selection route for prefill/training: ``fn(q, k, v, block_idx, *, sel_block_len)`` for
    :func:`nsa.ops.select_blocks` output, positions ``0..T-1``."""
    pow2 = sel_block_len >= 16 and sel_block_len & (sel_block_len - 1) == 0
    use_triton = pow2 and _triton_blocker(device, dtype) is None and triton_selection.available()
    if use_triton and not needs_grad:
        return Route("triton-sparse", "NSA_USE_TRITON=1, no autograd: one program per (query, group) over "
                     "its selected blocks", triton_selection.selection_attention_triton)
    if use_triton:
        # Measured on an H200 (bf16, 64 heads in 4 groups, d=128, l'=64, n=16): the selection's
        # forward + backward 11.7 ms at T=8K against 33.8 for flex; the layer's 45.3 ms at 8K and 522
        # at 32K (flex's [B, G, T, blocks] mask) against 25.3 and 120 with every branch on Triton.
        return Route("triton-sparse", "NSA_USE_TRITON=1: one program per (query, group) over its selected "
                     "blocks; backward by the selection inverted into per-block query lists",
                     triton_selection.selection_attention_triton)
    blocker = _flex_blocker(device, dtype, d_k, d_v)
    if blocker is None and (sel_block_len % 64 or (128 % sel_block_len and sel_block_len % 128)):
        blocker = f"sel_block_len={sel_block_len} (flex tiles keys by 128: 64 or a multiple of 128)"
    if blocker is None:
        return Route("flex-block-sparse", "NSA_USE_FLEX=1 on CUDA, Triton off: one FlexAttention kernel over "
                     "the selected blocks (forward and backward)", flex.selection_attention_flex)
    note = "" if blocker in ("NSA_USE_FLEX=0", "not on CUDA") else f"; flex not taken: {blocker}"
    return _slc_packed_or_gather(note)


def route_slc_decode() -> Route:
    """Selection route for decode steps (device-side positions, static shapes, no host sync):
    ``fn(q, k, v, block_idx, *, sel_block_len, positions)``."""
    return _slc_packed_or_gather()


def route_decode(device, dtype, heads: int, groups: int, d_k: int, d_v: int, block_len: int, block_stride: int,
                 sel_block_len: int) -> Route:
    """The decode step's attention: ``fn(q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, pos, *,
    block_len, block_stride, sel_block_len, n_sel, num_blocks) -> (gated output, blocks)``, or None:
    the module's own torch step (cached masked matmul, selection by ``route_slc_decode``); and the
    token's work before it, ``prologue`` (``triton_decode_token.prepare_token``), or None: the torch
    ops (``NSAAttention._append``). Asked on every decode step: the torch route's selection is named
    by :func:`backends`, not built here."""
    blocker = _triton_blocker(device, dtype) or triton_decode.supported(heads, groups, d_k, d_v, block_len,
                                                                         block_stride, sel_block_len)
    if blocker is None:
        return Route("triton-fused", "NSA_USE_TRITON=1: one Triton kernel for the token (RoPE, gates, cache "
                     "appends, phi), then up to six read the caches in place (compressed attention, block scores, "
                     "top-n, selected blocks and window ring, gated sum)",
                     triton_decode.decode_attention, prologue=triton_decode_token.prepare_token)
    return Route("cached-masked-matmul", f"static shapes, device-side positions: CUDA-graph capturable "
                 f"(Triton not taken: {blocker})")


def backends(device=None, dtype=None, d_k: int = 64, d_v: int = 64, sel_block_len: int = 64, *,
             groups: int = 1, heads_per_group: int = 1, block_len: int = 32, block_stride: int = 16) -> dict:
    """Routes each branch takes for a layer on ``device``/``dtype`` (defaults: CUDA if present, bf16)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    provider, why = fa2_provider()
    prefill = route_prefill()
    cmp = route_cmp(device, dtype, d_k, d_v)
    if cmp.fn is None:
        select = SELECT_FROM_CMP
    else:
        select = route_select(device, dtype, groups * heads_per_group, groups, d_k, block_len, block_stride,
                              sel_block_len)
    out = {}
    for branch, route in (("cmp", cmp), ("select", select), ("slc", route_slc(device, dtype, sel_block_len, d_k, d_v)),
                          ("slc_inference", route_slc(device, dtype, sel_block_len, d_k, d_v, needs_grad=False)),
                          ("win", route_win(device, dtype, d_k, d_v)),
                          ("win_inference", route_win(device, dtype, d_k, d_v, needs_grad=False)),
                          ("rope", route_rope(device, dtype)), ("combine", route_combine(device, dtype))):
        if prefill.name == "sequential":  # the per-token references run instead of any branch route
            route = Route("sequential-reference", f"{prefill.reason} (would be {route.name}: {route.reason})")
        out[branch] = {"route": route.name, "reason": route.reason}
    out["prefill"] = {"route": prefill.name, "reason": prefill.reason}
    decode = route_decode(device, dtype, groups * heads_per_group, groups, d_k, d_v, block_len, block_stride,
                          sel_block_len)
    if decode.fn is None:  # the torch step: its selection route too
        slc = route_slc_decode()
        decode = Route(f"{decode.name}, selection {slc.name}", f"{decode.reason}; selection: {slc.reason}")
    out["decode"] = {"route": decode.name, "reason": decode.reason}
    out["fa2"] = {"available": provider != "none", "provider": provider, "reason": why}
    out["query"] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "d_k": d_k, "d_v": d_v,
                    "groups": groups, "heads_per_group": heads_per_group}
    return out
