"""Adapter for this repository's own ``nsa`` package (public API v1, docs/api.md). The default.

The model fields the workflow speaks (config key ``model``) are ``NSAConfig``'s own, so the
mapping is one to one. Protocol: workflow/adapters/README.md.
"""

from __future__ import annotations

import inspect

ADAPTER_API = 1
NAME = "nsa"
PACKAGE = "nsa"  # what `import` names; the environment check verifies it comes from the commit
INSTALL = "pip"
CAPABILITIES = {
    "decode": True,
    "backward": True,
    "cuda_graph": True,  # static-shape, sync-free decode_step
    "compile": True,  # NSAAttention.compile_decode()
    "workspaces": True,
    "block_indices": True,
    "devices": ["cpu", "cuda"],
    "dtypes": ["float32", "bfloat16", "float16"],
}
MODEL_FIELDS = ("dim", "groups", "heads_per_group", "d_k", "d_v", "block_len", "block_stride", "sel_block_len",
                "n_sel", "window")

_FLAG = "0 or 1"
_COUNT = "an integer >= 0"
# The variables nsa/flags.py reads (README "Settings"), so a typo stops the run before any job.
ENV_VARS = {
    "NSA_PREFILL_BATCHED": _FLAG, "NSA_SEL_RANGES_V2": _FLAG, "NSA_USE_SEL_PACK": _FLAG, "NSA_USE_FLEX": _FLAG,
    "NSA_USE_TRITON": _FLAG, "NSA_USE_FA2": _FLAG, "NSA_USE_FA2_CMP": _FLAG, "NSA_USE_FA2_WIN": _FLAG,
    "NSA_SEL_PACK_RESERVE_N": _COUNT, "NSA_SEL_PACK_RESERVE_L": _COUNT, "NSA_VARLEN_RESERVE_N": _COUNT,
    "NSA_VARLEN_RESERVE_K": _COUNT, "NSA_SEL_PACK_CHUNK_ROWS": _COUNT,
}
RESERVE_VARS = ("NSA_SEL_PACK_RESERVE_N", "NSA_SEL_PACK_RESERVE_L", "NSA_VARLEN_RESERVE_N", "NSA_VARLEN_RESERVE_K")


def check_env(variables: dict) -> list[str]:
    problems = []
    for name, value in variables.items():
        if not name.startswith("NSA_"):
            continue
        accepted = ENV_VARS.get(name)
        if accepted is None:
            problems.append(f"{name}={value!r}: nsa reads no such variable; accepted: {', '.join(ENV_VARS)}")
        elif accepted == _FLAG and value not in ("0", "1", "True", "False"):
            problems.append(f"{name}={value!r} is invalid; accepted: {_FLAG}")
        elif accepted == _COUNT and not value.isdigit():
            problems.append(f"{name}={value!r} is invalid; accepted: {_COUNT}")
    return problems


def _nsa():
    import nsa

    return nsa


def version() -> str | None:
    return getattr(_nsa(), "__version__", None)


def build_layer(model: dict, *, device: str, dtype: str):
    import torch

    from adapter_api import check_fields

    check_fields(model, MODEL_FIELDS)
    nsa = _nsa()
    layer = nsa.NSAAttention(nsa.NSAConfig(**model))
    return layer.to(device=device, dtype=getattr(torch, dtype))


def forward(layer, x):
    return layer(x)


def new_cache(layer, batch: int, max_len: int):
    return layer.new_cache(batch, max_len)


def prefill(layer, x, cache):
    return layer.prefill(x, cache), cache


def decode_step(layer, x_t, cache):
    return layer.decode_step(x_t, cache), cache


def prepare_decode(layer) -> None:
    layer.compile_decode()


def routes(layer) -> dict:
    ref = next(layer.parameters())
    cfg = layer.cfg
    backends = _nsa().backends
    # Older commits' backends() take fewer of these (the first ones only the device): pass what it names.
    params = inspect.signature(backends).parameters
    if "dtype" not in params:
        return backends(ref.device)
    shape = {"d_k": cfg.d_k, "d_v": cfg.d_v, "sel_block_len": cfg.sel_block_len, "groups": cfg.groups,
             "heads_per_group": cfg.heads_per_group, "block_len": cfg.block_len, "block_stride": cfg.block_stride}
    out = backends(ref.device, ref.dtype, **{k: v for k, v in shape.items() if k in params})
    # The routes the layer's last forward took, where the commit records them: under autocast they
    # follow the autocast dtype, not the float32 parameters (older commits routed by the input's
    # dtype, the TinyLM's float32 residual stream: what backends() gives for the parameters).
    return {**out, **(getattr(layer, "routes_taken", None) or {})}


def workspace_stats() -> dict:
    return _nsa().workspace_stats()


def reset_workspaces() -> None:
    _nsa().reset_workspaces()


def selected_blocks(layer, x):
    """The selection branch's block indices for ``x`` (whatever shape ``select_blocks`` returns).

    Recorded by wrapping the name ``select_blocks`` in ``nsa.attention`` for one forward, so it
    works whatever that op's signature is in the commit under test.
    """
    from adapter_api import recording

    try:
        import nsa.attention as attention
    except ImportError:  # a commit without that module: the indices are not observable
        return None
    if not hasattr(attention, "select_blocks"):
        return None
    with recording(attention, "select_blocks") as seen:
        layer(x)
    return seen[-1] if seen else None
