"""The Triton selection-attention kernels (``nsa.ops.triton_selection``), forward and backward.

``ops``: float32 on CPU through Triton's interpreter (one subprocess; see ``triton_build``): outputs
and dq/dk/dv against :func:`nsa.ops.selection_attention` in float64, max error <= 1e-5 relative to
the reference's largest value, for block lists from :func:`nsa.ops.select_blocks` and hand-made
ones (holes, repeats, any order, blocks past the keys), head counts that are not powers of two, and
block lists long enough that the dK/dV kernel splits them into segments that add atomically. The
kernels also build for sm_90 without register spills. ``gpu``: bf16 at the paper's shape against a
float32 reference.
"""

from __future__ import annotations

import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); its kernels cannot run")

from nsa.ops import select_blocks, selection_attention  # noqa: E402
from nsa.ops import triton_selection as tsel  # noqa: E402
from nsa.tests import triton_build  # noqa: E402
from nsa.tests.triton_build import H100_SHARED_BYTES, build_sm90, run_cases, usage  # noqa: E402

TOL = 1e-5

# name -> (B, T, G, h, d_k, d_v, sel_block_len, n_sel, block lists). Under the interpreter the dK/dV
# kernel takes segments of 32 queries: block 0's list (every query) crosses many.
CASES = {
    "B1-T100-G2-h3-dk16-dv24-l16-n4": (1, 100, 2, 3, 16, 24, 16, 4, "selected"),
    "B1-T130-G1-h4-dk32-dv16-l16-n5": (1, 130, 1, 4, 32, 16, 16, 5, "selected"),
    "B2-T40-G2-h1-dk16-dv16-l16-n3": (2, 40, 2, 1, 16, 16, 16, 3, "selected"),
    "B1-T70-G2-h2-dk16-dv16-l16-n5-hand-made": (1, 70, 2, 2, 16, 16, 16, 5, "hand-made"),
}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _case(name: str) -> dict:
    B, T, G, h, dk, dv, bs, n, lists = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(B, T, G * h, dk + 8, generator=gen, dtype=torch.float64)[..., :dk]  # strided, as projected
    k = torch.randn(B, T, G, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, G, dv, generator=gen, dtype=torch.float64)
    nb = -(-T // bs)
    if lists == "selected":
        idx = select_blocks(torch.randn(B, T, G, nb, generator=gen), sel_block_len=bs, n_sel=n)
    else:  # holes, repeats, any order, blocks past t and past the keys; the current block always there
        idx = torch.randint(-1, nb + 2, (B, T, G, n), generator=gen)
        idx[..., 0] = (torch.arange(T) // bs)[None, :, None]
    x64 = [x.clone().requires_grad_() for x in (q, k, v)]
    x32 = [x.float().requires_grad_() for x in (q, k, v)]
    ref = selection_attention(*x64, idx, sel_block_len=bs)
    out = tsel.selection_attention_triton(*x32, idx, sel_block_len=bs)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    result = {"o": _rel(out, ref), "dtype": float(out.dtype == torch.float32)}
    for key, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, x32, grad_out.float()),
                         torch.autograd.grad(ref, x64, grad_out)):
        result[key] = _rel(g, r)
    return result


def _inverted_lists() -> dict:
    """``query_lists`` against a plain loop over the selection."""
    gen = torch.Generator().manual_seed(11)
    B, T, G, n, nb = 2, 30, 2, 4, 5
    idx = select_blocks(torch.randn(B, T, G, nb, generator=gen), sel_block_len=8, n_sel=n)
    qt, offsets = tsel.query_lists(idx, nb)
    ok = True
    for b in range(B):
        for g in range(G):
            for j in range(nb):
                key = (b * G + g) * nb + j
                want = [t for t in range(T) if j in idx[b, t, g].tolist()]
                ok &= qt[offsets[key]:offsets[key + 1]].tolist() == want
    return {"equal": float(ok)}


def _module_case() -> dict:
    """A layer trained through the Triton selection route against the same layer on the reference
    route: output and the gradients of the input and of every parameter."""
    from nsa import routes

    route = routes.Route("triton-sparse", "test", tsel.selection_attention_triton)
    r = triton_build.layer_route_errors({"route_slc": route}, batch=1, T=100, n_sel=4)
    return {"o": r["o"], "grads": r["grads"]}


def compute_all() -> dict:
    return run_cases({**{name: (lambda n=name: _case(n)) for name in CASES}, "lists": _inverted_lists,
                      "module": _module_case})


interpreter_results = triton_build.interpreter_fixture("nsa.tests.test_triton_selection", compute_all)


@pytest.mark.ops
@pytest.mark.parametrize("name", list(CASES))
def test_triton_selection_matches_the_reference_in_interpreter(name, interpreter_results):
    r = triton_build.case(interpreter_results, name)
    assert r["dtype"] == 1.0, r
    for key in ("o", "dq", "dk", "dv"):
        assert r[key] <= TOL, f"{key}: max error {r[key]:.3g} > {TOL} relative ({r})"


@pytest.mark.ops
def test_selection_inverted_into_query_lists(interpreter_results):
    r = triton_build.case(interpreter_results, "lists")
    assert r == {"equal": 1.0}, r


@pytest.mark.ops
def test_layer_trained_through_the_triton_selection_matches_the_reference_route(interpreter_results):
    r = triton_build.case(interpreter_results, "module")
    assert r["o"] <= 1e-4 and r["grads"] <= 1e-4, r


@pytest.mark.ops
def test_routes_train_on_triton_selection_then_flex(monkeypatch):
    from nsa import override_settings, routes
    from nsa.ops import triton_attention as ta

    monkeypatch.setattr(ta, "available", lambda: True)  # the decision, on a machine without a GPU
    monkeypatch.setattr(tsel, "available", lambda: True)
    r = routes.route_slc("cuda", torch.bfloat16, 64, 128, 128, needs_grad=True)
    assert r.fn is tsel.selection_attention_triton and "backward" in r.reason
    with override_settings(use_triton=False):
        assert routes.route_slc("cuda", torch.bfloat16, 64, 128, 128, needs_grad=True).name == "flex-block-sparse"
    with override_settings(use_flex=False, use_triton=False):
        assert routes.route_slc("cuda", torch.bfloat16, 64, 128, 128, needs_grad=True).name == "packed"


@pytest.mark.ops
@pytest.mark.parametrize("d,h", [(128, 16), (192, 16), (32, 4)])
def test_triton_selection_builds_for_sm90_within_spill_bounds(d, h):
    """sm_90 builds at the library's options: no spill at d < 128; the dK/dV kernel at d=128 spills
    about 0.9 KB at its 4 warps (timed faster on the H100 than 8 warps without spill), 192 ~0.3 KB."""
    if tsel.triton is None or type(tsel._selection_fwd).__name__ == "InterpretedFunction":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process")
    pads = tsel._pads(h, d, 128 if d > 128 else d)
    hp = triton.next_power_of_2(h)
    types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "IDX": "*i32",
             "LSE": "*fp32", "DELTA": "*fp32", "DK_": "*fp32", "DV_": "*fp32", "QT": "*i64", "OFFS": "*i64",
             "scale": "fp32"}
    row = dict(G=4, HP=max(16, hp), **pads, BS=64, N=16)
    opt = tsel.kernel_options(hp, pads["DKP"], torch.device("cuda"))
    dkdv = dict(G=4, HP=hp, **pads, BS=64, BQ=opt["dkdv_queries"], SEG=opt["segment"])
    for kernel, const, warps, stages, spill in (
            (tsel._selection_fwd, row, opt["fwd_warps"], opt["fwd_stages"], 0),
            (tsel._selection_bwd_dq, row, opt["dq_warps"], opt["dq_stages"], 0),
            (tsel._selection_bwd_dkdv, dkdv, opt["dkdv_warps"], opt["dkdv_stages"], 0 if d < 128 else 1024)):
        used = usage(build_sm90(kernel, const, types, warps=warps, stages=stages))
        assert used["shared_bytes"] <= H100_SHARED_BYTES and used["spill_bytes"] <= spill, (kernel.__name__, used)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,G,h,dk,dv", [(1, 4096, 4, 16, 128, 128), (2, 3000, 2, 3, 64, 32)])
def test_triton_selection_bf16_values_and_grads(B, T, G, h, dk, dv, cuda, gen):
    if not tsel.available():
        pytest.skip("Triton or CUDA missing")
    bs, n = 64, 16
    q, k, v = (torch.randn(*s, generator=gen).to(cuda, torch.bfloat16)
               for s in ((B, T, G * h, dk), (B, T, G, dk), (B, T, G, dv)))
    idx = select_blocks(torch.randn(B, T, G, -(-T // bs), generator=gen).to(cuda), sel_block_len=bs, n_sel=n)
    x32 = [x.float().requires_grad_() for x in (q, k, v)]
    xb = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = selection_attention(*x32, idx, sel_block_len=bs)
    out = tsel.selection_attention_triton(*xb, idx, sel_block_len=bs)
    norm_rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert out.dtype == torch.bfloat16 and norm_rel(out, ref) <= 1e-2
    grad_out = torch.randn(out.shape, generator=gen).to(cuda, torch.bfloat16)
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, xb, grad_out),
                          torch.autograd.grad(ref, x32, grad_out.float())):
        assert torch.isfinite(g).all() and norm_rel(g, r) <= 2e-2, (name, norm_rel(g, r))


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before Triton's import
    import json

    print(json.dumps(compute_all()))
