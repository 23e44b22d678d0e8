"""Adapter for seconds-0/nsa-vibe (https://github.com/seconds-0/nsa-vibe), the seed report's project.

How that project is shaped, and what this file does about it (protocol: workflow/adapters/README.md):

- Its wheel holds no ``nsa/__init__.py``; its docs run it from the checkout with ``PYTHONPATH=.``.
  So ``INSTALL = "pythonpath"``: the harness puts the checkout on ``sys.path``.
- The layer is ``nsa.core.nsa_attention.NSAAttention``; every call takes and returns its decode
  cache, a ``nsa.cache.kv_cache.NSA_KV`` dataclass of tensors that grow by ``torch.cat``. A plain
  ``forward`` is a prefill into a fresh, empty cache.
- It reads its ``NSA_*`` variables with ``os.getenv`` in many places, each with its own loose parser
  (a flag is true only for ``1/true/yes`` -- and ``on`` in some places but not others; integers that
  do not parse silently become the default; reserves above a bound are clamped with only a
  warning). ``check_env`` accepts only values every one of those parsers reads the same way, and
  ``routes`` reports the values the layer actually parsed, including the reserves after clamping.

Capabilities, and why:
- decode: its layer has a single-token decode mode that threads ``NSA_KV``.
- backward: prefill is plain autograd PyTorch (its training path).
- cuda_graph: False. Its decode grows the cache with ``torch.cat`` (shapes change every step) and
  reads tensors on the host (``.item()`` for block metadata, logging and range merging).
- compile: False. It has no counterpart of ``compile_decode``.
- workspaces: True. It keeps two module-level workspace dictionaries (selection pack, FA-2 varlen)
  without counters; this adapter counts their allocations by replacing each dictionary with an
  equivalent one that counts (the implementation's code is not changed). High-water marks of the
  requests are not observable from outside and are reported as None.
- block_indices: True. The selected block indices of one forward are read from the token ranges
  its top-n selection returns (that function is wrapped for the one call).

What the workflow finds with it (tests/test_adapter_nsa_vibe.py pins each, at 27efbae and 9fe0530):
- decode != forward. Without flash-attn, decode's window branch calls SDPA with ``is_causal=True``
  on a single query, a mask PyTorch aligns top-left: it attends to the oldest token of the window
  only, while the batched prefill attends to the whole window.
- The same one-query call makes its selection branch (packed and gather) return the value of the
  first selected token only, and its compressed branch is defined as the first compressed value;
  both agree between decode and forward, so only a comparison with the paper shows them.
- perf/workspace-presize: the packed selection raises whenever a reserve makes the workspace larger
  than the call, and always under autograd (``need_new`` unbound), then falls back to gather; the
  fallbacks are counted in ``routes(layer)["fallbacks"]``.
"""

from __future__ import annotations

import math
import re

ADAPTER_API = 1
NAME = "nsa-vibe"
PACKAGE = "nsa"
INSTALL = "pythonpath"
# Its tests import only pytest, torch and numpy (numpy is a declared dependency); hypothesis is in
# its [dev] extra and harmless to have.
EXTRA_REQUIREMENTS = ["pytest", "hypothesis"]
CAPABILITIES = {
    "decode": True,
    "backward": True,
    "cuda_graph": False,  # cache grows by torch.cat; host syncs (.item()) in every decode step
    "compile": False,  # no compile_decode counterpart
    "workspaces": True,  # counted by this adapter around its _SEL_PACK_WS / _VARLEN_WS dictionaries
    "block_indices": True,
    "devices": ["cpu", "cuda"],
    "dtypes": ["float32", "bfloat16", "float16"],
}
MODEL_FIELDS = ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "block_stride", "sel_block_len",
                "n_sel", "window")
FORCED_BLOCKS = 3  # it always selects block 0 and the two most recent blocks (paper §3.3.2)

# ----------------------------------------------------------------------------------------------
# Its variables. Kinds: what check_env accepts, chosen so that every parser in the project reads
# the value the same way (e.g. "on" is true in kernels/ but false in core/nsa_attention.py).
_FLAG = "flag"  # 0, 1, true or false (any case)
_FLAG01 = "flag01"  # 0 or 1
_COUNT = "count"  # a non-negative integer written in digits
_POSITIVE = "positive"  # an integer >= 1
_ENABLE = "enable"  # read as "set at all": only 1 is accepted (unset it to disable)
_SCALE = "scale"  # a positive finite number
_CHOICE = "choice"

# Reserve bounds of perf/workspace-presize (9fe0530): larger values are clamped with a warning.
RESERVE_BOUNDS = {"NSA_SEL_PACK_RESERVE_N": 10**5, "NSA_SEL_PACK_RESERVE_L": 10**4,
                  "NSA_VARLEN_RESERVE_N": 10**6, "NSA_VARLEN_RESERVE_K": 10**8}
CHOICES = {"NSA_FORCE_BRANCH": ("cmp", "sel", "win"), "NSA_SEL_TRITON_FORCE_PATH": ("auto", "dense", "varlen")}
ENV_VARS = {
    # nsa/core/nsa_attention.py, read once per layer at construction
    **{name: _FLAG for name in (
        "NSA_ENV_STATIC", "NSA_FORCE_UNIFORM_GATE", "NSA_PREFILL_BATCHED", "NSA_STRICT_ASSERTS",
        "NSA_FORCE_PARITY", "NSA_USE_SEL_PACK", "NSA_USE_TRITON_SEL", "NSA_SEL_CUDA", "NSA_USE_FA2",
        "NSA_USE_FA2_WIN", "NSA_USE_FA2_CMP", "NSA_USE_SEL_MASK", "NSA_USE_CMP_MASK", "NSA_USE_WIN_MASK",
        "NSA_VERIFY_EQ9_MAPPING", "NSA_STOPGRAD_GATES", "NSA_NVTX", "NSA_DEBUG_COMPARE", "NSA_SDPA_AUDIT")},
    "NSA_FORCE_BRANCH": _CHOICE, "NSA_ROPE_SCALE": _SCALE, "NSA_PREFILL_TILE": _COUNT,
    # nsa/core/selection_scorer.py, read at every call
    "NSA_SEL_RANGES_V2": _FLAG, "NSA_VALIDATE_SELECTION_DETERMINISM": _FLAG,
    # nsa/core/attention_kernels.py (reserves: perf/workspace-presize only)
    **{name: _COUNT for name in RESERVE_BOUNDS},
    **{name: _FLAG for name in ("NSA_TRAIN_SAFE_PACK", "NSA_FA2_FORCE", "NSA_ALLOW_SLIDING_FA2",
                                "NSA_FA2_FORCE_DENSE", "NSA_FA2_FORCE_VARLEN", "NSA_WIN_FORCE_DENSE",
                                "NSA_DEBUG_TIMING")},
    "NSA_FA2_MIN_LEN_CMP": _POSITIVE, "NSA_FA2_MIN_LEN_WIN": _POSITIVE,
    # nsa/core/debug.py
    "NSA_DEBUG_LOG": _FLAG, "NSA_LOG_LIMIT": _COUNT,
    # nsa/kernels/ (Triton and CUDA selection kernels)
    **{name: _FLAG for name in ("NSA_SEL_CUDA_BUILD", "NSA_DEBUG_BUILD", "NSA_SEL_TRITON_ALLOW_GRAD",
                                "NSA_DEBUG_SHAPES", "NSA_SEL_TRITON_REQUIRE_ALIGN", "NSA_TRITON_SEL_FORCE",
                                "NSA_SEL_TRITON_GROUP")},
    "NSA_SEL_TRITON_FORCE_PATH": _CHOICE,
    **{name: _POSITIVE for name in ("NSA_SEL_TRITON_MIN_L", "NSA_SEL_TRITON_PACK_CACHE_MAX_ENTRIES",
                                    "NSA_SEL_TRITON_PACK_CACHE_MAX_MB", "NSA_SEL_TRITON_BLOCK_D",
                                    "NSA_SEL_TRITON_BLOCK_L", "NSA_SEL_TRITON_BLOCK_DV", "NSA_SEL_TRITON_BLOCK_H")},
    # read only on other branches (FA-2 hardening, selection varlen, mixed precision, gate fusion)
    **{name: _FLAG for name in ("NSA_FA2_ALLOW_D_GT_128", "NSA_FA2_ALLOW_FP32", "NSA_FA2_ALLOW_LARGE_BATCH",
                                "NSA_FA2_AUDIT", "NSA_FA2_PREF_FP16", "NSA_FORCE_SEL_MASK", "NSA_GATE_COMPILE",
                                "NSA_P_CMP_MIXED", "NSA_P_GRP_FP32", "NSA_P_SLC_MIXED", "NSA_SEL_VARLEN_FORCE_PARITY",
                                "NSA_SEL_VARLEN_V2", "NSA_USE_SEL_VARLEN")},
    "NSA_SEL_VARLEN_MIN_L": _COUNT,
    "NSA_REQUIRE_VARLEN_SEMANTIC": _FLAG01,  # compared without lower(): "True" would read as off
    # its test suite (nsa/tests/): opt-in switches and the seed
    **{name: _FLAG for name in ("NSA_TEST_FA2", "NSA_TEST_TRAIN", "NSA_TEST_MASKED", "NSA_TEST_SEL_MASK",
                                "NSA_TEST_SEL_PACK", "NSA_TEST_TRITON_SEL")},
    "NSA_TEST_SEED": _COUNT,
    "NSA_INTEGRATION_TESTS": _ENABLE,  # skipif(not os.getenv(...)): "0" would enable them
}
_ACCEPTED = {
    _FLAG: "0, 1, true or false", _FLAG01: "0 or 1", _COUNT: "an integer >= 0 in digits", _POSITIVE: "an integer >= 1 in digits",
    _ENABLE: "1 (unset the variable to disable it)", _SCALE: "a positive finite number",
}
# What nsa-vibe does with a value outside what check_env accepts.
_MISREAD = {
    _FLAG: "nsa-vibe reads 1/true/yes as on ('on' too, but only in some modules) and anything else as off",
    _FLAG01: "nsa-vibe reads exactly 1, true or yes as on, and anything else (True included) as off",
    _COUNT: "nsa-vibe silently uses its default when int() fails, and clamps or ignores negatives",
    _POSITIVE: "nsa-vibe silently uses its default when int() fails, and clamps values below 1",
    _ENABLE: "its tests run whenever the variable is set, to 0 as well",
    _SCALE: "nsa-vibe silently uses 1.0 unless it parses a positive number (and takes inf)",
    _CHOICE: "nsa-vibe silently ignores any other value",
}


def _problem(name: str, value: str, kind: str) -> str | None:
    """Why nsa-vibe would misread ``value`` for ``name`` (None when every parser of it agrees)."""
    if kind == _FLAG:
        ok = value.lower() in ("0", "1", "true", "false")
    elif kind == _FLAG01:
        ok = value in ("0", "1")
    elif kind in (_COUNT, _POSITIVE):
        ok = value.isascii() and value.isdigit() and (kind == _COUNT or int(value) >= 1)
    elif kind == _ENABLE:
        ok = value == "1"
    elif kind == _SCALE:
        try:
            x = float(value)
            ok = math.isfinite(x) and x > 0
        except ValueError:
            ok = False
    else:
        ok = value.strip().lower() in CHOICES[name]  # it lower-cases (and strips) these itself
    if not ok:
        accepted = _ACCEPTED.get(kind) or " or ".join(CHOICES[name])
        return f"{name}={value!r} is invalid ({_MISREAD[kind]}); accepted: {accepted}"
    bound = RESERVE_BOUNDS.get(name)
    if bound is not None and int(value) > bound:
        return (f"{name}={value!r} is above {bound}, which nsa-vibe (perf/workspace-presize) clamps to {bound} "
                f"with only a warning; accepted: an integer from 0 to {bound}")
    return None


def check_env(variables: dict) -> list[str]:
    problems = []
    for name, value in variables.items():
        if not name.startswith("NSA_"):
            continue  # not one of nsa-vibe's; the harness passes it on unchecked
        kind = ENV_VARS.get(name)
        if kind is None:
            problems.append(f"{name}={value!r}: nsa-vibe reads no such variable (it would be ignored); "
                            f"accepted names: {', '.join(sorted(ENV_VARS))}")
            continue
        problem = _problem(name, str(value), kind)
        if problem:
            problems.append(problem)
    return problems


# ----------------------------------------------------------------------------------------------
# The layer


def version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("nsa-vibe")
    except metadata.PackageNotFoundError:
        return None  # run from the checkout (INSTALL = "pythonpath"): the harness records the SHA


def build_layer(model: dict, *, device: str, dtype: str):
    import torch
    from adapter_api import Unsupported
    from nsa.core.nsa_attention import NSAAttention

    from adapter_api import check_fields

    check_fields(model, MODEL_FIELDS)
    m = {k: int(model[k]) for k in MODEL_FIELDS}
    for field in ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "block_stride", "sel_block_len"):
        if m[field] < 1:
            raise Unsupported(f"unsupported: {field}={m[field]} (must be >= 1)")
    if m["block_len"] % m["block_stride"]:
        raise Unsupported(f"unsupported: block_stride={m['block_stride']} (nsa-vibe needs block_stride to divide "
                          f"block_len={m['block_len']})")
    if m["sel_block_len"] % m["block_stride"]:
        raise Unsupported(f"unsupported: sel_block_len={m['sel_block_len']} (nsa-vibe needs block_stride="
                          f"{m['block_stride']} to divide it)")
    if m["n_sel"] < FORCED_BLOCKS:
        raise Unsupported(f"unsupported: n_sel={m['n_sel']} (nsa-vibe always selects block 0 and the two most "
                          f"recent blocks, so it reads at least {FORCED_BLOCKS} blocks)")
    if m["window"] < 1:
        raise Unsupported(f"unsupported: window={m['window']} (nsa-vibe's decode keeps the whole sequence "
                          f"in its window cache when window < 1)")
    # Only the paper's quantities are passed: every other argument keeps the commit's own default,
    # and its flags come from the environment (read here, once, by the layer).
    layer = NSAAttention(dim=m["dim"], n_heads=m["groups"] * m["heads_per_group"], n_kv_groups=m["groups"],
                         d_k=m["d_k"], d_v=m["d_v"], l=m["block_len"], d=m["block_stride"],
                         l_sel=m["sel_block_len"], n_sel=m["n_sel"], w=m["window"])
    _count_workspaces()
    return layer.to(device=device, dtype=getattr(torch, dtype))


def _param(layer):
    return layer.W_Q.weight


def new_cache(layer, batch: int, max_len: int):
    """An empty ``NSA_KV`` as its own model file builds one (it grows as tokens arrive; ``max_len``
    is not needed: the cache has no capacity)."""
    import torch
    from nsa.cache.kv_cache import NSA_KV
    from nsa.core.block_index import build_block_meta

    ref = _param(layer)
    G, dev = layer.n_kv_groups, ref.device

    def empty(width):
        return torch.zeros((batch, G, 0, width), device=dev, dtype=ref.dtype)

    def counts(shape):
        return torch.zeros(shape, dtype=torch.int64, device=dev)

    return NSA_KV(
        K_sel=empty(layer.d_k), V_sel=empty(layer.d_v), K_win=empty(layer.d_k), V_win=empty(layer.d_v),
        K_cmp_raw_seq=empty(layer.d_k), V_cmp_raw_seq=empty(layer.d_v), K_cmp=empty(layer.d_k),
        V_cmp=empty(layer.d_v), win_ptr=counts((batch, G)), cmp_emit_next=counts((batch, G)),
        meta=build_block_meta(0, layer.l, layer.d, layer.l_sel, layer.n_sel, layer.w),
        reads_pred=counts((0,)), reads_act_total=counts((0,)), reads_act_sel=counts((0,)),
        reads_act_cmp=counts((0,)), reads_act_win=counts((0,)),
    )


def prefill(layer, x, cache):
    return layer(x, cache, prefill=True)


def decode_step(layer, x_t, cache):
    return layer(x_t, cache, prefill=False)


def forward(layer, x):
    y, _ = prefill(layer, x, new_cache(layer, x.shape[0], x.shape[1]))
    return y


# ----------------------------------------------------------------------------------------------
# What it used


def _int_literal(text: str) -> int:
    """``12`` or ``10**6`` as written in its source."""
    base, _, exponent = text.partition("**")
    return int(base) ** int(exponent) if exponent else int(base)


def _reserves_as_read() -> dict:
    """The reserve values this commit actually uses: which of the variables its source reads, and
    the value after its own parsing (non-integers fall back to 0; bounded ones are clamped)."""
    import inspect
    import os

    import nsa.core.attention_kernels as kernels

    try:
        source = inspect.getsource(kernels)
    except (OSError, TypeError):
        source = ""
    out = {}
    for name in RESERVE_BOUNDS:
        raw = os.environ.get(name)
        entry = {"configured": raw}
        bounded = re.search(rf'_env_int_bounded\(\s*"{name}"\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*([\d*]+)\s*\)', source)
        if f'"{name}"' not in source:
            entry.update(read_by_commit=False, used=None, note="this commit does not read it")
            out[name] = entry
            continue
        try:
            value = int(raw) if raw is not None else 0
            parsed = True
        except ValueError:
            value, parsed = 0, False
        entry.update(read_by_commit=True, used=value, clamped=False)
        if not parsed:
            entry["note"] = "not an integer: the commit silently uses 0"
        if bounded:
            low, high = int(bounded.group(2)), _int_literal(bounded.group(3))
            if value < low or value > high:
                entry.update(used=min(max(value, low), high), clamped=True, bounds=[low, high])
                entry["note"] = f"clamped by the commit to [{low}, {high}] (it only warns)"
            else:
                entry["bounds"] = [low, high]
        out[name] = entry
    return out


def _env_on(name: str) -> bool:
    import os

    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _route(kernel: str, why: str, **detail) -> dict:
    return {"route": kernel, "reason": why, **detail}


def routes(layer) -> dict:
    """``{branch: {"route", "reason"}}`` as the report shows them: the kernel each branch takes
    under the flags the layer parsed, the flags themselves, the reserves as this commit uses them,
    and the fallbacks taken so far (nsa-vibe falls back silently on any exception, only counting)."""
    import os

    import torch

    env = dict(getattr(layer, "_env_cache", {}))
    parity = bool(env.get("force_parity"))
    ref = _param(layer)
    try:
        from nsa.kernels import flash_wrappers as fw

        dense_ok, varlen_ok = bool(fw.is_flash_available()), bool(fw.is_flash_varlen_available())
    except Exception:  # noqa: BLE001 - an old commit without the probes
        dense_ok = varlen_ok = False
    cuda = ref.device.type == "cuda"
    sm89 = cuda and torch.cuda.get_device_capability(ref.device) == (8, 9) and not _env_on("NSA_FA2_FORCE")
    fa2_hw = cuda and layer.d_k % 8 == 0 and not sm89
    fa2_cmp = bool(env.get("fa2_all_eff") or env.get("fa2_cmp_eff")) and not parity
    fa2_win = bool(env.get("fa2_all_eff") or env.get("fa2_win_eff")) and not parity
    no_fa2 = ("flash_attn not importable" if not (dense_ok or varlen_ok) else "not on CUDA" if not cuda else
              "head dim not a multiple of 8" if layer.d_k % 8 else "RTX 4090 guard" if sm89 else "")
    bgh = ("flash_attn dense" if dense_ok and cuda else
           "sdpa, is_causal=True on one query (attends to the first key given only)")

    def pick(*rows):  # (condition, kernel, why): the first that holds
        return next(_route(kernel, why) for cond, kernel, why in rows if cond)

    if env.get("use_triton_sel") and not parity:
        sel = _route("triton", "NSA_USE_TRITON_SEL=1; packed sdpa if it raises")
    elif env.get("use_sel_pack", True) and not parity:
        sel = _route("packed sdpa, is_causal=True on one query (attends to the first selected token only)",
                     "NSA_USE_SEL_PACK (default 1); gather if it raises")
    elif env.get("use_sel_mask") and not parity:
        sel = _route("masked sdpa", "NSA_USE_SEL_MASK=1")
    else:
        sel = _route("gather sdpa, is_causal=True on one query (attends to the first selected token only)",
                     "NSA_FORCE_PARITY=1" if parity else "packed and masked paths off")
    decode_sel = sel
    if env.get("use_cuda_sel") and not parity and not env.get("use_triton_sel"):
        decode_sel = _route("cuda selection kernel", "NSA_SEL_CUDA=1; packed sdpa if it raises")
    sliding_policy = _env_on("NSA_ALLOW_SLIDING_FA2") or _env_on("NSA_FA2_FORCE_VARLEN") or _env_on("NSA_FA2_FORCE_DENSE")
    tile = int(getattr(layer, "prefill_tile", 0) or 0)
    masks_off = "its masks off (NSA_USE_*_MASK=0 or NSA_FORCE_PARITY=1)"
    out = {
        "prefill": (_route("decode steps", f"NSA_PREFILL_TILE={tile}") if tile else
                    _route("batched" if env.get("prefill_batched") else "sequential",
                           "NSA_PREFILL_BATCHED (default 0)")),
        "prefill.cmp": pick(
            (fa2_cmp and fa2_hw and varlen_ok, "fa2 varlen", "FA-2 on; masked below NSA_FA2_MIN_LEN_CMP tokens"),
            (fa2_cmp, "masked (first compressed token only)", f"FA-2 on but unusable: {no_fa2}"),
            (env.get("use_cmp_mask", True) and not parity, "masked (first compressed token only)",
             "NSA_USE_CMP_MASK (default 1)"),
            (True, f"per token: {bgh}", masks_off)),
        "prefill.slc": sel,
        "prefill.win": pick(
            (fa2_win and not sliding_policy, "masked sdpa band",
             "FA-2 on, but its policy keeps sliding FA-2 off without NSA_ALLOW_SLIDING_FA2=1"),
            (fa2_win and fa2_hw and varlen_ok, "fa2 varlen", "FA-2 on; masked below NSA_FA2_MIN_LEN_WIN"),
            (fa2_win, "masked sdpa band", f"FA-2 on but unusable: {no_fa2}"),
            (env.get("use_win_mask", True) and not parity, "masked sdpa band", "NSA_USE_WIN_MASK (default 1)"),
            (True, f"per token: {bgh}", masks_off)),
        "decode.cmp": pick(
            (fa2_cmp and fa2_hw and dense_ok, "fa2 dense", f"FA-2 on; {bgh} below NSA_FA2_MIN_LEN_CMP"),
            (True, bgh, f"FA-2 on but unusable: {no_fa2}" if fa2_cmp else "FA-2 off")),
        "decode.slc": decode_sel,
        "decode.win": pick(
            (fa2_win and fa2_hw and dense_ok, "fa2 dense", f"FA-2 on; {bgh} below NSA_FA2_MIN_LEN_WIN"),
            (True, bgh, f"FA-2 on but unusable: {no_fa2}" if fa2_win else "FA-2 off")),
    }
    ranges_v2 = os.environ.get("NSA_SEL_RANGES_V2", "1").lower() in ("1", "true", "yes")
    out["ranges"] = _route("v2" if ranges_v2 else "v1", "NSA_SEL_RANGES_V2 (default 1), read at every call")
    fa2_on = [b for b in ("all", "cmp", "win") if env.get(f"fa2_{b}_eff")]
    out["fa2"] = _route("on: " + ", ".join(fa2_on) if fa2_on else "off",
                        "NSA_USE_FA2 unset means the layer's default use_flash=True; NSA_USE_FA2=0 turns all off; "
                        f"flash_attn importable: dense {dense_ok}, varlen {varlen_ok}")
    flags = {k: v for k, v in env.items() if isinstance(v, (bool, int, float, str, type(None)))}
    on = sorted(k for k, v in flags.items() if v is True)
    out["flags"] = _route("on: " + ", ".join(on), "as NSAAttention parsed NSA_* at construction (all others off"
                          + (f"; NSA_FORCE_BRANCH={flags['force_branch']!r}" if flags.get("force_branch") else "")
                          + f"; rope_scale {float(getattr(layer, 'rope_scale', 1.0))})", parsed=flags)
    reserves = _reserves_as_read()
    read = {n: r for n, r in reserves.items() if r["read_by_commit"]}
    out["reserves"] = _route(
        ", ".join(f"{n}={r['used']}" for n, r in read.items()) if read else "none read",
        ("this commit does not read NSA_*_RESERVE_*" if not read else
         "as this commit parses them" + "".join(f"; {n}: {r['note']}" for n, r in read.items() if r.get("note"))),
        detail=reserves)
    fallbacks = dict(layer.get_fallback_counters()) if hasattr(layer, "get_fallback_counters") else {}
    taken = {k: v for k, v in fallbacks.items() if v and k != "total_fallbacks"}
    out["fallbacks"] = _route(", ".join(f"{k}={v}" for k, v in taken.items()) or "none",
                              "fallbacks taken by this layer so far (its kernels catch every exception)",
                              counters=fallbacks)
    return out


# ----------------------------------------------------------------------------------------------
# Workspaces: nsa-vibe keeps module-level dictionaries {key: {name: tensor}} and looks them up by
# global name on every call, so an equivalent dictionary that counts can stand in for each.

_WORKSPACES = {"sel_pack": ("_SEL_PACK_WS", "Q", "K", 1), "varlen": ("_VARLEN_WS", "q", "k", 0)}


class _CountingWorkspaces(dict):
    """A dict that counts lookups (requests), stores (allocations) and replacements (growth)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = self.allocations = self.growth_events = 0

    def get(self, key, default=None):
        self.requests += 1
        return super().get(key, default)

    def __setitem__(self, key, value):
        self.allocations += 1
        if key in self:
            self.growth_events += 1
        super().__setitem__(key, value)


def _count_workspaces(fresh: bool = False) -> dict:
    """Install counting dictionaries in the commit's kernels module (once, or anew when ``fresh``)."""
    try:
        import nsa.core.attention_kernels as kernels
    except ImportError:
        return {}
    installed = {}
    for name, (attr, *_rest) in _WORKSPACES.items():
        current = getattr(kernels, attr, None)
        if current is None:
            continue
        if fresh or not isinstance(current, _CountingWorkspaces):
            current = _CountingWorkspaces() if fresh else _CountingWorkspaces(current)
            setattr(kernels, attr, current)
        installed[name] = current
    return installed


def workspace_stats() -> dict:
    stats = {}
    for name, table in _count_workspaces().items():
        _attr, rows_key, keys_key, keys_dim = _WORKSPACES[name]
        bufs = [b for entry in table.values() for b in entry.values() if hasattr(b, "nbytes")]
        stats[name] = {
            "allocations": table.allocations,
            "growth_events": table.growth_events,
            "bytes_reserved": sum(int(b.nbytes) for b in bufs),
            "high_water_rows": None,  # not observable from outside the implementation
            "high_water_keys": None,
            "capacity_rows": max((int(e[rows_key].shape[0]) for e in table.values() if rows_key in e), default=0),
            "capacity_keys": max((int(e[keys_key].shape[keys_dim]) for e in table.values() if keys_key in e),
                                 default=0),
            "requests": table.requests,
        }
    return stats


def reset_workspaces() -> None:
    """Free the workspaces (as its clear_* helpers do) and start counting from zero."""
    _count_workspaces(fresh=True)


# ----------------------------------------------------------------------------------------------
# Selection


def selected_blocks(layer, x):
    """Block indices ``[B, T, G, n_sel]`` (ascending, -1 where fewer were selected) of ``forward(layer, x)``.

    Read from the token ranges its selection step returns (``select_topn_ranges_batched`` for the
    batched prefill, ``select_topn_ranges`` per position for the sequential one), wrapped by name in
    ``nsa.core.nsa_attention`` for this one call. A selection block is selected when a range covers
    its first token.
    """
    import torch
    import nsa.core.nsa_attention as attention

    seen = {"batched": [], "single": []}
    originals = {}

    def wrap(name, kind):
        original = getattr(attention, name, None)
        if original is None:
            return
        originals[name] = original

        def recording(*args, **kwargs):
            out = original(*args, **kwargs)
            seen[kind].append(out.detach().clone())
            return out

        setattr(attention, name, recording)

    wrap("select_topn_ranges_batched", "batched")
    wrap("select_topn_ranges", "single")
    try:
        with torch.no_grad():
            forward(layer, x)
    finally:
        for name, original in originals.items():
            setattr(attention, name, original)
    if seen["batched"]:
        ranges = seen["batched"][-1]  # [B, T, G, n, 2]
    elif seen["single"]:
        ranges = torch.stack(seen["single"][-x.shape[1]:], dim=1)  # T x [B, G, n, 2] -> [B, T, G, n, 2]
    else:
        return None
    return _blocks_from_ranges(ranges.to(torch.int64), layer.l_sel, layer.n_sel, x.shape[1])


def _blocks_from_ranges(ranges, l_sel: int, n_sel: int, T: int):
    import torch

    n_blocks = (T + l_sel - 1) // l_sel
    starts = torch.arange(n_blocks, device=ranges.device) * l_sel  # [S_sel]
    s, e = ranges[..., 0:1], ranges[..., 1:2]  # [B, T, G, n, 1]
    covered = ((starts >= s) & (starts < e) & (e > s)).any(dim=-2)  # [B, T, G, S_sel]
    idx = torch.arange(n_blocks, device=ranges.device).expand_as(covered)
    picked = torch.where(covered, idx, torch.full_like(idx, n_blocks))
    picked = torch.sort(picked, dim=-1).values[..., :n_sel]
    picked = torch.where(picked == n_blocks, torch.full_like(picked, -1), picked)
    if picked.shape[-1] < n_sel:
        pad = torch.full((*picked.shape[:-1], n_sel - picked.shape[-1]), -1, dtype=picked.dtype, device=picked.device)
        picked = torch.cat([picked, pad], dim=-1)
    return picked
