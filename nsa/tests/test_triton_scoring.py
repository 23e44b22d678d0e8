"""The Triton selection-scoring and top-n kernels (``nsa.ops.triton_scoring``) against the references.

``ops``: float32 on CPU through Triton's interpreter, in one subprocess (as in
``test_triton_attention``: the interpreter must be on before Triton is imported):
- log-sum-exp against a float64 ``logsumexp`` of the visible compressed scores, and block scores
  against :func:`nsa.ops.selection_scores` of float64 :func:`nsa.ops.compressed_attention`
  probabilities: max error <= 1e-5 relative to the largest value;
- top-n against :func:`nsa.ops.select_blocks` on the same scores, exactly, with ties, NaN,
  infinities, fewer blocks than slots and query positions that do not start at 0: ``_topn``'s
  rounds, and the one-pass rank (``_ranked``, the short decode step's) on the rows of up to 64 blocks;
- the whole selection (chunked, as the layer runs it) against the reference's blocks;
- the layer on the route against the layer on the reference route.
The kernels also build for sm_90 without spilling (no GPU needed), and on a GPU bf16 at real shapes.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); its kernels cannot run")

from nsa.ops import compressed_attention, select_blocks, selection_scores  # noqa: E402
from nsa.ops import selection  # noqa: E402
from nsa.ops import triton_scoring as ts  # noqa: E402
from nsa.tests import triton_build  # noqa: E402
from nsa.tests.triton_build import H100_SHARED_BYTES, build_sm90, run_cases, usage  # noqa: E402

TOL = 1e-5

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _ranked_rows(SC, OUT, T, T0, NB, G: tl.constexpr, SEL: tl.constexpr, NSEL: tl.constexpr,
                     NSP: tl.constexpr, NBP: tl.constexpr):
        # The decode front's top-n (nsa.ops.triton_decode._dec_front) on given scores: one row of
        # contiguous scores [B, T, G, NB] per program, its blocks at OUT [B, T, G, NSEL].
        row = tl.program_id(0)
        j = tl.arange(0, NBP)
        sc = tl.load(SC + row * NB + j, mask=j < NB, other=0.0)
        key = ts._keys(tl.reshape(sc, [1, NBP]), j, (T0 + (row // G) % T) // SEL, NB)
        ts._store_chosen(OUT, tl.zeros([1], tl.int64) + row * NSEL, ts._ranked(key, NBP, NSEL), j,
                         tl.full([1], 1, tl.int1), 1, NSEL, NSP)

# name -> (B, T, G, h, d_k, block_len, block_stride, sel_block_len, n_sel, chunk_rows). Tiles of 16
# selection blocks span 16 * sel_block_len positions: the long cases cross them.
SCORE_CASES = {
    "B2-T300-G2-h4-dk16-l8-d4-sel16-n4-chunk64": (2, 300, 2, 4, 16, 8, 4, 16, 4, 64),
    "B1-T290-G1-h16-dk16-l16-d16-sel16-n3": (1, 290, 1, 16, 16, 16, 16, 16, 3, None),  # two head chunks
    "B1-T200-G2-h2-dk32-l24-d8-sel32-n5-chunk48": (1, 200, 2, 2, 32, 24, 8, 32, 5, 48),  # l not a power of 2
    "B1-T40-G2-h1-dk16-l32-d16-sel64-n16": (1, 40, 2, 1, 16, 32, 16, 64, 16, None),  # one block, 16 slots
    "B2-T6-G1-h2-dk16-l8-d4-sel16-n3-no-cmp-token": (2, 6, 1, 2, 16, 8, 4, 16, 3, None),
    # the GPU layer's tiles (16 heads per group at d=128: 32 queries x 2 heads, eight head chunks)
    "B1-T120-G1-h16-dk128-l16-d16-sel16-n3": (1, 120, 1, 16, 128, 16, 16, 16, 3, None),
}

def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return 0.0 if b.numel() == 0 else float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(name, B, T, G, h, dk, l, d):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    N = 0 if T < l else (T - l) // d + 1
    q = torch.randn(B, T, G * h, dk + 8, generator=gen)[..., :dk]  # a strided view, as from a projection
    return q, torch.randn(B, N, G, dk, generator=gen), torch.randn(B, N, G, dk, generator=gen)


def _score_case(name: str) -> dict:
    B, T, G, h, dk, l, d, sel, n, chunk = SCORE_CASES[name]
    q, k, v = _inputs(name, B, T, G, h, dk, l, d)
    nb = -(-T // sel)
    cmp = {"block_len": l, "block_stride": d}
    out = {}
    # log-sum-exp: float64 over the visible compressed keys
    s = torch.einsum("bthd,bnhd->bthn", q.double(), k.double().repeat_interleave(h, dim=2)) / math.sqrt(dk)
    visible = (torch.arange(k.shape[1]) * d + l - 1)[None, :] <= torch.arange(T)[:, None]
    ref_lse = torch.logsumexp(s.masked_fill(~visible[None, :, None, :], float("-inf")), dim=-1)
    lse = ts.compressed_lse(q, k, **cmp)
    seen = torch.isfinite(ref_lse)
    out["lse"] = _rel(lse[seen], ref_lse[seen])
    out["lse_unseen_-inf"] = float(bool((lse[~seen] == float("-inf")).all()))
    # block scores against the reference's probabilities
    _, p = compressed_attention(q.double(), k.double(), v.double(), **cmp)
    ref = selection_scores(p, groups=G, **cmp, sel_block_len=sel, num_blocks=nb)
    scores = ts.block_scores(q, k, lse, groups=G, **cmp, sel_block_len=sel, num_blocks=nb)
    out["scores"] = _rel(scores, ref) if ref.abs().max() > 0 else float(scores.abs().max())
    # the whole selection, chunked as the layer runs it, against the float32 reference
    kw = {"groups": G, **cmp, "sel_block_len": sel, "n_sel": n}
    idx = ts.select_from_compressed(q, k, v, **kw, chunk_rows=chunk)
    ref_idx = selection.select_from_compressed(q, k, v, **kw)
    out["blocks_equal"] = float(bool(torch.equal(idx, ref_idx)))
    out["rows"] = idx[..., 0].numel()
    return out


def _top_case(seed: int, B: int, T: int, G: int, nb: int, sel: int, n: int, start: int) -> dict:
    """Scores full of ties (values 0..3), NaN and infinities."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (B, T, G, nb), generator=gen).float()
    special = torch.rand(B, T, G, nb, generator=gen)
    scores[special < 0.05] = float("nan")
    scores[(special >= 0.05) & (special < 0.08)] = float("inf")
    scores[(special >= 0.08) & (special < 0.11)] = float("-inf")
    positions = torch.arange(start, start + T)
    ref = select_blocks(scores, sel_block_len=sel, n_sel=n, positions=positions)
    got = ts.top_blocks(scores, sel_block_len=sel, n_sel=n, positions_start=start)
    out = {"equal": float(bool(torch.equal(got, ref))), "dtype_int64": float(got.dtype == torch.long)}
    nbp = triton.next_power_of_2(max(nb, 16))
    if nbp <= 64:
        ranked = torch.empty(B, T, G, n, dtype=torch.long)
        _ranked_rows[(B * T * G,)](scores, ranked, T, start, nb, G=G, SEL=sel, NSEL=n,
                                   NSP=triton.next_power_of_2(n), NBP=nbp)
        out["ranked_equal"] = float(bool(torch.equal(ranked, ref)))
    return out


TOP_CASES = {  # seed, B, T, G, nb, sel_block_len, n_sel, first position
    "ties-nan-inf": (1, 2, 70, 3, 5, 16, 4, 0),
    "more-blocks-than-positions": (2, 1, 70, 2, 40, 16, 8, 0),
    "fewer-blocks-than-slots": (3, 2, 33, 1, 3, 16, 16, 0),
    "positions-from-37": (4, 1, 20, 2, 9, 8, 5, 37),
    "many-blocks": (5, 1, 9, 1, 300, 1, 16, 250),
}


def _module_case() -> dict:
    """The layer with its selection on the Triton scoring route against the reference route."""
    from nsa import NSAAttention, NSAConfig, routes

    cfg = NSAConfig(dim=32, groups=2, heads_per_group=2, d_k=16, d_v=16, block_len=8, block_stride=4,
                    sel_block_len=16, n_sel=6, window=16)  # 3 of 6 slots chosen by score, of 19 blocks
    torch.manual_seed(5)
    layer = NSAAttention(cfg)
    x = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(6))
    real_cmp, real_select = routes.route_cmp, routes.route_select
    import nsa.ops.triton_attention as ta

    # The compressed output from the Triton kernel (with its log-sum-exp) in both runs, so the
    # runs differ only in how the blocks are scored and picked.
    routes.route_cmp = lambda *a, **k: routes.Route("triton-compressed", "test", ta.triton_compressed_attention, lse=True)
    try:
        ref = layer(x)
        routes.route_select = lambda *a, **k: routes.Route("triton-scores", "test", ts.select_from_compressed)
        got = layer(x)
        # The control: scores from negated queries pick other blocks, and the comparison sees it.
        routes.route_select = lambda *a, **k: routes.Route(
            "broken", "test", lambda q, *r, **kw: ts.select_from_compressed(-q, *r, **kw))
        broken = layer(x)
    finally:
        routes.route_cmp, routes.route_select = real_cmp, real_select
    return {"o": _rel(got, ref), "broken": _rel(broken, ref)}


def compute_all() -> dict:
    return run_cases({**{f"scores-{n}": (lambda n=n: _score_case(n)) for n in SCORE_CASES},
                      **{f"top-{n}": (lambda c=c: _top_case(*c)) for n, c in TOP_CASES.items()},
                      "module": _module_case})


interpreter_results = triton_build.interpreter_fixture("nsa.tests.test_triton_scoring", compute_all)


@pytest.mark.ops
@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_block_scores_match_the_reference_in_interpreter(name, interpreter_results):
    r = triton_build.case(interpreter_results, f"scores-{name}")
    assert r["lse"] <= TOL and r["scores"] <= TOL, r
    assert r["lse_unseen_-inf"] == 1.0, r
    assert r["blocks_equal"] == 1.0, f"selected blocks differ from the reference's ({r})"


@pytest.mark.ops
@pytest.mark.parametrize("name", list(TOP_CASES))
def test_top_blocks_equal_select_blocks_in_interpreter(name, interpreter_results):
    r = triton_build.case(interpreter_results, f"top-{name}")
    ranked = {"ranked_equal": 1.0} if TOP_CASES[name][4] <= 64 else {}  # rows short enough for _ranked
    assert r == {"equal": 1.0, "dtype_int64": 1.0, **ranked}


@pytest.mark.ops
def test_layer_on_the_triton_scoring_route_matches_the_reference_route(interpreter_results):
    r = triton_build.case(interpreter_results, "module")
    assert r["o"] <= 1e-5, r
    assert r["broken"] > 1e-2, f"the layer cannot tell a wrong selection from the right one ({r})"


@pytest.mark.ops
def test_routes_score_with_triton_on_a_gpu_for_half_dtypes(monkeypatch):
    from nsa import override_settings, routes
    from nsa.ops import triton_attention as ta

    monkeypatch.setattr(ta, "available", lambda: True)  # the decision, on a machine without a GPU
    args = (64, 4, 128, 32, 16, 64)  # heads, groups, d_k, block_len, block_stride, sel_block_len
    assert routes.route_select("cuda", torch.bfloat16, *args).fn is ts.select_from_compressed
    assert routes.route_select("cuda", torch.float32, *args).name == "chunked-matmul"
    assert routes.route_select("cpu", torch.bfloat16, *args).name == "chunked-matmul"
    odd = routes.route_select("cuda", torch.bfloat16, 12, 4, 128, 32, 16, 64)  # 3 heads per group
    assert odd.name == "chunked-matmul" and "3 heads per group" in odd.reason
    with override_settings(use_triton=False):
        assert routes.route_select("cuda", torch.bfloat16, *args).name == "chunked-matmul"
    b = routes.backends("cuda", torch.bfloat16, 128, 128, 64, groups=4, heads_per_group=16)
    assert b["cmp"]["route"] == "triton-compressed" and b["select"]["route"] == "triton-scores"
    assert routes.backends("cpu")["select"]["route"] == "from-cmp-probabilities"


@pytest.mark.ops
def test_top_blocks_rejects_too_few_blocks():
    with pytest.raises(ValueError, match="nb > 4"):
        ts.top_blocks(torch.zeros(1, 10, 1, 4), sel_block_len=8, n_sel=3, positions_start=30)


@pytest.mark.ops
@pytest.mark.parametrize("d_k,h", [(128, 16), (128, 8), (192, 16), (64, 4)])
def test_triton_scoring_builds_for_sm90_without_spilling(d_k, h):
    """At the GPU tiles ``block_scores`` and ``compressed_lse`` launch with (paper layer: 64 heads in 4
    groups, l=32, d=16, l'=64), the kernels compile for sm_90, fit its shared memory and spill no
    register (a loop over head chunks that the compiler unrolled kept every chunk's queries live:
    kilobytes of spill at d=128)."""
    if ts._interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process")
    dkp = ts._pad(d_k)
    tile = ts.score_tiles(h, dkp)
    types = {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "OUT": "*fp32", "qk_scale": "fp32"}
    built = build_sm90(ts._scores, dict(G=4, HPG=h, HB=tile["heads"], DK=d_k, DKP=dkp, L=32, D=16, SEL=64, NBT=16,
                                        BLOCK_T=tile["queries"], BLOCK_N=64, PREC="tf32"),
                       types, warps=tile["warps"], stages=tile["stages"])
    used = usage(built)
    assert used["shared_bytes"] <= H100_SHARED_BYTES and used["spill_bytes"] == 0, used
    rows, keys = ts.LSE_TILES
    built = build_sm90(ts._lse, dict(G=4, HPG=h, DK=d_k, DKP=dkp, L=32, D=16, BLOCK_M=rows, BLOCK_N=keys,
                                     PREC="tf32"), types, warps=4, stages=2)
    used = usage(built)
    assert used["shared_bytes"] <= H100_SHARED_BYTES and used["spill_bytes"] == 0, used


@pytest.mark.ops
@pytest.mark.parametrize("nb", [64, 1024, 4096])
def test_top_blocks_builds_for_sm90_without_spilling(nb):
    if ts._interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process")
    nbp, rows = ts.top_tiles(nb)
    built = build_sm90(ts._topn, dict(G=4, SEL=64, NSEL=16, NSP=16, NBP=nbp, BLOCK_R=rows, POS_PTR=False),
                       {"SC": "*fp32", "OUT": "*i64", "POS": "*i64"}, warps=4, stages=1)
    assert usage(built)["spill_bytes"] == 0


# --- GPU: bf16 at realistic shapes ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,G,h,dk", [(1, 4096, 4, 16, 128), (2, 3000, 2, 4, 32), (1, 2048, 4, 16, 192)])
def test_triton_scoring_bf16_matches_the_reference(B, T, G, h, dk, cuda, gen):
    if not ts.triton or not torch.cuda.is_available():
        pytest.skip("Triton or CUDA missing")
    l, d, sel, n = 32, 16, 64, 16
    N = (T - l) // d + 1
    q, k, v = (torch.randn(*s, generator=gen).to(cuda, torch.bfloat16)
               for s in ((B, T, G * h, dk), (B, N, G, dk), (B, N, G, dk)))
    cmp = {"block_len": l, "block_stride": d}
    # The reference in float32 from the same bf16 values: the kernels' dots multiply bf16 exactly and
    # sum in float32. (The bf16 reference rounds its logits to bf16: 3e-4 to 9e-4 apart on an H200.)
    _, p = compressed_attention(q.float(), k.float(), v.float(), **cmp)
    nb = -(-T // sel)
    ref = selection_scores(p, groups=G, **cmp, sel_block_len=sel, num_blocks=nb)
    lse = ts.compressed_lse(q, k, **cmp)
    scores = ts.block_scores(q, k, lse, groups=G, **cmp, sel_block_len=sel, num_blocks=nb)
    assert _rel(scores, ref) <= 1e-4
    idx = ts.select_from_compressed(q, k, v, groups=G, **cmp, sel_block_len=sel, n_sel=n)
    ref_idx = select_blocks(ref, sel_block_len=sel, n_sel=n)
    # Equal blocks, except where float32 rounding reorders near ties: the chosen blocks' reference
    # scores must then sum the same.
    same = (idx == ref_idx).all(-1).float().mean().item()
    picked = torch.gather(ref, -1, idx.clamp_min(0)).masked_fill(idx < 0, 0).sum(-1)
    ref_picked = torch.gather(ref, -1, ref_idx.clamp_min(0)).masked_fill(ref_idx < 0, 0).sum(-1)
    assert same >= 0.999 and _rel(picked, ref_picked) <= 1e-4, (same, _rel(picked, ref_picked))
    assert torch.equal(ts.top_blocks(ref, sel_block_len=sel, n_sel=n), ref_idx)


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before Triton's import
    print(json.dumps(compute_all()))
