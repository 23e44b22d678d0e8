"""Check at start-up that every pytest marker a suite selects (``-m EXPR``) is one the commits know.

``pytest -m core_invariant`` (a typo) selects nothing, so the suite would end as "not run" or
worse, be blamed on the commit. Before any job, each marker name in a suite's ``-m`` expression
must appear as a word in at least one commit under test (``git grep -w``: decorators, a
registered ``markers`` list, a conftest that adds it). A marker that only the newer commits know
is fine: the older ones report the suite as not run.
"""

from __future__ import annotations

import re

import resolve_refs

OPERATORS = {"and", "or", "not"}
# pytest's own marks, never a suite of anyone's
BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def marker_expressions(args: list[str]) -> list[str]:
    """The ``-m`` expressions in a suite's pytest arguments (``-m EXPR``, ``-mEXPR``, ``-m=EXPR``)."""
    out = []
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith("-m") and len(arg) > 2 and not arg.startswith("--"):
            out.append(arg[2:].lstrip("="))
    return out


def marker_names(expression: str) -> list[str]:
    """The marker names in a ``-m`` expression (``gpu and not slow`` -> gpu, slow)."""
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression)
    return [w for w in dict.fromkeys(words) if w not in OPERATORS]


def commit_mentions(repo, sha: str, word: str) -> bool:
    return resolve_refs.git(repo, "grep", "-q", "-w", "-F", "-e", word, sha, "--", check=False).returncode == 0


def markers_used(repo, sha: str) -> set[str]:
    """``pytest.mark.<name>`` names in a commit (what the message offers instead)."""
    r = resolve_refs.git(repo, "grep", "-h", "-o", "-E", r"mark\.[A-Za-z_][A-Za-z0-9_]*", sha, "--", "*.py",
                         check=False)
    return {m.split(".", 1)[1] for m in r.stdout.split()} - BUILTIN_MARKS


def marker_problems(repo, shas: list[str], suites: dict) -> list[str]:
    """One line per suite marker that no commit under test knows, naming the key and the markers used.

    ``suites`` as config_check.normalized_suites gives them: ``{name: {"args": [...], ...}}``."""
    problems = []
    for name, suite in suites.items():
        for expression in marker_expressions(suite["args"]):
            unknown = [m for m in marker_names(expression) if not any(commit_mentions(repo, s, m) for s in shas)]
            if unknown:
                used = sorted(set().union(*(markers_used(repo, s) for s in shas)))
                problems.append(f"config key suites.{name}: the pytest marker {', '.join(unknown)} (in -m "
                                f"{expression!r}) appears in none of the commits under test; accepted: a marker "
                                f"they use: {', '.join(used) or 'none found'}")
    return problems
