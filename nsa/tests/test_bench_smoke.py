"""``python -m nsa.bench_smoke``'s decode comparison (the numbers come from the GPU run)."""

from __future__ import annotations

import json

from nsa import bench_smoke


def test_decode_ratios_are_each_dense_steps_time_over_nsas_of_the_same_cell():
    def row(layer, ms, mode="graph", batch=1, context=2048):
        return {"layer": layer, "batch": batch, "context": context, "mode": mode, "median_ms": ms}

    rows = [row("nsa", 0.05), row("dense", 0.10), row("dense_gqa", 0.025), row("nsa", 0.2, mode="eager"),
            row("dense", 0.4, mode="eager"), row("dense", 9.0, batch=8)]
    got = {e["mode"]: e for e in bench_smoke.decode_ratios(rows)}
    assert got["graph"] == {"batch": 1, "context": 2048, "mode": "graph", "vs_dense": 2.0, "vs_dense_gqa": 0.5}
    assert got["eager"] == {"batch": 1, "context": 2048, "mode": "eager", "vs_dense": 2.0}  # no dense_gqa row
    assert len(got) == 2  # a cell without an NSA row gives none


def test_bench_smoke_prints_and_keeps_the_ratios(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    result = bench_smoke.main(["--device", "cpu", "--contexts", "48", "--steps", "2", "--warmup", "1",
                               "--skip-prefill", "--json", str(out)])
    med = {r["layer"]: r["median_ms"] for r in result["decode"]}
    (ratio,) = json.loads(out.read_text())["decode_ratios"]
    assert ratio["vs_dense"] == med["dense"] / med["nsa"] and ratio["vs_dense_gqa"] == med["dense_gqa"] / med["nsa"]
    assert f"B=1 ctx    48 eager          dense {ratio['vs_dense']:.2f}x" in capsys.readouterr().out
