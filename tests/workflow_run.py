"""Running the workflow from the tests: the tiny configuration for the fake repository
(tests/fixtures/fake_nsa) and ``snakemake`` from this checkout in a working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

TINY_MODEL = {"dim": 16, "groups": 1, "heads_per_group": 2, "d_k": 8, "d_v": 8, "block_len": 4, "block_stride": 2,
              "sel_block_len": 4, "n_sel": 4, "window": 8}


def tiny_config(fake_repo: dict, **overrides) -> dict:
    cfg = {
        "repo": fake_repo["repo"],
        "variants": {"base": "base", "base-again": "base", "slow": "slow", "broken": "broken"},
        "baseline": "base",
        "device": "cpu",
        "reserve_configs": {"none": {}, "presized": {"NSA_SEL_PACK_RESERVE_N": 64, "NSA_SEL_PACK_RESERVE_L": 128}},
        "model": TINY_MODEL,
        "decode": {"cpu": {"contexts": [16, 32], "steps": 10, "warmup": 2, "rounds": 3, "processes": 2}},
        # batch x seq_len large enough that the loss falls clearly within these few steps (at 2 x 32
        # it wandered around ln(32) and the loss check was a coin toss)
        "train": {"cpu": {"steps": 9, "warmup": 2, "rounds": 3, "processes": 2, "batch": 8, "seq_len": 64, "layers": 1,
                          "vocab": 32, "lr": 0.02}},
        "equivalence": {"cpu": {"batch": 1, "seq_len": 24, "decode_steps": 3}},
        "consistency": {"cpu": {"batch": 1, "seq_len": 24, "prefix": 16, "dtype": "float32"}},
        "suites": {"core": "core_invariants", "selection": "selection_v2"},
        "acceptance": {"bootstrap_resamples": 300},
    }
    cfg.update(overrides)
    return cfg


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]


def snakemake(workdir: Path, *args: str, timeout: int = 300, env=None,
              prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``snakemake`` from this checkout, run in ``workdir`` (which holds config.yaml); ``prefix``
    goes before it (e.g. ``timeout -s INT``, as the SLURM test does)."""
    return subprocess.run([*prefix, *snakemake_cmd(workdir, *args)], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)


def workdir_with(tmp: Path, config) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    (tmp / "config.yaml").write_text(text)
    return tmp
