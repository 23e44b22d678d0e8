"""Which kernel each branch runs, and why: one function per branch, all routes in view.

Each ``route_*`` function returns a :class:`Route` (a name, a reason and the callable). The module
calls the callable; :func:`backends` reports the names and reasons so a validation report can say
what actually ran.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .ops import compressed, flex, triton_selection, window
from .flags import settings


@dataclasses.dataclass(frozen=True)
class Route:
    name: str
    reason: str
    fn: Callable | None = None


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


# --- compressed branch ---------------------------------------------------------------------------


def _cmp_flash_attn(q, k, v):
    # flash_attn takes [B, N, heads, d]
    return _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


def _cmp_sdpa_flash(q, k, v):
    h = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(h, dim=1), v.repeat_interleave(h, dim=1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def route_cmp(device, dtype, d_k, d_v) -> Route:
    blocker = _fa2_blocker(settings().use_fa2_cmp, "NSA_USE_FA2_CMP", torch.device(device), dtype, d_k, d_v)
    if blocker is None:
        provider, _ = fa2_provider()
        attn = _cmp_flash_attn if provider == "flash_attn" else _cmp_sdpa_flash
        name = "fa2-flash_attn" if provider == "flash_attn" else "fa2-torch-sdpa-flash"
        return Route(name, "compressed output through causal FA-2 over stride segments; scores by matmul",
                     functools.partial(compressed.compressed_attention_fa2, attn_fn=attn))
    return Route("reference", f"masked matmul softmax ({blocker})", None)


# --- sliding-window branch -----------------------------------------------------------------------


def _win_flash_attn(q, k, v, window_len):
    return _flash_attn_func()(q, k, v, causal=True, window_size=(window_len - 1, 0))


def _win_torch_varlen(q, k, v, cu, max_len, window_len):
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
        k = compressed.pack_varlen(k, "k_win", None, k.shape[0] * k.shape[1])
        v = compressed.pack_varlen(v, "v_win", None, v.shape[0] * v.shape[1])
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(window_len - 1, 0), **extra)


def route_win(device, dtype, d_k, d_v) -> Route:
    blocker = _fa2_blocker(settings().use_fa2_win, "NSA_USE_FA2_WIN", torch.device(device), dtype, d_k, d_v)
    if blocker is None:
        provider, _ = fa2_provider()
        if provider == "flash_attn":
            return Route("fa2-flash_attn", "flash_attn_func with window (w-1, 0)",
                         lambda q, k, v, w: _win_flash_attn(q, k, v, w))
        varlen_attn, params = _torch_varlen()
        if varlen_attn is not None and "window_size" in params:
            return Route("fa2-torch-varlen", "torch varlen_attn with window (w-1, 0)",
                         lambda q, k, v, w: window.sliding_window_attention_fa2(q, k, v, w, _win_torch_varlen))
        blocker = f"torch {torch.__version__} varlen_attn has no window_size"
    if _flex_blocker(device, dtype, d_k, d_v) is None:
        return Route("flex-sliding-window", f"NSA_USE_FLEX=1 on CUDA: FlexAttention over the band's tiles "
                     f"(FA-2 not taken: {blocker})", flex.sliding_window_attention_flex)
    return Route("reference", f"chunked band attention ({blocker})", None)


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


def route_slc(device="cpu", dtype=torch.float32, sel_block_len: int = 64, d_k: int = 64, d_v: int = 64,
              needs_grad: bool = True) -> Route:
    """Selection route for prefill/training (decode always takes packed or gather)."""
    s = settings()
    ranges = "v2 vectorised ranges" if s.sel_ranges_v2 else "v1 reference ranges (host loop)"
    half = dtype in (torch.float16, torch.bfloat16)
    pow2 = sel_block_len >= 16 and sel_block_len & (sel_block_len - 1) == 0
    if (not needs_grad and s.use_triton and torch.device(device).type == "cuda" and half and pow2
            and triton_selection.available()):
        return Route("triton-sparse", "NSA_USE_TRITON=1, no autograd: one program per (query, group) over "
                     "its selected blocks", triton_selection.selection_attention_triton)
    blocker = _flex_blocker(device, dtype, d_k, d_v)
    if blocker is None and sel_block_len % 64:
        blocker = f"sel_block_len={sel_block_len} (flex tiles keys by 64)"
    if blocker is None:
        return Route("flex-block-sparse", "NSA_USE_FLEX=1 on CUDA: one FlexAttention kernel over the "
                     "selected blocks (forward and backward)", flex.selection_attention_flex)
    note = "" if blocker in ("NSA_USE_FLEX=0", "not on CUDA") else f"; flex not taken: {blocker}"
    if s.use_sel_pack:
        return Route("packed", f"NSA_USE_SEL_PACK=1: merged ranges packed into the workspace, {ranges}{note}")
    return Route("gather", f"NSA_USE_SEL_PACK=0: per-block gather with a causal mask{note}")


def backends(device=None, dtype=None, d_k: int = 64, d_v: int = 64, sel_block_len: int = 64) -> dict:
    """Routes each branch takes for a layer on ``device``/``dtype`` (defaults: CUDA if present, bf16)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    provider, why = fa2_provider()
    s = settings()
    out = {}
    for branch, route in (("cmp", route_cmp(device, dtype, d_k, d_v)), ("slc", route_slc(device, dtype, sel_block_len, d_k, d_v)),
                          ("slc_inference", route_slc(device, dtype, sel_block_len, d_k, d_v, needs_grad=False)),
                          ("win", route_win(device, dtype, d_k, d_v))):
        out[branch] = {"route": route.name, "reason": route.reason}
    out["prefill"] = {"route": "batched" if s.prefill_batched else "sequential",
                      "reason": f"NSA_PREFILL_BATCHED={int(s.prefill_batched)}"}
    out["decode"] = {"route": "cached-masked-matmul, selection " + ("packed" if s.use_sel_pack else "gather"),
                     "reason": "static shapes, device-side positions: CUDA-graph capturable"}
    out["fa2"] = {"available": provider != "none", "provider": provider, "reason": why}
    out["query"] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "d_k": d_k, "d_v": d_v}
    return out
