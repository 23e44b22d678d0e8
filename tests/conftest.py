"""Shared setup for the workflow's tests (tests/): markers, and a throwaway git repository of a
tiny fake ``nsa`` (tests/fixtures/fake_nsa) with three commits the workflow can check out."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fake_nsa"
# The fake package's own suites run inside the workflow (against the fake), never in this session.
collect_ignore_glob = ["fixtures/*"]


def pytest_configure(config):
    # Also in pyproject.toml; registered here too so these tests run under any rootdir.
    config.addinivalue_line("markers", "workflow: runs the Snakemake workflow end to end")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def make_fake_repo(root: Path) -> dict[str, str]:
    """A git repo with tags ``base`` (correct), ``slow`` (decode sleeps 3 ms per step: a real
    regression) and ``broken`` (pyproject.toml unparsable: the install fails). Returns tag -> SHA."""
    repo = root / "fake-nsa"
    shutil.copytree(FIXTURE, repo, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "fake nsa")
    git(repo, "tag", "base")
    core = repo / "nsa" / "core.py"
    core.write_text(core.read_text().replace("DECODE_DELAY_S = 0.0", "DECODE_DELAY_S = 0.003"))
    git(repo, "commit", "-q", "-am", "slower decode")
    git(repo, "tag", "slow")
    (repo / "pyproject.toml").write_text("[project\nname = ")
    git(repo, "commit", "-q", "-am", "break the build")
    git(repo, "tag", "broken")
    return {"repo": str(repo), **{t: git(repo, "rev-parse", t) for t in ("base", "slow", "broken")}}


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory) -> dict[str, str]:
    return make_fake_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def e2e(fake_repo, tmp_path_factory) -> dict:
    """One undisturbed run of the tiny configuration (~1 minute on 2 cores), shared by the tests
    that read its results (test_workflow.py) and those that compare a disturbed run with it."""
    from workflow_run import snakemake, tiny_config, workdir_with

    work = workdir_with(tmp_path_factory.mktemp("e2e"), tiny_config(fake_repo))
    t0 = time.monotonic()
    proc = snakemake(work, "--cores", "2", "all", timeout=600)
    return {"work": work, "proc": proc, "seconds": time.monotonic() - t0, "repo": fake_repo}
