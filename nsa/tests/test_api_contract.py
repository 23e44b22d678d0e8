"""The public ops (``nsa.ops``) as an API a new user can call safely (issue 11): one test per trap
found by calling them as a user would, each failing on the ops before the change.

Contract (docs/api.md): tensors positional, everything else keyword-only with one name per concept;
``ValueError`` naming the op, the argument, its value and what is accepted; integer index tensors of
any integer dtype; ``T = 0`` gives empty outputs; forced blocks survive any scores; no op reads the
``NSA_*`` settings; bad settings fail at ``import nsa``.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import nsa
from nsa import ops
from nsa.ops import naive

pytestmark = pytest.mark.ops

TOL = {"atol": 1e-5, "rtol": 1e-5}
PUBLIC_OPS = [getattr(ops, name) for name in ops.__all__]
INT_DTYPES = [getattr(torch, name) for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
              if hasattr(torch, name)]


def _qkv(gen, B=2, T=12, S=None, G=2, h=2, d_k=4, d_v=3, dtype=torch.float32):
    S = T if S is None else S
    return (torch.randn(B, T, G * h, d_k, generator=gen, dtype=dtype), torch.randn(B, S, G, d_k, generator=gen, dtype=dtype),
            torch.randn(B, S, G, d_v, generator=gen, dtype=dtype))


def _blocks(gen, B=2, T=12, G=2, l_sel=4, n_sel=3):
    return ops.select_blocks(torch.rand(B, T, G, -(-T // l_sel), generator=gen), sel_block_len=l_sel, n_sel=n_sel)


def _raises(match_arg: str, fn, *args, **kwargs) -> str:
    """``fn`` raises a ValueError that names ``match_arg`` and says what is accepted."""
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert match_arg in msg and "accepted" in msg, msg
    return msg


# --- signatures: keyword-only scalars, one name per concept, typed and documented ------------------------------

TENSOR_PARAMS = {"q", "k", "v", "k_cmp", "v_cmp", "block_idx", "scores", "p_cmp", "x", "weight", "bias", "pos_emb"}


@pytest.mark.parametrize("fn", PUBLIC_OPS, ids=lambda f: f.__name__)
def test_arguments_after_the_tensors_are_keyword_only(fn):
    """Trap: ``select_blocks(scores, sel_block_len, n_sel)`` took two integers side by side; swapped,
    they silently gave another answer."""
    params = list(inspect.signature(fn).parameters.values())
    for p in params:
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert p.name in TENSOR_PARAMS or (fn in (ops.apply_rope, ops.num_cmp) and p.name == "positions"), \
                f"{fn.__name__}({p.name}) may be passed by position"
    scores = torch.rand(1, 8, 1, 2)
    with pytest.raises(TypeError):
        ops.select_blocks(scores, 4, 3)


def test_one_name_per_concept():
    """Trap: the selection block length was ``sel_block_len`` in one op and ``block_size`` in another;
    ``sliding_window_attention`` had no ``positions``; ``selection_scores`` needed ``num_blocks``."""
    names = {f.__name__: set(inspect.signature(f).parameters) for f in PUBLIC_OPS}
    for op in ("selection_scores", "select_blocks", "selection_ranges", "selection_attention"):
        assert "sel_block_len" in names[op], op
    assert not any("block_size" in n for n in names.values())
    for op in ("compressed_attention", "select_blocks", "selection_ranges", "selection_attention",
               "sliding_window_attention"):
        assert "positions" in names[op], op
    p = torch.softmax(torch.randn(1, 20, 4, 4), -1)
    kw = {"groups": 2, "block_len": 8, "block_stride": 4, "sel_block_len": 8}
    assert torch.equal(ops.selection_scores(p, **kw), ops.selection_scores(p, **kw, num_blocks=3))


@pytest.mark.parametrize("fn", PUBLIC_OPS, ids=lambda f: f.__name__)
def test_public_ops_are_typed_and_documented(fn):
    sig = inspect.signature(fn)
    assert sig.return_annotation is not inspect.Signature.empty, fn.__name__
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{fn.__name__}({p.name}) has no type hint"
    doc = inspect.getdoc(fn) or ""
    assert "[" in doc and ("dtype" in doc or "float" in doc or "int" in doc), f"{fn.__name__}: shapes/dtypes undocumented"


def test_window_takes_positions(gen):
    """Trap: ``sliding_window_attention`` had no ``positions`` (its reference and the other ops did)."""
    q, k, v = _qkv(gen, T=4, S=20)
    positions = torch.tensor([3, 9, 10, 19], dtype=torch.int32)
    got = ops.sliding_window_attention(q, k, v, window=5, positions=positions)
    ref = naive.sliding_window_attention(q, k, v, window=5, positions=positions)
    torch.testing.assert_close(got, ref, **TOL)


# --- no hidden global state ------------------------------------------------------------------------------------

class _Poisoned:
    def __getattr__(self, name):
        raise AssertionError(f"an op read nsa.settings().{name}")


def test_ops_read_no_settings(gen, monkeypatch):
    """Trap: ``selection_attention`` chose packed vs gather from ``settings()``, and its workspace read
    ``settings()`` again; the route table decides, and passes what the op needs."""
    q, k, v = _qkv(gen)
    idx = _blocks(gen)
    with nsa.override_settings(use_sel_pack=False):
        want_packed = ops.selection_attention(q, k, v, idx, sel_block_len=4, packed=True)
        assert nsa.workspace_stats()["sel_pack"]["requests"] == 2  # packed, whatever NSA_USE_SEL_PACK says
    nsa.reset_workspaces()
    monkeypatch.setattr(nsa.flags, "_current", _Poisoned())
    with torch.no_grad():
        for packed in (True, False):
            got = ops.selection_attention(q, k, v, idx, sel_block_len=4, packed=packed, workspace_reserve=(100, 16))
            torch.testing.assert_close(got, want_packed, **TOL)
        o, p = ops.compressed_attention(q, k[:, :3], v[:, :3], block_len=4, block_stride=2)
        scores = ops.selection_scores(p, groups=2, block_len=4, block_stride=2, sel_block_len=4)
        ops.select_blocks(scores, sel_block_len=4, n_sel=3)
        ops.selection_ranges(idx, sel_block_len=4)
        ops.sliding_window_attention(q, k, v, window=3)
    assert nsa.workspace_stats()["sel_pack"]["capacity_rows"] == 100  # the reserve passed in, not NSA_*


def test_backends_reports_the_decode_selection_that_runs(make_cfg, gen, override):
    attn = nsa.NSAAttention(make_cfg())
    x = torch.randn(1, 10, attn.cfg.dim, generator=gen)
    for pack, requests in ((False, 0), (True, 2 * 10)):
        nsa.reset_workspaces()
        with override(use_sel_pack=pack):
            route = nsa.backends("cpu", torch.float32)["decode"]["route"]
            cache = attn.new_cache(1, 10)
            for t in range(10):
                attn.decode_step(x[:, t: t + 1], cache)
        assert route.endswith("packed" if pack else "gather")
        assert nsa.workspace_stats()["sel_pack"]["requests"] == requests


def test_routes_follow_the_dtype_the_branches_compute_in(make_cfg, gen, monkeypatch):
    """Under autocast (float32 parameters, bf16 compute) a layer's input is float32 while its branches
    get bf16 tensors: every route must be chosen for bf16, as the branch ops see it (routing by the
    input ran the float32 reference routes on a GPU's bf16 training), and routes_taken says so."""
    from nsa import routes

    seen = []
    for name in ("route_cmp", "route_select", "route_slc", "route_win"):
        real = getattr(routes, name)
        monkeypatch.setattr(routes, name, lambda dev, dtype, *a, _real=real, _n=name, **k:
                            seen.append((_n, dtype)) or _real(dev, dtype, *a, **k))
    attn = nsa.NSAAttention(make_cfg())
    x = torch.randn(1, 40, attn.cfg.dim, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x)
    assert y.dtype == torch.bfloat16 and seen and {d for _, d in seen} == {torch.bfloat16}, seen
    expected = routes.route_win("cpu", torch.bfloat16, attn.cfg.d_k, attn.cfg.d_v)
    assert attn.routes_taken["win"] == {"route": expected.name, "reason": expected.reason}
    assert {"prefill", "cmp", "select", "slc", "win"} <= set(attn.routes_taken)
    seen.clear()
    attn(x)
    assert {d for _, d in seen} == {torch.float32}


# --- validation: ValueError naming argument, value and what is accepted ---------------------------------------

def test_mixed_dtypes_raise(gen):
    """Trap: q float32 with k/v float64 returned float64 computed in float32."""
    q, k, v = _qkv(gen)
    k64, v64 = k.double(), v.double()
    assert "mixed dtypes" in _raises("q.dtype", ops.sliding_window_attention, q, k64, v64, window=3)
    _raises("q.dtype", ops.selection_attention, q, k64, v64, _blocks(gen), sel_block_len=4)
    _raises("q.dtype", ops.compressed_attention, q, k64[:, :3], v64[:, :3], block_len=4, block_stride=2)


def test_heads_not_divisible_by_groups_raise(gen):
    """Trap: heads not divisible by groups gave ``shape '[1, 12, 2, 1, 4]' is invalid``."""
    q, k, v = _qkv(gen, G=1, h=3)
    k, v = k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1)
    for fn, args, kw in [
        (ops.sliding_window_attention, (q, k, v), {"window": 3}),
        (ops.selection_attention, (q, k, v, _blocks(gen)), {"sel_block_len": 4}),
        (ops.compressed_attention, (q, k[:, :3], v[:, :3]), {"block_len": 4, "block_stride": 2}),
        (ops.selection_scores, (torch.rand(2, 12, 3, 5),), {"groups": 2, "block_len": 4, "block_stride": 2,
                                                             "sel_block_len": 4}),
    ]:
        assert "divisible" in _raises("3 heads", fn, *args, **kw)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_block_idx_of_any_integer_dtype(dtype, gen):
    """Trap: int32 ``block_idx`` failed on the packed route (``scatter(): Expected self.dtype``)."""
    q, k, v = _qkv(gen)
    idx = _blocks(gen)
    ref = ops.selection_attention(q, k, v, idx, sel_block_len=4)
    if not dtype.is_signed:  # cannot hold -1; select_blocks leaves none here (3 candidates from t = 0)
        idx = torch.where(idx < 0, idx[..., :1], idx)
    cast = idx.to(dtype)
    for packed in (True, False):
        for v2 in (True, False):
            got = ops.selection_attention(q, k, v, cast, sel_block_len=4, packed=packed, ranges_v2=v2)
            torch.testing.assert_close(got, ref, **TOL)
    for version in (1, 2):
        want = ops.selection_ranges(idx, sel_block_len=4, version=version)
        got = ops.selection_ranges(cast, sel_block_len=4, version=version)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    positions = torch.arange(12).to(dtype)
    scores = torch.rand(2, 12, 2, 3, generator=gen)
    assert torch.equal(ops.select_blocks(scores, sel_block_len=4, n_sel=3, positions=positions),
                       ops.select_blocks(scores, sel_block_len=4, n_sel=3))
    assert torch.equal(ops.num_cmp(positions, block_len=4, block_stride=2),
                       ops.num_cmp(positions.long(), block_len=4, block_stride=2))


def test_float_or_out_of_range_block_idx_raises(gen):
    """Trap: float ``block_idx`` gave ``torch.iinfo() requires an integer input type``; a negative
    index other than -1 (an int8 that wrapped) silently selected nothing."""
    q, k, v = _qkv(gen)
    idx = _blocks(gen)
    assert "integer dtype" in _raises("block_idx.dtype", ops.selection_attention, q, k, v, idx.float(), sel_block_len=4)
    _raises("block_idx.dtype", ops.selection_ranges, idx.float(), sel_block_len=4)
    bad = idx.clone()
    bad[0, 5, 1, 0] = -7
    assert "-7" in _raises("block_idx", ops.selection_attention, q, k, v, bad, sel_block_len=4)
    _raises("block_idx", ops.selection_ranges, bad, sel_block_len=4)
    ops.selection_attention(q, k, v, bad, sel_block_len=4, validate=False)  # the caller vouches: no check
    _raises("block_idx.shape", ops.selection_attention, q, k, v, idx[:, :5], sel_block_len=4)


@pytest.mark.parametrize("value", [0, -2, 2.5, True])
def test_block_lengths_must_be_positive_integers(value, gen):
    """Trap: ``sel_block_len=0`` raised ``ZeroDivisionError``."""
    q, k, v = _qkv(gen)
    p = torch.softmax(torch.randn(2, 12, 4, 3, generator=gen), -1)
    _raises("sel_block_len", ops.selection_attention, q, k, v, _blocks(gen), sel_block_len=value)
    _raises("sel_block_len", ops.select_blocks, torch.rand(2, 12, 2, 3), sel_block_len=value, n_sel=3)
    _raises("sel_block_len", ops.selection_ranges, _blocks(gen), sel_block_len=value)
    _raises("sel_block_len", ops.selection_scores, p, groups=2, block_len=4, block_stride=2, sel_block_len=value)
    _raises("block_len", ops.compressed_attention, q, k[:, :3], v[:, :3], block_len=value, block_stride=2)
    _raises("block_stride", ops.num_cmp, torch.arange(5), block_len=4, block_stride=value)


@pytest.mark.parametrize("window", [0, -3, 1.5, None])
def test_window_must_be_positive(window, gen):
    """Trap: ``window`` 0 or -3 silently returned zeros."""
    q, k, v = _qkv(gen)
    assert repr(window) in _raises("window", ops.sliding_window_attention, q, k, v, window=window)


@pytest.mark.parametrize("n_sel", [1, 2, 0])
def test_n_sel_must_keep_the_forced_blocks(n_sel):
    """Trap: ``n_sel`` 1 or 2 was accepted and dropped forced blocks."""
    assert ">= 3" in _raises("n_sel", ops.select_blocks, torch.rand(1, 20, 1, 5), sel_block_len=4, n_sel=n_sel)


def test_scores_must_cover_every_position():
    """Too few blocks in ``scores`` to hold the current block: the forced block could not be chosen."""
    _raises("scores.shape", ops.select_blocks, torch.rand(1, 20, 1, 3), sel_block_len=4, n_sel=3)
    _raises("scores.shape", ops.select_blocks, torch.rand(1, 2, 1, 3), sel_block_len=4, n_sel=3,
            positions=torch.tensor([3, 12]))


@pytest.mark.parametrize("name,arg", [("positions.shape", torch.arange(5)), ("positions.dtype", torch.arange(12.0)),
                                      ("positions", -torch.arange(12))])
def test_bad_positions_raise(name, arg, gen):
    q, k, v = _qkv(gen)
    _raises(name, ops.sliding_window_attention, q, k, v, window=3, positions=arg)
    _raises(name, ops.selection_attention, q, k, v, _blocks(gen), sel_block_len=4, positions=arg)
    _raises(name, ops.compressed_attention, q, k[:, :3], v[:, :3], block_len=4, block_stride=2, positions=arg)


def test_shape_mismatches_raise(gen):
    q, k, v = _qkv(gen)
    _raises("k.shape", ops.sliding_window_attention, q, k[..., :3], v, window=3)
    _raises("v.shape", ops.sliding_window_attention, q, k, v[:, :5], window=3)
    _raises("q.shape", ops.sliding_window_attention, q[0], k, v, window=3)
    _raises("scale", ops.sliding_window_attention, q, k, v, window=3, scale=-1.0)
    _raises("pos_emb.shape", ops.compress_tokens, k, None, None, torch.zeros(3, 4), block_len=4, block_stride=2,
            mode="mean")


# --- T = 0 ------------------------------------------------------------------------------------------------------

def test_empty_sequence_returns_empty_outputs(gen):
    """Trap: T = 0 raised ``torch.cat(): expected a non-empty list``."""
    q, k, v = _qkv(gen, T=0)
    B, H, G = 2, 4, 2
    assert ops.sliding_window_attention(q, k, v, window=3).shape == (B, 0, H, 3)
    idx = torch.zeros(B, 0, G, 3, dtype=torch.long)
    assert ops.selection_attention(q, k, v, idx, sel_block_len=4).shape == (B, 0, H, 3)
    starts, ends = ops.selection_ranges(idx, sel_block_len=4)
    assert starts.shape == ends.shape == (B, 0, G, 3)
    k3, v3 = _qkv(gen, T=3)[1:]
    o, p = ops.compressed_attention(q, k3, v3, block_len=4, block_stride=2)
    assert o.shape == (B, 0, H, 3) and p.shape == (B, 0, H, 3)
    scores = ops.selection_scores(p, groups=G, block_len=4, block_stride=2, sel_block_len=4)
    assert scores.shape == (B, 0, G, 0)
    assert ops.select_blocks(scores, sel_block_len=4, n_sel=3).shape == (B, 0, G, 3)
    assert ops.compress_tokens(k, None, None, torch.zeros(4, 4), block_len=4, block_stride=2, mode="mean").shape \
        == (B, 0, G, 4)
    assert ops.num_cmp(torch.zeros(0, dtype=torch.long), block_len=4, block_stride=2).shape == (0,)
    assert ops.apply_rope(q, torch.zeros(0, dtype=torch.long)).shape == q.shape


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_module_empty_sequence(batched, make_cfg, override):
    attn = nsa.NSAAttention(make_cfg())
    with override(prefill_batched=batched):
        assert attn(torch.zeros(2, 0, attn.cfg.dim)).shape == (2, 0, attn.cfg.dim)
    cache = attn.new_cache(2, 4)
    assert attn.prefill(torch.zeros(2, 0, attn.cfg.dim), cache).shape == (2, 0, attn.cfg.dim) and int(cache.pos) == 0


def test_backends_reports_sequential_prefill(override):
    """With NSA_PREFILL_BATCHED=0 the per-token references run, not the branch routes."""
    with override(prefill_batched=False):
        b = nsa.backends("cpu", torch.float32)
    assert all(b[branch]["route"] == "sequential-reference" for branch in ("cmp", "slc", "slc_inference", "win", "win_inference"))


# --- forced blocks whatever the scores ---------------------------------------------------------------------------

@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_forced_blocks_survive_any_scores(poison, gen):
    """Trap: NaN scores dropped the forced current block (the spec: forced blocks are always selected)."""
    T, l_sel, n_sel, nb = 40, 4, 4, 10
    scores = torch.rand(2, T, 2, nb, generator=gen)
    scores[:, :, 0] = poison
    scores[:, ::3, :, 3:] = poison  # forced and free blocks alike
    idx = ops.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel)
    for t in range(T):
        cur = t // l_sel
        for j in {0, cur, cur - 1} - {-1}:
            assert (idx[:, t] == j).any(-1).all(), f"forced block {j} missing at t={t} ({poison} scores)"
    assert torch.all(idx <= (torch.arange(T) // l_sel)[None, :, None, None])  # no future block got in
    assert torch.equal(idx, naive.select_blocks(scores, sel_block_len=l_sel, n_sel=n_sel))


# --- decode picks the blocks prefill picks -----------------------------------------------------------------------

def test_float64_decode_scores_equal_prefill(make_cfg, gen, monkeypatch):
    """Trap: float64 decode built its overlap weights in float32 (prefill in float64): near ties
    within ~3e-8 chose other blocks in decode. With l = 12, weights of 1/3 are inexact in float32."""
    import nsa.attention as attention

    cfg = make_cfg(block_len=12, block_stride=4, sel_block_len=8, n_sel=3, window=4)
    attn = nsa.NSAAttention(cfg).double()
    T = 40
    x = torch.randn(1, T, cfg.dim, generator=gen, dtype=torch.float64)
    seen = []
    original = attention.select_blocks

    def recording(scores, *args, **kwargs):
        seen.append(scores.detach().clone())
        return original(scores, *args, **kwargs)

    monkeypatch.setattr(attention, "select_blocks", recording)
    with torch.no_grad():
        attn(x)
        prefill_scores = seen.pop()
        cache = attn.new_cache(1, T)
        for t in range(T):
            attn.decode_step(x[:, t: t + 1], cache)
    decode_scores = torch.cat(seen, dim=1)
    assert decode_scores.shape == prefill_scores.shape
    assert (decode_scores - prefill_scores).abs().max() <= 1e-13


def test_checks_add_no_graph_break_to_decode(make_cfg, gen):
    """The host-side checks trace away: the compiled decode step is still one graph (fullgraph)."""
    attn = nsa.NSAAttention(make_cfg())
    x = torch.randn(1, 12, attn.cfg.dim, generator=gen)
    with torch.no_grad():
        ref = attn(x)
    attn.compile_decode(backend="eager", fullgraph=True)
    cache = attn.new_cache(1, 12)
    with torch.no_grad():
        y = torch.cat([attn.decode_step(x[:, t: t + 1], cache) for t in range(12)], 1)
    torch.testing.assert_close(y, ref, **TOL)


# --- settings fail early -----------------------------------------------------------------------------------------

def test_bad_setting_fails_at_import():
    """Trap: settings errors surfaced at the first forward, never at ``import nsa``."""
    root = pathlib.Path(nsa.__file__).resolve().parent.parent
    env = {**os.environ, "NSA_USE_FA2": "maybe", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", "import nsa"], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "SettingsError" in proc.stderr and "NSA_USE_FA2='maybe'" in proc.stderr


def test_reserve_that_cannot_fit_fails_at_settings(monkeypatch):
    """A reserve inside the parse limit whose workspace fits no memory: fails at ``nsa.settings()``."""
    monkeypatch.setenv("NSA_SEL_PACK_RESERVE_N", str(10**12))
    monkeypatch.setenv("NSA_SEL_PACK_RESERVE_L", "64")
    with pytest.raises(nsa.SettingsError) as err:
        nsa.reload_settings()
    assert "NSA_SEL_PACK_RESERVE_N=1000000000000" in str(err.value) and "accepted" in str(err.value)
