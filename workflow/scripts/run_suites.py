"""Run one commit's own correctness suites under one reserve configuration.

    run_suites.py --env-json results/env/SHA/env.json --checkout results/checkouts/SHA \
        --suites '{"core": {"args": ["tests/test_core.py", "-k", "decode"], "env": {}, "min_tests": 1}}' \
        --vars '{"NSA_USE_SEL_PACK": 1}' --out results/tests/SHA/none/summary.json --results results

Each suite is one ``pytest <args>`` run from the checkout's root, with the commit's environment,
the configuration's variables and the suite's own ``env``; its junit XML is kept beside the
summary, and the counts come from it. Marker suites (``[test_dir, -m, EXPR]``) with the same
directory and ``env`` run as one pytest process whose junit file is split by each test's markers.
A suite with failing tests, or one that cannot run (crash, timeout, usage or collection error),
makes the record ``"status": "failed"``; one that collects fewer than ``min_tests`` tests is
``"not_run"``, never "ok". Both carry the log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The plugin that puts each test's marker names into its junit entry (a directory of its own: on
# the commit's PYTHONPATH it must not shadow any module of the commit).
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "pytest_plugin"
PLUGIN = "validation_suite_marks"
sys.path[:0] = [str(Path(__file__).resolve().parent), str(PLUGIN_DIR)]
import harness  # noqa: E402
import validation_suite_marks  # noqa: E402

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


def marker_matcher(expression: str):
    """A function of a test's marker names, true where ``pytest -m expression`` selects the test; for
    expressions of marker names, ``and``/``or``/``not`` and parentheses only (pytest's other forms,
    such as marker arguments, give None and their suite runs in a process of its own)."""
    if not re.fullmatch(r"[\w\s()]*", expression) or not expression.strip():
        return None
    # pytest's -m grammar with these tokens is Python's boolean grammar (same precedence), so each
    # name becomes a lookup and Python parses the rest; nothing but has(), and/or/not and () is eval'd.
    source = " ".join(t if t in ("and", "or", "not", "(", ")") else f"has({t!r})"
                      for t in re.findall(r"\w+|[()]", expression))
    try:
        code = compile(source, "<marker expression>", "eval")
    except SyntaxError:
        return None
    return lambda marks: bool(eval(code, {"__builtins__": {}}, {"has": set(marks).__contains__}))


def batches(suites: dict) -> list[list[str]]:
    """The suites' names grouped into pytest processes: marker suites (``[path, -m, EXPR]`` with a plain
    expression) on the same path with the same ``env`` share one; every other suite runs alone.
    Each pytest start imports torch and collects the whole test directory again (about 3 s on a
    2-core CPU, more with CUDA), and the default config runs four marker suites per job."""
    groups: dict = {}
    for name, suite in suites.items():
        args = suite["args"]
        if len(args) == 3 and args[1] == "-m" and marker_matcher(args[2]) is not None:
            key = ("markers", args[0], json.dumps(suite.get("env", {}), sort_keys=True))
        else:
            key = ("alone", name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def case_markers(case) -> list[str] | None:
    """A junit testcase's marker names as the plugin recorded them; None where it recorded none (a
    collection error: it belongs to every suite of the run)."""
    for prop in case.iter("property"):
        if prop.get("name") == validation_suite_marks.PROPERTY:
            return (prop.get("value") or "").split()
    return None


def split_junit(combined: Path, matchers: dict, junits: dict) -> dict:
    """Write each suite's junit file (``junits[name]``) with the combined run's testcases that its marker
    expression selects; returns each suite's failed + errors count."""
    cases = list(ET.parse(combined).getroot().iter("testcase"))
    bad = {}
    for name, match in matchers.items():
        picked = [c for c in cases if (marks := case_markers(c)) is None or match(marks)]
        counts = {k: sum(c.find(tag) is not None for c in picked)
                  for k, tag in (("failures", "failure"), ("errors", "error"), ("skipped", "skipped"))}
        root = ET.Element("testsuites")
        suite = ET.SubElement(root, "testsuite", name=name, tests=str(len(picked)),
                              time=f"{sum(float(c.get('time') or 0) for c in picked):.3f}",
                              **{k: str(v) for k, v in counts.items()})
        suite.extend(picked)
        ET.ElementTree(root).write(junits[name], encoding="utf-8", xml_declaration=True)
        bad[name] = counts["failures"] + counts["errors"]
    return bad


def run_pytest(env_dir: Path, checkout: Path, args: list[str], junit: Path, variables: dict, device: str,
               log: Path, timeout: int, plugin: bool = False) -> tuple[int, str]:
    junit.unlink(missing_ok=True)  # a stale file from an interrupted run must not be counted
    cmd = [harness.env_python(env_dir), "-m", "pytest", *args, "-q", "-rfEs",
           "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    if plugin:
        cmd += ["-p", PLUGIN]
    env = harness.child_env(variables, device, extra_path=str(PLUGIN_DIR) if plugin else None)
    return harness.run_logged(cmd, log, env, timeout, cwd=checkout)


def run_suites(env_dir: Path, checkout: Path, suites: dict, variables: dict, device: str,
               out_dir: Path, results_root: Path, log: Path, timeout: int) -> dict:
    out = {"status": "ok", "suites": {}, "log_tail": ""}
    failed_tails = []
    for batch in batches(suites):
        # absolute junit paths: pytest runs in the checkout
        junits = {name: (out_dir / f"{name}.xml").resolve() for name in batch}
        first = suites[batch[0]]
        start = log.stat().st_size if log.exists() else 0
        job_vars = {**variables, **first.get("env", {})}
        if len(batch) == 1:
            rc, how = run_pytest(env_dir, checkout, first["args"], junits[batch[0]], job_vars, device, log, timeout)
            rcs = {batch[0]: rc}
        else:
            matchers = {name: marker_matcher(suites[name]["args"][2]) for name in batch}
            expression = " or ".join(f"({suites[name]['args'][2]})" for name in batch)
            combined = (out_dir / "combined.xml").resolve()
            for junit in junits.values():
                junit.unlink(missing_ok=True)
            rc, how = run_pytest(env_dir, checkout, [first["args"][0], "-m", expression], combined, job_vars,
                                 device, log, timeout, plugin=True)
            rcs = dict.fromkeys(batch, rc)
            if combined.exists():
                bad = split_junit(combined, matchers, junits)
                combined.unlink()
                if rc in (0, 1, NO_TESTS_COLLECTED):
                    # the run ended normally: each suite's own tests decide, as in a run of its own
                    rcs = {name: 1 if bad[name] else 0 for name in batch}
        for name in batch:
            junit = junits[name]
            entry = suite_result(name, suites[name], rcs[name], how, junit,
                                 os.path.relpath(junit, results_root.resolve()))
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
