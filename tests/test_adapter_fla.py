"""fla's NSA through its adapter (workflow/adapters/fla.py), on a machine without CUDA.

    python -m pytest tests/test_adapter_fla.py       # the GPU side: python tools/check_fla_adapter.py

What runs anywhere: the protocol, and an ``Unsupported`` naming the field for each constraint of
fla's op (checked before fla is imported, so no triton is needed); on CPU every stage is "not
supported by this implementation". With PyPI (marked ``workflow``): the constraints the adapter
states are read back from fla-core's released source, so a release that lifts one shows here.
With fla importable (it needs triton): the adapter's view of the installed op.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import adapter_api  # noqa: E402

# A model fla's op can run: 16 query heads per key/value head, one block size for all, d_k == d_v.
MODEL = {"dim": 256, "groups": 1, "heads_per_group": 16, "d_k": 64, "d_v": 64, "block_len": 32,
         "block_stride": 32, "sel_block_len": 32, "n_sel": 16, "window": 64}
FLA_CORE = "0.6.0"  # the release whose source the adapter's constraints were read from


def adapter():
    return adapter_api.load(adapter_api.adapter_path("fla"))


def unsupported(change: dict, device: str = "cuda", dtype: str = "bfloat16") -> str:
    with pytest.raises(adapter_api.Unsupported) as info:
        adapter().check_model({**MODEL, **change}, device, dtype)
    return str(info.value)


def test_adapter_follows_the_protocol():
    ad = adapter()
    assert adapter_api.check_module(ad) == []
    caps = adapter_api.capabilities(ad)
    assert caps["devices"] == ["cuda"] and caps["dtypes"] == ["bfloat16", "float16"]
    assert caps["decode"] and caps["backward"] and caps["block_indices"]
    assert not caps["cuda_graph"] and not caps["compile"] and not caps["workspaces"]
    assert ad.PACKAGE == "fla" and ad.INSTALL == "pip"


def test_on_cpu_every_stage_is_not_supported():
    ad = adapter()
    assert adapter_api.unsupported_on(ad, "cpu") == "unsupported: device=cpu (this implementation runs on cuda)"
    assert adapter_api.unsupported_on(ad, "cuda", "float32").startswith("unsupported: dtype=float32")
    with pytest.raises(adapter_api.Unsupported, match=r"^unsupported: device='cpu' \(not supported by this "
                                                      r"implementation: .*CUDA only\)$"):
        ad.build_layer(MODEL, device="cpu", dtype="bfloat16")  # raised before fla (and triton) is imported


def test_a_model_it_can_run_passes_the_checks():
    adapter().check_model(MODEL, "cuda", "bfloat16")
    adapter().check_model({**MODEL, "groups": 2, "heads_per_group": 32, "n_sel": 12}, "cuda:0", "float16")


@pytest.mark.parametrize("change, field, why", [
    ({"heads_per_group": 4}, "heads_per_group=4", "power of 2 and >= 16"),
    ({"heads_per_group": 24}, "heads_per_group=24", "power of 2 and >= 16"),
    ({"block_stride": 16}, "block_stride=16", "non-overlapping blocks"),
    ({"sel_block_len": 64}, "sel_block_len=64", "one block_size for compression and selection"),
    ({"block_len": 24, "block_stride": 24, "sel_block_len": 24}, "block_len=24", "a power of 2, >= 16"),
    ({"block_len": 8, "block_stride": 8, "sel_block_len": 8}, "block_len=8", "a power of 2, >= 16"),
    ({"n_sel": 17}, "n_sel=17", "block_len >= 2 * next_pow2(n_sel) = 64"),
    ({"n_sel": 0}, "n_sel=0", "n_sel >= 1"),
    ({"d_v": 32}, "d_v=32", "one head size for q, k and v"),
    ({"d_k": 8, "d_v": 8}, "d_k=8", "16 <= d_k <= 256"),
    ({"d_k": 512, "d_v": 512}, "d_k=512", "16 <= d_k <= 256"),
    ({"window": 0}, "window=0", "switches the window branch off"),
    ({"shared_kv": True}, "shared_kv=True", "this adapter maps"),
])
def test_each_constraint_raises_unsupported_naming_its_field(change, field, why):
    msg = unsupported(change)
    assert msg.startswith(f"unsupported: {field} (") and why in msg, msg


def test_float32_is_refused_with_its_reason():
    assert "flash-attn" in unsupported({}, dtype="float32")


def test_check_env_checks_the_values_fla_parses():
    ad = adapter()
    assert ad.check_env({"FLA_USE_FAST_OPS": "1", "FLA_TENSOR_CACHE_SIZE": "8", "FLA_TRITON": "0", "X": "y"}) == []
    problems = ad.check_env({"FLA_USE_FAST_OPS": "true", "FLA_TENSOR_CACHE_SIZE": "big"})
    assert len(problems) == 2 and "FLA_USE_FAST_OPS='true' is invalid" in problems[0]


@pytest.mark.workflow
def test_constraints_are_those_of_the_released_source(tmp_path):
    """Each constraint the adapter states, found in fla-core's released parallel.py (read as text)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--disable-pip-version-check", "-d", str(tmp_path), f"fla-core=={FLA_CORE}"],
                          capture_output=True, text=True, timeout=300)
    wheels = list(tmp_path.glob("fla_core-*.whl"))
    if proc.returncode or not wheels:
        pytest.skip(f"cannot download fla-core=={FLA_CORE} from PyPI: {(proc.stderr or proc.stdout)[-300:]}")
    source = zipfile.ZipFile(wheels[0]).read("fla/ops/nsa/parallel.py").decode()
    for needle in (
        "assert G >= 16 and (G & (G - 1)) == 0",  # heads_per_group
        "mean_pooling(k, block_size",  # compression: mean pooling over block_size, no stride of its own
        "BC = BS = block_size",  # selection blocks are the compression blocks
        'assert BC >= 2 * S',  # block_len >= 2 * next_pow2(n_sel)
        "S = triton.next_power_of_2(S)",  # an int block count is rounded up
        "window_size=(window_size-1, 0)",  # keys [t - w + 1, t]
        "if window_size > 0:",  # window 0 switches the branch off
        "flash_attn_func = flash_attn_varlen_func = None",  # no flash-attn: no window
        "Q_OFFSET = TK - TQ",  # cached inference (decode)
        "(o_c == 0) | ((o_c == IC - 1) | (o_c == IC))",  # forced: block 0 and the two most recent
        'assert NK == 1, "The key dimension can not be larger than 256"',
    ):
        assert needle in source, needle


def test_with_fla_importable_the_installed_op_supports_decode():
    pytest.importorskip("triton", reason="fla's ops import triton, which this machine does not have")
    pytest.importorskip("fla.ops.nsa.parallel", reason="fla (fla-core) is not installed here")
    ad = adapter()
    assert ad._has_cached_inference()
    with pytest.raises(adapter_api.Unsupported, match="device='cpu'"):
        ad.build_layer(MODEL, device="cpu", dtype="bfloat16")


def stand_in_parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size):
    """Dense causal GQA attention (queries are the last TQ of TK positions), gated like the op:
    a stand-in that lets the adapter's glue (projections, rotary offsets, cache) run on CPU."""
    import torch

    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    k, v = (t.repeat_interleave(HQ // H, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    pos_q = torch.arange(TK - TQ, TK).view(TQ, 1)
    s = s.masked_fill(torch.arange(TK).view(1, TK) > pos_q, float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)
    return o * (g_cmp + g_slc + g_swa).unsqueeze(-1)


def test_glue_decode_matches_forward_with_a_stand_in_op(monkeypatch):
    """The adapter's own code on CPU (fla's op replaced): rotary offsets, cache writes, shapes."""
    import types

    import torch

    ad = adapter()
    monkeypatch.setattr(ad, "_ops", lambda: types.SimpleNamespace(parallel_nsa=stand_in_parallel_nsa))
    torch.manual_seed(0)
    model = {**MODEL, "dim": 32, "d_k": 16, "d_v": 16, "n_sel": 12}
    layer = ad._layer_class()(model)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        y = ad.forward(layer, x)
        monkeypatch.setattr(ad, "_has_cached_inference", lambda: True)
        cache = ad.new_cache(layer, 2, 20)
        y_p, cache = ad.prefill(layer, x[:, :7], cache)
        parts = [y_p]
        for t in range(7, 20):
            y_t, cache = ad.decode_step(layer, x[:, t:t + 1], cache)
            parts.append(y_t)
    assert y.shape == (2, 20, 32) and cache["len"] == 20
    assert (torch.cat(parts, 1) - y).abs().max().item() < 1e-5
    assert layer.block_counts(torch.zeros(2, 5, 1, 1)).shape == (2, 5, model["groups"])  # n_sel=12: a tensor
    with pytest.raises(adapter_api.Unsupported, match="^unsupported: prefill="):
        ad.prefill(layer, x, cache)


# ------------------------------------------------------------------------------------------------
# The whole workflow with the fla adapter on CPU: every stage "not supported", nothing FAILED


FLA_ON_CPU = {
    "implementation": {"adapter": "fla"},
    "variants": {FLA_CORE: FLA_CORE},
    "baseline": FLA_CORE,
    "reserve_configs": {"none": {}},
    "common_env": {},
    "suites": {},
    "device": "cpu",
    "model": MODEL,
    "decode": {"cpu": {"contexts": [64, 128], "steps": 4, "warmup": 1, "rounds": 2, "processes": 2}},
    "train": {"cpu": {"steps": 4, "warmup": 1, "rounds": 2, "processes": 2, "batch": 2, "seq_len": 64, "layers": 1,
                      "vocab": 32, "lr": 0.02}},
    "equivalence": {"cpu": {"batch": 1, "seq_len": 640, "decode_steps": 3}},
    "consistency": {"cpu": {"batch": 1, "seq_len": 576, "prefix": 544, "dtype": "float32"}},
    "acceptance": {"bootstrap_resamples": 200},
}


@pytest.mark.workflow
def test_snakemake_on_cpu_reports_not_supported(tmp_path):
    """A local repository of fla-core's sdist, snakemake all on CPU: the env installs it, and every
    stage that runs it records "unsupported" with the adapter's reason (no FAILED row)."""
    import json

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lucidrains_repo

    try:
        repo = lucidrains_repo.build_repo(tmp_path / "repo", (FLA_CORE,), distribution="fla-core")
    except lucidrains_repo.Unavailable as exc:
        pytest.skip(f"cannot build a repository from fla-core's sdist: {exc}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    (work / "fla.yaml").write_text(yaml.safe_dump({**FLA_ON_CPU, "repo": repo["repo"]}, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
         "--cores", "2", "all", "--configfile", str(work / "fla.yaml")],
        cwd=work, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results, sha = work / "results", repo[FLA_CORE]
    env = json.loads((results / "env" / sha / "env.json").read_text())
    assert env["status"] == "ok" and env["implementation_version"] == FLA_CORE, env.get("error")
    reason = "unsupported: device=cpu (this implementation runs on cuda)"
    for rel in (f"consistency/{sha}/none.json", f"equiv/{sha}/none.json"):
        assert json.loads((results / rel).read_text()) == {"status": "unsupported", "reason": reason}, rel
    report = (results / "report.md").read_text()
    assert "FAILED" not in report and report.count(f"not supported: {reason}") >= 3
