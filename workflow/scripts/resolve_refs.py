"""Turn the configured git refs into full commit SHAs (start-up of the workflow).

Every output is keyed by the full SHA, so a branch that moved reruns and one that did not is left
alone. ``repo`` may be a local clone or a URL; a URL is mirrored once under ``results/repos/`` and
fetched at each start-up. Usage: ``python resolve_refs.py REPO REF [REF ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path


class RefError(ValueError):
    """A ref that cannot be turned into a commit, with what to do about it."""


def git(repo, *args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check)


def is_url(repo: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", repo)) or bool(re.match(r"^[\w.-]+@[\w.-]+:", repo))


def local_repo(repo: str, mirrors: Path) -> Path:
    """A local git directory for ``repo``: the path itself, or a mirror of the URL."""
    if not is_url(repo):
        path = Path(repo).expanduser()
        if not path.exists():
            raise RefError(f"config key repo = {repo!r}: no such directory; accepted: a git clone's path or a URL")
        top = git(path, "rev-parse", "--git-dir", check=False)
        if top.returncode != 0:
            raise RefError(f"config key repo = {repo!r} is not a git repository ({top.stderr.strip()})")
        return path
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", repo.rstrip("/").rsplit("/", 1)[-1]) or "repo"
    mirror = Path(mirrors) / f"{slug}-{hashlib.sha1(repo.encode()).hexdigest()[:8]}.git"
    if mirror.exists():
        r = git(mirror, "fetch", "--prune", "origin", "+refs/*:refs/*", check=False)
        if r.returncode != 0:
            # Never measure yesterday's branches silently: say so, and how to use them on purpose.
            raise RefError(f"config key repo = {repo!r}: git fetch failed ({' '.join(r.stderr.split())[-300:]}); the "
                           f"refs fetched earlier are in {mirror}: set repo to that path to use them offline")
    else:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["git", "clone", "--mirror", "--quiet", repo, str(mirror)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RefError(f"config key repo = {repo!r}: git clone failed: {r.stderr.strip()}")
    return mirror


def resolve_ref(repo: Path, ref: str, source: str | None = None) -> str:
    """The full SHA of the commit ``ref`` names in ``repo`` (a mirror of the URL ``source``, if
    given); RefError says how to get a missing one."""
    if ref.startswith("-"):
        raise RefError(f"ref {ref!r} is not a git ref (it starts with '-')")
    r = git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", check=False)
    if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", r.stdout.strip()):
        return r.stdout.strip()
    # A fresh clone has the other branches only as remote-tracking ones (origin/<branch>): take
    # the branch there when exactly one commit answers to that name.
    remote = git(repo, "for-each-ref", "--format=%(objectname)", f"refs/remotes/*/{ref}", check=False).stdout.split()
    if len(set(remote)) == 1:
        return remote[0]
    raise RefError(f"git ref {ref!r} does not name a commit in {source or repo}; {missing_ref_hint(repo, ref, source)}")


def missing_ref_hint(repo: Path, ref: str, source: str | None = None) -> str:
    """What to do about a ref that ``repo`` lacks. For a URL's mirror, commands run in the mirror fix
    nothing (it is fetched whole at each start-up): the ref must reach the URL."""
    shallow = git(repo, "rev-parse", "--is-shallow-repository", check=False).stdout.strip() == "true"
    # A mirror holds every branch and tag of the URL: only a commit in the history can be cut off.
    in_history = bool(re.search(r"[~^@:]", ref) or re.fullmatch(r"[0-9a-f]{4,40}", ref))
    if source and shallow and in_history:
        return (f"{source} serves a shallow history, so its mirror lacks older commits: fetch the full history "
                f"where that URL points (`git fetch --unshallow` there), or set repo to the path of a full clone")
    if source:
        return f"check the spelling, or push it to {source} (the workflow fetches it at each start-up)"
    if shallow:
        hint = f"{repo} is a shallow clone, which may lack it: run `git -C {repo} fetch --unshallow`"
        return hint + (f" (or `git -C {repo} fetch origin {ref}`)" if not re.search(r"[~^@:]", ref) else "")
    return (f"check the spelling, or fetch it: `git -C {repo} fetch origin {ref}` "
            f"(for a branch of a remote: `git -C {repo} fetch origin {ref}:{ref}`)")


def uncommitted_warning(repo, shown: int = 5) -> str | None:
    """A warning when ``repo``'s working tree holds changes no commit has (they are not measured);
    None for a clean tree or a bare mirror."""
    r = git(repo, "status", "--porcelain", check=False)
    changed = r.stdout.splitlines() if r.returncode == 0 else []
    if not changed:
        return None
    paths = ", ".join(line[3:] for line in changed[:shown])
    paths += f" and {len(changed) - shown} more" if len(changed) > shown else ""
    return (f"{repo} has uncommitted changes, which are not measured (refs name commits, never the working "
            f"tree): {paths}; commit them to measure them")


def resolve_variants(repo: Path, variants: dict[str, str], source: str | None = None) -> dict[str, dict]:
    """``{name: ref}`` -> ``{name: {"ref", "sha", "subject"}}``; every failure in one error naming the variants."""
    out, problems = {}, []
    for name, ref in variants.items():
        try:
            sha = resolve_ref(repo, str(ref), source)
            subject = git(repo, "log", "-1", "--format=%s", sha, check=False).stdout.strip()
            out[name] = {"ref": str(ref), "sha": sha, "subject": subject}
        except RefError as e:
            problems.append(f"config key variants.{name}: {e}")
    if problems:
        raise RefError("\n  - ".join(["cannot resolve the variants' refs:"] + problems))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo")
    ap.add_argument("refs", nargs="+")
    ap.add_argument("--mirrors", default="results/repos")
    args = ap.parse_args(argv)
    try:
        repo = local_repo(args.repo, Path(args.mirrors))
        source = args.repo if is_url(args.repo) else None
        print(json.dumps(resolve_variants(repo, {r: r for r in args.refs}, source), indent=1))
    except RefError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
