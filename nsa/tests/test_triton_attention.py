"""The Triton window/compressed attention kernels (forward and backward) against the references.

``ops``: float32 on CPU through Triton's interpreter, outputs and dq/dk/dv against
``nsa.ops.sliding_window_attention`` and ``nsa.ops.compressed_attention`` in float64, max error
<= 1e-4 relative to the reference's largest value (float16 cases: 3e-3; bf16 runs on GPU only, since
the interpreter's bf16 ``tl.dot`` is wrong). The interpreter must be switched on
(``TRITON_INTERPRET=1``) before Triton is first imported, and ``import nsa`` has imported it by the
time this module loads, so all interpreter cases run in one subprocess (``python -m
nsa.tests.test_triton_attention``, about 20-40 s on 2 cores) whose numbers the tests below check;
a process started with ``TRITON_INTERPRET=1`` computes them in place.
``gpu``: bf16 at realistic shapes against float32 references on the GPU.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); its kernels cannot run")

from nsa.ops import compressed_attention, sliding_window_attention  # noqa: E402
from nsa.ops import triton_attention as ta  # noqa: E402
from nsa.tests import triton_build  # noqa: E402
from nsa.tests.triton_build import H100_SHARED_BYTES, build_sm90, run_cases, usage  # noqa: E402

TOL = 1e-4  # float32 kernel vs float64 reference, max abs error / max |reference|

# name -> (kind, B, T, G, h, d_k, d_v, params). Shapes cross the interpreter's tiles (32 rows, 16 keys).
CASES = {
    "win-B2-T37-G2-h3-dk16-dv24-w16": ("win", 2, 37, 2, 3, 16, 24, {"window": 16}),
    "win-B1-T130-G2-h3-dk32-dv24-w1": ("win", 1, 130, 2, 3, 32, 24, {"window": 1}),
    "win-B1-T130-G1-h1-dk32-dv16-w64": ("win", 1, 130, 1, 1, 32, 16, {"window": 64}),
    "win-B2-T37-G1-h3-dk16-dv16-w64": ("win", 2, 37, 1, 3, 16, 16, {"window": 64}),
    "win-B2-T1-G2-h1-dk16-dv16-w16": ("win", 2, 1, 2, 1, 16, 16, {"window": 16}),
    "cmp-B2-T37-G2-h3-dk16-dv24-l8-d4": ("cmp", 2, 37, 2, 3, 16, 24, {"block_len": 8, "block_stride": 4}),
    "cmp-B1-T130-G1-h3-dk32-dv16-l8-d4": ("cmp", 1, 130, 1, 3, 32, 16, {"block_len": 8, "block_stride": 4}),
    "cmp-B1-T130-G2-h1-dk16-dv16-l16-d16": ("cmp", 1, 130, 2, 1, 16, 16, {"block_len": 16, "block_stride": 16}),
    "cmp-B2-T6-G1-h1-dk16-dv16-l8-d4-empty": ("cmp", 2, 6, 1, 1, 16, 16, {"block_len": 8, "block_stride": 4}),
    "any-B1-T50-G2-h2-dk16-dv24-stride3-offset2-w7": ("any", 1, 50, 2, 2, 16, 24,
                                                      {"key_stride": 3, "key_offset": 2, "window": 7}),
    # float16 (the half-precision casts; the interpreter's bf16 dot is wrong, so bf16 runs on GPU only)
    "win-B1-T37-G2-h3-dk16-dv24-w16-fp16": ("win", 1, 37, 2, 3, 16, 24, {"window": 16, "dtype": torch.float16}),
    "cmp-B1-T37-G2-h3-dk16-dv24-l8-d4-fp16": ("cmp", 1, 37, 2, 3, 16, 24,
                                              {"block_len": 8, "block_stride": 4, "dtype": torch.float16}),
}
TOL_FP16 = 3e-3  # float16 inputs and outputs (observed <= 6e-4: storage alone rounds at ~5e-4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _dense_reference(q, k, v, key_stride, key_offset, window, scale):
    """Masked dense attention over positioned keys; returns (o, lse)."""
    B, T, H, _ = q.shape
    S, G = k.shape[1], k.shape[2]
    h = H // G
    t = torch.arange(T)[:, None]
    kpos = torch.arange(S)[None, :] * key_stride + key_offset
    visible = (kpos <= t) & (t - kpos < window)
    s = torch.einsum("btghd,bsgd->bghts", q.reshape(B, T, G, h, -1), k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, G, h, T]
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    o = torch.einsum("bghts,bsgd->btghd", p, v).reshape(B, T, H, -1)
    return o, lse.permute(0, 3, 1, 2).reshape(B, T, H)


def _case_errors(name: str) -> dict:
    """Max relative errors of o, dq, dk, dv (and lse) for one case, float32 kernel vs float64 reference."""
    kind, B, T, G, h, dk, dv, params = CASES[name]
    params = dict(params)
    dtype = params.pop("dtype", torch.float32)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    S = T
    if kind == "cmp":
        l, d = params["block_len"], params["block_stride"]
        S = 0 if T < l else (T - l) // d + 1
    if kind == "any":
        S = T // params["key_stride"]
    # q is a strided view (a slice of a wider tensor), as from a fused projection.
    q = torch.randn(B, T, G * h, dk + 8, generator=gen)[..., :dk]
    k = torch.randn(B, S, G, dk, generator=gen)
    v = torch.randn(B, S, G, dv, generator=gen)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    grad_out = torch.randn(B, T, G * h, dv, generator=gen).to(dtype)
    x32 = [x.clone().requires_grad_() for x in (q, k, v)]
    x64 = [x.double().requires_grad_() for x in (q, k, v)]
    out = {}
    if kind == "win":
        o, lse = ta.triton_window_attention(*x32, window=params["window"], return_lse=True)
        ref = sliding_window_attention(*x64, window=params["window"])
    elif kind == "cmp":
        o, lse = ta.triton_compressed_attention(*x32, return_lse=True, **params)
        ref, _ = compressed_attention(*x64, **params)
        out["finite"] = float(torch.isfinite(o).all())
        out["empty_rows_zero"] = float((o[:, : params["block_len"] - 1] == 0).all())
    else:
        o, lse = ta.positioned_key_attention(*x32, return_lse=True, **params)
        ref, ref_lse = _dense_reference(*x64, scale=1 / math.sqrt(dk), **params)
        seen = torch.isfinite(ref_lse)
        out["lse"] = _rel(lse[seen], ref_lse[seen])
        out["lse_empty_is_-inf"] = float((lse[~seen] == float("-inf")).all())
    out["lse_dtype_float32"] = float(lse.dtype == torch.float32)
    out["out_dtype"] = float(o.dtype == dtype)
    out["o"] = _rel(o, ref)
    grads = torch.autograd.grad(o, x32, grad_out)
    ref_grads = torch.autograd.grad(ref, x64, grad_out.double(), allow_unused=True)
    for key, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        if g.numel() == 0:
            out[key] = 0.0
        else:  # an all-zero reference gradient (no visible key anywhere): the kernel's must be zero too
            out[key] = _rel(g, r) if r.abs().max() > 0 else float(g.abs().max())
    return out


def _skipping_errors() -> dict:
    """The kernels read only the key tiles (forward, dq) and query tiles (dk, dv) that rows can see:
    a NaN planted far outside every window must not reach any output (0 * NaN would spread it)."""
    gen = torch.Generator().manual_seed(7)
    B, T, G, h, dk, w, p = 1, 160, 1, 2, 16, 4, 80
    q, k, v = (torch.randn(B, T, G * h, dk, generator=gen), torch.randn(B, T, G, dk, generator=gen),
               torch.randn(B, T, G, dk, generator=gen))
    v[:, p] = float("nan")
    o = ta.triton_window_attention(q, k, v, window=w)
    # Rows far past the poisoned key: a kernel walking every key below t would turn them NaN.
    fwd_far = float(torch.isfinite(o[:, p + 40:]).all() and torch.isfinite(o[:, :p]).all())
    q, k, v = (x.clone().requires_grad_() for x in (q, k, torch.randn(B, T, G, dk, generator=gen)))
    o = ta.triton_window_attention(q, k, v, window=w)
    grad_out = torch.randn(o.shape, generator=gen)
    grad_out[:, p] = float("nan")
    dq, dkk, dvv = torch.autograd.grad(o, (q, k, v), grad_out)
    # dk/dv of keys far below p (and above it) and dq of rows far from p stay finite.
    bwd_far = float(all(torch.isfinite(x[:, : p - 40]).all() and torch.isfinite(x[:, p + 40:]).all()
                        for x in (dq, dkk, dvv)))
    return {"fwd_far_rows_finite": fwd_far, "bwd_far_rows_finite": bwd_far}


def _module_errors() -> dict:
    """The layer with its compressed branch on the Triton route (what ``routes.route_cmp`` picks on a
    GPU for half dtypes; the selection then comes from ``select_from_compressed``) against the same
    layer on the reference route: output and the gradients of the input and of every parameter."""
    from nsa import routes

    route = routes.Route("triton-compressed", "test", ta.triton_compressed_attention)
    r = triton_build.layer_route_errors({"route_cmp": route}, batch=2, T=70, n_sel=3)
    return {"o": r["o"], "grads": r["grads"]}


def compute_all() -> dict:
    special = {"skipping": _skipping_errors, "module": _module_errors}
    return run_cases({**{name: (lambda n=name: _case_errors(n)) for name in CASES}, **special})


interpreter_results = triton_build.interpreter_fixture("nsa.tests.test_triton_attention", compute_all)


@pytest.mark.ops
@pytest.mark.parametrize("name", list(CASES))
def test_triton_attention_matches_reference_in_interpreter(name, interpreter_results):
    r = triton_build.case(interpreter_results, name)
    tol = TOL_FP16 if name.endswith("fp16") else TOL
    for key in ("o", "dq", "dk", "dv", "lse"):
        if key in r:
            assert r[key] <= tol, f"{key}: max error {r[key]:.3g} > {tol} relative ({r})"
    for flag in ("finite", "empty_rows_zero", "lse_empty_is_-inf", "lse_dtype_float32", "out_dtype"):
        if flag in r:
            assert r[flag] == 1.0, f"{flag} fails ({r})"


@pytest.mark.ops
def test_layer_on_the_triton_compressed_route_matches_the_reference_route(interpreter_results):
    r = triton_build.case(interpreter_results, "module")
    assert r["o"] <= TOL and r["grads"] <= TOL, r


@pytest.mark.ops
def test_routes_take_the_triton_compressed_kernel_on_a_gpu_for_half_dtypes(monkeypatch):
    from nsa import override_settings, routes

    monkeypatch.setattr(ta, "available", lambda: True)  # the decision, on a machine without a GPU
    assert routes.route_cmp("cuda", torch.bfloat16, 128, 128).fn is ta.triton_compressed_attention
    assert routes.route_cmp("cuda", torch.float32, 128, 128).name == "reference"
    assert routes.route_cmp("cpu", torch.bfloat16, 128, 128).name == "reference"
    with override_settings(use_triton=False):
        assert routes.route_cmp("cuda", torch.bfloat16, 128, 128).name == "reference"
    # The window: the Triton kernel first, with or without autograd; flex where Triton is off.
    for needs_grad in (True, False):
        assert routes.route_win("cuda", torch.bfloat16, 128, 128, needs_grad=needs_grad).fn is ta.triton_window_attention
        with override_settings(use_flex=False):
            assert routes.route_win("cuda", torch.bfloat16, 128, 128, needs_grad=needs_grad).name == "triton-window"
            assert routes.route_win("cuda", torch.float32, 128, 128, needs_grad=needs_grad).name == "reference"
        with override_settings(use_triton=False):
            assert routes.route_win("cuda", torch.bfloat16, 128, 128, needs_grad=needs_grad).name == "flex-sliding-window"
            with override_settings(use_flex=False):
                assert routes.route_win("cuda", torch.bfloat16, 128, 128, needs_grad=needs_grad).name == "reference"
    assert routes.route_win("cuda", torch.float32, 128, 128, needs_grad=False).name == "reference"


@pytest.mark.ops
def test_triton_attention_skips_invisible_tiles_in_interpreter(interpreter_results):
    r = triton_build.case(interpreter_results, "skipping")
    assert r == {"fwd_far_rows_finite": 1.0, "bwd_far_rows_finite": 1.0}


@pytest.mark.ops
def test_triton_attention_rejects_bad_arguments():
    q, k, v = torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="window"):
        ta.triton_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="block_stride"):
        ta.triton_compressed_attention(q, k, v, block_len=8, block_stride=16)
    with pytest.raises(ValueError, match="k.shape"):
        ta.triton_window_attention(q, k[..., :8], v, window=4)
    if not ta._interpreting():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            ta.triton_window_attention(q, k, v, window=4)


# --- compiled (not interpreted) kernels, built for sm_90 without a GPU -------------------------------

_POINTERS = ("Q", "K", "V", "O", "DO", "DK_", "DV_", "DQ")


@pytest.mark.ops
@pytest.mark.parametrize("windowed", [True, False], ids=["window", "compressed"])
def test_triton_attention_builds_for_sm90_without_a_gpu(windowed):
    """The bf16 d=128 kernels at their first-choice GPU tiles compile to sm_90 machine code and fit in
    an H100's shared memory: catches what only the compiler rejects, on a CPU-only machine. (They
    spill at 4 warps, 0.7-2.5 KB under Triton 3.9, and still ran fastest on the H100: not checked.)"""
    if ta._interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process")
    opt = ta._tile_options(torch.device("cuda"), torch.bfloat16, 128, 128, windowed)[0]
    types = {**{p: "*bf16" for p in _POINTERS}, "LSE": "*fp32", "DELTA": "*fp32", "qk_scale": "fp32", "scale": "fp32"}
    for kernel, which in ((ta._fwd, "fwd"), (ta._bwd_dkdv, "dkdv"), (ta._bwd_dq, "dq")):
        block_m, block_n, warps, stages = opt[which]
        const = dict(G=4, HPG=16, DK=128, DKP=128, DV=128, DVP=128, BLOCK_M=block_m, BLOCK_N=block_n,
                     WINDOWED=windowed, PREC="tf32")
        if which == "dkdv":  # the compressed branch's row segments add atomically into float32
            const["ATOMIC"] = not windowed
            types = {**types, "DK_": "*bf16" if windowed else "*fp32", "DV_": "*bf16" if windowed else "*fp32"}
        used = usage(build_sm90(kernel, const, types, warps=warps, stages=stages))
        assert used["shared_bytes"] <= H100_SHARED_BYTES, (which, used)


# --- GPU: bf16 at realistic shapes ---------------------------------------------------------------

GPU_CASES = [  # kind, B, T, G, h, d_k, d_v, params
    ("win", 1, 4096, 4, 4, 128, 128, {"window": 512}),
    ("win", 2, 4096, 2, 8, 128, 128, {"window": 512}),
    ("win", 1, 1000, 2, 3, 192, 128, {"window": 100}),
    ("cmp", 1, 4096, 4, 4, 128, 128, {"block_len": 32, "block_stride": 16}),
    ("cmp", 2, 4096, 2, 8, 128, 128, {"block_len": 32, "block_stride": 16}),
    ("cmp", 1, 1000, 2, 3, 192, 128, {"block_len": 32, "block_stride": 16}),
]


def _gpu_id(c):
    kind, B, T, G, h, dk, dv, params = c
    return f"{kind}-B{B}-T{T}-G{G}-h{h}-dk{dk}-dv{dv}-" + "-".join(f"{k}{v}" for k, v in params.items())


def _norm_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_id)
def test_triton_attention_bf16_matches_float32_reference(case, cuda, gen):
    if not ta.available():
        pytest.skip("Triton is not installed")
    kind, B, T, G, h, dk, dv, params = case
    S = T if kind == "win" else (T - params["block_len"]) // params["block_stride"] + 1
    q, k, v = (torch.randn(*shape, generator=gen).to(cuda, torch.bfloat16)
               for shape in ((B, T, G * h, dk), (B, S, G, dk), (B, S, G, dv)))
    grad_out = torch.randn(B, T, G * h, dv, generator=gen).to(cuda, torch.bfloat16)
    x32 = [x.float().requires_grad_() for x in (q, k, v)]
    xb = [x.clone().requires_grad_() for x in (q, k, v)]
    if kind == "win":
        ref = sliding_window_attention(*x32, **params)
        out = ta.triton_window_attention(*xb, **params)
    else:
        ref, _ = compressed_attention(*x32, **params)
        out = ta.triton_compressed_attention(*xb, **params)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _norm_rel(out, ref) <= 1e-2
    ref_grads = torch.autograd.grad(ref, x32, grad_out.float())
    grads = torch.autograd.grad(out, xb, grad_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert _norm_rel(g, r) <= 2e-2, f"{name}: {_norm_rel(g, r):.3g}"


@pytest.mark.gpu
def test_triton_attention_float32_exact_on_gpu(cuda, gen):
    """float32 inputs take IEEE float32 dots (no TF32): errors at the float32 level."""
    for kind in ("win", "cmp"):
        params = {"window": 16} if kind == "win" else {"block_len": 8, "block_stride": 4}
        S = 300 if kind == "win" else (300 - 8) // 4 + 1
        q = torch.randn(2, 300, 6, 32, generator=gen).to(cuda)
        k, v = torch.randn(2, S, 2, 32, generator=gen).to(cuda), torch.randn(2, S, 2, 24, generator=gen).to(cuda)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        x64 = [x.double().requires_grad_() for x in (q, k, v)]
        if kind == "win":
            out, ref = ta.triton_window_attention(*xs, **params), sliding_window_attention(*x64, **params)
        else:
            out, ref = ta.triton_compressed_attention(*xs, **params), compressed_attention(*x64, **params)[0]
        assert _rel(out, ref) <= TOL, kind
        go = torch.randn(out.shape, generator=gen).to(cuda)
        for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, xs, go), torch.autograd.grad(ref, x64, go.double())):
            assert _rel(g, r) <= TOL, f"{kind} {name}: {_rel(g, r):.3g}"


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before Triton's import
    print(json.dumps(compute_all()))
