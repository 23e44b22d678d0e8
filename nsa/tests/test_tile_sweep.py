"""``tools/tile_sweep.py --smoke``: the sweep's plumbing (option functions swapped and restored,
outputs compared with the library's choice) on CPU under Triton's interpreter; the timings that
matter come from the GPU (``tools/gpu_session.sh sweep``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tile_sweep_smoke_compares_each_candidate_with_the_library(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "tile_sweep.py"), "--smoke", "--only", "compressed",
                           "scoring", "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["family"], r["candidate"] == "library") for r in rows} == {
        ("compressed", True), ("compressed", False), ("scoring", True), ("scoring", False)}
    for r in rows:
        assert "error" not in r, r
        assert set(r["ms"]) == ({"forward", "backward"} if r["family"] == "compressed" else {"scores"})
        assert r["max_diff"] < 1e-5  # another tiling of the same float32 sums
    assert "compressed at T=64: library forward" in proc.stdout
