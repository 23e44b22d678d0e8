"""Wall time of each job in a Snakemake log (``snakemake ... > log``): where a run's minutes went.

    python tools/job_times.py results/snakemake.log

Snakemake prints a timestamp before it starts a job and before it reports one finished; this pairs
them by job id (``--cores 1``: one job at a time, so the gap is the job's). Per rule: jobs, total and
largest seconds, then all jobs' sum. Snakemake's ``benchmark:`` directive would record the same per
job, but as an output of every rule, so adding it reruns every result a user already has.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from datetime import datetime

STAMP = re.compile(r"^\[(\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
DONE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_times(lines) -> list[tuple[str, str, float]]:
    """(rule, job id, seconds) for every job the log shows finished."""
    stamp, rule, started, out = None, None, {}, []
    for line in lines:
        if m := STAMP.match(line):
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif m := RULE.match(line):
            rule = m.group(1)
        elif (m := JOBID.match(line)) and rule and stamp:
            started[m.group(1)] = (rule, stamp)
        elif (m := DONE.match(line)) and m.group(1) in started and stamp:
            name, t0 = started.pop(m.group(1))
            out.append((name, m.group(1), (stamp - t0).total_seconds()))
    return out


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(args[0], errors="replace") as f:
        times = job_times(f.read().splitlines())
    if not times:
        print(f"no finished jobs in {args[0]}")
        return 1
    per_rule = defaultdict(list)
    for rule, _, s in times:
        per_rule[rule].append(s)
    print(f"{'rule':14s} {'jobs':>4s} {'total s':>8s} {'max s':>6s}")
    for rule, secs in sorted(per_rule.items(), key=lambda kv: -sum(kv[1])):
        print(f"{rule:14s} {len(secs):4d} {sum(secs):8.0f} {max(secs):6.0f}")
    print(f"{'all jobs':14s} {len(times):4d} {sum(s for *_, s in times):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
