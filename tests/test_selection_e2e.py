"""End to end on the real ``nsa`` package: a commit that flips the sign of the selection scores must
FAIL in equivalence, with the correctness suites switched off (issue: "equivalence that can see
selection"). The lengths compared hold more selection blocks than ``n_sel``, so the selection must
choose, and the selected block indices are compared as well as the outputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import git

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"dim": 32, "groups": 1, "heads_per_group": 2, "d_k": 8, "d_v": 8, "block_len": 4, "block_stride": 2,
         "sel_block_len": 4, "n_sel": 5, "window": 8}


@pytest.fixture(scope="module")
def flipped_repo(tmp_path_factory) -> dict:
    repo = tmp_path_factory.mktemp("nsa-flip") / "nsa"
    repo.mkdir()
    shutil.copytree(ROOT / "nsa", repo / "nsa", ignore=shutil.ignore_patterns("__pycache__", "tests"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, repo / name)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "nsa as it is")
    selection = repo / "nsa" / "ops" / "selection.py"
    text = selection.read_text()
    assert text.count("    return per_group @ overlap\n") == 1
    selection.write_text(text.replace("    return per_group @ overlap\n", "    return -(per_group @ overlap)\n"))
    git(repo, "commit", "-q", "-am", "flip the sign of the selection scores")
    return {"repo": str(repo), "base": git(repo, "rev-parse", "HEAD~1"), "flipped": git(repo, "rev-parse", "HEAD")}


@pytest.mark.workflow
def test_a_flipped_selection_fails_equivalence_without_any_suite(flipped_repo, tmp_path):
    cfg = {
        "repo": flipped_repo["repo"], "device": "cpu", "suites": {},
        "variants": {"base": "HEAD~1", "flipped": "HEAD"}, "baseline": "base",
        "reserve_configs": {"none": {}}, "common_env": {}, "model": MODEL,
        "decode": {"cpu": {"contexts": [32], "steps": 3, "warmup": 1, "rounds": 2, "processes": 2}},
        "train": {"cpu": {"steps": 2, "warmup": 1, "rounds": 2, "processes": 2, "batch": 1, "seq_len": 32,
                          "layers": 1, "vocab": 32, "lr": 0.01}},
        "equivalence": {"cpu": {"batch": 1, "seq_len": 48, "decode_steps": 4}},
        "consistency": {"cpu": {"batch": 1, "seq_len": 48, "prefix": 40, "dtype": "float32"}},
        "acceptance": {"bootstrap_resamples": 200},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                           str(tmp_path), "--cores", "2", "all"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["verdict"] == "FAIL", summary["reasons"]
    failed = {c["id"] for c in summary["acceptance"] if c["status"] == "fail"}
    assert {"equivalence", "blocks"} <= failed, summary["acceptance"]  # outputs and selected blocks
    assert any("flipped" in r for r in summary["reasons"]), summary["reasons"]
    # Within each commit decode still equals forward: the flip is a change, not an inconsistency.
    for sha in (flipped_repo["base"], flipped_repo["flipped"]):
        rec = json.loads((tmp_path / "results" / "consistency" / sha / "none.json").read_text())
        assert rec["passed"] is True, rec
