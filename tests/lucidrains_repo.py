"""A local git repository of lucidrains' native-sparse-attention-pytorch, built from PyPI sdists, and
throwaway virtual environments to install it into.

CI reaches PyPI but not GitHub, so the workflow's tests cannot clone the project. Each release's sdist
holds its whole source tree (package, tests, pyproject.toml), so committing two of them, one after the
other, gives a repository with real commits and the release tags configs/lucidrains.yaml names.
The sdist's data/enwik8.gz (36 MB of training text no test reads) is left out of the commits.

    python tests/lucidrains_repo.py DEST     # builds DEST/native-sparse-attention-pytorch (~1 MB), prints its path
    python tests/lucidrains_repo.py DEST fla-core 0.6.0    # another distribution, its versions in order
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DISTRIBUTION = "native-sparse-attention-pytorch"
# Both sides of the 0.2.0 rename of the compression parameters (see configs/lucidrains.yaml).
VERSIONS = ("0.1.27", "0.2.3")
LEFT_OUT = ("data/enwik8.gz",)


class Unavailable(RuntimeError):
    """PyPI (or pip) could not give what was asked; tests skip with this message."""


def _git(repo: Path, *args: str, date: int | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "pypi-sdist", "GIT_AUTHOR_EMAIL": "sdist@example.com",
           "GIT_COMMITTER_NAME": "pypi-sdist", "GIT_COMMITTER_EMAIL": "sdist@example.com"}
    if date is not None:  # the sdist's file time (hatchling writes 2020-02-02): the same SHAs on every build
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{date} +0000"
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def download_sdist(version: str, dest: Path, distribution: str = DISTRIBUTION, timeout: int = 300) -> Path:
    """``pip download`` of one release's sdist into ``dest``; raises ``Unavailable`` when pip cannot."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-d", str(dest), f"{distribution}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"pip download {distribution}=={version}: no answer in {timeout} s") from exc
    found = sorted(dest.glob(f"{distribution.replace('-', '_')}-{version}.tar.gz"))
    if proc.returncode or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"pip download {distribution}=={version} failed: {tail[0]}")
    return found[0]


def _unpack_into(sdist: Path, repo: Path) -> int:
    """Replace the repository's work tree (all but .git) with the sdist's top folder; returns the
    newest file time in the sdist."""
    for child in repo.iterdir():
        if child.name != ".git":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/" in m.name and (m.isfile() or m.isdir())]
        newest = max(int(m.mtime) for m in members)
        for member in members:
            rel = member.name.split("/", 1)[1]
            if not rel or rel in LEFT_OUT:
                continue
            target = repo / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return newest


def build_repo(root: Path, versions=VERSIONS, distribution: str = DISTRIBUTION) -> dict:
    """``root/<distribution>``: one commit per release, in order, each tagged with its version (any
    project whose sdist holds its source tree works: tests/test_adapter_fla.py uses fla-core).
    Returns ``{"repo": path, version: full SHA, ...}``. Raises ``Unavailable`` without PyPI."""
    repo = Path(root) / distribution
    out = {"repo": str(repo)}
    with tempfile.TemporaryDirectory(prefix="sdists-") as tmp:  # 36 MB each: not kept
        sdists = [download_sdist(v, Path(tmp), distribution) for v in versions]
        repo.mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
        for version, sdist in zip(versions, sdists):
            date = _unpack_into(sdist, repo)
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "-m", f"{distribution} {version} (PyPI sdist)", date=date)
            _git(repo, "tag", version)
            out[version] = _git(repo, "rev-parse", "HEAD")
    return out


def make_venv(path: Path, *requirements: str, timeout: int = 600) -> Path:
    """A throwaway venv at ``path`` that sees this interpreter's packages (torch) through a .pth file and
    has ``requirements`` pip-installed into itself only. Returns its python. Raises ``Unavailable``."""
    path = Path(path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                         capture_output=True, text=True).stdout.strip()
    Path(own, "_host_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    if requirements:
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check",
               *requirements]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"pip install {' '.join(requirements)}: no answer in {timeout} s") from exc
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip install {' '.join(requirements)} failed: {tail[0]}")
    return python


def main(argv: list[str]) -> int:
    if not argv:
        print("\n".join(__doc__.strip().splitlines()[-2:]), file=sys.stderr)
        return 2
    dest, rest = Path(argv[0]), argv[1:]
    repo = build_repo(dest, tuple(rest[1:]), distribution=rest[0]) if len(rest) >= 2 else build_repo(dest)
    print(repo["repo"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
