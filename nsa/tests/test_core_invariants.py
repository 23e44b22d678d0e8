"""Invariants of the layer: causality, group consistency, block math, decode == prefill, batched ==
sequential prefill, reserve knobs change no output bit, workspace counters, settings and config
validation. Tolerances are stated where used (float32 1e-5, float64 1e-10; bitwise where the spec
says "no output bit")."""

from __future__ import annotations

import pytest
import torch

import nsa
from nsa import ops
from nsa.ops import compressed as compressed_mod
from nsa.ops import naive

pytestmark = pytest.mark.core_invariants

F32 = {"atol": 1e-5, "rtol": 0}
F64 = {"atol": 1e-10, "rtol": 0}

CONFIGS = {
    "base": {},
    "G1h1": {"groups": 1, "heads_per_group": 1},
    "dk_ne_dv": {"d_k": 10, "d_v": 4, "groups": 1, "heads_per_group": 3},
    "mean_gatemlp": {"compress": "mean", "gate_hidden": 5, "groups": 3, "heads_per_group": 1},
    "wide": {"block_len": 6, "block_stride": 2, "sel_block_len": 4, "n_sel": 5, "window": 5},
    "w_gt_T": {"window": 512, "block_len": 4, "block_stride": 4, "sel_block_len": 4, "n_sel": 3},
}


# --- causality -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_future_tokens_change_no_past_output(name, batched, make_cfg, override, gen):
    cfg = make_cfg(**CONFIGS[name])
    attn = nsa.NSAAttention(cfg)
    T, t0 = 27, 13
    x = torch.randn(2, T, cfg.dim, generator=gen)
    x2 = x.clone()
    x2[:, t0:] = torch.randn(2, T - t0, cfg.dim, generator=gen) * 5
    with torch.no_grad(), override(prefill_batched=batched):
        y, y2 = attn(x), attn(x2)
    assert torch.equal(y[:, :t0], y2[:, :t0])
    assert not torch.allclose(y[:, t0:], y2[:, t0:])  # the change is visible where it may be


def test_jacobian_is_lower_triangular(make_cfg, gen):
    """d y_t / d x_s == 0 exactly for every s > t (autograd through all three branches)."""
    cfg = make_cfg()
    attn = nsa.NSAAttention(cfg)
    T = 20
    x = torch.randn(1, T, cfg.dim, generator=gen, requires_grad=True)
    y = attn(x)
    for t in (0, 7, 12, 19):
        (g,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert torch.all(g[:, t + 1:] == 0)
        assert g[:, t].abs().sum() > 0


# --- group consistency ------------------------------------------------------------------------------

@pytest.mark.parametrize("G,h", [(1, 4), (2, 3), (4, 1)])
def test_group_shares_blocks(G, h, gen, qkv):
    B, T, l, d, l_sel, n_sel = 2, 40, 8, 4, 8, 3
    N, nb = naive.num_cmp(T - 1, block_len=l, block_stride=d), -(-T // l_sel)
    p = torch.softmax(torch.randn(B, T, G * h, N, generator=gen) * 3, -1)
    kw = {"block_len": l, "block_stride": d, "sel_block_len": l_sel, "num_blocks": nb}
    scores = ops.selection_scores(p, groups=G, **kw)
    per_head = ops.selection_scores(p, groups=G * h, **kw)  # each head as its own group
    # Group scores are the sum over that group's heads (paper eq. 10) ...
    torch.testing.assert_close(scores, per_head.reshape(B, T, G, h, nb).sum(3), **F32)
    # ... so they do not depend on the order of heads inside a group, nor on other groups' heads.
    perm = torch.cat([g * h + torch.randperm(h, generator=gen) for g in range(G)])
    torch.testing.assert_close(ops.selection_scores(p[:, :, perm], **{**kw, "groups": G}), scores, **F32)
    if G > 1:
        p2 = p.clone()
        p2[:, :, h:] = torch.softmax(torch.randn(B, T, (G - 1) * h, N, generator=gen), -1)
        assert torch.equal(ops.selection_scores(p2, **{**kw, "groups": G})[:, :, 0], scores[:, :, 0])
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    assert idx.shape == (B, T, G, n_sel)
    # Every head of group g reads exactly the blocks idx[..., g, :]: its output equals single-head
    # attention over those blocks.
    q, k, v = qkv(B, T, T, G, h, 4, 4, generator=gen)
    o = ops.selection_attention(q, k, v, idx, sel_block_len=l_sel)
    for head in range(G * h):
        g = head // h
        ref = naive.selection_attention(q[:, :, head: head + 1], k[:, :, g: g + 1], v[:, :, g: g + 1], idx[:, :, g: g + 1], sel_block_len=l_sel)
        torch.testing.assert_close(o[:, :, head: head + 1], ref, **F32)


# --- block math --------------------------------------------------------------------------------------

@pytest.mark.parametrize("l,d", [(32, 16), (8, 4), (6, 3), (4, 4), (5, 1), (16, 2)])
def test_num_cmp_counts_whole_past_blocks(l, d, make_cfg):
    cfg = make_cfg(block_len=l, block_stride=d, sel_block_len=l * 2)
    ts = range(5 * l + 7)
    brute = [sum(1 for i in range(t + 2) if i * d + l <= t + 1) for t in ts]  # definition: block in the past
    assert [cfg.num_cmp(t) for t in ts] == brute
    assert [naive.num_cmp(t, block_len=l, block_stride=d) for t in ts] == brute
    assert ops.num_cmp(torch.tensor(list(ts)), block_len=l, block_stride=d).tolist() == brute
    assert all(cfg.num_cmp(t) == 0 for t in range(l - 1))  # t + 1 < l sees nothing


@pytest.mark.parametrize("n_sel", [3, 4, 6])
def test_forced_blocks_always_present(n_sel, gen):
    """Block 0, the current block and the one before are chosen even with the lowest scores."""
    T, l_sel = 60, 5
    nb = -(-T // l_sel)
    scores = torch.rand(2, T, 2, nb, generator=gen) + 1.0
    cur = torch.arange(T) // l_sel
    for j in range(nb):  # forced blocks get score 0, every other candidate scores higher
        forced_here = (cur == j) | (cur - 1 == j) | (j == 0)
        scores[:, forced_here, :, j] = 0.0
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    for t in range(T):
        for j in {0, int(cur[t]), int(cur[t]) - 1}:
            if j >= 0:
                assert (idx[:, t] == j).any(-1).all(), f"forced block {j} missing at t={t}"
    if n_sel == 3:  # no free slot: exactly the forced set
        assert idx[:, 50].tolist() == [[[0, 9, 10]] * 2] * 2  # t = 50 is in block 10


def test_tie_break_toward_lower_index():
    T, l_sel, n_sel = 50, 5, 5  # t = 49 is in block 9
    scores = torch.ones(1, T, 1, 10)
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    assert idx[0, 49, 0].tolist() == [0, 1, 2, 8, 9]  # forced 0, 8, 9; ties -> 1, 2
    scores[0, 49, 0, 5] = 1.5  # one higher score wins a slot; the other goes to the lower index
    assert ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)[0, 49, 0].tolist() == [0, 1, 5, 8, 9]
    assert torch.equal(idx, naive.select_blocks(torch.ones(1, T, 1, 10), sel_block_len=l_sel, n_sel=n_sel))


@pytest.mark.parametrize("T,l_sel,n_sel", [(1, 4, 3), (9, 4, 8), (30, 8, 16), (5, 64, 16)])
def test_fewer_candidates_pad_with_minus_one_and_no_future(T, l_sel, n_sel, gen):
    nb = -(-T // l_sel) + 2  # extra (future) blocks with high scores must never be picked
    scores = torch.rand(2, T, 2, nb, generator=gen)
    scores[..., -2:] = 10.0
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    cur = (torch.arange(T) // l_sel)[None, :, None, None]
    chosen = idx >= 0
    assert torch.all(idx[chosen] <= cur.expand_as(idx)[chosen]), "a future block was selected"
    count = chosen.sum(-1)
    assert torch.equal(count, torch.minimum(cur[..., 0] + 1, torch.tensor(n_sel)).expand_as(count))
    # ascending blocks first, -1 after
    key = torch.where(chosen, idx, torch.full_like(idx, 10**9))
    assert torch.equal(key, key.sort(-1).values)


# --- decode == prefill ----------------------------------------------------------------------------------

def _decode_all(attn, x, cache, start):
    return torch.cat([attn.decode_step(x[:, t: t + 1], cache) for t in range(start, x.shape[1])], 1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decode_equals_prefill_from_empty_cache(name, dtype, make_cfg, gen):
    cfg = make_cfg(**CONFIGS[name])
    attn = nsa.NSAAttention(cfg).to(dtype)
    T = 30
    x = torch.randn(2, T, cfg.dim, generator=gen).to(dtype)
    with torch.no_grad():
        ref = attn(x)
    cache = attn.new_cache(2, T + 3)  # a little longer than used: unused slots must not leak in
    y = _decode_all(attn, x, cache, 0)
    torch.testing.assert_close(y, ref, **(F32 if dtype == torch.float32 else F64))
    assert int(cache.pos) == T and cache.steps == T


@pytest.mark.parametrize("P", [1, 5, 7, 8, 12, 21])
@pytest.mark.parametrize("name", ["base", "wide", "dk_ne_dv"])
def test_prefill_then_decode_equals_prefill(P, name, make_cfg, gen):
    cfg = make_cfg(**CONFIGS[name])
    attn = nsa.NSAAttention(cfg)
    T = 26
    x = torch.randn(2, T, cfg.dim, generator=gen)
    with torch.no_grad():
        ref = attn(x)
        cache = attn.new_cache(2, T)
        y_pre = attn.prefill(x[:, :P], cache)
    torch.testing.assert_close(y_pre, ref[:, :P], **F32)
    torch.testing.assert_close(_decode_all(attn, x, cache, P), ref[:, P:], **F32)


def test_decode_float64_prefill_then_decode(make_cfg, gen):
    cfg = make_cfg(**CONFIGS["mean_gatemlp"])
    attn = nsa.NSAAttention(cfg).double()
    x = torch.randn(1, 24, cfg.dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = attn(x)
        cache = attn.new_cache(1, 24)
        attn.prefill(x[:, :9], cache)
    torch.testing.assert_close(_decode_all(attn, x, cache, 9), ref[:, 9:], **F64)


@pytest.mark.parametrize("name", ["base", "dk_ne_dv"])
def test_cache_rows_live_in_one_buffer_or_two(name, make_cfg):
    """d_k == d_v: every cache a row range of one buffer; else keys' and values' buffers. The views
    are disjoint and cover each buffer."""
    cfg = make_cfg(**CONFIGS[name])
    cache = nsa.NSAAttention(cfg).new_cache(2, 40)
    assert len(cache.buffers) == (1 if cfg.d_k == cfg.d_v else 2)
    for b, buf in enumerate(cache.buffers):
        spans = sorted((start, start + n) for bb, start, n in cache.rows.values() if bb == b)
        assert spans[0][0] == 0 and spans[-1][1] == buf.shape[1]
        assert all(end == nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no gap, no overlap
    assert cache.k_slc.shape == (2, 40, cfg.groups, cfg.d_k) and cache.v_cmp.shape[-1] == cfg.d_v


@pytest.mark.parametrize("name", ["base", "dk_ne_dv"])
def test_compiled_step_product_and_sum_matches_the_matmul_phi(name, make_cfg, gen, monkeypatch):
    """The decode step's phi under torch.compile (a product and a sum, fusable) against the eager
    matmul of compress_tokens, float64 on the same ring: to rounding."""
    cfg = make_cfg(**CONFIGS[name])
    attn = nsa.NSAAttention(cfg).double()
    with torch.no_grad():
        for p in (attn.phi_k_bias, attn.phi_v_bias, attn.pos_k, attn.pos_v):
            p.normal_(generator=gen)
    kr = torch.randn(3, cfg.block_len, cfg.groups, cfg.d_k, generator=gen, dtype=torch.float64)
    vr = torch.randn(3, cfg.block_len, cfg.groups, cfg.d_v, generator=gen, dtype=torch.float64)
    ref = attn._compress(kr, vr)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = attn._compress_ring(kr, vr)
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (3, 1, cfg.groups, b.shape[-1])
        torch.testing.assert_close(a, b, **F64)


def test_compiled_decode_with_two_buffers_equals_prefill(make_cfg, gen):
    """d_k != d_v (keys' and values' buffers), the step traced whole (fullgraph) with the fusable phi."""
    cfg = make_cfg(**CONFIGS["dk_ne_dv"])
    attn = nsa.NSAAttention(cfg)
    x = torch.randn(2, 20, cfg.dim, generator=gen)
    with torch.no_grad():
        ref = attn(x)
        attn.compile_decode(backend="eager", fullgraph=True)
        cache = attn.new_cache(2, 20)
        attn.prefill(x[:, :6], cache)
        torch.testing.assert_close(_decode_all(attn, x, cache, 6), ref[:, 6:], **F32)


def test_decode_cache_reset_and_reuse(make_cfg, gen):
    cfg = make_cfg()
    attn = nsa.NSAAttention(cfg)
    x = torch.randn(1, 15, cfg.dim, generator=gen)
    with torch.no_grad():
        ref = attn(x)
    cache = attn.new_cache(1, 15)
    _decode_all(attn, torch.randn(1, 15, cfg.dim, generator=gen), cache, 0)
    with pytest.raises(ValueError, match="max_len"):
        attn.decode_step(x[:, :1], cache)  # full
    cache.reset()
    torch.testing.assert_close(_decode_all(attn, x, cache, 0), ref, **F32)


# --- batched == sequential prefill -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_equals_sequential_prefill(name, make_cfg, override, gen):
    cfg = make_cfg(**CONFIGS[name])
    attn = nsa.NSAAttention(cfg)
    x = torch.randn(2, 23, cfg.dim, generator=gen)
    with torch.no_grad():
        with override(prefill_batched=True):
            y_b = attn(x)
        with override(prefill_batched=False):
            y_s = attn(x)
    torch.testing.assert_close(y_b, y_s, **F32)


# --- reserve knobs and workspaces ----------------------------------------------------------------------------

@pytest.mark.parametrize("reserve", [(1, 1), (7, 3), (1000, 64), (50000, 1), (1, 4096)])
def test_reserves_change_no_output_bit(reserve, make_cfg, override, gen):
    cfg = make_cfg(**CONFIGS["wide"])
    attn = nsa.NSAAttention(cfg)
    x = torch.randn(2, 25, cfg.dim, generator=gen)
    with torch.no_grad():
        nsa.reset_workspaces()
        base = attn(x)
        cache = attn.new_cache(2, 25)
        base_dec = _decode_all(attn, x, cache, 0)
        nsa.reset_workspaces()
        n, l = reserve
        with override(sel_pack_reserve_n=n, sel_pack_reserve_l=l, varlen_reserve_n=n, varlen_reserve_k=l):
            got = attn(x)
            cache = attn.new_cache(2, 25)
            got_dec = _decode_all(attn, x, cache, 0)
    assert torch.equal(got, base) and torch.equal(got_dec, base_dec)
    stats = nsa.workspace_stats()["sel_pack"]
    assert stats["requests"] > 0  # the packed route really went through the workspace
    assert stats["capacity_rows"] >= n and stats["capacity_keys"] >= l


def _cmp_fa2_cpu(q, k, v, l, d):
    import torch.nn.functional as F

    def attn(qs, ks, vs):
        r = qs.shape[1] // ks.shape[1]
        return F.scaled_dot_product_attention(qs, ks.repeat_interleave(r, 1), vs.repeat_interleave(r, 1),
                                              is_causal=True)

    # What the route table passes when it takes this route: the NSA_VARLEN_RESERVE_* settings.
    reserve = (nsa.settings().varlen_reserve_n, nsa.settings().varlen_reserve_k)
    return compressed_mod.compressed_attention_fa2(q, k, v, block_len=l, block_stride=d, attn_fn=attn,
                                                   workspace_reserve=reserve)


@pytest.mark.parametrize("reserve", [(3, 2), (10000, 500)])
def test_varlen_reserves_change_no_output_bit(reserve, override, gen, qkv):
    N = naive.num_cmp(40 - 1, block_len=8, block_stride=4)
    q, k, v = qkv(2, 40, N, 2, 2, 8, 8, generator=gen)
    with torch.no_grad():
        base = _cmp_fa2_cpu(q, k, v, 8, 4)
        assert nsa.workspace_stats()["varlen"]["requests"] == 3
        nsa.reset_workspaces()
        with override(varlen_reserve_n=reserve[0], varlen_reserve_k=reserve[1]):
            got = _cmp_fa2_cpu(q, k, v, 8, 4)
    assert torch.equal(got, base)
    st = nsa.workspace_stats()["varlen"]
    assert st["capacity_rows"] >= reserve[0] and st["capacity_keys"] >= reserve[1]


def _sel(q, k, v, idx, l_sel):
    """The packed route as the route table builds it (with the NSA_SEL_PACK_RESERVE_* settings)."""
    with torch.no_grad(), nsa.override_settings(use_sel_pack=True):
        route = nsa.routes.route_slc("cpu", q.dtype, l_sel, q.shape[-1], v.shape[-1], needs_grad=False)
        assert route.name == "packed"
        return route.fn(q, k, v, idx, sel_block_len=l_sel)


def test_workspace_grows_only_when_needed(gen, qkv, override):
    # Grow-on-demand is what this test checks, whatever reserves the environment sets
    # (the validation workflow runs the suites under its reserve configurations).
    with override(sel_pack_reserve_n=0, sel_pack_reserve_l=0):
        _check_growth(gen, qkv)


def _check_growth(gen, qkv):
    l_sel, n = 4, 3
    def inputs(B, T):
        q, k, v = qkv(B, T, T, 2, 1, 4, 4, generator=gen)
        idx = ops.select_blocks(torch.rand(B, T, 2, -(-T // l_sel), generator=gen), sel_block_len=l_sel, n_sel=n)
        return q, k, v, idx

    _sel(*inputs(1, 16), l_sel)
    st = nsa.workspace_stats()["sel_pack"]
    # one buffer for keys and one for values, sized exactly to the call: rows = B*T*G, keys = n*l_sel
    assert (st["allocations"], st["growth_events"], st["requests"]) == (2, 0, 2)
    assert (st["capacity_rows"], st["capacity_keys"]) == (1 * 16 * 2, n * l_sel)
    assert st["bytes_reserved"] == 2 * 32 * 12 * 4 * 4
    _sel(*inputs(1, 16), l_sel)  # same size: reuse
    _sel(*inputs(1, 6), l_sel)   # smaller (rows as wide as its 6 keys, not n*l_sel = 12): reuse
    st = nsa.workspace_stats()["sel_pack"]
    assert (st["allocations"], st["growth_events"], st["requests"]) == (2, 0, 6)
    _sel(*inputs(2, 16), l_sel)  # more rows: both buffers grow once
    st = nsa.workspace_stats()["sel_pack"]
    assert (st["allocations"], st["growth_events"]) == (4, 2)
    assert st["high_water_rows"] == st["capacity_rows"] == 64 and st["high_water_keys"] == 12
    assert st["bytes_reserved"] == 2 * 64 * 12 * 4 * 4  # the old buffers are released
    nsa.reset_workspaces()
    assert all(v == 0 for v in nsa.workspace_stats()["sel_pack"].values())


def test_reserve_presizes_workspace(override, gen, qkv):
    with override(sel_pack_reserve_n=500, sel_pack_reserve_l=64):
        for B, T in [(1, 5), (2, 30), (3, 40), (1, 12)]:
            q, k, v = qkv(B, T, T, 2, 2, 4, 4, generator=gen)
            idx = ops.select_blocks(torch.rand(B, T, 2, -(-T // 8), generator=gen), sel_block_len=8, n_sel=3)
            _sel(q, k, v, idx, 8)
    st = nsa.workspace_stats()["sel_pack"]
    assert st["growth_events"] == 0 and st["allocations"] == 2
    assert (st["capacity_rows"], st["capacity_keys"]) == (500, 64)
    assert st["high_water_rows"] == 3 * 40 * 2 and st["high_water_keys"] == 24


@pytest.mark.parametrize("var,field", [("NSA_SEL_PACK_RESERVE_N", "sel_pack_reserve_n"),
                                       ("NSA_SEL_PACK_RESERVE_L", "sel_pack_reserve_l")])
def test_reserve_beyond_device_memory_names_variable(var, field, override, gen, qkv):
    q, k, v = qkv(1, 8, 8, 1, 1, 4, 4, generator=gen)
    idx = ops.select_blocks(torch.rand(1, 8, 1, 2, generator=gen), sel_block_len=4, n_sel=3)
    with override(**{field: 2**40}), pytest.raises(nsa.SettingsError, match=var):
        _sel(q, k, v, idx, 4)


def test_varlen_reserve_beyond_device_memory_names_variable(override, gen, qkv):
    q, k, v = qkv(1, 20, naive.num_cmp(19, block_len=8, block_stride=4), 1, 1, 8, 8, generator=gen)
    with override(varlen_reserve_n=2**40), pytest.raises(nsa.SettingsError, match="NSA_VARLEN_RESERVE_N"), \
            torch.no_grad():
        _cmp_fa2_cpu(q, k, v, 8, 4)


# --- settings validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("var,value", [
    ("NSA_USE_FA2", "maybe"), ("NSA_PREFILL_BATCHED", "2"), ("NSA_USE_SEL_PACK", "tru"),
    ("NSA_SEL_PACK_RESERVE_N", "-1"), ("NSA_SEL_PACK_RESERVE_N", "4k"), ("NSA_SEL_PACK_RESERVE_N", "10**12"),
    ("NSA_SEL_PACK_RESERVE_L", "1e6"), ("NSA_VARLEN_RESERVE_K", "0x10"), ("NSA_VARLEN_RESERVE_N", "1.5"),
    ("NSA_SEL_PACK_RESERVE_N", str(2**41)), ("NSA_VARLEN_RESERVE_K", str(10**13)),
])
def test_bad_setting_names_variable_value_and_accepted(var, value, from_env):
    with pytest.raises(nsa.SettingsError) as err:
        from_env({var: value})
    msg = str(err.value)
    assert var in msg and value in msg and "accepted" in msg
    assert isinstance(err.value, ValueError)


def test_unknown_variable_is_an_error(from_env):
    with pytest.raises(nsa.SettingsError) as err:
        from_env({"NSA_FOO": "1"})
    assert "NSA_FOO" in str(err.value) and "NSA_USE_FA2" in str(err.value)  # names it and lists the valid ones
    from_env({"NSAFOO": "1", "OTHER": "x"})  # not NSA_*: ignored


def test_good_settings_parse(from_env):
    s = from_env({"NSA_USE_FA2": "yes", "NSA_PREFILL_BATCHED": " 0 ", "NSA_USE_SEL_PACK": "off",
                  "NSA_SEL_RANGES_V2": "False", "NSA_SEL_PACK_RESERVE_N": "4096", "NSA_SEL_PACK_RESERVE_L": "1_024",
                  "NSA_VARLEN_RESERVE_K": str(2**40), "NSA_VARLEN_RESERVE_N": ""})
    assert (s.use_fa2, s.prefill_batched, s.use_sel_pack, s.sel_ranges_v2) == (True, False, False, False)
    assert (s.sel_pack_reserve_n, s.sel_pack_reserve_l, s.varlen_reserve_k, s.varlen_reserve_n) == (4096, 1024, 2**40, 0)
    assert from_env(s.as_env()) == s  # round trip
    assert from_env({}) == nsa.Settings()


def test_reload_settings_reads_environment(monkeypatch):
    monkeypatch.setenv("NSA_SEL_PACK_RESERVE_N", "123")
    monkeypatch.setenv("NSA_USE_SEL_PACK", "0")
    s = nsa.reload_settings()
    assert s is nsa.settings() and s.sel_pack_reserve_n == 123 and not s.use_sel_pack
    monkeypatch.setenv("NSA_USE_FA2", "maybe")
    with pytest.raises(nsa.SettingsError, match="NSA_USE_FA2"):
        nsa.reload_settings()


def test_override_rejects_unknown_setting(override):
    with pytest.raises(nsa.SettingsError, match="use_fa3"), override(use_fa3=True):
        pass


# --- config validation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,kwargs", [
    ("dim", {"dim": 0}), ("dim", {"dim": 2.5}), ("groups", {"groups": 0}), ("groups", {"groups": True}),
    ("heads_per_group", {"heads_per_group": 0}), ("d_k", {"d_k": 0}), ("d_k", {"d_k": 7}),
    ("d_v", {"d_v": 0}), ("block_len", {"block_len": 0}), ("block_stride", {"block_stride": 0}),
    ("block_stride", {"block_stride": 16, "block_len": 8}), ("block_len", {"block_len": 10, "block_stride": 4}),
    ("sel_block_len", {"sel_block_len": 10, "block_stride": 4}), ("n_sel", {"n_sel": 2}),
    ("window", {"window": 0}), ("rope_theta", {"rope_theta": 0.0}), ("compress", {"compress": "max"}),
    ("gate_hidden", {"gate_hidden": -1}),
])
def test_config_validation_names_field(field, kwargs):
    base = {"dim": 16, "d_k": 8, "d_v": 8, "block_len": 8, "block_stride": 4, "sel_block_len": 8, "n_sel": 3, "window": 8}
    base.update(kwargs)
    with pytest.raises(ValueError, match=rf"NSAConfig\.{field}="):
        nsa.NSAConfig(**base)


def test_config_accepts_small_and_odd_shapes():
    cfg = nsa.NSAConfig(dim=3, groups=1, heads_per_group=1, d_k=2, d_v=5, block_len=1, block_stride=1,
                        sel_block_len=1, n_sel=3, window=1)
    assert cfg.num_heads == 1 and cfg.num_cmp(0) == 1 and cfg.num_sel_blocks(7) == 7
    y = nsa.NSAAttention(cfg)(torch.randn(1, 6, 3))
    assert y.shape == (1, 6, 3) and torch.isfinite(y).all()


# --- GPU: no host sync in decode, CUDA-graph replay ------------------------------------------------------------------

def _gpu_layer(cuda, dtype=torch.float32):
    cfg = nsa.NSAConfig(dim=64, groups=2, heads_per_group=2, d_k=16, d_v=16, block_len=8, block_stride=4,
                        sel_block_len=16, n_sel=4, window=32)
    return nsa.NSAAttention(cfg).to(cuda, dtype)


@pytest.mark.gpu
def test_decode_step_does_no_host_sync(cuda, gen):
    attn = _gpu_layer(cuda)
    x = torch.randn(2, 40, 64, generator=gen).to(cuda)
    cache = attn.new_cache(2, 64)
    attn.prefill(x[:, :20], cache)
    attn.decode_step(x[:, 20:21], cache)  # warm-up (lazy init may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ys = [attn.decode_step(x[:, t: t + 1], cache) for t in range(21, 40)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        ref = attn(x)
    torch.testing.assert_close(torch.cat(ys, 1), ref[:, 21:], atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_decode_step_cuda_graph_replays_to_eager(cuda, gen):
    attn = _gpu_layer(cuda)
    T, P = 48, 10
    x = torch.randn(1, T, 64, generator=gen).to(cuda)
    eager_cache = attn.new_cache(1, T)
    attn.prefill(x[:, :P], eager_cache)
    eager = [attn.decode_step(x[:, t: t + 1], eager_cache) for t in range(P, T)]

    cache = attn.new_cache(1, T)
    attn.prefill(x[:, :P], cache)
    static_x = x[:, P: P + 1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, then rewind the cache
        attn.decode_step(static_x, cache)
    torch.cuda.current_stream().wait_stream(side)
    cache.pos.fill_(P)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = attn.decode_step(static_x, cache)
    cache.pos.fill_(P)  # capture does not run the step; start replays from position P
    replayed = []
    for t in range(P, T):
        static_x.copy_(x[:, t: t + 1])
        graph.replay()
        replayed.append(static_y.clone())
    assert int(cache.pos) == T
    torch.testing.assert_close(torch.cat(replayed, 1), torch.cat(eager, 1), atol=1e-5, rtol=0)
