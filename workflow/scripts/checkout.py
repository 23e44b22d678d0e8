"""Extract one commit's tree into ``results/checkouts/<sha>/`` with ``git archive``.

    checkout.py --repo REPO --sha SHA --dest results/checkouts/SHA --out results/checkouts/SHA.json

The user's working tree, index and branches are never touched. The tree is extracted into a
temporary directory and renamed into place, and the small JSON marker (the rule's output) is
written last, so an interrupted extraction is never taken for a complete one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def extract(repo: str, sha: str, dest: Path) -> int:
    """Files extracted; raises CalledProcessError when git cannot archive the commit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", sha], capture_output=True, check=True)
        with tempfile.TemporaryFile() as f:
            f.write(archive.stdout)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(tmp, filter="data")
                count = sum(1 for m in tar.getmembers() if m.isfile())
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--sha", required=True)
    ap.add_argument("--dest", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        files = extract(args.repo, args.sha, args.dest)
    except subprocess.CalledProcessError as e:
        print(f"git archive {args.sha} failed in {args.repo}: {e.stderr.decode(errors='replace').strip()}",
              file=sys.stderr)
        return 1
    subject = subprocess.run(["git", "-C", args.repo, "log", "-1", "--format=%s", args.sha],
                             capture_output=True, text=True).stdout.strip()
    harness.write_json(args.out, {"sha": args.sha, "dir": str(args.dest), "files": files, "subject": subject})
    print(f"checkout {args.sha[:12]}: {files} files in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
