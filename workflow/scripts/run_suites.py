"""Run one commit's own correctness suites under one reserve configuration.

    run_suites.py --env-json results/env/SHA/env.json --checkout results/checkouts/SHA \
        --suites '{"core": {"args": ["tests/test_core.py", "-k", "decode"], "env": {}, "min_tests": 1}}' \
        --vars '{"NSA_USE_SEL_PACK": 1}' --out results/tests/SHA/none/summary.json --results results

Each suite is one ``pytest <args>`` run from the checkout's root, with the commit's environment,
the configuration's variables and the suite's own ``env``; its junit XML is kept beside the
summary, and the counts come from it. A suite with failing tests, or one that cannot run (crash,
timeout, usage or collection error), makes the record ``"status": "failed"``; one that collects
fewer than ``min_tests`` tests is ``"not_run"``, never "ok". Both carry the log's tail.
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


def suite_result(name: str, suite: dict, rc: int, how: str, junit: Path, junit_rel: str) -> dict:
    """One suite's entry of the summary from pytest's exit code and junit file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    base = {"args": suite["args"], "min_tests": suite["min_tests"]}
    if junit.exists():
        try:
            counts = junit_counts(junit)
        except (ET.ParseError, ValueError) as e:
            return {**base, **counts, "errors": 1, "junit": junit_rel, "status": "failed",
                    "error": f"unreadable junit XML: {e}"}
    collected = sum(counts.values())
    entry = {**base, **counts, "collected": collected, "junit": junit_rel if junit.exists() else None, "status": "ok"}
    if counts["failed"] or counts["errors"]:
        entry.update(status="failed", error=f"{counts['failed']} failed, {counts['errors']} errors")
    elif rc not in (0, NO_TESTS_COLLECTED) or (rc != 0 and not junit.exists()):
        # pytest stopped without a test failing: internal error, usage error (a missing path), crash, timeout.
        entry.update(status="failed", errors=max(counts["errors"], 1), error=f"pytest {how}")
    elif collected < suite["min_tests"]:
        # Collecting nothing is not a pass: the suite did not run (a wrong path, -k or marker).
        entry.update(status="not_run", error=f"collected {collected} test(s), fewer than min_tests={suite['min_tests']}")
    return entry


def run_suites(env_dir: Path, checkout: Path, suites: dict, variables: dict, device: str,
               out_dir: Path, results_root: Path, log: Path, timeout: int) -> dict:
    out = {"status": "ok", "suites": {}, "log_tail": ""}
    failed_tails = []
    for name, suite in suites.items():
        junit = (out_dir / f"{name}.xml").resolve()  # absolute: pytest runs in the checkout
        junit.unlink(missing_ok=True)  # a stale file from an interrupted run must not be counted
        cmd = [harness.env_python(env_dir), "-m", "pytest", *suite["args"], "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
        start = log.stat().st_size if log.exists() else 0
        env = harness.child_env({**variables, **suite.get("env", {})}, device)
        rc, how = harness.run_logged(cmd, log, env, timeout, cwd=checkout)
        entry = suite_result(name, suite, rc, how, junit, os.path.relpath(junit, results_root.resolve()))
        out["suites"][name] = entry
        if entry["status"] != "ok":
            with open(log, errors="replace") as f:
                f.seek(start)
                failed_tails.append(f"--- suite {name} ({entry.get('error')}) ---\n" + harness.log_tail(f.read()))
    failed = {n: s for n, s in out["suites"].items() if s["status"] == "failed"}
    not_run = {n: s for n, s in out["suites"].items() if s["status"] == "not_run"}
    if failed or not_run:
        out["status"] = "failed" if failed else "not_run"
        out["error"] = "; ".join(f"{n}: {s.get('error')}" for n, s in {**failed, **not_run}.items())
        out["log_tail"] = "\n".join(failed_tails) or harness.file_tail(log)
    else:
        out["log_tail"] = harness.file_tail(log, 10)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env-json", type=Path, required=True)
    ap.add_argument("--checkout", type=Path, required=True)
    ap.add_argument("--suites", required=True, help="JSON mapping suite name -> {args, env, min_tests}")
    ap.add_argument("--vars", default="{}", help="JSON mapping of environment variables")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args(argv)
    harness.job_start(args.device)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    env = harness.env_record(args.env_json)
    if env.get("status") != "ok":
        record = harness.failed(f"environment failed: {env.get('error')}", env.get("log_tail", ""), suites={})
    else:
        record = run_suites(Path(env["env_dir"]), args.checkout, json.loads(args.suites),
                            json.loads(args.vars), args.device, args.out.parent, args.results, args.log, args.timeout)
    harness.write_json(args.out, record)
    print(f"tests {args.out}: {record['status']}" + (f" ({record.get('error')})" if record["status"] != "ok" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
