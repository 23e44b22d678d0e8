"""Drive nsa-vibe through its adapter at tiny sizes on CPU; print one JSON record (for
tests/test_adapter_nsa_vibe.py, which runs this in a subprocess so that ``nsa`` is nsa-vibe's).

    python tests/nsa_vibe_probe.py CHECKOUT '{"NSA_PREFILL_BATCHED": "1", ...}'

CHECKOUT is a checkout of seconds-0/nsa-vibe; the JSON argument is the configuration's common_env.
The process must start with no NSA_* variables set: this script sets them itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CHECKOUT = Path(sys.argv[1]).resolve()
COMMON_ENV = json.loads(sys.argv[2])
sys.path.insert(0, str(CHECKOUT))  # its `nsa` before ours (ours is installed editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))

import torch  # noqa: E402

import adapter_api  # noqa: E402
import nsa  # noqa: E402

MODEL = {"dim": 32, "groups": 2, "heads_per_group": 2, "d_k": 8, "d_v": 8, "block_len": 4, "block_stride": 2,
         "sel_block_len": 4, "n_sel": 3, "window": 8}
B, T, P = 2, 24, 6  # T spans 6 selection blocks and 3 windows
RESERVES = {"NSA_SEL_PACK_RESERVE_N": "256", "NSA_SEL_PACK_RESERVE_L": "64", "NSA_VARLEN_RESERVE_N": "256",
            "NSA_VARLEN_RESERVE_K": "4096"}


def set_env(extra: dict) -> None:
    for name in [n for n in os.environ if n.startswith("NSA_")]:
        del os.environ[name]
    os.environ.update({k: str(v) for k, v in {**COMMON_ENV, **extra}.items()})


def build(extra_env: dict | None = None):
    set_env(extra_env or {})
    torch.manual_seed(0)
    return adapter.build_layer(MODEL, device="cpu", dtype="float32").eval()


def inputs(requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, MODEL["dim"], generator=g).requires_grad_(requires_grad)


def consistency(extra_env: dict | None = None) -> dict:
    """forward of all T tokens against prefill of P tokens + decode of the rest: max |diff| per position."""
    layer = build(extra_env)
    x = inputs()
    with torch.no_grad():
        y = adapter.forward(layer, x)
        y_p, cache = adapter.prefill(layer, x[:, :P], adapter.new_cache(layer, B, T))
        errs = [float((y_p - y[:, :P]).abs().max())]
        for t in range(P, T):
            y_t, cache = adapter.decode_step(layer, x[:, t:t + 1], cache)
            assert tuple(y_t.shape) == (B, 1, MODEL["dim"])
            errs.append(float((y_t[:, 0] - y[:, t]).abs().max()))
    return {"shape": list(y.shape), "prefix_err": errs[0], "decode_errs": errs[1:],
            "scale": float(y.abs().max()), "cache_tokens": int(cache.K_sel.shape[2])}


def reserves(extra_env: dict) -> dict:
    """One forward after a reset of the workspaces: its output, fallbacks, counters and reserves as read."""
    adapter.reset_workspaces()
    layer = build(extra_env)
    with torch.no_grad():
        y = adapter.forward(layer, inputs())
    routes = adapter.routes(layer)
    return {"y": y, "fallbacks": routes["fallbacks"]["counters"], "reserves": routes["reserves"]["detail"],
            "workspaces": adapter.workspace_stats()}


def backward() -> dict:
    adapter.reset_workspaces()
    layer = build()
    x = inputs(requires_grad=True)
    adapter.forward(layer, x).pow(2).mean().backward()
    return {"grad_finite": bool(torch.isfinite(x.grad).all()), "grad_nonzero": bool(x.grad.abs().sum() > 0),
            "fallbacks": adapter.routes(layer)["fallbacks"]["counters"]}


def one_query_causal_sdpa() -> dict:
    """What its attention_bgh (decode's window and compressed branches without flash-attn) does with
    one query and several keys: SDPA's is_causal=True mask is aligned top-left, so the query sees
    only the first key."""
    from nsa.kernels.flash_wrappers import attention_bgh

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g),
               torch.randn(1, 1, 5, 8, generator=g))
    out = attention_bgh(q, k, v, causal=True)[0, 0, 0]
    full = torch.softmax(q[0, 0] @ k[0, 0].T / 8 ** 0.5, dim=-1) @ v[0, 0]
    # Its packed selection attention makes the same call per row: over the selected tokens 4..7 and
    # 12..15 it returns the value of token 4.
    from nsa.core.attention_kernels import grouped_selection_attention_packed

    Q, K, V = (torch.randn(1, 1, 1, 2, 8, generator=g), torch.randn(1, 1, 16, 8, generator=g),
               torch.randn(1, 1, 16, 8, generator=g))
    sel = grouped_selection_attention_packed(Q, K, V, torch.tensor([[[[[4, 8], [12, 16]]]]]))[0, 0, 0]
    return {"vs_first_value": float((out - v[0, 0, 0]).abs().max()), "vs_all_keys": float((out - full).abs().max()),
            "selection_vs_first_selected_value": float((sel - V[0, 0, 4]).abs().max())}


adapter = adapter_api.load(adapter_api.adapter_path("nsa-vibe"))
record = {"nsa_path": [str(p) for p in nsa.__path__], "capabilities": adapter_api.capabilities(adapter),
          "install": adapter.INSTALL, "package": adapter.PACKAGE, "unsupported": {}}
for field, value in (("block_stride", 3), ("sel_block_len", 5), ("n_sel", 2), ("window", 0), ("phi", "mlp")):
    try:
        adapter.build_layer({**MODEL, field: value}, device="cpu", dtype="float32")
        record["unsupported"][field] = None
    except adapter_api.Unsupported as e:
        record["unsupported"][field] = str(e)

record["consistency"] = {"common_env": consistency()}
for branch in ("cmp", "sel", "win"):  # the gate forced onto one branch: which branch disagrees
    record["consistency"][branch] = consistency({"NSA_FORCE_BRANCH": branch})
record["one_query_causal_sdpa"] = one_query_causal_sdpa()

layer = build()
blocks = adapter.selected_blocks(layer, inputs())
record["selected_blocks"] = {"shape": list(blocks.shape), "dtype": str(blocks.dtype).replace("torch.", ""),
                             "min": int(blocks.min()), "max": int(blocks.max()),
                             # block 0 once it is complete (its batched prefill selects complete blocks only)
                             "block0_once_complete": bool((blocks[:, MODEL["sel_block_len"] - 1:] == 0).any(dim=-1).all()),
                             "none_before": bool((blocks[:, :MODEL["sel_block_len"] - 1] == -1).all()),
                             "last_row": blocks[0, -1, 0].tolist()}
routes = adapter.routes(layer)
record["routes"] = json.loads(json.dumps(routes))

none, presized = reserves({}), reserves(RESERVES)
record["reserves"] = {
    "max_abs_diff": float((none.pop("y") - presized.pop("y")).abs().max()),
    "none": none, "presized": presized,
}
record["backward"] = backward()
print(json.dumps(record))
