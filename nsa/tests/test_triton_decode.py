"""The fused Triton decode step (``nsa.ops.triton_decode``) against the torch step's ops.

``ops``: float32 on CPU through Triton's interpreter (one subprocess; see ``triton_build``):
- the op on random caches against the references composed in float64 (``compressed_attention`` at
  the position, ``selection_scores`` with the overlap matrix, ``select_blocks``,
  ``selection_attention``, the window ring, the gates): output max error <= 1e-5 relative to the
  largest value, blocks equal, at positions before the first compressed token, on an emitting step,
  inside an unwrapped and a wrapped window ring, and across splits and score tiles;
- the layer's decode steps on the fused route (the token's work by the torch ops, and by its kernel,
  ``triton_decode_token``) against the same steps on the torch route, from one prefill, with a
  control (negated compressed-branch queries) that must differ, and compiled (``compile_decode``,
  fullgraph) against eager.
The kernels also build for sm_90 without register spills; on a GPU, bf16 steps against the torch step.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); its kernels cannot run")

from nsa.ops import compressed_attention, select_blocks, selection_attention, selection_scores  # noqa: E402
from nsa.ops import triton_decode as td  # noqa: E402
from nsa.ops import triton_decode_token as tt  # noqa: E402
from nsa.ops.selection import overlap_matrix  # noqa: E402
from nsa.ops.window import ring_window_attention  # noqa: E402
from nsa.tests import triton_build  # noqa: E402
from nsa.tests.triton_build import H100_SHARED_BYTES, build_sm90, run_cases, usage  # noqa: E402

TOL = 1e-5

# name -> (B, G, h, d_k, d_v, l, d, l_sel, n_sel, S (cache length), W (ring), positions)
OP_CASES = {
    # 149 compressed slots: 10 splits of 16 under the interpreter, 3 score tiles of 64 tokens
    "B2-G2-h2-dk16-dv16-l8-d4-sel16-n4": (2, 2, 2, 16, 16, 8, 4, 16, 4, 600, 24, [3, 7, 11, 20, 333, 599]),
    "B1-G1-h4-dk32-dv16-l16-d8-sel32-n5": (1, 1, 4, 32, 16, 16, 8, 32, 5, 300, 40, [15, 39, 40, 120, 299]),
    "B1-G2-h1-dk16-dv32-l12-d4-sel16-n3": (1, 2, 1, 16, 32, 12, 4, 16, 3, 200, 16, [0, 11, 64, 199]),
    "B2-G1-h2-dk16-dv16-l12-d4-sel16-n3-no-cmp-slot": (2, 1, 2, 16, 16, 12, 4, 16, 3, 10, 10, [0, 9]),  # N = 0
}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _op_case(name: str, pos: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The op on random caches (rounded to ``dtype``, on ``device``) against the reference ops in
    float64 on those same values."""
    B, G, h, dk, dv, l, d, sel, n, S, W, _ = OP_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{pos}".encode()))
    H = G * h
    N = (S - 1 + 1 - l) // d + 1  # the cache's compressed slots (NSAAttention.new_cache)
    nb = -(-S // sel)

    def r(*shape):  # values exactly representable in dtype
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).double()

    q, q_rope = r(B, 1, H, dk + 8)[..., :dk], r(B, 1, H, dk)  # q strided, as projected
    gates = torch.rand(B, 1, H, 3, generator=gen, dtype=torch.float64).to(dtype).double()
    k_cmp, v_cmp, k_slc, v_slc = r(B, N, G, dk), r(B, N, G, dv), r(B, S, G, dk), r(B, S, G, dv)
    k_win, v_win = r(B, W, G, dk), r(B, W, G, dv)
    p_t = torch.tensor([pos])
    # the references, float64
    o_cmp, p = compressed_attention(q, k_cmp, v_cmp, block_len=l, block_stride=d, positions=p_t)
    scores = selection_scores(p, groups=G, block_len=l, block_stride=d, sel_block_len=sel, num_blocks=nb,
                              overlap=overlap_matrix(N, nb, l, d, sel, torch.device("cpu"), torch.float64))
    ref_idx = select_blocks(scores, sel_block_len=sel, n_sel=n, positions=p_t)
    o_slc = selection_attention(q_rope, k_slc, v_slc, ref_idx, sel_block_len=sel, positions=p_t)
    o_win = ring_window_attention(q_rope, k_win, v_win, p_t)  # tested against the per-token window
    ref = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    x = [t.to(device, dtype) for t in (q, q_rope, gates, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)]
    o, idx = td.decode_attention(*x, p_t.to(device), block_len=l, block_stride=d, sel_block_len=sel, n_sel=n, num_blocks=nb)
    o, idx = o.cpu(), idx.cpu()
    same = (idx == ref_idx).all(-1)  # [B, 1, G]: rows whose blocks agree
    # Where rounding reorders a near tie, the blocks picked must score (in float64) as the reference's.
    picked = torch.gather(scores, -1, idx.clamp_min(0)).masked_fill(idx < 0, 0).sum(-1)
    ref_picked = torch.gather(scores, -1, ref_idx.clamp_min(0)).masked_fill(ref_idx < 0, 0).sum(-1)
    rows = same.repeat_interleave(h, dim=2)  # [B, 1, H]
    return {"o": _rel(o[rows], ref[rows]) if rows.any() else 0.0, "blocks_equal": float(same.float().mean()),
            "picked_scores": _rel(picked, ref_picked), "dtype": float(o.dtype == dtype)}


def _layer_case() -> dict:
    """Decode steps of the layer on the fused route against the torch route, from one prefill."""
    from nsa import NSAAttention, NSAConfig, routes

    cfg = NSAConfig(dim=32, groups=2, heads_per_group=2, d_k=16, d_v=16, block_len=8, block_stride=4,
                    sel_block_len=16, n_sel=4, window=24)
    torch.manual_seed(3)
    layer = NSAAttention(cfg)
    gen = torch.Generator().manual_seed(4)
    prefix, steps = 150, 6  # steps 150..155 cross a compressed-token emission and a block boundary
    x = torch.randn(2, prefix + steps, 32, generator=gen)
    real = routes.route_decode

    def run(fn, prologue=None):
        routes.route_decode = lambda *a, **k: routes.Route("test", "test", fn, prologue=prologue)
        try:
            cache = layer.new_cache(2, 200)
            layer.prefill(x[:, :prefix], cache)
            return torch.cat([layer.decode_step(x[:, t:t + 1], cache) for t in range(prefix, prefix + steps)], 1)
        finally:
            routes.route_decode = real

    ref = run(None)
    got = run(td.decode_attention)
    # and with the token's work in its kernel too (the route's prologue), as on a GPU
    token = run(td.decode_attention, tt.prepare_token)

    # The control: negated compressed-branch queries (other scores, other blocks) must show.
    control = run(lambda q, *rest, **kw: td.decode_attention(-q, *rest, **kw))
    # torch.compile (compile_decode) keeps the ops whole: one graph, the same outputs.
    layer.compile_decode(backend="eager", fullgraph=True)
    try:
        compiled = run(td.decode_attention, tt.prepare_token)
    finally:
        layer._compiled_decode = None
    return {"o": _rel(got, ref), "token": _rel(token, ref), "control": _rel(control, ref),
            "compiled": _rel(compiled, token)}


def compute_all() -> dict:
    return run_cases({**{f"{name}-pos{p}": (lambda name=name, p=p: _op_case(name, p))
                         for name, c in OP_CASES.items() for p in c[-1]},
                      "layer": _layer_case})


interpreter_results = triton_build.interpreter_fixture("nsa.tests.test_triton_decode", compute_all)


@pytest.mark.ops
@pytest.mark.parametrize("case", [f"{name}-pos{p}" for name, c in OP_CASES.items() for p in c[-1]])
def test_decode_attention_matches_the_reference_ops_in_interpreter(case, interpreter_results):
    r = triton_build.case(interpreter_results, case)
    assert r["o"] <= TOL and r["blocks_equal"] == 1.0 and r["dtype"] == 1.0, r
    assert r["picked_scores"] <= 1e-12, r


def test_cases_make_the_selection_choose():
    """At least one case's position has more candidate blocks than forced ones and fewer slots than
    candidates, so a wrong score would pick a wrong block (the op cases' blocks are compared)."""
    name = "B2-G2-h2-dk16-dv16-l8-d4-sel16-n4"
    _, _, _, _, _, _, _, sel, n, _, _, positions = OP_CASES[name]
    assert any(p // sel + 1 > n > 3 for p in positions)


@pytest.mark.ops
def test_layer_decode_on_the_fused_route_matches_the_torch_route_in_interpreter(interpreter_results):
    r = triton_build.case(interpreter_results, "layer")
    assert r["o"] <= 1e-5 and r["token"] <= 1e-5, r
    assert r["control"] > 1e-3, r  # the comparison sees wrong queries
    assert r["compiled"] <= 1e-6, r


def test_route_decode_takes_triton_on_a_gpu_for_half_dtypes(monkeypatch):
    from nsa import override_settings, routes

    monkeypatch.setattr(routes.triton_attention, "available", lambda: True)
    args = (64, 4, 128, 128, 32, 16, 64)
    fused = routes.route_decode("cuda", torch.bfloat16, *args)
    assert fused.fn is td.decode_attention and fused.prologue is tt.prepare_token
    assert routes.route_decode("cuda", torch.float32, *args).fn is None
    assert routes.route_decode("cuda", torch.float32, *args).prologue is None
    assert routes.route_decode("cpu", torch.bfloat16, *args).fn is None
    assert "power of two" in routes.route_decode("cuda", torch.bfloat16, 12, 4, 128, 128, 32, 16, 64).reason
    with override_settings(use_triton=False):
        assert routes.route_decode("cuda", torch.bfloat16, *args).fn is None
    b = routes.backends("cuda", torch.bfloat16, 128, 128, 64, groups=4, heads_per_group=16)
    assert b["decode"]["route"] == "triton-fused"
    assert routes.backends("cpu")["decode"]["route"].startswith("cached-masked-matmul")


def test_op_cases_take_both_compressed_paths():
    """The interpreter cases cover one pass with the scores and top-n in the same program
    (``_dec_front``), and splits merged by the reduce, with the scores and top-n kernels apart."""
    cpu = torch.device("cpu")
    front = [-(-max((S - l) // d + 1, 1) // 16) <= td.single_pass_tiles(cpu)
             and triton.next_power_of_2(max(-(-S // sel), 16)) <= td.front_blocks(cpu)
             for _, _, _, _, _, l, d, sel, _, S, _, _ in OP_CASES.values()]
    assert any(front) and not all(front), front


@pytest.mark.ops
@pytest.mark.parametrize("d_k,d_v,h", [(192, 128, 16), (128, 128, 16), (32, 32, 4)])
def test_decode_kernels_build_for_sm90_without_spilling(d_k, d_v, h):
    """At the shapes and warps ``decode_attention`` launches on a GPU (the paper's layer and the seed's)."""
    if td._interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process")
    hp, dkp, dvp = max(16, h), td._pad(d_k), td._pad(d_v)
    common = dict(G=4, HPG=h, HP=hp, DK=d_k, DKP=dkp, PREC="tf32")
    ptrs = {name: "*fp32" for name in ("PM", "PL", "PACC", "OC", "LSE2", "SC")}
    ptrs.update({name: "*bf16" for name in ("Q", "K", "V", "KS", "VS", "KW", "VW", "GATES", "O")})
    ptrs.update({"POS": "*i64", "IDX": "*i64", "qk_scale": "fp32"})
    warps, gpu = td.kernel_warps(dkp), torch.device("cuda")
    # the reduce's most splits; the seed layer's gated merge (16 blocks, 8 window tiles)
    merge = {"merge16": td.merge_launch((16,), dvp, gpu), "merge24": td.merge_launch((16, 8), dvp, gpu)}
    warps.update({name: m.pop("num_warps") for name, m in merge.items()})
    kernels = [("cmp", td._dec_cmp, dict(common, DV=d_v, DVP=dvp, L=32, D=16, BLOCK_N=64, FINAL=False)),
               ("cmp", td._dec_cmp, dict(common, DV=d_v, DVP=dvp, L=32, D=16, BLOCK_N=64, FINAL=True)),
               ("merge16", td._dec_cmp_reduce, dict(merge["merge16"], HP=hp, DVP=dvp, NSPLIT=16)),
               ("front", td._dec_front, dict(common, DV=d_v, DVP=dvp, L=32, D=16, SEL=64, NSEL=16, NSP=16,
                                             NBP=td.front_blocks(gpu), BLOCK_N=64)),
               ("scores", td._dec_scores, dict(common, L=32, D=16, SEL=64, NBT=16, BLOCK_N=64)),
               ("sparse", td._dec_sparse, dict(common, DV=d_v, DVP=dvp, SEL=64, NSEL=16)),
               ("merge24", td._dec_combine, dict(merge["merge24"], G=4, HPG=h, HP=hp, DV=d_v, DVP=dvp, NSEL=16,
                                                 NPART=24))]
    for name, kernel, constexprs in kernels:
        used = usage(build_sm90(kernel, constexprs, ptrs, warps=warps[name], stages=2))
        assert used["shared_bytes"] <= H100_SHARED_BYTES and used["spill_bytes"] == 0, (kernel.__name__, used)


# --- GPU: bf16 at real shapes, and inside a CUDA graph ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OP_CASES))
def test_decode_attention_bf16_matches_the_reference_ops(name, cuda):
    """bf16 on the GPU (tf32 dots, bf16 probabilities into P.V) against float64 on the same values.
    Blocks: equal where no near tie; where rounding reorders one, the picked blocks score the same."""
    for pos in OP_CASES[name][-1]:
        r = _op_case(name, pos, cuda, torch.bfloat16)
        assert r["o"] <= 2e-2 and r["blocks_equal"] >= 0.5 and r["picked_scores"] <= 1e-3, (pos, r)


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,h,dk,dv,context", [(1, 4, 16, 192, 128, 4000), (8, 2, 4, 32, 32, 3000)])
def test_fused_decode_replays_in_a_cuda_graph(B, G, h, dk, dv, context, cuda):
    """The layer's compiled fused step (as users deploy decode) captured in a CUDA graph replays to
    the same step's outputs run without the graph, bit for bit (no atomics in the decode kernels)."""
    from nsa import NSAAttention, NSAConfig, backends

    cfg = NSAConfig(dim=256, groups=G, heads_per_group=h, d_k=dk, d_v=dv, block_len=32, block_stride=16,
                    sel_block_len=64, n_sel=16, window=512)
    assert backends(cuda, torch.bfloat16, dk, dv, 64, groups=G, heads_per_group=h)["decode"]["route"] == "triton-fused"
    torch.manual_seed(0)
    layer = NSAAttention(cfg).to(cuda, torch.bfloat16)
    x = torch.randn(B, context + 12, 256, device=cuda, dtype=torch.bfloat16)
    steps = range(context, context + 12)
    layer.compile_decode()
    x_t = torch.empty(B, 1, 256, device=cuda, dtype=torch.bfloat16)

    def warmed_cache():
        # Both runs fill the cache the same way (a prefill's projections round differently from a
        # step's, so a cache prefilled to `context` is not the one three steps build): prefill to
        # context - 3, then three steps on a side stream (they compile; capture needs that stream).
        cache = layer.new_cache(B, context + 16)
        layer.prefill(x[:, :context - 3], cache)
        for t in range(context - 3, context):
            x_t.copy_(x[:, t:t + 1])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                layer.decode_step(x_t, cache)
            torch.cuda.current_stream().wait_stream(side)
        return cache

    with torch.no_grad():
        cache = warmed_cache()
        eager = []
        for t in steps:
            x_t.copy_(x[:, t:t + 1])
            eager.append(layer.decode_step(x_t, cache).clone())
        cache = warmed_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer.decode_step(x_t, cache)
        assert int(cache.pos) == context  # capture records the step without running it
        replayed = []
        for t in steps:
            x_t.copy_(x[:, t:t + 1])
            graph.replay()
            replayed.append(y.clone())
    for t, (a, b) in enumerate(zip(eager, replayed)):
        assert torch.equal(a, b), (t, float((a.float() - b.float()).abs().max()))


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before Triton's import
    print(json.dumps(compute_all()))
