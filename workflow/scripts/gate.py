"""Exit status from the verdict, for CI: 0 PASS, 1 FAIL, 2 INCOMPLETE (or no readable summary),
3 INCONCLUSIVE (the run's own noise floor was above the tolerance: measure again on a quieter machine).

Usage: gate.py --summary results/summary.json [--allow-incomplete]

INCOMPLETE fails the gate by default: a run where jobs crashed has not shown that the code is
good. ``--allow-incomplete`` lets it through (e.g. on hosts without a GPU for the CUDA suites).
INCONCLUSIVE always fails the gate: nothing was shown either way.

``snakemake gate`` runs this as a job, and Snakemake exits 1 whatever the job's own code; run the
script directly where CI must tell the verdicts apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT = {"PASS": 0, "FAIL": 1, "INCOMPLETE": 2, "INCONCLUSIVE": 3}


def gate_status(verdict: str | None, allow_incomplete: bool = False) -> int:
    if verdict == "INCOMPLETE" and allow_incomplete:
        return 0
    return EXIT.get(verdict, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default="results/summary.json")
    ap.add_argument("--allow-incomplete", action="store_true", help="exit 0 on INCOMPLETE too")
    args = ap.parse_args(argv)
    try:
        s = json.loads(Path(args.summary).read_text())
    except (OSError, ValueError) as e:
        print(f"gate: cannot read {args.summary}: {e}", file=sys.stderr)
        return 2
    verdict = s.get("verdict")
    print(f"verdict: {verdict}")
    for reason in s.get("reasons", []):
        print(f"  - {reason}")
    return gate_status(verdict, args.allow_incomplete)


if __name__ == "__main__":
    sys.exit(main())
