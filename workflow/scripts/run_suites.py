"""Run one commit's own correctness suites under one reserve configuration.

    run_suites.py --env-json results/env/SHA/env.json --checkout results/checkouts/SHA \
        --suites '{"selection_v2": "selection_v2"}' --vars '{"NSA_USE_SEL_PACK": 1}' \
        --out results/tests/SHA/none/summary.json --results results

Each suite is one ``pytest -m <marker>`` in the checkout's test directory, with the commit's
environment and the configuration's variables; its junit XML is kept beside the summary, and the
counts come from it. A suite that cannot run (crash, timeout, collection error) and a suite with
failing tests both make the record ``"status": "failed"`` with the log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NO_TESTS_COLLECTED = 5  # pytest's exit code when the marker selects nothing


def junit_counts(path) -> dict:
    """passed / failed / skipped / errors summed over a junit XML file's test suites."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in total:
            total[k] += int(s.get(k, 0) or 0)
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "skipped": total["skipped"], "errors": total["errors"]}


def suite_result(name: str, marker: str, rc: int, how: str, junit: Path, junit_rel: str) -> dict:
    """One suite's entry of the summary from pytest's exit code and junit file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    if junit.exists():
        try:
            counts = junit_counts(junit)
        except (ET.ParseError, ValueError) as e:
            return {"marker": marker, **counts, "errors": 1, "junit": junit_rel, "status": "failed",
                    "error": f"unreadable junit XML: {e}"}
    entry = {"marker": marker, **counts, "junit": junit_rel if junit.exists() else None, "status": "ok"}
    if rc == NO_TESTS_COLLECTED:
        entry["note"] = f"no test carries the marker {marker!r} in this commit"
    elif not junit.exists():
        entry.update(status="failed", errors=max(counts["errors"], 1), error=f"pytest {how} and wrote no junit XML")
    elif rc != 0 and not (counts["failed"] or counts["errors"]):
        # pytest stopped without a test failing: internal error, usage error, crash or timeout.
        entry.update(status="failed", errors=max(counts["errors"], 1), error=f"pytest {how}")
    elif counts["failed"] or counts["errors"]:
        entry.update(status="failed", error=f"{counts['failed']} failed, {counts['errors']} errors")
    return entry


def run_suites(env_dir: Path, checkout: Path, test_dir: str, suites: dict, variables: dict, device: str,
               out_dir: Path, results_root: Path, log: Path, timeout: int) -> dict:
    out = {"status": "ok", "suites": {}, "log_tail": ""}
    tests_path = checkout / test_dir
    failed_tails = []
    for name, marker in suites.items():
        junit = (out_dir / f"{name}.xml").resolve()  # absolute: pytest runs in the checkout
        junit.unlink(missing_ok=True)  # a stale file from an interrupted run must not be counted
        if not tests_path.is_dir():
            out["suites"][name] = {"marker": marker, "passed": 0, "failed": 0, "skipped": 0, "errors": 1,
                                   "junit": None, "status": "failed",
                                   "error": f"this commit has no {test_dir}/ (config key test_dir)"}
            continue
        cmd = [harness.env_python(env_dir), "-m", "pytest", test_dir, "-m", marker, "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
        start = log.stat().st_size if log.exists() else 0
        rc, how = harness.run_logged(cmd, log, harness.child_env(variables, device), timeout, cwd=checkout)
        entry = suite_result(name, marker, rc, how, junit, os.path.relpath(junit, results_root.resolve()))
        out["suites"][name] = entry
        if entry["status"] != "ok":
            with open(log, errors="replace") as f:
                f.seek(start)
                failed_tails.append(f"--- suite {name} ({entry.get('error')}) ---\n" + harness.log_tail(f.read()))
    bad = {n: s for n, s in out["suites"].items() if s["status"] != "ok"}
    if bad:
        out["status"] = "failed"
        out["error"] = "; ".join(f"{n}: {s.get('error')}" for n, s in bad.items())
        out["log_tail"] = "\n".join(failed_tails) or harness.file_tail(log)
    else:
        out["log_tail"] = harness.file_tail(log, 10)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env-json", type=Path, required=True)
    ap.add_argument("--checkout", type=Path, required=True)
    ap.add_argument("--test-dir", default="nsa/tests")
    ap.add_argument("--suites", required=True, help="JSON mapping suite name -> pytest marker")
    ap.add_argument("--vars", default="{}", help="JSON mapping of environment variables")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args(argv)
    harness.exit_on_sigterm()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    env = harness.env_record(args.env_json)
    if env.get("status") != "ok":
        record = harness.failed(f"environment failed: {env.get('error')}", env.get("log_tail", ""), suites={})
    else:
        record = run_suites(Path(env["env_dir"]), args.checkout, args.test_dir, json.loads(args.suites),
                            json.loads(args.vars), args.device, args.out.parent, args.results, args.log, args.timeout)
    harness.write_json(args.out, record)
    print(f"tests {args.out}: {record['status']}" + (f" ({record.get('error')})" if record["status"] != "ok" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
