"""After a run: the failures it recorded, and the command that runs them again.

A harness job that fails (an install error, a crash, a timeout) still writes its output, a record
with ``"status": "failed"``, so that one bad commit never stops the others and the report can
show why. Snakemake sees that output and never reruns the job by itself; ``--forcerun`` with the
record's path does (and reruns what depends on it). A job that died without writing its output
(Ctrl-C, a kill, a full disk) is different: a plain rerun of the same command runs it again.
"""

from __future__ import annotations

import json
from pathlib import Path


def _failed(rec: dict) -> bool:
    # "environment failed" is the consequence of a failed env.json: forcing that one reruns these too.
    return rec.get("status") == "failed" and not str(rec.get("error", "")).startswith("environment failed")


def failed_records(paths) -> list[str]:
    """The records among ``paths`` (JSON outputs of the harness) that hold a failure of their own."""
    out = []
    for path in paths:
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        runs = rec.get("runs") if isinstance(rec, dict) else None
        if isinstance(rec, dict) and (_failed(rec) or any(_failed(r) for r in runs or [] if isinstance(r, dict))):
            out.append(str(path))
    return out


def rerun_hint(paths) -> str | None:
    """The lines to print after a finished run with recorded failures; None when there are none."""
    failed = failed_records(paths)
    if not failed:
        return None
    return (f"{len(failed)} job(s) recorded a failure (shown in the report); a plain rerun keeps these records. "
            f"To run them again, add to the same command:\n    --forcerun {' '.join(failed)}")


ON_ERROR = ("A job stopped without writing its output (its log is named above): rerun the same command to run "
            "it again; the jobs that finished are kept.")
