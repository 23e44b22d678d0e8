"""``python -m nsa.bench_prefill`` end to end on a small layer (the numbers come from the GPU run)."""

from __future__ import annotations

import json

from nsa import bench_prefill


def test_bench_prefill_times_every_variant_and_pass(tmp_path):
    out = tmp_path / "prefill.json"
    result = bench_prefill.main(["--tiny", "--device", "cpu", "--lengths", "40", "96", "--reps", "1",
                                 "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["variant"], r["pass"], r["T"]): r for r in result["rows"]}
    assert set(rows) == {(v, p, T) for v in ("nsa_layer", "nsa_projections", "dense_sdpa") for p in ("fwd", "fwd+bwd")
                         for T in (40, 96)}
    for row in rows.values():
        assert "error" not in row and row["n"] == 1 and row["median_ms"] > 0
        assert row["peak_bytes"] is None and row["own_peak_bytes"] is None  # CUDA's allocator counts them
    # What each variant owns, counted once: dense SDPA its q, k, v (4 heads, 2 groups, d 16, float32).
    assert rows[("dense_sdpa", "fwd", 40)]["input_bytes"] == (4 + 2 + 2) * 40 * 16 * 4
    layer_params = sum(p.numel() for p in bench_prefill.NSAAttention(bench_prefill.NSAConfig(**bench_prefill.TINY_CFG))
                       .parameters()) * 4
    assert rows[("nsa_layer", "fwd+bwd", 96)]["input_bytes"] == 96 * 64 * 4 + layer_params
    # The targets' terms: dense's median over the layer's, per length and pass (no memory on a CPU).
    ratio = {(e["T"], e["pass"]): e for e in result["ratios"] if e["variant"] == "nsa_layer"}
    assert set(ratio) == {(T, p) for T in (40, 96) for p in ("fwd", "fwd+bwd")}
    e = ratio[(96, "fwd+bwd")]
    assert e["speedup_vs_dense"] == rows[("dense_sdpa", "fwd+bwd", 96)]["median_ms"] / rows[("nsa_layer", "fwd+bwd", 96)]["median_ms"]
    assert "memory_vs_dense" not in e and "speedup_vs_fla" not in e


def test_bench_prefill_records_a_failing_variant_and_skips_it_later(monkeypatch):
    def broken(*args, **kwargs):
        out = real(*args, **kwargs)

        def fail():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB. GPU 0 has ... (simulated)")

        return {**out, "nsa_layer": (out["nsa_layer"][0], fail, out["nsa_layer"][2])}

    import torch

    real = bench_prefill.variants
    monkeypatch.setattr(bench_prefill, "variants", broken)
    rows = bench_prefill.main(["--tiny", "--device", "cpu", "--lengths", "40", "64", "--reps", "1"])["rows"]
    bad = [r for r in rows if (r["variant"], r["pass"]) == ("nsa_layer", "fwd+bwd")]
    assert [r["error"] for r in bad] == ["out of memory (tried to allocate 128.00 GiB)", "skipped: failed at a shorter length"]
    assert all("error" not in r and r["n"] == 1 for r in rows if r not in bad)


def test_bench_prefill_only_some_variants_with_progress_and_a_json_per_length(tmp_path, capsys, monkeypatch):
    out = tmp_path / "prefill.json"
    seen = []
    real_write = bench_prefill.write_json

    def write(path, result):  # what a run stopped after the first length would have left
        real_write(path, result)
        seen.append(json.loads(out.read_text()))

    monkeypatch.setattr(bench_prefill, "write_json", write)
    result = bench_prefill.main(["--tiny", "--device", "cpu", "--lengths", "40", "64", "--reps", "1",
                                 "--only", "dense_sdpa", "nsa_layer_eager_elementwise", "--json", str(out)])
    assert {r["variant"] for r in result["rows"]} == {"dense_sdpa"} and len(result["rows"]) == 4
    assert [(len(s["rows"]), s["complete"]) for s in seen] == [(2, False), (4, True)]
    printed = capsys.readouterr().out
    assert printed.count("first timed call") == 4 and printed.count("median") == 4
    # a GPU-only variant, said per length
    assert printed.count("not available here: nsa_layer_eager_elementwise") == 2


def test_ratios_compare_each_nsa_variant_with_dense_and_fla_of_the_same_length():
    def row(variant, what, ms, own, T=64):
        return {"variant": variant, "pass": what, "T": T, "median_ms": ms, "own_peak_bytes": own}

    rows = [row("nsa_layer", "fwd+bwd", 200.0, 12), row("dense_sdpa", "fwd+bwd", 400.0, 8),
            row("fla_parallel_nsa", "fwd+bwd", 100.0, 4),
            row("nsa_layer_eager_elementwise", "fwd+bwd", 250.0, None),
            row("nsa_projections", "fwd+bwd", 10.0, 1), row("dense_sdpa", "fwd+bwd", 1.0, 1, T=32),
            {"variant": "nsa_layer", "pass": "fwd", "T": 64, "error": "out of memory"}]
    got = {e["variant"]: e for e in bench_prefill.ratios(rows, 64)}
    assert set(got) == {"nsa_layer", "nsa_layer_eager_elementwise"}  # no projections, no failed pass, no other length
    # attention alone: fla's 100 ms over the layer's 200 less the projections' 10
    assert got["nsa_layer"] == {"T": 64, "variant": "nsa_layer", "pass": "fwd+bwd", "speedup_vs_dense": 2.0,
                                "memory_vs_dense": 1.5, "speedup_vs_fla": 0.5,
                                "attention_speedup_vs_fla": 100.0 / 190.0}
    assert got["nsa_layer_eager_elementwise"] == {"T": 64, "variant": "nsa_layer_eager_elementwise",
                                                  "pass": "fwd+bwd", "speedup_vs_dense": 1.6, "speedup_vs_fla": 0.4,
                                                  "attention_speedup_vs_fla": 100.0 / 240.0}
    assert bench_prefill._ratio_line(got["nsa_layer"]).endswith(
        "2.00x dense's speed, 1.50x its memory, 0.50x fla's speed, attention alone (less nsa_projections) 0.53x fla's")
    # without the projections in the run, no attention ratio
    bare = {e["variant"]: e for e in bench_prefill.ratios([r for r in rows if r["variant"] != "nsa_projections"], 64)}
    assert "attention_speedup_vs_fla" not in bare["nsa_layer"] and bare["nsa_layer"]["speedup_vs_fla"] == 0.5


def test_bench_prefill_refuses_an_unknown_variant(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench_prefill.main(["--tiny", "--device", "cpu", "--only", "dense", "nsa_layer"])
    assert "--only dense: no such variant; accepted: nsa_layer, nsa_layer_eager_elementwise" in capsys.readouterr().err


def test_a_call_counts_its_own_allocations_after_every_gradient_is_dropped(monkeypatch):
    """On CUDA: the peak above what was allocated before the call, with leftover gradients dropped
    first (the allocator's counters are stand-ins here)."""
    import types

    import torch

    counters = {"allocated": 100, "peak": 350}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: counters["peak"])
    leaf = torch.zeros(3, requires_grad=True)
    leaf.grad = torch.ones(3)
    seen = []
    ms, peak, extra = bench_prefill._call(lambda: seen.append(leaf.grad), lambda fn: fn() or 1.5,
                                          types.SimpleNamespace(type="cuda"), [leaf])
    assert (ms, peak, extra) == (1.5, 350, 250) and seen == [None]
