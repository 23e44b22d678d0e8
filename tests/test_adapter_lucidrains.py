"""lucidrains' native-sparse-attention-pytorch through its adapter (workflow/adapters/lucidrains.py).

    python -m pytest tests/test_adapter_lucidrains.py            # all; -m "not workflow" for the offline ones

Offline: the model mapping (``layer_kwargs``) for both constructor shapes the releases have had, and
an ``Unsupported`` naming the field for everything the layer cannot honour.

With PyPI (marked ``workflow``): each release in tests/lucidrains_repo.VERSIONS is pip-installed into
a throwaway venv (this venv's torch seen through a .pth file; nothing is installed here), and this
file, run there as a script, drives the adapter at tiny sizes on CPU: shapes, decode == forward,
gradients, selected blocks. Then the workflow end to end on configs/lucidrains.yaml against a local
git repository built from the two releases' sdists (CI reaches PyPI, not GitHub).

What the package was found to do is asserted as measured, so a change in it shows here:
- decode == forward to float32 rounding once the first compressed token exists (t >= block_stride);
  before that, its decode attends to no compressed key (0) while its forward attends to the learned
  memory key (the memory value): equal only while that value is zero, as initialised;
- 0.1.27 and 0.2.3 build the same parameters from the same model and compute the same outputs;
- in bfloat16 (and float16) its decode raises once selection starts when einx >= 0.4 is installed
  (which its ``einx>=0.3.0`` lets pip pick): ``einx.where`` with a Python float promotes to float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_api  # noqa: E402
import lucidrains_repo  # noqa: E402

CONFIG = ROOT / "configs" / "lucidrains.yaml"
MODEL = {"dim": 32, "groups": 2, "heads_per_group": 2, "d_k": 8, "d_v": 8, "block_len": 8, "block_stride": 4,
         "sel_block_len": 8, "n_sel": 3, "window": 6}
# The constructor's keyword names in releases >= 0.2.0 and in 0.1.x (what layer_kwargs looks at).
NEW = {"dim", "dim_head", "heads", "kv_heads", "sliding_window_size", "compress_block_size",
       "compress_block_sliding_stride", "selection_block_size", "num_selected_blocks", "causal", "norm",
       "use_triton_kernel"}
OLD = NEW - {"compress_block_sliding_stride"} | {"compress_block_overlap_len"}
TOL = 1e-4  # float32 decode vs forward, outputs of size ~1 (measured: <= 4e-5)


def adapter():
    return adapter_api.load(adapter_api.adapter_path("lucidrains"))


def unsupported(model: dict, parameters=NEW) -> str:
    with pytest.raises(adapter_api.Unsupported) as info:
        adapter().layer_kwargs(model, parameters)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Offline: the protocol and the model mapping


def test_adapter_follows_the_protocol():
    ad = adapter()
    assert adapter_api.check_module(ad) == []
    caps = adapter_api.capabilities(ad)
    assert caps["decode"] and caps["backward"] and caps["block_indices"]
    assert not caps["cuda_graph"] and not caps["compile"] and not caps["workspaces"]
    assert ad.INSTALL == "pip" and ad.PACKAGE == "native_sparse_attention_pytorch"
    assert adapter_api.check_env(ad, {"NSA_ANYTHING": "x", "OMP_NUM_THREADS": "1"}) == []


def test_model_maps_onto_its_constructor():
    kw = adapter().layer_kwargs(MODEL, NEW)
    assert kw == {"dim": 32, "dim_head": 8, "heads": 4, "kv_heads": 2, "sliding_window_size": 5,
                  "compress_block_size": 8, "compress_block_sliding_stride": 4, "selection_block_size": 8,
                  "num_selected_blocks": 2, "causal": True, "norm": False, "use_triton_kernel": False}


def test_releases_before_0_2_spell_the_same_windows_as_an_overlap():
    kw = adapter().layer_kwargs(MODEL, OLD)
    assert kw["compress_block_size"] == 4 and kw["compress_block_overlap_len"] == 4
    assert "compress_block_sliding_stride" not in kw
    assert "block_len=12" in unsupported({**MODEL, "block_len": 12, "sel_block_len": 12}, OLD)


@pytest.mark.parametrize("change, field", [
    ({"d_v": 16}, "d_v=16"),
    ({"block_stride": 16}, "block_stride=16"),
    ({"sel_block_len": 6}, "sel_block_len=6"),
    ({"window": 1}, "window=1"),
    ({"n_sel": 0}, "n_sel=0"),
    ({"rope": True}, "rope=True"),
])
def test_fields_it_cannot_honour_raise_unsupported_naming_them(change, field):
    msg = unsupported({**MODEL, **change})
    assert msg.startswith(f"unsupported: {field} (") and msg.endswith(")")


def test_a_release_without_stride_or_overlap_takes_only_non_overlapping_blocks():
    bare = NEW - {"compress_block_sliding_stride"}
    assert "block_stride=4" in unsupported(MODEL, bare)
    assert adapter().layer_kwargs({**MODEL, "block_stride": 8}, bare)["compress_block_size"] == 8
    assert "groups=2" in unsupported(MODEL, bare - {"kv_heads"})


def test_config_is_valid_for_the_adapter():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["implementation"]["adapter"] == "lucidrains"
    assert set(cfg["variants"].values()) == set(lucidrains_repo.VERSIONS)
    assert cfg["baseline"] in cfg["variants"]
    adapter().layer_kwargs(cfg["model"], OLD)  # both constructor shapes honour the example's model
    adapter().layer_kwargs(cfg["model"], NEW)
    for suite in cfg["suites"].values():
        assert set(suite) <= {"args", "env", "min_tests"} and suite["args"][0].startswith("tests/")


# ------------------------------------------------------------------------------------------------
# With PyPI: the installed package, driven in a throwaway venv


def probe() -> dict:
    """Run inside a venv that has the package: the adapter at tiny sizes on CPU (JSON-able numbers)."""
    import torch

    ad = adapter()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layer = ad.build_layer(MODEL, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in layer.parameters():  # the init zeroes the memory key and the intra-block positions
            p.normal_(0, 0.3)
    B, T, P = 2, 37, 13
    x = torch.randn(B, T, MODEL["dim"])
    out = {"version": ad.version(), "params": {n: list(p.shape) for n, p in layer.named_parameters()}}
    y = ad.forward(layer, x)
    out["forward_shape"] = list(y.shape)
    out["forward_max_abs"] = y.abs().max().item()
    out["checksum"] = y.double().sum().item()

    def decode_errors(prefix: int) -> list[float]:
        with torch.no_grad():
            cache = ad.new_cache(layer, B, T)
            parts = []
            if prefix:
                y_p, cache = ad.prefill(layer, x[:, :prefix], cache)
                parts.append(y_p)
            for t in range(prefix, T):
                y_t, cache = ad.decode_step(layer, x[:, t:t + 1], cache)
                parts.append(y_t)
            return (torch.cat(parts, 1) - y).abs().amax(dim=(0, 2)).tolist()

    out["decode_err_prefix"] = decode_errors(P)
    out["decode_err_from_0"] = decode_errors(0)
    try:
        ad.prefill(layer, x[:, :4], ad.prefill(layer, x[:, :4], ad.new_cache(layer, B, T))[1])
        out["prefill_on_full_cache"] = "accepted"
    except adapter_api.Unsupported as exc:
        out["prefill_on_full_cache"] = str(exc)
    with torch.no_grad():
        layer.compress_mem_kv.zero_()
    y = ad.forward(layer, x)
    out["decode_err_from_0_zero_memory"] = max(decode_errors(0))

    blocks = ad.selected_blocks(layer, x)
    out["blocks_shape"] = list(blocks.shape)
    out["blocks_max"] = blocks.max().item()
    # a picked block must have started before the query's own block (which is read anyway)
    own = torch.arange(T).view(1, 1, T, 1) // MODEL["sel_block_len"]
    out["blocks_before_own"] = bool(((blocks < own) | (blocks == -1)).all())
    out["blocks_first_rows"] = blocks[0, 0, :12].tolist()

    x = x.clone().requires_grad_(True)
    ad.forward(layer, x).square().mean().backward()
    grads = [p.grad for p in layer.parameters()]
    # rotary_emb.freqs is a parameter with requires_grad=False (fixed frequencies)
    out["grad_none"] = [n for n, p in layer.named_parameters() if p.requires_grad and p.grad is None]
    out["grad_finite"] = bool(all(torch.isfinite(g).all() for g in grads if g is not None))
    out["grad_x_nonzero"] = bool(x.grad.abs().sum() > 0)
    out["routes"] = ad.routes(layer)

    # bfloat16 decode, past the first selection block (where its decode masks with einx.where)
    from importlib import metadata

    out["einx"] = metadata.version("einx")
    layer = ad.build_layer(MODEL, device="cpu", dtype="bfloat16")
    xb = torch.randn(1, 24, MODEL["dim"], dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            yb = ad.forward(layer, xb)
            cache = ad.new_cache(layer, 1, 24)
            y_p, cache = ad.prefill(layer, xb[:, :16], cache)
            parts = [y_p]
            for t in range(16, 24):
                y_t, cache = ad.decode_step(layer, xb[:, t:t + 1], cache)
                parts.append(y_t)
        out["bf16_decode"] = {"max_abs_err": (torch.cat(parts, 1).float() - yb.float()).abs().max().item()}
    except RuntimeError as exc:
        out["bf16_decode"] = {"error": str(exc)}
    try:
        ad.build_layer({**MODEL, "d_v": 16}, device="cpu", dtype="float32")
        out["unsupported"] = None
    except adapter_api.Unsupported as exc:
        out["unsupported"] = str(exc)
    return out


_PROBES: dict = {}


def probe_release(version: str, tmp_path_factory) -> dict:
    """``probe()`` run in a throwaway venv holding that release from PyPI (once per session)."""
    if version not in _PROBES:
        t0 = time.monotonic()
        try:
            python = lucidrains_repo.make_venv(tmp_path_factory.mktemp(f"venv-{version}"),
                                               f"{lucidrains_repo.DISTRIBUTION}=={version}")
        except lucidrains_repo.Unavailable as exc:
            pytest.skip(f"cannot install {lucidrains_repo.DISTRIBUTION}=={version} from PyPI: {exc}")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([str(python), __file__], capture_output=True, text=True, timeout=300, env=env,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _PROBES[version] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.monotonic() - t0}
    return _PROBES[version]


@pytest.fixture(scope="module", params=lucidrains_repo.VERSIONS)
def probed(request, tmp_path_factory):
    return probe_release(request.param, tmp_path_factory)


@pytest.mark.workflow
def test_installed_release_is_the_one_asked_for(probed, request):
    assert probed["version"] == request.node.callspec.params["probed"]
    assert probed["forward_shape"] == [2, 37, MODEL["dim"]]
    assert probed["unsupported"].startswith("unsupported: d_v=16 (")


@pytest.mark.workflow
def test_decode_equals_forward_after_the_first_compressed_token(probed):
    assert max(probed["decode_err_prefix"]) <= TOL * max(1.0, probed["forward_max_abs"])
    stride = MODEL["block_stride"]
    err = probed["decode_err_from_0"]
    assert max(err[stride:]) <= TOL * max(1.0, probed["forward_max_abs"])
    # before it: forward reads the (randomised) memory value, decode reads nothing
    assert min(err[:stride]) > 0.05
    assert probed["decode_err_from_0_zero_memory"] <= TOL * max(1.0, probed["forward_max_abs"])
    assert probed["prefill_on_full_cache"].startswith("unsupported: prefill=")


@pytest.mark.workflow
def test_bfloat16_decode_fails_with_einx_0_4(probed):
    """Its decode masks with ``einx.where(mask, sim, python_float)``; einx >= 0.4 promotes that to
    float32 (torch.where keeps bfloat16), and the next einsum mixes float32 with bfloat16. It
    declares einx>=0.3.0, so a fresh install gets 0.4.x; with einx 0.3.0 the same decode agrees
    with forward to 5e-4."""
    major_minor = tuple(int(p) for p in probed["einx"].split(".")[:2])
    if major_minor >= (0, 4):
        # "expected m1 and m2 to have the same dtype" or "expected scalar type Float but found BFloat16"
        error = probed["bf16_decode"].get("error", "")
        assert "same dtype" in error or "scalar type Float" in error, probed["bf16_decode"]
    else:
        assert probed["bf16_decode"]["max_abs_err"] < 5e-2, probed["bf16_decode"]


@pytest.mark.workflow
def test_selected_blocks_are_past_blocks(probed):
    G, n_scored = MODEL["groups"], MODEL["n_sel"] - 1
    assert probed["blocks_shape"] == [2, G, 37, n_scored]
    assert probed["blocks_before_own"]
    # the first selection block (tokens 0-7) has no complete block before it: nothing picked
    assert probed["blocks_first_rows"][:8] == [[-1] * n_scored] * 8


@pytest.mark.workflow
def test_gradients_flow(probed):
    assert probed["grad_none"] == [] and probed["grad_finite"] and probed["grad_x_nonzero"]
    assert probed["routes"]["selection"]["route"] == "torch gather"


@pytest.mark.workflow
def test_releases_agree(tmp_path_factory):
    """Same parameter names and shapes, same outputs: the 0.2.0 rename changed spelling, not maths."""
    first, *others = (probe_release(v, tmp_path_factory) for v in lucidrains_repo.VERSIONS)
    for other in others:
        assert other["params"] == first["params"]
        assert other["checksum"] == pytest.approx(first["checksum"], rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# The whole workflow on configs/lucidrains.yaml, against a local repository of the two releases


TINY = {
    "device": "cpu",
    "model": {"dim": 32, "groups": 2, "heads_per_group": 2, "d_k": 8, "d_v": 8, "block_len": 4, "block_stride": 2,
              "sel_block_len": 4, "n_sel": 4, "window": 8},
    "decode": {"cpu": {"contexts": [16, 32], "steps": 4, "warmup": 1, "rounds": 2, "processes": 2}},
    "train": {"cpu": {"steps": 4, "warmup": 1, "rounds": 2, "processes": 2, "batch": 2, "seq_len": 32, "layers": 1,
                      "vocab": 32, "lr": 0.02}},
    "equivalence": {"cpu": {"batch": 1, "seq_len": 24, "decode_steps": 3}},
    "consistency": {"cpu": {"batch": 1, "seq_len": 24, "prefix": 16, "dtype": "float32"}},
    "acceptance": {"bootstrap_resamples": 200},
    # one case of its decode == forward test: [8-2-2-8] in 0.2.3, [10-2-2-8] in 0.1.27 (parameters renamed)
    "suites": {"inference": {"args": ["tests/test_sparse_attn.py", "-k", "test_inference and (8-2-2-8 or 10-2-2-8)"],
                             "env": {"OMP_NUM_THREADS": 1}, "min_tests": 1}},
}


@pytest.fixture(scope="module")
def local_repo(tmp_path_factory):
    try:
        return lucidrains_repo.build_repo(tmp_path_factory.mktemp("lucidrains"))
    except lucidrains_repo.Unavailable as exc:
        pytest.skip(f"cannot build the local repository from PyPI sdists: {exc}")


@pytest.mark.workflow
def test_snakemake_end_to_end(local_repo, tmp_path):
    """snakemake all --configfile configs/lucidrains.yaml --config repo=<local repo>, with tiny sizes."""
    yaml = pytest.importorskip("yaml")
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text((ROOT / "config.yaml").read_text())  # the defaults, as in a checkout
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSA_") and k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
         "--cores", "2", "all", "--configfile", str(CONFIG), str(work / "tiny.yaml"),
         "--config", f"repo={local_repo['repo']}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = work / "results"
    meta = json.loads((results / "meta" / "variants.json").read_text())
    assert set(meta["variants"]) == set(lucidrains_repo.VERSIONS)  # config.yaml's own variants not merged in
    assert meta["implementation"]["adapter"] == "lucidrains"
    for version in lucidrains_repo.VERSIONS:
        sha = meta["variants"][version]["sha"]
        assert sha == local_repo[version]
        env_record = json.loads((results / "env" / sha / "env.json").read_text())
        assert env_record["status"] == "ok", env_record.get("error")
        tests = json.loads((results / "tests" / sha / "none" / "summary.json").read_text())
        assert tests["suites"]["inference"]["collected"] == 1 and tests["suites"]["inference"]["failed"] == 0
        c = json.loads((results / "consistency" / sha / "none.json").read_text())
        assert c["status"] == "ok" and c["passed"] is True, c
    print(f"end to end in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    print(json.dumps(probe()))
