"""The decode step's token kernel (``nsa.ops.triton_decode_token.prepare_token``) against the layer's
torch ops for the same work (``NSAAttention._append``).

``ops``: float32 on CPU through Triton's interpreter (one subprocess; see ``triton_build``). From the
same random caches and token, at positions before the first block, on steps that emit a compressed
token and steps that do not, inside an unwrapped and a wrapped window ring, at the cache's last row:
``q_rope`` and the gates, and every cache buffer afterwards, within 1e-5 of the largest value. The
reference also writes the scratch slot on steps that emit nothing; the kernel writes no compressed
slot then, which the cases check. Layers: one buffer (d_k = d_v) and two, phi "linear" and
"mean", gates in the projection and from an MLP, one head per group and several. And the layer's
step compiled by inductor: eager's outputs, with the cache buffer written in place (not copied).
The kernel also builds for sm_90 without spills; on a GPU, bf16 against the torch ops.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); its kernels cannot run")

from nsa.ops import triton_decode_token as tt  # noqa: E402
from nsa.tests import triton_build  # noqa: E402
from nsa.tests.triton_build import H100_SHARED_BYTES, build_sm90, usage  # noqa: E402

TOL = 1e-5

# name -> (NSAConfig keywords, batch, cache length, positions)
CASES = {
    "G2-h2-dk16-l8-d4-linear": (dict(groups=2, heads_per_group=2, d_k=16, d_v=16, block_len=8, block_stride=4,
                                     sel_block_len=16, n_sel=4, window=24), 2, 60, [0, 6, 7, 9, 11, 30, 59]),
    "G1-h4-dk32-dv16-l16-d8-mean-mlp": (dict(groups=1, heads_per_group=4, d_k=32, d_v=16, block_len=16,
                                             block_stride=8, sel_block_len=16, n_sel=3, window=10,
                                             compress="mean", gate_hidden=8), 1, 50, [15, 20, 23, 49]),
    "G3-h1-dk8-dv24-l4-d4-linear": (dict(groups=3, heads_per_group=1, d_k=8, d_v=24, block_len=4, block_stride=4,
                                         sel_block_len=16, n_sel=3, window=5), 2, 40, [3, 4, 7, 39]),
}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _case(name: str, pos: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from nsa import NSAAttention, NSAConfig

    kw, B, S, _ = CASES[name]
    cfg = NSAConfig(dim=32, **kw)
    torch.manual_seed(zlib.crc32(name.encode()))
    layer = NSAAttention(cfg).to(device, dtype)
    with torch.no_grad():  # phi's embeddings and bias start at zero: make them count
        for p in (layer.pos_k, layer.pos_v, layer.phi_k_bias, layer.phi_v_bias):
            p.normal_()
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{pos}".encode()))
    x_t = torch.randn(B, 1, cfg.dim, generator=gen).to(device, dtype)
    cache = layer.new_cache(B, S)
    for buf in cache.buffers:
        buf.copy_(torch.randn(buf.shape, generator=gen))
    cache.pos.fill_(pos)
    before = [buf.clone() for buf in cache.buffers]
    with torch.no_grad():
        _, ref_q_rope, ref_gates = layer._append(x_t, cache)
        ref_bufs = [buf.clone() for buf in cache.buffers]
        for buf, old in zip(cache.buffers, before):
            buf.copy_(old)
        y = layer.proj(x_t)
        gate_logits = y[..., sum(layer.split):] if layer.gate_mlp is None else layer.gate_mlp(x_t)
        phi = (layer.pos_k, layer.pos_v, layer.phi_k, layer.phi_v, layer.phi_k_bias, layer.phi_v_bias)
        q_rope, gates = tt.prepare_token(y, gate_logits, cache.buffers, cache.rows, cache.pos, cache.inv_freq, phi,
                                         heads=cfg.num_heads, d_k=cfg.d_k, d_v=cfg.d_v, block_len=cfg.block_len,
                                         block_stride=cfg.block_stride, compress=cfg.compress)
    l, d = cfg.block_len, cfg.block_stride
    emit = pos + 1 >= l and (pos + 1 - l) % d == 0
    # the scratch slot (the reference's write on a step that emits nothing) is compared apart
    scratch = [(cache.rows[n][0], cache.rows[n][1] + cache.rows[n][2] - 1) for n in ("k_cmp", "v_cmp")]
    keep = [torch.ones(buf.shape[1], dtype=torch.bool) for buf in cache.buffers]
    for b, row in scratch:
        keep[b][row] = False
    got = [buf.cpu() for buf in cache.buffers]
    ref, old = [buf.cpu() for buf in ref_bufs], [buf.cpu() for buf in before]
    new_cmp = [(cache.rows[n][0], cache.rows[n][1] + (pos + 1 - l) // d) for n in ("k_cmp", "v_cmp")] if emit else []
    return {"q_rope": _rel(q_rope.cpu(), ref_q_rope.cpu()), "gates": _rel(gates.cpu(), ref_gates.cpu()),
            "buffers": max(_rel(g[:, k], r[:, k]) for g, r, k in zip(got, ref, keep)),
            "scratch_untouched": float(all(torch.equal(got[b][:, row], old[b][:, row]) for b, row in scratch)),
            # the emitted token is a write the comparison sees (it differs from the slot's old values)
            "emitted_changed": min([_rel(got[b][:, row], old[b][:, row]) for b, row in new_cmp], default=1.0),
            "rows_written": float(sum(int((g != o).any(-1).any(-1).any(0).sum()) for g, o in zip(got, old))),
            "emit": float(emit), "dtypes": float(q_rope.dtype == dtype and gates.dtype == dtype)}


def _inductor_case() -> dict:
    """The layer's step compiled by inductor (``compile_decode``) on the fused route with this kernel:
    the outputs of eager steps, and the cache buffer handed to the op itself (a functionalised copy
    of the whole cache every step would be correct, and slow)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from nsa import NSAAttention, NSAConfig, routes
    from nsa.ops import triton_decode as td

    cfg = NSAConfig(dim=32, **CASES["G2-h2-dk16-l8-d4-linear"][0])
    torch.manual_seed(5)
    layer = NSAAttention(cfg)
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(6))
    real = routes.route_decode
    routes.route_decode = lambda *a, **k: routes.Route("test", "test", td.decode_attention, prologue=tt.prepare_token)
    try:
        outs, codes = [], []
        for compiled in (False, True):
            cache = layer.new_cache(1, 64)
            layer.prefill(x[:, :30], cache)
            if compiled:
                layer.compile_decode(fullgraph=True)
            steps = []
            for t in range(30, 36):  # step 31 emits a compressed token
                y, code = run_and_get_code(layer.decode_step, x[:, t:t + 1], cache)
                steps.append(y)
                codes += code
            outs.append(torch.cat(steps, 1))
    finally:
        routes.route_decode = real
        layer._compiled_decode = None
    code = "\n".join(codes)
    calls = re.findall(r"torch\.ops\.nsa\.decode_prepare_token\.default\((.*)\)", code)
    return {"compiled": _rel(outs[1], outs[0]), "calls": float(len(calls)),
            # inductor names graph inputs argN_1; a copy would be a buffer it allocates (bufN)
            "in_place": float(bool(calls) and all(re.search(r"\[arg\d+_1\]", c) for c in calls)),
            "clones": float(code.count("clone"))}


def compute_all() -> dict:
    return triton_build.run_cases({**{f"{name}-pos{p}": (lambda name=name, p=p: _case(name, p))
                                      for name, c in CASES.items() for p in c[-1]},
                                   "inductor": _inductor_case})


interpreter_results = triton_build.interpreter_fixture("nsa.tests.test_triton_decode_token", compute_all)


@pytest.mark.ops
@pytest.mark.parametrize("case", [f"{name}-pos{p}" for name, c in CASES.items() for p in c[-1]])
def test_prepare_token_matches_the_layers_torch_ops_in_interpreter(case, interpreter_results):
    r = triton_build.case(interpreter_results, case)
    assert max(r["q_rope"], r["gates"], r["buffers"]) <= TOL and r["dtypes"] == 1.0, r
    assert r["scratch_untouched"] == 1.0, r
    # six appends, and the two compressed slots on an emitting step
    assert r["rows_written"] == 6 + 2 * r["emit"], r
    assert r["emitted_changed"] > 1e-3, r


@pytest.mark.ops
def test_inductor_keeps_the_step_and_writes_the_cache_in_place_in_interpreter(interpreter_results):
    r = triton_build.case(interpreter_results, "inductor")
    assert r["compiled"] <= 1e-6 and r["calls"] >= 1 and r["in_place"] == 1.0 and r["clones"] == 0, r


def test_cases_cover_emitting_and_silent_steps_and_a_wrapped_ring():
    kinds = set()
    for kw, _, S, positions in CASES.values():
        l, d, W = kw["block_len"], kw["block_stride"], min(kw["window"], S)
        for p in positions:
            kinds.add("early" if p + 1 < l else "emit" if (p + 1 - l) % d == 0 else "silent")
            kinds.add("wrapped" if p >= W else "unwrapped")
    assert kinds == {"early", "emit", "silent", "wrapped", "unwrapped"}, kinds


@pytest.mark.ops
@pytest.mark.parametrize("d_k,d_v,h", [(192, 128, 16), (128, 128, 16), (32, 32, 4)])
def test_token_kernel_builds_for_sm90_without_spilling(d_k, d_v, h):
    if tt._interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions in this process")
    p = triton.next_power_of_2
    bk, bv = tt.phi_tile(d_k), tt.phi_tile(d_v)
    constexprs = dict(G=4, HPG=h, HPP=p(h), DK=d_k, DKP=p(d_k), HALFP=p(d_k // 2), DV=d_v, DVP=p(d_v), L=32, D=16,
                      MEAN=False, BLOCK_K=bk, BLOCK_V=bv, CTK=triton.cdiv(d_k, bk))
    ptrs = {name: "*bf16" for name in ("Y", "GL", "QR", "GATES", "KB", "VB", "PEK", "PEV", "WK", "WV", "BK", "BV")}
    ptrs.update({"INV": "*fp32", "POS": "*i64"})
    compiled = build_sm90(tt._dec_token, constexprs, ptrs, warps=4, stages=2)
    used = usage(compiled)
    # The stack holds libdevice sinf/cosf's 28-byte table for large angles (|angle| > ~1e5; the PTX's
    # one local array), which the kernel has at 40 registers too; a register spill would add to it.
    depots = [line.strip() for line in compiled.asm["ptx"].splitlines() if line.strip().startswith(".local")]
    assert depots == [".local .align 4 .b8 \t__local_depot0[28];"], depots
    assert used["shared_bytes"] <= H100_SHARED_BYTES and used["spill_bytes"] <= 32, used


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_prepare_token_bf16_matches_the_layers_torch_ops(name, cuda):
    """bf16 on the GPU: each side rounds its float32 results to bf16 once (phi sums in another order)."""
    for pos in CASES[name][-1]:
        r = _case(name, pos, cuda, torch.bfloat16)
        assert max(r["q_rope"], r["gates"], r["buffers"]) <= 2e-2 and r["scratch_untouched"] == 1.0, (pos, r)
        assert r["rows_written"] <= 6 + 2 * r["emit"], (pos, r)


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before Triton's import
    print(json.dumps(compute_all()))
