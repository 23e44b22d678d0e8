"""FlashAttention-2 routes against the reference routes.

CPU: the segment folding of ``compressed_attention_fa2`` checked with a plain causal SDPA kernel
(float32, ``atol = rtol = 1e-5``), and what ``nsa.backends()`` reports there. GPU (``gpu`` marker,
skipped without CUDA): the real FA-2 routes in bf16 against the reference, relative error <= 1e-2
of the reference's scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nsa
from nsa import ops
from nsa.routes import route_cmp, route_win
from nsa.ops import compressed as compressed_mod
from nsa.ops import naive

from .conftest import max_rel_err

pytestmark = pytest.mark.fa2_varlen

TOL = {"atol": 1e-5, "rtol": 1e-5}
BF16_REL = 1e-2


def causal_sdpa_gqa(q, k, v):
    """Plain causal attention, ``[B, heads, N, d]`` with GQA by repeat_interleave (math kernel)."""
    r = q.shape[1] // k.shape[1]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-workspace", "autograd"])
@pytest.mark.parametrize("B,T,G,h,dk,dv,l,d", [
    (1, 5, 1, 1, 4, 4, 8, 4),     # T < l: no compressed token
    (2, 8, 2, 1, 4, 4, 8, 4),     # T == l
    (2, 23, 2, 3, 8, 6, 8, 4),    # T not a multiple of d, d_k != d_v
    (1, 37, 3, 2, 4, 4, 6, 2),
    (2, 40, 1, 4, 8, 8, 8, 8),    # d == l
    (1, 50, 2, 2, 4, 4, 32, 16),
])
def test_segment_folding_equals_compressed_attention(grad, B, T, G, h, dk, dv, l, d, gen, qkv):
    N = naive.num_cmp(T - 1, block_len=l, block_stride=d)
    q, k, v = qkv(B, T, N, G, h, dk, dv, generator=gen)
    ref, _ = ops.compressed_attention(q, k, v, block_len=l, block_stride=d)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        got = compressed_mod.compressed_attention_fa2(q, k, v, block_len=l, block_stride=d, attn_fn=causal_sdpa_gqa)
    else:
        with torch.no_grad():
            got = compressed_mod.compressed_attention_fa2(q, k, v, block_len=l, block_stride=d, attn_fn=causal_sdpa_gqa)
        if N:
            assert nsa.workspace_stats()["varlen"]["requests"] == 3  # q, k, v packed in the workspace
    assert got.shape == (B, T, G * h, dv)
    torch.testing.assert_close(got, ref.detach(), **TOL)


def test_segment_folding_repeated_calls_reuse_workspace(gen, qkv):
    """Back-to-back calls through the shared workspace do not corrupt each other's results."""
    outs, refs = [], []
    with torch.no_grad():
        for T in (30, 22, 30):
            N = naive.num_cmp(T - 1, block_len=8, block_stride=4)
            q, k, v = qkv(2, T, N, 2, 2, 4, 4, generator=gen)
            outs.append(compressed_mod.compressed_attention_fa2(q, k, v, block_len=8, block_stride=4, attn_fn=causal_sdpa_gqa))
            refs.append(ops.compressed_attention(q, k, v, block_len=8, block_stride=4)[0])
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **TOL)
    assert nsa.workspace_stats()["varlen"]["growth_events"] == 0  # 22 < 30: never grew


def test_backends_report_reference_routes_on_cpu(override):
    with override(use_fa2=True):
        b = nsa.backends("cpu", torch.float32)
        assert route_cmp("cpu", torch.bfloat16, 64, 64).fn is None
        assert route_win("cpu", torch.bfloat16, 64, 64).name == "reference"
    assert b["cmp"]["route"] == "reference" and b["win"]["route"] == "reference"
    assert b["cmp"]["reason"] and b["win"]["reason"]
    if not torch.cuda.is_available():
        assert b["fa2"] == {"available": False, "provider": "none", "reason": "no CUDA device"}
    with override(use_fa2=False):
        assert "NSA_USE_FA2=0" in nsa.backends("cpu")["cmp"]["reason"]
    with override(use_sel_pack=False):
        assert nsa.backends("cpu")["slc"]["route"] == "gather"
    with override(use_sel_pack=True):
        assert nsa.backends("cpu")["slc"]["route"] == "packed"


# --- GPU --------------------------------------------------------------------------------------------------

def _fa2_or_skip(route):
    if route.fn is None or not route.name.startswith("fa2"):
        pytest.skip(f"FA-2 route not taken on this machine: {route.reason}")
    return route


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,G,h,d_head,l,d", [(1, 31, 1, 1, 64, 32, 16), (2, 100, 2, 4, 64, 32, 16),
                                                (2, 513, 4, 4, 128, 32, 16), (1, 300, 2, 8, 64, 16, 8)])
def test_fa2_cmp_route_equals_reference(B, T, G, h, d_head, l, d, cuda, override, gen, qkv):
    with override(use_fa2=True, use_fa2_cmp=True):
        route = _fa2_or_skip(route_cmp(cuda, torch.bfloat16, d_head, d_head))
        N = naive.num_cmp(T - 1, block_len=l, block_stride=d)
        q, k, v = qkv(B, T, N, G, h, d_head, d_head, dtype=torch.bfloat16, device=cuda, generator=gen)
        got = route.fn(q, k, v, block_len=l, block_stride=d)
    ref, _ = ops.compressed_attention(q.float(), k.float(), v.float(), block_len=l, block_stride=d)
    assert torch.all(got[:, : l - 1] == 0)
    if N:
        assert max_rel_err(got, ref) <= BF16_REL


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,G,h,d_head,w", [(1, 1, 1, 1, 64, 512), (2, 100, 2, 4, 64, 1), (2, 700, 2, 2, 64, 512),
                                              (1, 300, 4, 4, 128, 37), (3, 129, 1, 8, 64, 64)])
def test_fa2_win_route_equals_reference(B, T, G, h, d_head, w, cuda, override, gen, qkv):
    with override(use_fa2=True, use_fa2_win=True):
        route = _fa2_or_skip(route_win(cuda, torch.bfloat16, d_head, d_head))
        q, k, v = qkv(B, T, T, G, h, d_head, d_head, dtype=torch.bfloat16, device=cuda, generator=gen)
        got = route.fn(q, k, v, window=w)
    ref = ops.sliding_window_attention(q.float(), k.float(), v.float(), window=w)
    assert torch.isfinite(got).all() and max_rel_err(got, ref) <= BF16_REL


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 40, 257, 1024])
def test_fa2_module_equals_reference_routes(T, cuda, override, gen):
    cfg = nsa.NSAConfig(dim=256, groups=2, heads_per_group=4, d_k=32, d_v=32, block_len=32, block_stride=16,
                        sel_block_len=64, n_sel=4, window=128)
    attn = nsa.NSAAttention(cfg).to(cuda, torch.bfloat16)
    x = torch.randn(2, T, cfg.dim, generator=gen).to(cuda, torch.bfloat16)
    with torch.no_grad():
        # Triton off on both sides: selection then scores by the same route, and only the FA-2
        # branches differ (Triton's float32 logits and the reference's bf16 ones pick differently
        # at near ties, which the spec's bf16 tolerance does not cover).
        with override(use_fa2=True, use_flex=False, use_triton=False):
            names = {b: nsa.backends(cuda, torch.bfloat16, 32, 32)[b]["route"] for b in ("cmp", "win")}
            got = attn(x)
        with override(use_fa2=False, use_flex=False, use_triton=False):  # the reference routes
            ref = attn(x)
    if not all(n.startswith("fa2") for n in names.values()):
        pytest.skip(f"FA-2 routes not taken on this machine: {names}")
    assert torch.isfinite(got).all() and max_rel_err(got, ref) <= BF16_REL


@pytest.mark.gpu
def test_fa2_module_backward_matches_reference(cuda, override, gen):
    cfg = nsa.NSAConfig(dim=128, groups=2, heads_per_group=2, d_k=32, d_v=32, block_len=16, block_stride=8,
                        sel_block_len=64, n_sel=4, window=64)
    attn = nsa.NSAAttention(cfg).to(cuda, torch.bfloat16)
    x = torch.randn(1, 300, cfg.dim, generator=gen).to(cuda, torch.bfloat16)
    grads = []
    for fa2 in (True, False):
        xg = x.clone().requires_grad_()
        with override(use_fa2=fa2, use_flex=False, use_triton=False):  # fa2=False: the reference routes
            attn(xg).float().square().sum().backward()
        grads.append(xg.grad.float())
    assert torch.isfinite(grads[0]).all() and max_rel_err(grads[0], grads[1]) <= 3e-2
